//! `cella-vmm run`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cella_vmm::{build, default_runner_image, error_chain, BuildError, GuestExit, RunReport, VmConfig};
use clap::Args;

use super::exit_code;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest ELF image [default: the cella-runner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest memory in MiB (8-65536)
    #[arg(long, value_name = "N", default_value_t = cella_vmm::vmm_config::DEFAULT_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the guest after this many milliseconds of wall-clock time
    #[arg(long, value_name = "N")]
    pub timeout_ms: Option<u64>,
    /// Print one JSON object (exit, launch_us, run_us, scrub, ...) as the last line of stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub devices: super::devices::DeviceArgs,
    #[command(flatten)]
    pub jail: super::jailed::JailArgs,
    /// Test only: try to open PATH (relative to --test-open-dirfd) as the VMM, report, and exit
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "PATH", hide = true)]
    pub test_open: Option<PathBuf>,
    /// Test only: the directory descriptor --test-open is relative to
    #[cfg(feature = "test-hooks")]
    #[arg(long, value_name = "FD", hide = true)]
    pub test_open_dirfd: Option<i32>,
    /// Test only: install the main thread's seccomp filter, then make a forbidden syscall
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    pub test_forbidden_syscall: bool,
    /// Arguments for the guest (cella-runner: hello | exit N | fault | spin | fill-canary)
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn request_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if let Some(stop) = STOP.get() {
        stop.store(true, Ordering::Release);
    }
}

/// A flag that SIGINT and SIGTERM set, for [`VmConfig::cancel`]: the VM then stops, is scrubbed
/// and reports `stopped`.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = STOP.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, request_stop) {
            tracing::warn!("cannot handle signal {signal}: {e}");
        }
    }
    stop
}

/// Runs one VM; returns the exit code for its outcome.
pub fn main(args: RunArgs, launch_start: Instant) -> ExitCode {
    let image = match args.image.clone().map(Ok).unwrap_or_else(default_runner_image) {
        Ok(image) => image,
        Err(e) => return fail_input(&e),
    };
    if args.jail.jailed {
        return jailed(&args, image);
    }
    args.jail.apply_seccomp_mode();
    let stop = stop_on_signals();
    let config = VmConfig {
        mem_mib: args.mem_mib,
        timeout: args.timeout_ms.map(Duration::from_millis),
        cancel: Some(stop),
        launch_start,
        disk: args.devices.disk.clone(),
        vsock_uds: args.devices.vsock.clone(),
        ..VmConfig::new(image, args.args.clone())
    };
    #[cfg(feature = "test-hooks")]
    if let Some(code) = test_hooks(&args) {
        return code;
    }
    let vm = match build(&config, Box::new(std::io::stderr())) {
        Ok(vm) => vm,
        Err(e) => return build_failed(&e),
    };
    match vm.run() {
        Ok(report) => {
            if args.json {
                // Not println!: when whoever reads the report is gone (a jailed scan's outer
                // process was killed), the VM is scrubbed already and there is no one to tell.
                let line = serde_json::to_string(&report).unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "{line}");
            } else {
                tracing::info!("{}", summary(&report));
            }
            exit_code::for_exit(&report.exit)
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(exit_code::VMM_FAILED)
        }
    }
}

fn build_failed(e: &BuildError) -> ExitCode {
    if e.is_bad_input() {
        return fail_input(e);
    }
    tracing::error!("{}", error_chain(e));
    ExitCode::from(exit_code::VMM_FAILED)
}

fn fail_input(e: &dyn std::error::Error) -> ExitCode {
    tracing::error!("{}", error_chain(e));
    ExitCode::from(exit_code::BAD_INPUT)
}

/// One line for people: how it ended, how long it took, what the scrub proved.
pub fn summary(report: &RunReport) -> String {
    let how = match &report.exit {
        GuestExit::Exited { code } => format!("guest exited with status {code}"),
        GuestExit::Crashed { reason, rip } => format!("guest crashed at rip {rip:#x}: {reason}"),
        GuestExit::DeviceError { device, reason } => format!("guest broke {device}: {reason}"),
        GuestExit::TimedOut { timeout_ms } => format!("guest timed out after {timeout_ms} ms"),
        GuestExit::Stopped => "guest stopped by signal".to_owned(),
        GuestExit::VmmFailed { error } => format!("VMM failed: {error}"),
    };
    let s = &report.scrub;
    format!(
        "{how} (launch {:.2} ms, run {:.2} ms); scrubbed {} KiB of {} MiB, {} pages verified zero, released in {:.2} ms",
        report.launch_us as f64 / 1e3,
        report.run_us as f64 / 1e3,
        s.bytes >> 10,
        report.mem_mib,
        s.pages_verified,
        s.ms
    )
}

/// `run --jailed`: the same run through cella-jailer.
fn jailed(args: &RunArgs, image: PathBuf) -> ExitCode {
    if args.devices.vsock.is_some() {
        return super::jailed::refuse(&super::jailed::JailedError::Unsupported("--vsock"));
    }
    let mut files = vec![("--image", image)];
    files.extend(args.devices.disk.clone().map(|disk| ("--disk", disk)));
    let mut options = Vec::new();
    if let Some(ms) = args.timeout_ms {
        options.extend(["--timeout-ms".into(), ms.to_string().into()]);
    }
    if args.json {
        options.push("--json".into());
    }
    let launch = super::jailed::JailedLaunch {
        subcommand: "run",
        mem_mib: args.mem_mib,
        files,
        options,
        guest_args: args.args.clone(),
    };
    args.jail.exec(&launch)
}

/// The hidden test-only paths the jailer's tests use to probe the cell from inside the VMM
/// (only in a build with the `test-hooks` feature, which the tests make; never in a release).
#[cfg(feature = "test-hooks")]
fn test_hooks(args: &RunArgs) -> Option<ExitCode> {
    if let Some(path) = &args.test_open {
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return Some(ExitCode::from(exit_code::BAD_INPUT));
        };
        let dirfd = args.test_open_dirfd.unwrap_or(libc::AT_FDCWD);
        // SAFETY: openat with a NUL-terminated path; the descriptor is closed right away.
        let fd = unsafe { libc::openat(dirfd, c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` was just opened here.
            unsafe { libc::close(fd) };
            tracing::info!("test-open {}: opened", path.display());
            return Some(ExitCode::SUCCESS);
        }
        tracing::info!("test-open {}: {}", path.display(), std::io::Error::last_os_error());
        return Some(ExitCode::FAILURE);
    }
    if args.test_forbidden_syscall {
        if let Err(e) = cella_vmm::seccomp::install(cella_vmm::seccomp::ThreadKind::Vmm) {
            tracing::error!("{}", error_chain(&e));
            return Some(ExitCode::from(exit_code::VMM_FAILED));
        }
        tracing::info!("test: making a forbidden syscall (ptrace)");
        // SAFETY: PTRACE_TRACEME takes no pointers; the filter is expected to kill the process.
        unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        tracing::error!("test: the forbidden syscall was allowed (seccomp mode {:?})", args.jail.seccomp);
        return Some(ExitCode::SUCCESS);
    }
    None
}
