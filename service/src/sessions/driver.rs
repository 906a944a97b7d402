//! [`VmmDriver`]: everything the session manager does to a session's VMM, as one trait. `cella
//! serve` drives real VMMs through [`Vmms`]; the manager's unit tests drive a fake one, so every
//! transition of a session (and every failure of its VM) is tested without root or KVM.
//!
//! The calls block (a control-socket exchange, a look through `/proc`, a process start): the
//! manager makes them on tokio's blocking threads.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::vmm::{Guest, LaunchSpec, Liveness, RestoreSpec, SpareSpec, SpareVmm, VmState, VmmError, Vmms};

pub trait VmmDriver: Send + Sync + 'static {
    /// Whether session VMMs run jailed (each as a uid of its own).
    fn jailed(&self) -> bool;
    /// Starts a VMM for `spec`; its pid, once the process exists (not yet ready).
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError>;
    /// Waits until the VMM `pid` answers on `api_sock`, up to `timeout`.
    fn wait_ready(&self, pid: u32, api_sock: &Path, timeout: Duration) -> Result<(), VmmError>;
    /// What the control API says the VM is doing.
    fn state(&self, api_sock: &Path) -> Result<VmState, VmmError>;
    fn pause(&self, api_sock: &Path) -> Result<(), VmmError>;
    fn resume(&self, api_sock: &Path) -> Result<(), VmmError>;
    /// Snapshots the paused VM into `dir` (which the VMM creates); details for the audit event.
    fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, VmmError>;
    /// Stops the VM (it scrubs its memory and exits) if the control API answers within
    /// `timeout`; its run report.
    fn stop_within(&self, api_sock: &Path, timeout: Duration) -> Result<Value, VmmError>;
    /// Continues the VMM `pid` should it have been stopped (SIGSTOP).
    fn continue_stopped(&self, pid: u32);
    /// Opens a connection to the guest, retrying up to `timeout`; each request on it may take
    /// up to `exec_timeout`.
    fn connect(&self, vsock: &Path, timeout: Duration, exec_timeout: Duration) -> Result<Guest, VmmError>;
    /// Whether the VMM `pid` serving `api_sock` is still there.
    fn alive(&self, pid: u32, api_sock: &Path) -> Liveness;
    /// SIGTERM to the VMM (it scrubs and exits), or with `kill`, SIGKILL.
    fn signal(&self, pid: u32, kill: bool);
    /// Removes what jail `id` left behind and gives `dir` back to root; what it reported.
    fn cleanup_jail(&self, id: &str, dir: Option<&Path>) -> Result<String, VmmError>;
    /// The uids this host's processes run as (a jailed launch takes one none of them has).
    fn uids_in_use(&self) -> Result<HashSet<u32>, String>;
    /// Starts a spare session VMM for `spec` and waits until it answers, confined, with no VM.
    fn start_spare(&self, spec: &SpareSpec) -> Result<SpareVmm, VmmError>;
    /// Restores `spec`'s snapshot in `spare`, handing its files over; the VM runs on return.
    fn restore_into(&self, spare: &SpareVmm, spec: &RestoreSpec) -> Result<(), VmmError>;
    /// Ends a spare nobody took, and removes its folder.
    fn discard_spare(&self, spare: &SpareVmm);
    /// Ends the spare serving `api_sock` that a killed process left, if it is still there.
    fn end_stale_spare(&self, api_sock: &Path);
}

impl VmmDriver for Vmms {
    fn jailed(&self) -> bool {
        Vmms::jailed(self)
    }
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError> {
        Vmms::launch(self, spec)
    }
    fn wait_ready(&self, pid: u32, api_sock: &Path, timeout: Duration) -> Result<(), VmmError> {
        Vmms::wait_ready(self, pid, api_sock, timeout)
    }
    fn state(&self, api_sock: &Path) -> Result<VmState, VmmError> {
        Vmms::state(self, api_sock)
    }
    fn pause(&self, api_sock: &Path) -> Result<(), VmmError> {
        Vmms::pause(self, api_sock)
    }
    fn resume(&self, api_sock: &Path) -> Result<(), VmmError> {
        Vmms::resume(self, api_sock)
    }
    fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, VmmError> {
        Vmms::snapshot(self, api_sock, dir)
    }
    fn stop_within(&self, api_sock: &Path, timeout: Duration) -> Result<Value, VmmError> {
        Vmms::stop_within(self, api_sock, timeout)
    }
    fn continue_stopped(&self, pid: u32) {
        Vmms::continue_stopped(self, pid)
    }
    fn connect(&self, vsock: &Path, timeout: Duration, exec_timeout: Duration) -> Result<Guest, VmmError> {
        Vmms::connect(self, vsock, timeout, exec_timeout)
    }
    fn alive(&self, pid: u32, api_sock: &Path) -> Liveness {
        Vmms::alive(self, pid, api_sock)
    }
    fn signal(&self, pid: u32, kill: bool) {
        Vmms::signal(self, pid, kill)
    }
    fn cleanup_jail(&self, id: &str, dir: Option<&Path>) -> Result<String, VmmError> {
        Vmms::cleanup_jail(self, id, dir)
    }
    fn uids_in_use(&self) -> Result<HashSet<u32>, String> {
        super::vmm::uids_in_use()
    }
    fn start_spare(&self, spec: &SpareSpec) -> Result<SpareVmm, VmmError> {
        Vmms::start_spare(self, spec)
    }
    fn restore_into(&self, spare: &SpareVmm, spec: &RestoreSpec) -> Result<(), VmmError> {
        Vmms::restore_into(self, spare, spec)
    }
    fn discard_spare(&self, spare: &SpareVmm) {
        Vmms::discard_spare(self, spare)
    }
    fn end_stale_spare(&self, api_sock: &Path) {
        Vmms::end_stale_spare(self, api_sock)
    }
}
