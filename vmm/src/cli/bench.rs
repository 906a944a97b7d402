//! `cella-vmm bench`.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Launch-to-exit latency of `hello` in a microVM vs a native process vs bubblewrap
    Launch {
        /// Launches of each kind
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Print the figures as one JSON object
        #[arg(long)]
        json: bool,
    },
}

pub fn main(_cmd: BenchCommand) -> ExitCode {
    ExitCode::FAILURE
}
