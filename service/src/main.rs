//! `cella`: see the library's documentation (`service/src/lib.rs`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use cella_service::cli::{self, Cli, CliError};
use clap::Parser;

/// Exit statuses, decided here and nowhere else (`cella --help` lists them).
fn exit_code(err: &CliError) -> u8 {
    match err {
        CliError::VerificationFailed(_)
        | CliError::Untrusted
        | CliError::FindingsAtThreshold(_)
        | CliError::RulesFoundNothing(_) => 1,
        CliError::Usage(_)
        | CliError::Key(_)
        | CliError::File { .. }
        | CliError::Bundle(_)
        | CliError::ClientSetup(_) => 2,
        CliError::Database(_)
        | CliError::Export(_)
        | CliError::Store(_)
        | CliError::Serve(_)
        | CliError::Service(_) => 3,
        CliError::JobDidNotSucceed(_) => 4,
        CliError::StillRunning(_) => 6,
        CliError::Client(_) => 5,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ CliError::VerificationFailed(_)) => {
            println!("FAILED: {}", cella_service::error::escape_controls(&err.to_string()));
            ExitCode::from(exit_code(&err))
        }
        // Reported by the command itself.
        Err(err @ (CliError::FindingsAtThreshold(_) | CliError::Untrusted)) => {
            ExitCode::from(exit_code(&err))
        }
        Err(err) => {
            eprintln!("cella: {}", cella_service::error::error_chain(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}
