//! `cella`: the HTTPS API, tenants and keys, the PostgreSQL job queue, workers, the admin API,
//! metrics and the command-line client. It owns everything a user touches; VMs are run by
//! `cella-vmm` (through `cella-jailer`), and the audit log's mechanics live in `cella-audit`.
//!
//! - [`serve`]: `cella serve` (data folder, private PostgreSQL [`postgres`], TLS [`tls`],
//!   migrations, admin credential, audit checkpointer, API [`api`] over [`server`], a worker).
//! - [`jobs`] (tenant side) and [`queue`] (worker side) over the `jobs` table; [`tenants`] for
//!   tenants and keys; [`worker`] leases and runs jobs; [`audit_log`] appends their events;
//!   [`janitor`] purges jobs past their retention and removes files a crash left behind;
//!   [`packs`] keeps tenants' own rule packs and resolves the policy a job or session runs.
//! - [`sessions`]: long-lived session VMs (pause, suspend to a snapshot, resume, connect, exec,
//!   terminate), their manager in `serve` and the reaper that enforces idle and maximum times.
//! - [`client`] and [`cli`]: the command line (`cella scan`, `cella session …`, `cella tenant …`,
//!   `cella audit …`).
#![deny(unsafe_code)]

pub mod api;
pub mod audit_log;
pub mod baselines;
pub mod cli;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod db;
pub mod error;
pub mod files;
pub mod ids;
pub mod janitor;
pub mod jobs;
pub mod license_policy;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod packs;
pub mod postgres;
pub mod queue;
pub mod quotas;
pub mod serve;
pub mod server;
pub mod sessions;
pub mod signal;
pub mod spares;
pub mod tenants;
pub mod tls;
pub mod worker;
