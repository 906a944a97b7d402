//! The command line: `cella audit …` for now (`serve`, `worker`, … come with the service issue).

mod audit;
mod audit_bench;

use clap::{Parser, Subcommand};

pub use audit::AuditCommand;

/// Cella: multi-tenant compliance scanning in one-tenant microVMs.
#[derive(Debug, Parser)]
#[command(name = "cella", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The audit log: export, verify offline, prove inclusion, manage signing keys, benchmark.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Everything a command can fail with; `main` maps each to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    VerificationFailed(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Key(#[from] cella_audit::keys::KeyError),
    #[error("{path}")]
    File { path: String, source: std::io::Error },
    #[error("not a Cella audit bundle or proof")]
    Bundle(#[from] cella_audit::bundle::BundleError),
    #[error("cannot reach the database")]
    Database(#[from] sqlx::Error),
    #[error("export failed")]
    Export(#[from] cella_audit::export::ExportError),
    #[error("audit store")]
    Store(#[from] cella_audit::store::StoreError),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Audit(cmd) => audit::run(cmd),
    }
}
