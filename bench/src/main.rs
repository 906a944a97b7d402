//! `cella-bench`: Cella's benchmarks, each printing its figures side by side with what it is
//! measured against, in the same run (this machine is noisy and shared). They run on demand,
//! never in the test suite, and live here so that no production binary carries them: `cella`,
//! `cella-vmm` and `cella-jailer` have no benchmark code. The binaries measured are the ones
//! next to this one (`target/release/`, built by `scripts/setup.sh`).
#![forbid(unsafe_code)]

mod audit;
mod binaries;
mod jailer;
mod service;
mod sessions;
pub(crate) mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit statuses of the VMM benchmarks: the VMM's own (`cella-vmm --help`).
mod exit_code {
    pub use cella_abi::exit::{BAD_INPUT, VMM_FAILED};
}

#[derive(Debug, Parser)]
#[command(
    name = "cella-bench",
    version,
    about = "Cella's benchmarks (run on demand; not part of the test suite)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The VMM: launch, scan throughput, tenant packs, pause, sessions, spares and templates
    #[command(subcommand)]
    Vm(vm::BenchCommand),
    /// Launch-to-exit latency of `hello`: jailed vs unjailed Cella VM vs bwrap, with the
    /// jailer's cost broken down by step (root)
    Jailer(jailer::BenchArgs),
    /// End-to-end jobs/s and latency through `cella serve` vs `cella-vmm scan` directly, and the
    /// queue alone (DATABASE_URL)
    Service(service::BenchArgs),
    /// A session back from pause against back from disk (suspend, then connect), through the
    /// API to the first exec answer (DATABASE_URL)
    Sessions(sessions::SessionsBenchArgs),
    /// Audit log appends (DATABASE_URL, in a scratch database) and offline verification
    Audit(audit::BenchArgs),
}

fn main() -> ExitCode {
    // The services a benchmark starts log through `tracing`; unless asked, nothing prints them
    // (a failed template, for one, only shows as slower figures).
    if std::env::var_os("CELLA_BENCH_LOG").is_some() {
        tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_writer(std::io::stderr).init();
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("cella-bench {what}: error: {e}");
        ExitCode::FAILURE
    };
    match Cli::parse().command {
        Command::Vm(cmd) => vm::main(cmd),
        Command::Jailer(args) => {
            jailer::main(args).map_or_else(|e| failed("jailer", &e), |()| ExitCode::SUCCESS)
        }
        Command::Service(args) => {
            service::run(args).map_or_else(|e| failed("service", &e), |()| ExitCode::SUCCESS)
        }
        Command::Sessions(args) => {
            sessions::run(args).map_or_else(|e| failed("sessions", &e), |()| ExitCode::SUCCESS)
        }
        Command::Audit(args) => audit::run(args).map_or_else(|e| failed("audit", &e), |()| ExitCode::SUCCESS),
    }
}
