//! `cella-vmm session`: one long-lived microVM with a tenant's artifact loaded, steered over
//! its control socket (`--api-sock`) and answering session requests over vsock (`--vsock`),
//! until a stop action, the guest's own exit, `--max-duration-secs`, or SIGINT/SIGTERM. The
//! teardown always scrubs guest memory; the socket is removed on the way out.
//!
//! Threads: the API thread (seccomp `api`) serves HTTP and passes actions on; this thread
//! becomes the VMM thread (seccomp `vmm`) once the vCPU starts, and runs
//! [`cella_vmm::control::run_vmm`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use cella_vmm::control::{action_channel, run_vmm, ApiServer, VmmLimits};
use cella_vmm::rpc_interface::{VmmAction, VmmController};
use cella_vmm::{build, default_scanner_image, error_chain, scan, VmConfig};
use clap::{Args, ValueEnum};
use vmm_sys_util::eventfd::EventFd;

use super::exit_code;
use super::jailed::SeccompArg;

/// Guest memory for a session unless told otherwise.
pub const SESSION_MEM_MIB: u64 = 256;
/// The longest a session VMM lives, running or paused: 8 hours.
pub const MAX_SESSION_SECS: u64 = 8 * 3600;

/// What the guest may return from `read`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ReadPolicy {
    /// No file bytes leave the VM
    #[default]
    Deny,
    /// File bytes leave the VM with the findings of the request's policy masked
    Redact,
    /// File bytes leave the VM as they are
    Allow,
}

impl ReadPolicy {
    fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::Deny => "deny",
            ReadPolicy::Redact => "redact",
            ReadPolicy::Allow => "allow",
        }
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["artifact", "restore"]))]
pub struct SessionArgs {
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket, mode 0600; removed at exit
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Attach virtio-vsock with its host Unix socket at PATH (session requests: CONNECT 1025)
    #[arg(long, value_name = "PATH")]
    pub vsock: PathBuf,
    /// The artifact to load (tar, tar.gz, zip or plain file), attached read-only as the disk
    #[arg(long, value_name = "FILE")]
    pub artifact: Option<PathBuf>,
    /// Restore the session from a snapshot folder instead (not wired yet: refused)
    #[arg(long, value_name = "SNAPDIR")]
    pub restore: Option<PathBuf>,
    /// Guest image [default: the cella-scanner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, value_name = "N", default_value_t = SESSION_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the VM (scrubbed, reported as timed_out) this many seconds after it starts, running
    /// or paused, so an orphaned session cannot live forever (1-28800)
    #[arg(long, value_name = "N", default_value_t = MAX_SESSION_SECS,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SESSION_SECS))]
    pub max_duration_secs: u64,
    /// What the guest's `read` may return
    #[arg(long, value_enum, value_name = "P", default_value_t = ReadPolicy::Deny)]
    pub read_policy: ReadPolicy,
    /// Print the final run report (exit, timings, scrub) as one JSON line on stdout
    #[arg(long)]
    pub json: bool,
    /// Per-thread seccomp filters (policies/seccomp/)
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
    /// Guest arguments instead of `session SIZE READ_POLICY NAME` (tests: `--image
    /// target/cella/cella-runner -- spin`)
    #[arg(last = true, value_name = "GUEST-ARGS")]
    pub guest_args: Vec<String>,
}

/// The stop eventfd the SIGINT/SIGTERM handler writes (-1 before it exists).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn request_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes to an eventfd is async-signal-safe; the eventfd lives
        // until the process exits.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

pub fn main(args: SessionArgs, launch_start: Instant) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("cella-vmm session: error: {message}");
        ExitCode::from(code)
    };
    cella_vmm::seccomp::set_mode(match args.seccomp {
        SeccompArg::Enforce => cella_vmm::seccomp::Mode::Enforce,
        SeccompArg::Log => cella_vmm::seccomp::Mode::Log,
        SeccompArg::Off => cella_vmm::seccomp::Mode::Off,
    });
    // Never closed: the signal handler may write it until the process exits.
    let stop_evt = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
        Ok(evt) => Box::leak(Box::new(evt)),
        Err(e) => return fail(exit_code::VMM_FAILED, format!("cannot create the stop eventfd: {e}")),
    };
    STOP_FD.store(std::os::fd::AsRawFd::as_raw_fd(stop_evt), Ordering::Release);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, request_stop) {
            return fail(exit_code::VMM_FAILED, format!("cannot handle signal {signal}: {e}"));
        }
    }

    let (actions, receiver) = match action_channel() {
        Ok(channel) => channel,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    let (mut controller, server) = match (&args.artifact, &args.restore) {
        (Some(artifact), _) => {
            let config = match config(&args, artifact, launch_start) {
                Ok(config) => config,
                Err(message) => return fail(exit_code::BAD_INPUT, message),
            };
            let vm = match build(&config, Box::new(std::io::stderr())) {
                Ok(vm) => vm,
                Err(e) if e.is_bad_input() => return fail(exit_code::BAD_INPUT, error_chain(&e)),
                Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
            };
            // The API thread starts before the vCPU: once this thread is under the `vmm`
            // filter it can start no thread.
            let server = match ApiServer::start(&args.api_sock, actions) {
                Ok(server) => server,
                Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            };
            match vm.start() {
                Ok(running) => (VmmController::new(running), server),
                Err(e) => {
                    server.shutdown();
                    return fail(exit_code::VMM_FAILED, error_chain(&e));
                }
            }
        }
        (None, Some(dir)) => {
            let server = match ApiServer::start(&args.api_sock, actions) {
                Ok(server) => server,
                Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            };
            let mut controller = VmmController::not_started();
            if let Err(e) =
                controller.handle(VmmAction::LoadSnapshot { snapshot_dir: dir.clone(), resume: true })
            {
                server.shutdown();
                return fail(exit_code::VMM_FAILED, format!("cannot restore from {}: {e}", dir.display()));
            }
            (controller, server)
        }
        (None, None) => {
            return fail(exit_code::BAD_INPUT, "give --artifact FILE or --restore SNAPDIR".into())
        }
    };
    eprintln!("cella-vmm session: serving the control API on {}", args.api_sock.display());

    let started = controller.vm().map_or_else(Instant::now, |vm| vm.started());
    let limits = VmmLimits {
        max_duration: Some((started, Duration::from_secs(args.max_duration_secs))),
        stop_fd: Some(STOP_FD.load(Ordering::Acquire)),
    };
    run_vmm(&mut controller, &receiver, &limits);
    // Requests that arrive from now on get "the VMM has stopped serving actions".
    drop(receiver);
    server.shutdown();

    let Some((cause, result)) = controller.take_final() else {
        return fail(exit_code::VMM_FAILED, "the VM ended without a report".into());
    };
    match result {
        Ok(report) => {
            if args.json {
                let line = serde_json::to_string(&report).unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "{line}");
            } else {
                eprintln!("cella-vmm session: {}", super::run::summary(&report));
            }
            exit_code::for_session(cause, &report.exit)
        }
        Err(e) => fail(exit_code::VMM_FAILED, error_chain(&e)),
    }
}

/// The VM for a session on `artifact`.
fn config(args: &SessionArgs, artifact: &std::path::Path, launch_start: Instant) -> Result<VmConfig, String> {
    let size = scan::check_artifact(artifact).map_err(|e| error_chain(&e))?;
    let image = match &args.image {
        Some(image) => image.clone(),
        None => default_scanner_image().map_err(|e| e.to_string())?,
    };
    let guest_args = if args.guest_args.is_empty() {
        vec![
            "session".to_owned(),
            size.to_string(),
            args.read_policy.as_str().to_owned(),
            scan::artifact_name(artifact),
        ]
    } else {
        args.guest_args.clone()
    };
    Ok(VmConfig {
        mem_mib: args.mem_mib,
        launch_start,
        disk: Some(artifact.to_owned()),
        vsock_uds: Some(args.vsock.clone()),
        ..VmConfig::new(image, guest_args)
    })
}
