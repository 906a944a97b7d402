//! `cella-jailer`: puts one Cella VMM in its cell, execs it, and cleans up when it ends.
//! Exit codes are decided here and only here.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use cella_jailer::timing::Timings;
use cella_jailer::{error_chain, supervisor, JailRequest};
use clap::{Args, Parser, Subcommand};

use cella_abi::exit::{CLEANUP_FAILED, JAIL_FAILED};

/// Bad command line or a request refused before anything was created.
const BAD_REQUEST: u8 = cella_abi::exit::BAD_INPUT;

const EXIT_HELP: &str = "\
Exit status:
  0-244  the VMM's own exit status (see cella-vmm run --help); with --hand-off, 0 once the
         VMM runs (its caller waits for it)
  245    the VMM was killed by SIGSYS: its seccomp filter caught a forbidden system call
  246    the VMM was killed by another signal (SIGKILL, the OOM killer at the memory limit, a crash)
  247    a jail step failed (the message names the step and the path); nothing is left behind
  248    the VMM ended but its jail folder or cgroups could not be removed
  2      bad command line or a request refused before anything was created

Log lines go to stderr as text, or as JSON objects with CELLA_LOG_FORMAT=json; CELLA_LOG filters
them (a level, e.g. `warn`, or `info,cella_jailer=debug`; default `info`).";

#[derive(Debug, Parser)]
#[command(
    name = "cella-jailer",
    version,
    about = "Runs one cella-vmm in its own cell: namespaces, pivot_root, cgroups, rlimits, Landlock, \
             no capabilities, its own uid/gid; removes the cell when the VMM ends, or (--hand-off) \
             hands the VMM to its caller and exits",
    after_help = EXIT_HELP,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    jail: JailArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a spare jail ahead of a launch: its folder and a network namespace. A later launch
    /// with `--from-prepared ID` takes it (once); `cleanup --id ID` removes an unused one
    Prepare {
        /// The spare's ID: letters, digits and hyphens, at most 64
        #[arg(long)]
        id: String,
        /// The VMM binary (statically linked, not a symlink) the launch will name as --exec-file
        #[arg(long, value_name = "PATH")]
        exec_file: PathBuf,
        /// Where jails are made (the launch's --chroot-base) [default: /dev/shm/cella-jailer]
        #[arg(long, value_name = "DIR")]
        chroot_base: Option<PathBuf>,
    },
    /// Remove what a jail left behind when its supervisor was killed: its cgroups (and anything
    /// still in them) and its folder
    Cleanup {
        /// The jail's ID
        #[arg(long)]
        id: String,
        /// Where the jail was made
        #[arg(long, value_name = "DIR", default_value = cella_jailer::config::DEFAULT_CHROOT_BASE)]
        chroot_base: PathBuf,
        /// The jailed binary's name
        #[arg(long, value_name = "NAME", default_value = "cella-vmm")]
        exec_name: String,
        /// The parent cgroup the jail used, if not the default
        #[arg(long, value_name = "PATH")]
        cgroup_parent: Option<String>,
        /// The jail's --bind-rw folder, to give back to root (with everything in it)
        #[arg(long, value_name = "DIR")]
        bind_rw: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct JailArgs {
    /// The jail's ID: letters, digits and hyphens, at most 64
    #[arg(long, required = true)]
    id: Option<String>,
    /// The VMM binary (statically linked, not a symlink, writable by neither its group nor
    /// others); it is exec'd from a descriptor opened on the host, never copied into the jail
    #[arg(long, value_name = "PATH", required = true)]
    exec_file: Option<PathBuf>,
    /// The user the VMM runs as (not 0)
    #[arg(long, value_name = "U", required = true)]
    uid: Option<u32>,
    /// The group the VMM runs as (not 0)
    #[arg(long, value_name = "G", required = true)]
    gid: Option<u32>,
    /// Where jails are made, <DIR>/<exec-name>/<id>/root; keep it on a tmpfs [default: /dev/shm/cella-jailer]
    #[arg(long, value_name = "DIR")]
    chroot_base: Option<PathBuf>,
    /// A cgroup limit: memory=SIZE, cpu=CPUS, pids=N, or CONTROLLER.FILE=VALUE (repeatable)
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    cgroups: Vec<String>,
    /// The jail's parent cgroup in each hierarchy [default: the jailer's own cgroup + /cella]
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// Join this network namespace (default: a new, empty one: no network)
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Run the VMM as PID 1 of a new PID namespace
    #[arg(long)]
    new_pid_ns: bool,
    /// Bind HOST_PATH read-only into the jail at JAIL_PATH (repeatable)
    #[arg(long = "ro-file", value_name = "HOST_PATH=JAIL_PATH")]
    ro_files: Vec<String>,
    /// Bind this host folder read-write into the jail at the same path: the one place the VMM
    /// may create, write and remove files (a session's folder: artifact, sockets, snapshots).
    /// Must be a real folder (no symbolic links), mode 0700, root's or --uid's, holding only
    /// folders, regular files and sockets; it and its contents belong to --uid/--gid while the
    /// jail lives and to root again when it ends
    #[arg(long, value_name = "DIR")]
    bind_rw: Option<PathBuf>,
    /// Mount a fresh, read-only procfs at /proc showing only the VMM's own PID namespace (needs
    /// --new-pid-ns); Landlock lets the VMM read files there (a restored VM's memory scrub
    /// reads /proc/self/pagemap) and nothing else
    #[arg(long)]
    mount_proc: bool,
    /// Pass this inherited file descriptor on to the VMM (repeatable)
    #[arg(long = "keep-fd", value_name = "FD")]
    keep_fds: Vec<i32>,
    /// Do not stay behind: start the VMM as a child of this jailer's caller, write its pid
    /// (decimal, one line) to this inherited descriptor as soon as it exists, and exit 0 once it
    /// has exec'd. The caller then waits for the VMM and removes the jail when it ends
    /// (`cella-jailer cleanup --id`); a failed launch still removes everything and exits 247,
    /// leaving the caller only the VMM's exited process to reap (its pid was written)
    #[arg(long, value_name = "FD")]
    hand_off: Option<i32>,
    /// An rlimit: core, no-file, fsize, nproc, memlock or as = N|unlimited (repeatable); at
    /// most the jailer's own hard limit
    #[arg(long = "rlimit", value_name = "NAME=VALUE")]
    rlimits: Vec<String>,
    /// Take the spare jail ID (made by `cella-jailer prepare` with the same --exec-file and
    /// --chroot-base) instead of making one: it saves making the folder and a network namespace,
    /// and is renamed to --id. A spare that is missing or unusable is reported on
    /// stderr and the jail made as usual
    #[arg(long, value_name = "ID")]
    from_prepared: Option<String>,
    /// Print what each step cost on stderr when the VMM ends
    #[arg(long)]
    timings: bool,
    /// The VMM's arguments
    #[arg(last = true, value_name = "VMM-ARGS")]
    vmm_args: Vec<OsString>,
}

/// A jail started by a launcher with `posix_spawn` (`cella_host::spawn`): ask for SIGTERM
/// when the launcher's thread ends, as its `pre_exec` used to; false if it is already gone.
fn die_with_parent() -> bool {
    let Some(value) = std::env::var_os(cella_abi::DIE_WITH_PARENT_ENV) else { return true };
    std::env::remove_var(cella_abi::DIE_WITH_PARENT_ENV);
    let Some(parent) = value.to_str().and_then(|v| v.parse::<libc::pid_t>().ok()) else { return true };
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid(2) have no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        libc::getppid() == parent
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let program = match &cli.command {
        Some(Command::Cleanup { .. }) => "cella-jailer cleanup",
        Some(Command::Prepare { .. }) => "cella-jailer prepare",
        None => "cella-jailer",
    };
    if let Err(e) = cella_log::init_tool(program, None, None) {
        eprintln!("{program}: error: {e}");
        return ExitCode::from(BAD_REQUEST);
    }
    if !die_with_parent() {
        tracing::info!("the launcher that started it is gone; exiting");
        return ExitCode::from(cella_abi::exit::STOPPED);
    }
    match cli.command {
        Some(Command::Cleanup { id, chroot_base, exec_name, cgroup_parent, bind_rw }) => {
            let _jail = tracing::info_span!("jail", jail = %id).entered();
            if let Err(e) = cella_jailer::config::validate_id(&id) {
                tracing::error!("refused: {}", error_chain(&e));
                return ExitCode::from(BAD_REQUEST);
            }
            let name_ok = !exec_name.starts_with('.')
                && exec_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !name_ok || !chroot_base.is_absolute() {
                tracing::error!("refused: --exec-name must be a plain file name and --chroot-base absolute");
                return ExitCode::from(BAD_REQUEST);
            }
            if let Some(Err(e)) = bind_rw.as_deref().map(|d| cella_jailer::config::check_bind_rw(d, None)) {
                tracing::error!("refused: {}", error_chain(&e));
                return ExitCode::from(BAD_REQUEST);
            }
            // The folder is given back after the jail's processes are gone (cleanup kills what
            // is left in its cgroups).
            let result = supervisor::cleanup(&id, &chroot_base, &exec_name, cgroup_parent.as_deref())
                .map_err(|e| error_chain(&e))
                .and_then(|removed| match &bind_rw {
                    Some(dir) => {
                        cella_jailer::handover::take_back(dir).map(|()| removed).map_err(|e| error_chain(&e))
                    }
                    None => Ok(removed),
                });
            return match result {
                Ok(removed) => {
                    for path in removed {
                        tracing::info!("removed {}", path.display());
                    }
                    if let Some(dir) = &bind_rw {
                        tracing::info!("gave {} back to root", dir.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(CLEANUP_FAILED)
                }
            };
        }
        Some(Command::Prepare { id, exec_file, chroot_base }) => {
            let _jail = tracing::info_span!("jail", jail = %id).entered();
            let (exec_name, base) = match cella_jailer::config::check_prepare(&id, &exec_file, chroot_base) {
                Ok(checked) => checked,
                Err(e) => {
                    tracing::error!("refused (nothing was created): {}", error_chain(&e));
                    return ExitCode::from(BAD_REQUEST);
                }
            };
            return match cella_jailer::prepared::prepare(&id, &exec_name, &base) {
                Ok(dir) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!("failed, and nothing is left behind: {}", error_chain(&e));
                    ExitCode::from(JAIL_FAILED)
                }
            };
        }
        None => {}
    }
    let a = cli.jail;
    let request = JailRequest {
        id: a.id.unwrap_or_default(),
        exec_file: a.exec_file.unwrap_or_default(),
        uid: a.uid.unwrap_or_default(),
        gid: a.gid.unwrap_or_default(),
        chroot_base: a.chroot_base,
        cgroups: a.cgroups,
        cgroup_parent: a.cgroup_parent,
        netns: a.netns,
        new_pid_ns: a.new_pid_ns,
        ro_files: a.ro_files,
        bind_rw: a.bind_rw,
        mount_proc: a.mount_proc,
        keep_fds: a.keep_fds,
        hand_off: a.hand_off,
        rlimits: a.rlimits,
        from_prepared: a.from_prepared,
        vmm_args: a.vmm_args,
    };
    let config = match request.validate() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("refused (nothing was created): {}", error_chain(&e));
            return ExitCode::from(BAD_REQUEST);
        }
    };
    let _jail = tracing::info_span!("jail", jail = %config.id).entered();
    let mut timings = Timings::default();
    timings.record("validate", started);
    let outcome = match supervisor::run(&config, &mut timings) {
        Ok(supervisor::Ran::Ended(outcome)) => outcome,
        Ok(supervisor::Ran::HandedOff { timings, .. }) => {
            if a.timings {
                tracing::info!("timings: {}", timings.line());
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            tracing::error!("jail {} failed, and nothing is left behind: {}", config.id, error_chain(&e));
            return ExitCode::from(JAIL_FAILED);
        }
    };
    if a.timings {
        tracing::info!("timings: {}", outcome.timings.line());
    }
    for message in outcome.report_messages(&config.id) {
        tracing::warn!("{message}");
    }
    ExitCode::from(outcome.exit_code())
}
