//! The one place that turns outcomes into process exit codes.

use std::process::ExitCode;

use cella_vmm::GuestExit;

/// Guest statuses up to this pass through unchanged.
pub const GUEST_STATUS_MAX: u32 = 239;
/// The guest exited with a status above [`GUEST_STATUS_MAX`] (`--json` has the exact value).
pub const GUEST_STATUS_OUT_OF_RANGE: u8 = 240;
/// The guest crashed.
pub const CRASHED: u8 = 241;
/// The wall-clock limit passed.
pub const TIMED_OUT: u8 = 242;
/// The VMM failed (KVM, memory, or the scrub could not be verified).
pub const VMM_FAILED: u8 = 243;
/// Stopped by SIGINT or SIGTERM.
pub const STOPPED: u8 = 244;
/// `scan`: the runner refused the artifact (unsafe or corrupt archive) and said why.
pub const SCAN_REFUSED: u8 = 3;
/// Bad command line, configuration or guest image.
pub const BAD_INPUT: u8 = 2;

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
  3      the artifact was refused (path traversal, bomb, corrupt archive...): the message says why
  2      bad command line, artifact path, policy or guest image
  241    the guest crashed or broke a device contract
  242    the scan ran past --timeout-ms
  243    the VMM failed, or the runner sent no result";

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
