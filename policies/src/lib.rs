//! Cella's policies as data: compliance rule packs, per-thread seccomp filters, and jailer and
//! tenant resource defaults; and baselines (`baseline.rs`: the known findings a scan suppresses,
//! read from a baseline file or an earlier SARIF log), the host side of which the service reuses.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod rules;
pub mod seccomp;
