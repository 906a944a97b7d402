//! The command line: the service (`serve`, `worker`), the client (`scan`, `job`, `session`, `pack`), operators
//! (`tenant`, `key`, `admin`) and the audit log (`audit`).

mod audit;
mod service;

use clap::{Parser, Subcommand};

pub use audit::AuditCommand;

use crate::client::admin::{AdminCommand, JobCommand, KeyCommand, TenantCommand};
use crate::client::pack::PackCommand;
use crate::client::scan::ScanArgs;
use crate::client::session::SessionCommand;
use crate::client::ClientError;

const EXIT_STATUS: &str = "Exit status:
  0  success (cella scan: no finding at or above --fail-on)
  1  cella scan: findings at or above --fail-on; cella audit verify/prove: verification failed, or
     passed only against the file's own keys (--insecure-trust-bundle-keys: UNTRUSTED); cella pack
     test: a rule of the pack found nothing in the samples
  2  bad command line, file or key (cella audit verify/prove without a trusted key; cella pack test:
     the pack is refused, the message says where)
  3  database, service start-up or server-side failure
  4  cella scan: the job failed or was cancelled; cella session create: the session failed to start;
     cella pack test: the local scan failed
  5  cannot reach the server, or it refused the request
  6  cella scan: the job was still queued or running when --wait-secs ran out (it goes on)";

/// Cella: multi-tenant compliance scanning in one-tenant microVMs.
#[derive(Debug, Parser)]
#[command(name = "cella", version, about, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: HTTPS API, private PostgreSQL (without DATABASE_URL), audit checkpoints, a worker
    Serve(service::ServeArgs),
    /// Run a worker against the service's database (DATABASE_URL, or the private one of --data-dir)
    Worker(service::WorkerArgs),
    /// Scan a folder or file on the server and print its findings (needs CELLA_API_KEY)
    Scan(ScanArgs),
    /// Your jobs (needs CELLA_API_KEY)
    #[command(subcommand)]
    Job(JobCommand),
    /// Baselines of known findings, so a scan reports only new ones (needs CELLA_API_KEY)
    #[command(subcommand)]
    Baseline(crate::client::baseline::BaselineCommand),
    /// Your sessions: a VM that keeps an artifact indexed for up to 8 h; pause, suspend, resume, exec (needs CELLA_API_KEY)
    #[command(subcommand)]
    Session(SessionCommand),
    /// Your own rule packs (Cella TOML or gitleaks configurations), versioned; your default policy; test a pack locally
    #[command(subcommand)]
    Pack(PackCommand),
    /// Operators: tenants
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Operators: tenants' API keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Operators: workers, VMs, any job, any audit log
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print the API's OpenAPI 3.1 document
    Openapi,
    /// The audit log: export, verify offline, prove inclusion, manage signing keys.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Everything a command can fail with; `main` maps each to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    VerificationFailed(String),
    /// Every check passed, but against keys that came with the file (already reported).
    #[error("checked only against the keys inside the file")]
    Untrusted,
    #[error("{0} finding(s) at or above the --fail-on level")]
    FindingsAtThreshold(usize),
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
    #[error("cella serve")]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Service(#[from] crate::error::ServiceError),
    #[error("{0}")]
    JobDidNotSucceed(String),
    #[error("{0}")]
    StillRunning(String),
    /// `cella pack test`: rules of the pack that found nothing in the samples.
    #[error("{} rule(s) of the pack found nothing in the samples: {}", .0.len(), .0.join(", "))]
    RulesFoundNothing(Vec<String>),
    #[error(transparent)]
    Client(ClientError),
    /// The client could not start: no key, no server, an unreadable file or CA.
    #[error(transparent)]
    ClientSetup(ClientError),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Other(msg) if msg.starts_with("job ") || msg.starts_with("session ") => {
                CliError::JobDidNotSucceed(msg)
            }
            ClientError::Usage(msg) => CliError::Usage(msg),
            ClientError::StillRunning(msg) => CliError::StillRunning(msg),
            ClientError::ScanFailed(msg) => CliError::JobDidNotSucceed(msg),
            e @ (ClientError::NoServer(_)
            | ClientError::NoApiKey
            | ClientError::NoAdminKey(_)
            | ClientError::Read(..)
            | ClientError::BadCa(..)
            | ClientError::BadCredential(_)
            | ClientError::Pack { .. }) => CliError::ClientSetup(e),
            other => CliError::Client(other),
        }
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => service::serve(args),
        Command::Worker(args) => service::worker(args),
        Command::Scan(args) => {
            let report = runtime()?.block_on(crate::client::scan::run(&args))?;
            if report.at_threshold > 0 {
                return Err(CliError::FindingsAtThreshold(report.at_threshold));
            }
            Ok(())
        }
        Command::Job(cmd) => Ok(runtime()?.block_on(crate::client::admin::job(cmd))?),
        Command::Baseline(cmd) => Ok(runtime()?.block_on(crate::client::baseline::run(cmd))?),
        Command::Session(cmd) => Ok(runtime()?.block_on(crate::client::session::run(cmd))?),
        Command::Pack(cmd) => {
            let report = runtime()?.block_on(crate::client::pack::run(cmd))?;
            if !report.silent_rules.is_empty() {
                return Err(CliError::RulesFoundNothing(report.silent_rules));
            }
            Ok(())
        }
        Command::Tenant(cmd) => Ok(runtime()?.block_on(crate::client::admin::tenant(cmd))?),
        Command::Key(cmd) => Ok(runtime()?.block_on(crate::client::admin::key(cmd))?),
        Command::Admin(cmd) => Ok(runtime()?.block_on(crate::client::admin::admin(cmd))?),
        Command::Openapi => {
            println!("{}", crate::api::openapi::document());
            Ok(())
        }
        Command::Audit(cmd) => audit::run(cmd),
    }
}
