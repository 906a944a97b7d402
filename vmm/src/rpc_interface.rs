//! The VMM's control contract, independent of any transport: a [`VmmAction`] goes in, a
//! `Result<`[`VmmData`]`, `[`VmmActionError`]`>` comes out. The control socket
//! (`control/`) turns HTTP requests into actions and results into responses; tests and
//! embedders call [`VmmController::handle`] directly, with no HTTP at all.
//!
//! The controller owns the VM through its life: `not_started` (a VMM waiting for a snapshot to
//! load) → `running` ⇄ `paused` → `stopped` (torn down and scrubbed; the final [`RunReport`]
//! is kept). A guest that ends on its own is torn down the next time the controller looks
//! ([`VmmController::reap`], or any action).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::microvm::{GuestExit, RunError, RunReport};
use crate::running::{PauseStats, RunningVm};
use crate::vstate::vcpu::VcpuControlError;

/// What a client can ask of the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// The VM's state (`GET /vm`).
    GetState,
    /// Pause the vCPUs, keeping memory and devices (`PATCH /vm {"state":"paused"}`).
    Pause,
    /// Resume paused vCPUs (`PATCH /vm {"state":"running"}`).
    Resume,
    /// Write a snapshot of the paused VM into `snapshot_dir` (`PUT /snapshot/create`).
    CreateSnapshot { snapshot_dir: PathBuf },
    /// Load a snapshot into a VMM that has no VM yet (`PUT /snapshot/load`).
    LoadSnapshot { snapshot_dir: PathBuf, resume: bool },
    /// Stop the VM, tear it down and scrub its memory (`PUT /actions {"action_type":"stop"}`).
    Stop,
    /// Counters (`GET /metrics`).
    GetMetrics,
}

impl VmmAction {
    /// The action's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            VmmAction::GetState => "get state",
            VmmAction::Pause => "pause",
            VmmAction::Resume => "resume",
            VmmAction::CreateSnapshot { .. } => "create a snapshot",
            VmmAction::LoadSnapshot { .. } => "load a snapshot",
            VmmAction::Stop => "stop",
            VmmAction::GetMetrics => "get metrics",
        }
    }
}

/// The VM's state as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::NotStarted => "not started",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        })
    }
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    /// Guest memory in MiB (absent before a VM exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Since the vCPU started, in ms (absent before a VM exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// How the guest ended, once stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<GuestExit>,
}

/// `GET /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmMetrics {
    /// Actions handled, this one included.
    pub actions: u64,
    /// Actions refused (any error).
    pub action_errors: u64,
    #[serde(flatten)]
    pub pause: PauseStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
}

/// A successful action's answer.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum VmmData {
    /// Done; nothing to say (pause, resume).
    Empty,
    State(VmInfo),
    Metrics(VmMetrics),
    /// The final report of a stopped VM: exit, timings, scrub evidence.
    Stopped(Box<RunReport>),
    /// What a snapshot create or load reports (defined with the snapshot library).
    Snapshot(serde_json::Value),
}

/// Why an action was refused. The control socket maps each kind to one HTTP status
/// (`control/routes.rs`).
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// The action does not apply in the VM's current state (409).
    #[error("cannot {action}: the VM is {state}{hint}")]
    WrongState { action: &'static str, state: VmState, hint: &'static str },
    /// This VMM cannot do that yet (501).
    #[error("{0}")]
    NotImplemented(String),
    /// The VMM failed (500). The VM may be gone: look at its state.
    #[error("cannot {action}: {message}")]
    Internal { action: &'static str, message: String },
}

/// Why the VM stopped, for whoever decides the process's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest exited or crashed on its own.
    Guest,
    /// A `Stop` action.
    Api,
    /// SIGINT or SIGTERM.
    Signal,
    /// The maximum duration passed.
    MaxDuration,
}

enum Slot {
    NotStarted,
    Live(Box<RunningVm>),
    Stopped { exit: Option<GuestExit> },
}

/// Owns the VM and carries out [`VmmAction`]s on it. Lives on the VMM thread.
pub struct VmmController {
    slot: Slot,
    /// The teardown's result, until taken by [`VmmController::take_final`].
    last: Option<(StopCause, Result<RunReport, RunError>)>,
    metrics: VmMetrics,
    started: Option<Instant>,
    mem_mib: Option<u64>,
}

impl std::fmt::Debug for VmmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmController").field("state", &self.state()).finish_non_exhaustive()
    }
}

impl VmmController {
    /// A controller for a started VM.
    pub fn new(vm: RunningVm) -> Self {
        let (started, mem_mib) = (Some(vm.started()), Some(vm.mem_mib()));
        VmmController {
            slot: Slot::Live(Box::new(vm)),
            last: None,
            metrics: VmMetrics::default(),
            started,
            mem_mib,
        }
    }

    /// A controller with no VM yet, waiting for [`VmmAction::LoadSnapshot`].
    pub fn not_started() -> Self {
        VmmController {
            slot: Slot::NotStarted,
            last: None,
            metrics: VmMetrics::default(),
            started: None,
            mem_mib: None,
        }
    }

    /// The VM's state (a guest that has ended but is not torn down yet still counts as live;
    /// [`VmmController::reap`] settles that).
    pub fn state(&self) -> VmState {
        match &self.slot {
            Slot::NotStarted => VmState::NotStarted,
            Slot::Live(vm) if vm.is_paused() => VmState::Paused,
            Slot::Live(_) => VmState::Running,
            Slot::Stopped { .. } => VmState::Stopped,
        }
    }

    /// The running VM, if any (e.g. for a snapshot).
    pub fn vm(&self) -> Option<&RunningVm> {
        match &self.slot {
            Slot::Live(vm) => Some(&**vm),
            _ => None,
        }
    }

    /// A descriptor that becomes readable when the guest ends on its own, while there is a VM.
    pub fn exit_fd(&self) -> Option<std::os::fd::RawFd> {
        self.vm().map(RunningVm::exit_fd)
    }

    /// If the guest has ended on its own, tears the VM down (scrubbing it). True once stopped.
    pub fn reap(&mut self) -> bool {
        if let Slot::Live(vm) = &mut self.slot {
            if vm.has_ended() {
                self.teardown(StopCause::Guest, None);
            }
        }
        matches!(self.slot, Slot::Stopped { .. })
    }

    /// Stops the VM for `cause` (a signal, the maximum duration), reporting `exit` as how it
    /// ended; a no-op once stopped. True if this call stopped it.
    pub fn stop_for(&mut self, cause: StopCause, exit: GuestExit) -> bool {
        if self.reap() {
            return false;
        }
        self.teardown(cause, Some(exit));
        true
    }

    /// The final report and why the VM stopped, once it has.
    pub fn take_final(&mut self) -> Option<(StopCause, Result<RunReport, RunError>)> {
        self.last.take()
    }

    /// Carries out one action.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        self.metrics.actions += 1;
        let result = self.dispatch(action);
        if result.is_err() {
            self.metrics.action_errors += 1;
        }
        result
    }

    fn dispatch(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        self.reap();
        let name = action.name();
        match action {
            VmmAction::GetState => Ok(VmmData::State(self.info())),
            VmmAction::GetMetrics => Ok(VmmData::Metrics(self.metrics_now())),
            VmmAction::Pause => {
                let vm = self.live(name, VmState::Running)?;
                vm.pause().map(|_| VmmData::Empty).map_err(|e| vcpu_error(name, e))
            }
            VmmAction::Resume => {
                let vm = self.live(name, VmState::Paused)?;
                vm.resume().map(|_| VmmData::Empty).map_err(|e| vcpu_error(name, e))
            }
            VmmAction::Stop => {
                if !matches!(self.slot, Slot::Live(_)) {
                    return Err(self.wrong_state(name, ""));
                }
                self.teardown(StopCause::Api, Some(GuestExit::Stopped));
                match &self.last {
                    Some((_, Ok(report))) => Ok(VmmData::Stopped(Box::new(report.clone()))),
                    Some((_, Err(e))) => {
                        Err(VmmActionError::Internal { action: name, message: crate::error_chain(e) })
                    }
                    None => Err(VmmActionError::Internal { action: name, message: "no report".into() }),
                }
            }
            VmmAction::CreateSnapshot { snapshot_dir } => {
                check_snapshot_dir(&snapshot_dir)?;
                self.live(name, VmState::Paused)?;
                self.create_snapshot(&snapshot_dir)
            }
            VmmAction::LoadSnapshot { snapshot_dir, resume } => {
                check_snapshot_dir(&snapshot_dir)?;
                if !matches!(self.slot, Slot::NotStarted) {
                    return Err(
                        self.wrong_state(name, "; a snapshot loads into a fresh VMM (session --restore)")
                    );
                }
                self.load_snapshot(&snapshot_dir, resume)
            }
        }
    }

    /// SNAPSHOTS ARE WIRED HERE. The VM is paused (checked); `vm.memory()`, `vm.bus()` and
    /// `vm.with_paused_vcpu(..)` give the snapshot library what it saves. Until it is wired,
    /// the action is refused as not implemented.
    fn create_snapshot(&mut self, snapshot_dir: &Path) -> Result<VmmData, VmmActionError> {
        let _ = snapshot_dir;
        Err(VmmActionError::NotImplemented(
            "snapshots are not wired into this VMM yet (they come with the snapshot library); \
             pause/resume work, create/load do not"
                .into(),
        ))
    }

    /// SNAPSHOT RESTORE IS WIRED HERE: build a `MicroVm` from the restored parts
    /// (`MicroVm::from_parts`), start it, and put it in `self.slot` (paused unless `resume`).
    fn load_snapshot(&mut self, snapshot_dir: &Path, resume: bool) -> Result<VmmData, VmmActionError> {
        let _ = (snapshot_dir, resume);
        Err(VmmActionError::NotImplemented(
            "snapshot restore is not wired into this VMM yet (it comes with the snapshot library); \
             start the session from --artifact"
                .into(),
        ))
    }

    fn live(&mut self, action: &'static str, want: VmState) -> Result<&mut RunningVm, VmmActionError> {
        let state = self.state();
        if state != want {
            let hint = match (want, state) {
                (VmState::Running, VmState::Paused) => " already",
                (VmState::Paused, VmState::Running) if action == "resume" => " already",
                (VmState::Paused, VmState::Running) => "; pause it first",
                _ => "",
            };
            return Err(VmmActionError::WrongState { action, state, hint });
        }
        match &mut self.slot {
            Slot::Live(vm) => Ok(&mut **vm),
            _ => Err(VmmActionError::WrongState { action, state, hint: "" }),
        }
    }

    fn wrong_state(&self, action: &'static str, hint: &'static str) -> VmmActionError {
        VmmActionError::WrongState { action, state: self.state(), hint }
    }

    fn teardown(&mut self, cause: StopCause, exit: Option<GuestExit>) {
        let Slot::Live(vm) = std::mem::replace(&mut self.slot, Slot::Stopped { exit: None }) else {
            return;
        };
        self.metrics.pause = vm.pause_stats();
        let result = match exit {
            Some(exit) => vm.stop_as(exit),
            None => vm.finish(),
        };
        let exit = match &result {
            Ok(report) => Some(report.exit.clone()),
            Err(e) => Some(GuestExit::VmmFailed { error: crate::error_chain(e) }),
        };
        self.slot = Slot::Stopped { exit };
        self.last = Some((cause, result));
    }

    fn uptime_ms(&self) -> Option<u64> {
        self.started.map(|s| s.elapsed().as_millis() as u64)
    }

    fn info(&self) -> VmInfo {
        let exit = match &self.slot {
            Slot::Stopped { exit } => exit.clone(),
            _ => None,
        };
        VmInfo { state: self.state(), mem_mib: self.mem_mib, uptime_ms: self.uptime_ms(), exit }
    }

    fn metrics_now(&self) -> VmMetrics {
        let pause = match &self.slot {
            Slot::Live(vm) => vm.pause_stats(),
            _ => self.metrics.pause.clone(),
        };
        VmMetrics { pause, uptime_ms: self.uptime_ms(), mem_mib: self.mem_mib, ..self.metrics.clone() }
    }
}

/// A vCPU that would not pause or resume. Wrong-state answers are caught before this; what is
/// left is the VMM's trouble.
fn vcpu_error(action: &'static str, e: VcpuControlError) -> VmmActionError {
    VmmActionError::Internal { action, message: e.to_string() }
}

/// Snapshot folders must be absolute, plain paths: no `..`, no NUL, not `/` itself.
fn check_snapshot_dir(dir: &Path) -> Result<(), VmmActionError> {
    let bad = |why: &str| VmmActionError::BadRequest(format!("snapshot_dir {}: {why}", dir.display()));
    let text = dir.as_os_str().as_encoded_bytes();
    if !dir.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if text.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    if text.len() > 4000 {
        return Err(bad("is longer than 4000 bytes"));
    }
    if dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(bad("must not contain `..`"));
    }
    if dir.parent().is_none() {
        return Err(bad("must name a folder below /"));
    }
    Ok(())
}

/// How long a caller may wait for an action over a channel before giving up on the VMM thread.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_dirs_must_be_absolute_and_plain() {
        for good in ["/var/lib/cella/snap/s1", "/tmp/x"] {
            check_snapshot_dir(Path::new(good)).unwrap();
        }
        for (bad, why) in [("relative/dir", "absolute"), ("/var/../etc", "`..`"), ("/", "below /")] {
            let e = check_snapshot_dir(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_vmm_without_a_vm_refuses_what_needs_one() {
        let mut c = VmmController::not_started();
        let state = c.handle(VmmAction::GetState).unwrap();
        assert_eq!(serde_json::to_value(&state).unwrap(), serde_json::json!({"state": "not_started"}));
        for action in [VmmAction::Pause, VmmAction::Resume, VmmAction::Stop] {
            let e = c.handle(action).unwrap_err();
            assert!(matches!(e, VmmActionError::WrongState { state: VmState::NotStarted, .. }), "{e}");
        }
        let e = c.handle(VmmAction::CreateSnapshot { snapshot_dir: "/tmp/s".into() }).unwrap_err();
        assert!(matches!(e, VmmActionError::WrongState { .. }), "{e}");
        let e = c.handle(VmmAction::LoadSnapshot { snapshot_dir: "rel".into(), resume: true }).unwrap_err();
        assert!(matches!(e, VmmActionError::BadRequest(_)), "{e}");
        let e =
            c.handle(VmmAction::LoadSnapshot { snapshot_dir: "/tmp/s".into(), resume: true }).unwrap_err();
        assert!(matches!(e, VmmActionError::NotImplemented(_)), "{e}");
        let metrics = c.handle(VmmAction::GetMetrics).unwrap();
        let VmmData::Metrics(m) = metrics else { panic!("{metrics:?}") };
        assert_eq!((m.actions, m.action_errors), (8, 6));
    }

    #[test]
    fn wrong_state_messages_say_what_to_do() {
        let e = VmmActionError::WrongState {
            action: "create a snapshot",
            state: VmState::Running,
            hint: "; pause it first",
        };
        assert_eq!(e.to_string(), "cannot create a snapshot: the VM is running; pause it first");
    }
}
