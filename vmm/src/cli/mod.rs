//! The command line: `cella-vmm run`, `scan`, `session`, `spare` and `template`. Benchmarks are
//! in `cella-bench vm`, not in this binary.

pub mod devices;
pub mod exit_code;
pub mod jailed;
pub mod policy;
pub mod run;
pub mod scan;
pub mod session;
pub mod spare;
pub mod stop_signal;
pub mod template;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cella-vmm", version, about = "Cella's VMM: one process, one KVM microVM, one tenant")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr are written: text, or one JSON object each [default: text, or
    /// $CELLA_LOG_FORMAT]
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<cella_log::LogFormat>,
    /// Which log lines are written: a level (error, warn, info, debug, trace, off), or a level and
    /// `module=level` pairs [default: info, or $CELLA_LOG]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_filter: Option<String>,
}

impl Command {
    /// The name the subcommand's text log lines begin with.
    pub fn program(&self) -> &'static str {
        match self {
            Command::Run(_) => "cella-vmm",
            Command::Scan(_) => "cella-vmm scan",
            Command::Session(_) => "cella-vmm session",
            Command::Spare(_) => "cella-vmm spare",
            Command::Template(_) => "cella-vmm template",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one microVM to its end, copying the guest console to stderr.
    #[command(after_help = exit_code::HELP)]
    Run(run::RunArgs),
    /// Scan one artifact in a microVM and print the findings summary.
    #[command(after_help = exit_code::SCAN_HELP)]
    Scan(Box<scan::ScanArgs>),
    /// Run a long-lived session VM steered over a control socket (pause, resume, stop).
    #[command(after_help = exit_code::SESSION_HELP)]
    Session(session::SessionArgs),
    /// Start a VMM ahead of its job, confined before it serves anything, waiting on its control
    /// API for `PUT /vm` and the job's descriptors.
    #[command(after_help = spare::HELP)]
    Spare(spare::SpareArgs),
    /// Build a template: a scanner VM with its engine built, snapshotted, for `scan --template`
    /// and `spare --template` to restore each job's VM from.
    Template(template::TemplateArgs),
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    /// The production build (no `test-hooks` feature, as `cargo test --workspace` and
    /// scripts/setup.sh build it) refuses the hidden test hooks as unknown arguments; a build
    /// with the feature (the tests' static VMM) takes them.
    #[test]
    fn the_test_hooks_exist_only_in_a_build_with_the_feature() {
        for hook in [
            &["run", "--test-open", "/", "--", "hello"][..],
            &["run", "--test-forbidden-syscall", "--", "hello"],
            &["spare", "--api-fd", "3", "--test-open", "/"],
        ] {
            let parsed = Cli::try_parse_from(std::iter::once("cella-vmm").chain(hook.iter().copied()));
            if cfg!(feature = "test-hooks") {
                assert!(parsed.is_ok(), "{hook:?}: {parsed:?}");
            } else {
                let err = parsed.expect_err("a production build took a test hook");
                assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{hook:?}: {err}");
            }
        }
    }
}
