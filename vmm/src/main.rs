//! `cella-vmm`: launch one microVM from the command line, or benchmark launches.
//! Exit codes are decided in one place, [`cli::exit_code`].

mod cli;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

fn main() -> ExitCode {
    let launch_start = Instant::now();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => cli::run::main(args, launch_start),
        cli::Command::Bench(args) => cli::bench::main(args),
    }
}
