//! The one place that turns outcomes into process exit codes.

use std::process::{ExitCode, ExitStatus};

use cella_vmm::rpc_interface::StopCause;
use cella_vmm::GuestExit;

pub use cella_abi::exit::{
    BAD_INPUT, CRASHED, FINDINGS, GUEST_STATUS_MAX, GUEST_STATUS_OUT_OF_RANGE, SCAN_REFUSED, STOPPED,
    TIMED_OUT, VMM_FAILED,
};
use cella_abi::exit::{CLEANUP_FAILED, VMM_KILLED_BY_SECCOMP};

/// `--jailed`: cella-jailer's own statuses, passed on: the VMM killed by its seccomp filter or
/// another signal, a jail step failed, the jail not removed completely.
pub const JAILER_STATUSES: std::ops::RangeInclusive<i32> =
    VMM_KILLED_BY_SECCOMP as i32..=CLEANUP_FAILED as i32;

/// Shown at the end of `cella-vmm run --help`.
pub const HELP: &str = "\
Exit status:
  0-239  the guest's own exit status
  240    the guest exited with a status above 239 (--json shows it)
  241    the guest crashed (triple fault, I/O no device answers, or it broke a
         virtio device's contract: kind device_error in --json)
  242    the guest ran past --timeout-ms
  243    the VMM failed (KVM error, or the memory scrub could not be verified)
  244    stopped by SIGINT or SIGTERM (memory is still scrubbed)
  2      bad command line, configuration or guest image";

/// Shown at the end of `cella-vmm scan --help`.
pub const SCAN_HELP: &str = "\
Exit status:
  0      the scan ran (see the summary for findings)
  1      --fail-on LEVEL: unsuppressed findings at or above LEVEL (suppressed ones never count)
  3      the artifact was refused (path traversal, bomb, corrupt archive...): the message says why
  2      bad command line, artifact path, policy or guest image
  241    the guest crashed or broke a device contract
  242    the scan ran past --timeout-ms
  243    the VMM failed, or the runner sent no result
  244    stopped by SIGINT or SIGTERM (memory is still scrubbed)
With --jailed, also cella-jailer's own (see cella-jailer --help):
  245    the VMM was killed by its seccomp filter (dmesg type 1326 names the call)
  246    the VMM was killed by another signal (the memory limit, the OOM killer...)
  247    a jail step failed (the message names it); nothing is left behind
  248    the jail folder or cgroups could not be removed: cella-jailer cleanup --id ID

--jailed runs the VMM as a spare (cella-vmm spare) in a cell made by cella-jailer (own
uid/gid, namespaces, cgroups, Landlock, seccomp), with only the image bound in. This process
stays outside: it hands the VMM the artifact and the job channel as descriptors over its
control socket, serves the job, writes --sarif; SIGINT and SIGTERM stop the VM through its
control API. No jailer stays behind (cella-jailer --hand-off): the VMM is this process's child,
and this process removes the jail when it ends. If this process is killed, the VMM dies with it
and the next jailed scan or worker on the host removes the jail.";

/// Shown at the end of `cella-vmm session --help`.
pub const SESSION_HELP: &str = "\
Control API (--api-sock; HTTP/1.1, JSON bodies, errors as {\"fault_message\": ...}):
  GET   /vm                                   200 {\"state\": \"running\"|\"paused\"|\"stopped\"|...}
  PATCH /vm       {\"state\": \"paused\"|\"running\"}   204 (409 if already in that state)
  PUT   /snapshot/create {\"snapshot_dir\": ABS}   200 sizes and timings (409 unless paused;
                                              500 e.g. disk full: nothing left, VM still paused)
  PUT   /snapshot/create {\"memory_fd\": I, \"state_fd\": J} with two new, empty files attached
          (SCM_RIGHTS): the same into those files, which the client then renames into place;
          how a VMM confined to no paths (--api-fd) snapshots
  PUT   /snapshot/load {\"snapshot_dir\": ABS, \"resume\": BOOL}   200 (409 once a VM exists;
                                              400 corrupt, truncated, other version, CPU, no memory file)
  PUT   /snapshot/load {\"state_fd\": I, \"memory_fd\": J, \"disk_fd\": K, \"vsock_fd\": L,
                        \"resume\": BOOL, \"max_duration_ms\": N}
          with those descriptors attached (SCM_RIGHTS): the same from handed-over files (disk
          and vsock listener if the VM had them); what a spare (--api-fd), confined to no paths,
          takes (400: a descriptor missing or of the wrong kind; the spare keeps waiting)
  PUT   /actions  {\"action_type\": \"stop\"}      200 the final run report; the process exits 0
  GET   /metrics                              200 pause/resume counters and latencies

Exit status:
  0      stopped through the API (PUT /actions stop)
  0-239  the guest ended on its own with this status
  240    the guest exited with a status above 239 (--json shows it)
  241    the guest crashed or broke a device contract
  242    --max-duration-secs passed (the VM was stopped and scrubbed)
  243    the VMM failed (KVM error, or the memory scrub could not be verified)
  244    stopped by SIGINT or SIGTERM (memory is still scrubbed)
  2      bad command line, artifact, guest image, --api-sock, or a --restore snapshot that cannot
         be used (the message says why)
With --jailed, also cella-jailer's own (see cella-jailer --help):
  245    the VMM was killed by its seccomp filter (dmesg type 1326 names the call)
  246    the VMM was killed by another signal (the memory limit, the OOM killer...)
  247    a jail step failed (the message names it); nothing is left behind
  248    the jail could not be removed completely: cella-jailer cleanup --id ID

--jailed runs the session in a cell made by cella-jailer (own uid/gid, namespaces, cgroups,
Landlock, seccomp). The session's folder (--session-dir, default: the folder of --api-sock;
mode 0700, root's) is bound read-write at the same path, so --api-sock, --vsock, --artifact,
--restore and snapshot_dir must all lie in it; the guest image is bound read-only; a restore
also gets a /proc of its own PID namespace. This process becomes the jail's supervisor (it
execs cella-jailer): SIGINT/SIGTERM to it stop and scrub the VM, and it does not end with
whoever started it. When the VM ends, the jail is removed and the folder is root's again.";

/// The exit code for a session VMM: why it stopped, and how the guest ended.
pub fn for_session(cause: StopCause, exit: &GuestExit) -> ExitCode {
    match cause {
        StopCause::Api => ExitCode::SUCCESS,
        StopCause::Signal => ExitCode::from(STOPPED),
        StopCause::MaxDuration => ExitCode::from(TIMED_OUT),
        StopCause::Guest => for_exit(exit),
    }
}

/// The exit code for how the VM ended.
pub fn for_exit(exit: &GuestExit) -> ExitCode {
    ExitCode::from(match exit {
        GuestExit::Exited { code } if *code <= GUEST_STATUS_MAX => *code as u8,
        GuestExit::Exited { .. } => GUEST_STATUS_OUT_OF_RANGE,
        GuestExit::Crashed { .. } | GuestExit::DeviceError { .. } => CRASHED,
        GuestExit::TimedOut { .. } => TIMED_OUT,
        GuestExit::Stopped => STOPPED,
        GuestExit::VmmFailed { .. } => VMM_FAILED,
    })
}

/// `scan --jailed` with a report from the VMM: the code cella-jailer's status imposes over the
/// scan's own, if any (a jail that could not be removed must not pass as a clean run).
pub fn for_jailer(status: &ExitStatus) -> Option<ExitCode> {
    let code = status.code()?;
    JAILER_STATUSES.contains(&code).then(|| ExitCode::from(code as u8))
}

/// `scan --jailed` when the VMM printed no report: cella-jailer's refusal (2) and its own
/// statuses pass on; anything else means the VMM failed.
pub fn for_jail_without_report(status: &ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) if code == i32::from(BAD_INPUT) => ExitCode::from(BAD_INPUT),
        _ => for_jailer(status).unwrap_or(ExitCode::from(VMM_FAILED)),
    }
}
