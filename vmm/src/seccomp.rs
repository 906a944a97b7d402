//! Installs the per-thread seccomp filters from `cella_seccomp` (data in
//! `seccomp/filters/`, compiled at build time) on the VMM's threads.
//!
//! Each thread installs its own filter before it touches anything the guest controls: the
//! vCPU thread first thing in its closure (`vstate/vcpu.rs`), the main thread right after it
//! starts the vCPU (`microvm.rs`), the device thread first thing when it exists. Filters are off
//! in the library by default, because tests and embedders run VMs on their own threads; the
//! `cella-vmm` binary turns them on with [`set_mode`] (`--seccomp`, default `enforce`), and
//! `cella-jailer` refuses to run a VMM with anything else.
//!
//! A forbidden syscall kills the whole process with `SIGSYS` (signal 31); the supervisor reports
//! it, and the kernel's audit log (`dmesg`, type 1326) names the syscall. `--seccomp log`
//! allows and logs instead, for finding what a new code path needs.

use std::sync::atomic::{AtomicU8, Ordering};

pub use cella_seccomp::{Action, SeccompError, ThreadKind};

/// What the VMM does about seccomp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// No filters (the library's default; `cella-vmm run --seccomp off` for development).
    #[default]
    Off,
    /// Filters that kill the process on a forbidden syscall (the binary's default).
    Enforce,
    /// Filters that allow a forbidden syscall and log it to the kernel audit log.
    Log,
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the mode for every thread that installs its filter from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Release);
}

/// The current mode.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        1 => Mode::Enforce,
        2 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Installs the filter for `kind` on the calling thread, unless seccomp is off.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    match mode() {
        Mode::Off => Ok(()),
        Mode::Enforce => cella_seccomp::apply(kind, Action::Kill),
        Mode::Log => cella_seccomp::apply(kind, Action::Log),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_so_library_users_keep_their_threads() {
        assert_eq!(mode(), Mode::Off);
        // With the mode off, install is a no-op even on a test thread.
        install(ThreadKind::Vmm).unwrap();
    }
}
