//! `cella-vmm spare`: a VMM started ahead of its job. It builds its VM as far as it can without
//! the job (image loaded, memory, vCPU), takes its control socket (inherited from its launcher,
//! `--api-fd`, or bound at `--api-sock`), and then confines itself before it serves anything:
//! a Landlock domain with no path access at all (and no-new-privileges) for every thread it
//! will run, the `api` seccomp filter on the API thread and the `spare` filter on this one.
//! From then on it opens no path: `PUT /vm` hands it the artifact and the job channel as
//! descriptors (`SCM_RIGHTS`) and starts the VM; the job itself runs between the launcher and
//! the guest over that channel; `PUT /actions {"action_type":"finish"}` returns the final
//! report (exit, timings, scrub evidence), after which the process exits. Until `finish`, a
//! stopped VM's report waits here (for at most a minute).
//!
//! With `--template DIR` the spare restores its VM from a template instead (see
//! [`cella_vmm::template`]): memory mapped from the template's file, registers restored, all
//! before it confines itself; `PUT /vm` puts the job's disk and channel behind the devices
//! the template's runner set up and writes the guest arguments, and the runner goes on with
//! its engine already built.

use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cella_vmm::control::{action_channel, run_vmm, ApiServer, VmmLimits};
use cella_vmm::rpc_interface::{Prepared, SpareVm, VmmController};
use cella_vmm::seccomp::ThreadKind;
use cella_vmm::template::TemplateVm;
use cella_vmm::{confine, default_scanner_image, error_chain, Prebuilt, VmConfig};
use clap::Args;

use super::exit_code;
use super::jailed::SeccompArg;

/// How long a stopped VM's report waits for `finish`.
const FINISH_LINGER: Duration = Duration::from_secs(60);

/// Shown at the end of `cella-vmm spare --help`.
pub const HELP: &str = "\
Control API (HTTP/1.1, JSON bodies, errors as {\"fault_message\": ...}):
  GET /vm                                       200 {\"state\": \"not_started\"|\"running\"|\"stopped\"...}
  PUT /vm {\"disk_fd\": I, \"vsock_channels\": [{\"port\": P, \"fd\": J}]}
          with the descriptors attached (SCM_RIGHTS)  204: the VM runs (400: a descriptor is
          missing, named twice, or of the wrong kind; the spare keeps waiting)
  PUT /actions {\"action_type\": \"finish\", \"grace_ms\": N}
          200 the final report, once the guest has ended (waiting up to N ms, default 1000)
          or been stopped; the process then exits
  PUT /actions {\"action_type\": \"stop\"}          200 the final report (stopped now)

The guest gets the arguments after `--` (default: scan). --timeout-ms counts from PUT /vm.

Exit status: as `cella-vmm session` (0 after finish or stop through the API; 244 after SIGINT
or SIGTERM, also while waiting; 2 bad command line, image or socket; 243 the VMM failed).";

#[derive(Debug, Args)]
pub struct SpareArgs {
    /// Serve the control API on the listening Unix socket inherited as descriptor N
    #[arg(long, value_name = "N", conflicts_with = "api_sock", required_unless_present = "api_sock")]
    pub api_fd: Option<RawFd>,
    /// Serve the control API on a socket bound at PATH (mode 0600; the spare, confined to no
    /// path access, cannot remove it: whoever started it does)
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Guest image [default: the cella-scanner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH", conflicts_with = "template")]
    pub image: Option<PathBuf>,
    /// Restore the VM from the template in DIR (`cella-vmm template`) instead of loading an
    /// image: its memory and memory size are the template's, and the guest goes on from where
    /// the template parked with the guest arguments given here
    #[arg(long, value_name = "DIR")]
    pub template: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, value_name = "N", default_value_t = cella_vmm::vmm_config::DEFAULT_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the VM (scrubbed, reported as timed_out) this long after PUT /vm starts it
    #[arg(long, value_name = "MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Also print the final run report as one JSON line on stdout
    #[arg(long)]
    pub json: bool,
    /// Seccomp filters (off and log are for development)
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
    /// Test only: once confined, try to open PATH as the VMM, report on stderr, and exit (0 if
    /// it opened, 1 if it was refused)
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "PATH", hide = true)]
    pub test_open: Option<PathBuf>,
    /// Guest arguments [default: scan]
    #[arg(last = true, value_name = "GUEST-ARGS")]
    pub guest_args: Vec<String>,
}

/// A listening Unix stream socket at descriptor `fd`, or why not.
pub(super) fn inherited_listener(fd: RawFd) -> Result<UnixListener, String> {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, an int.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut len) };
        (r == 0).then_some(value)
    };
    let listening = option(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && option(libc::SO_ACCEPTCONN) == Some(1);
    if !listening {
        return Err(format!("--api-fd {fd} is not a listening Unix stream socket"));
    }
    // SAFETY: `fd` is an open listening socket (checked above) that nothing else in this
    // process owns; it was inherited for this purpose.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Not passed on to anything this process might start.
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

pub fn main(args: SpareArgs, launch_start: Instant) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    cella_vmm::seccomp::set_mode(args.seccomp.mode());
    let stop_fd = match super::stop_signal::install() {
        Ok(fd) => fd,
        Err(message) => return fail(exit_code::VMM_FAILED, message),
    };
    let guest_args =
        if args.guest_args.is_empty() { vec!["scan".to_owned()] } else { args.guest_args.clone() };
    let (prepared, config) = match &args.template {
        Some(dir) => match TemplateVm::load(dir) {
            Ok(template) => {
                let config = VmConfig {
                    mem_mib: template.mem_mib(),
                    launch_start,
                    ..VmConfig::new(dir.join("memory.bin"), guest_args)
                };
                (Prepared::Template(Box::new(template)), config)
            }
            Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
        },
        None => {
            let image = match &args.image {
                Some(image) => image.clone(),
                None => match default_scanner_image() {
                    Ok(image) => image,
                    Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
                },
            };
            let config = VmConfig { mem_mib: args.mem_mib, launch_start, ..VmConfig::new(image, guest_args) };
            match Prebuilt::new(&config) {
                Ok(prebuilt) => (Prepared::Cold(Box::new(prebuilt)), config),
                Err(e) if e.is_bad_input() => return fail(exit_code::BAD_INPUT, error_chain(&e)),
                Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
            }
        }
    };
    let listener = match (&args.api_fd, &args.api_sock) {
        (Some(fd), _) => inherited_listener(*fd),
        (None, Some(path)) => cella_vmm::control::bind(path).map_err(|e| error_chain(&e)),
        (None, None) => Err("give --api-fd or --api-sock".into()),
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    // Everything this process will open is open: from here on, no path, on any thread.
    if let Err(e) = confine::deny_all_paths() {
        return fail(exit_code::VMM_FAILED, error_chain(&e));
    }
    #[cfg(feature = "test-hooks")]
    if let Some(path) = &args.test_open {
        return match std::fs::File::open(path) {
            Ok(_) => {
                tracing::info!("test-open {}: opened", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::info!("test-open {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    let (actions, receiver) = match action_channel() {
        Ok(channel) => channel,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    let server = match ApiServer::serve_listener(listener, args.api_sock.as_deref(), actions) {
        Ok(server) => server,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    if let Err(e) = cella_vmm::seccomp::install(ThreadKind::Spare) {
        server.shutdown();
        return fail(exit_code::VMM_FAILED, error_chain(&e));
    }
    let spare = SpareVm { prepared, config, console: Box::new(std::io::stderr()) };
    let mut controller = VmmController::spare(spare).with_run_timeout(Duration::from_millis(args.timeout_ms));
    let limits =
        VmmLimits { stop_fd: Some(stop_fd), await_finish: Some(FINISH_LINGER), ..VmmLimits::default() };
    run_vmm(&mut controller, &receiver, &limits);
    drop(receiver);
    server.shutdown();

    let Some((cause, result)) = controller.take_final() else {
        // Discarded before its launch.
        return ExitCode::from(exit_code::STOPPED);
    };
    match result {
        Ok(report) => {
            if args.json {
                let line = serde_json::to_string(&report).unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            exit_code::for_session(cause, &report.exit)
        }
        Err(e) => fail(exit_code::VMM_FAILED, error_chain(&e)),
    }
}
