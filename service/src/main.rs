//! `cella`: the HTTPS API, tenants and keys, the PostgreSQL queue, workers, sessions, the admin
//! API and the CLI client. Today it carries the audit-log commands (`cella audit …`); the
//! service itself arrives with the service issue.
#![forbid(unsafe_code)]

mod cli;
mod db;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, CliError};

/// Exit statuses, decided here and nowhere else.
fn exit_code(err: &CliError) -> u8 {
    match err {
        CliError::VerificationFailed(_) => 1,
        CliError::Usage(_) | CliError::Key(_) | CliError::File { .. } | CliError::Bundle(_) => 2,
        CliError::Database(_) | CliError::Export(_) | CliError::Store(_) => 3,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::VerificationFailed(failure)) => {
            println!("FAILED: {failure}");
            ExitCode::from(1)
        }
        Err(err) => {
            let mut msg = format!("cella: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(exit_code(&err))
        }
    }
}
