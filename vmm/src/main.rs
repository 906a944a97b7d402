//! `cella-vmm`: launch one microVM from the command line (run, scan, session, spare, template).
//! Exit codes are decided in one place, [`cli::exit_code`].

mod cli;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

fn main() -> ExitCode {
    let launch_start = Instant::now();
    // One malloc arena for every thread: glibc's per-thread arenas read
    // /proc/sys/vm/overcommit_memory when they shrink, and no VMM thread may open files.
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = cli::Cli::parse();
    let program = cli.command.program();
    if let Err(e) = cella_log::init_tool(program, cli.log_format, cli.log_filter.as_deref()) {
        eprintln!("{program}: error: {e}");
        return ExitCode::from(cli::exit_code::BAD_INPUT);
    }
    // A spare started by a launcher (`cella_host::spare`) stops when the launcher goes.
    if !cella_host::spawn::die_with_parent() {
        tracing::info!("the launcher that started this process is gone; exiting");
        return ExitCode::from(cella_abi::exit::STOPPED);
    }
    match cli.command {
        cli::Command::Run(args) => cli::run::main(args, launch_start),
        cli::Command::Scan(args) => cli::scan::main(*args, launch_start),
        cli::Command::Session(args) => cli::session::main(args, launch_start),
        cli::Command::Spare(args) => cli::spare::main(args, launch_start),
        cli::Command::Template(args) => cli::template::main(args),
    }
}
