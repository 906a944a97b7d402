//! The VMM's control contract, independent of any transport: a [`VmmAction`] goes in, a
//! `Result<`[`VmmData`]`, `[`VmmActionError`]`>` comes out. The control socket
//! (`control/`) turns HTTP requests into actions and results into responses; tests and
//! embedders call [`VmmController::handle`] directly, with no HTTP at all.
//!
//! The controller owns the VM through its life: `not_started` (a VMM waiting for a snapshot to
//! load, or a spare with its VM built ahead, waiting for `PUT /vm` and its devices' host ends)
//! → `running` ⇄ `paused` → `stopped` (torn down and scrubbed; the final [`RunReport`] is
//! kept). A guest that ends on its own is torn down the next time the controller looks
//! ([`VmmController::reap`], or any action).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::builder::Prebuilt;
use crate::handover::StartVm;
use crate::microvm::{GuestExit, RunError, RunReport};
use crate::running::RunningVm;
use crate::snapshot::SnapshotMeta;
use crate::vmm_config::VmConfig;
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
    /// The same into two new, empty files handed over with the request (`PUT /snapshot/create`
    /// with descriptors); the caller renames them into place. What a VMM confined to no paths
    /// can do.
    CreateSnapshotInto { handed: crate::handover::HandedSnapshotOutput },
    /// Load a snapshot into a VMM that has no VM yet (`PUT /snapshot/load`).
    LoadSnapshot { snapshot_dir: PathBuf, resume: bool },
    /// The same, from the snapshot's files handed over with the request (`PUT /snapshot/load`
    /// with descriptors): what a spare session VMM, confined to no paths, takes.
    /// `max_duration`: stop the VM (as `timed_out`) this long after it starts, instead of the
    /// run timeout the VMM was started with.
    LoadHandedSnapshot {
        handed: crate::handover::HandedSnapshot,
        resume: bool,
        max_duration: Option<Duration>,
    },
    /// Stop the VM, tear it down and scrub its memory (`PUT /actions {"action_type":"stop"}`).
    Stop,
    /// Start a spare's VM with the devices' host ends handed over with the request (`PUT /vm`).
    StartVm(StartVm),
    /// The job is over: wait up to `grace` for the guest to end on its own, stop it if it has
    /// not, and answer the final report, again on every later call (`PUT /actions
    /// {"action_type":"finish"}`).
    Finish { grace: Duration },
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
            VmmAction::CreateSnapshot { .. } | VmmAction::CreateSnapshotInto { .. } => "create a snapshot",
            VmmAction::LoadSnapshot { .. } | VmmAction::LoadHandedSnapshot { .. } => "load a snapshot",
            VmmAction::Stop => "stop",
            VmmAction::StartVm(_) => "start the VM",
            VmmAction::Finish { .. } => "finish",
            VmmAction::GetMetrics => "get metrics",
        }
    }
}

pub use cella_host::report::{VmInfo, VmMetrics, VmState};

/// Where a restored VM's host-side resources go (a snapshot remembers the paths of the VMM that
/// took it; a new VMM process usually has its own).
#[derive(Clone, Debug, Default)]
pub struct RestorePaths {
    /// Bind the vsock device's host socket here instead of the saved path.
    pub vsock_uds: Option<PathBuf>,
    /// Open this file as the disk instead of the saved path (it must have the same size).
    pub disk_override: Option<PathBuf>,
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
    /// A spare: its VM built ahead, waiting for its devices.
    Spare(Box<SpareVm>),
    Live(Box<RunningVm>),
    Stopped {
        exit: Option<GuestExit>,
    },
}

/// How far a spare's VM is made before its launch.
#[derive(Debug)]
pub enum Prepared {
    /// Image loaded, memory and vCPU made: the guest starts from its first instruction.
    Cold(Box<Prebuilt>),
    /// Restored from a template: the guest goes on from its park.
    Template(Box<crate::template::TemplateVm>),
}

impl Prepared {
    /// The VM with its devices' host ends and `config`'s arguments, ready to start.
    fn finish(
        self,
        config: &VmConfig,
        ends: crate::builder::HostEnds,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<crate::MicroVm, String> {
        match self {
            Prepared::Cold(prebuilt) => {
                prebuilt.finish_with(config, ends, console).map_err(|e| crate::error_chain(&e))
            }
            Prepared::Template(template) => {
                template.finish(config, ends, console).map_err(|e| crate::error_chain(&e))
            }
        }
    }
}

/// A spare's VM, made as far as it can be before its launch, and where its console goes.
pub struct SpareVm {
    pub prepared: Prepared,
    pub config: VmConfig,
    pub console: Box<dyn std::io::Write + Send>,
}

impl std::fmt::Debug for SpareVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpareVm").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Owns the VM and carries out [`VmmAction`]s on it. Lives on the VMM thread.
pub struct VmmController {
    slot: Slot,
    /// The teardown's result, until taken by [`VmmController::take_final`].
    last: Option<(StopCause, Result<RunReport, RunError>)>,
    metrics: VmMetrics,
    started: Option<Instant>,
    mem_mib: Option<u64>,
    /// What snapshots taken by this VMM carry about the VM.
    meta: SnapshotMeta,
    /// Where a loaded snapshot's host-side resources go.
    restore: RestorePaths,
    /// A `Finish` has been answered: the VMM's client has its report.
    finished: bool,
    /// The VM is stopped (as `timed_out`) this long after it started.
    run_timeout: Option<Duration>,
    /// The VM was built ahead (a spare's): its report says so.
    built_ahead: bool,
    /// A spare session VMM's VM and vCPU, made before it confined itself, for the snapshot
    /// handed over to it.
    ahead: Option<crate::snapshot::Ahead>,
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
            meta: SnapshotMeta::default(),
            restore: RestorePaths::default(),
            finished: false,
            run_timeout: None,
            built_ahead: false,
            ahead: None,
        }
    }

    /// A controller for a spare: `not_started` until [`VmmAction::StartVm`].
    pub fn spare(spare: SpareVm) -> Self {
        let mem_mib = Some(spare.config.mem_mib);
        VmmController { slot: Slot::Spare(Box::new(spare)), mem_mib, ..VmmController::not_started() }
    }

    /// What snapshots of this VM record about it (image, boot arguments, a label).
    pub fn with_snapshot_meta(mut self, meta: SnapshotMeta) -> Self {
        self.meta = meta;
        self
    }

    /// Where a loaded snapshot binds its vsock socket and finds its disk.
    pub fn with_restore_paths(mut self, paths: RestorePaths) -> Self {
        self.restore = paths;
        self
    }

    /// A spare session VMM: no VM yet, `ahead` made for the snapshot that
    /// [`VmmAction::LoadHandedSnapshot`] will hand over; a snapshot named by its folder is
    /// refused (this VMM is confined to no paths).
    pub fn restore_spare(ahead: crate::snapshot::Ahead) -> Self {
        VmmController { ahead: Some(ahead), built_ahead: true, ..VmmController::not_started() }
    }

    /// A controller with no VM yet, waiting for [`VmmAction::LoadSnapshot`].
    pub fn not_started() -> Self {
        VmmController {
            slot: Slot::NotStarted,
            last: None,
            metrics: VmMetrics::default(),
            started: None,
            mem_mib: None,
            meta: SnapshotMeta::default(),
            restore: RestorePaths::default(),
            finished: false,
            run_timeout: None,
            built_ahead: false,
            ahead: None,
        }
    }

    /// When the VM started (a spare's: when `StartVm` started it).
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Stops the VM (as `timed_out`) `timeout` after it starts (a spare's: after `StartVm`).
    pub fn with_run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = Some(timeout);
        self
    }

    /// When the running VM is due to be stopped for its run timeout.
    pub fn run_deadline(&self) -> Option<Instant> {
        match self.slot {
            Slot::Live(_) => Some(self.started? + self.run_timeout?),
            _ => None,
        }
    }

    /// Stops the VM if its run timeout has passed. True if this call stopped it.
    pub fn stop_if_over_run_timeout(&mut self) -> bool {
        match (self.run_deadline(), self.run_timeout) {
            (Some(deadline), Some(timeout)) if Instant::now() >= deadline => {
                let timeout_ms = timeout.as_millis() as u64;
                self.stop_for(StopCause::MaxDuration, GuestExit::TimedOut { timeout_ms })
            }
            _ => false,
        }
    }

    /// Whether a `Finish` has been answered.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The VM's state (a guest that has ended but is not torn down yet still counts as live;
    /// [`VmmController::reap`] settles that).
    pub fn state(&self) -> VmState {
        match &self.slot {
            Slot::NotStarted | Slot::Spare(_) => VmState::NotStarted,
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
            VmmAction::StartVm(start) => self.start_spare(&start),
            VmmAction::Finish { grace } => self.finish(grace),
            VmmAction::CreateSnapshot { snapshot_dir } => {
                check_snapshot_dir(&snapshot_dir)?;
                self.live(name, VmState::Paused)?;
                self.create_snapshot(Some(&snapshot_dir), None)
            }
            VmmAction::CreateSnapshotInto { handed } => {
                self.live(name, VmState::Paused)?;
                let files = handed
                    .files()
                    .map_err(|why| VmmActionError::BadRequest(format!("cannot {name}: {why}")))?;
                self.create_snapshot(None, Some(files))
            }
            VmmAction::LoadSnapshot { snapshot_dir, resume } => {
                check_snapshot_dir(&snapshot_dir)?;
                self.check_loadable(name)?;
                if self.built_ahead {
                    return Err(VmmActionError::BadRequest(format!(
                        "cannot {name} by its folder: this VMM is confined to no paths; hand the \
                         snapshot's files over as descriptors"
                    )));
                }
                self.load_snapshot(Loading::Dir(&snapshot_dir), resume)
            }
            VmmAction::LoadHandedSnapshot { handed, resume, max_duration } => {
                self.check_loadable(name)?;
                if max_duration.is_some() {
                    self.run_timeout = max_duration;
                }
                let files = handed
                    .files()
                    .map_err(|why| VmmActionError::BadRequest(format!("cannot {name}: {why}")))?;
                self.load_snapshot(Loading::Handed(files), resume)
            }
        }
    }

    /// `StartVm`: the spare's VM gets its devices' host ends from the handed-over descriptors,
    /// and starts. Descriptors that do not fit are refused (400) and the spare keeps waiting.
    fn start_spare(&mut self, start: &StartVm) -> Result<VmmData, VmmActionError> {
        const ACTION: &str = "start the VM";
        if !matches!(self.slot, Slot::Spare(_)) {
            let hint = match self.slot {
                Slot::NotStarted => "; this VMM waits for a snapshot, not a launch",
                _ => "; a spare starts once",
            };
            return Err(self.wrong_state(ACTION, hint));
        }
        let ends =
            start.host_ends().map_err(|why| VmmActionError::BadRequest(format!("cannot {ACTION}: {why}")))?;
        let Slot::Spare(spare) = std::mem::replace(&mut self.slot, Slot::Stopped { exit: None }) else {
            unreachable!("checked above");
        };
        let SpareVm { prepared, config, console } = *spare;
        // Its launch counts from this request, not from when the spare was started.
        let config = VmConfig { launch_start: Instant::now(), ..config };
        self.built_ahead = true;
        // A VM that could not start is stopped for good, and says why (to `GET /vm` and
        // `finish` alike).
        let mut failed = |message: String| {
            self.slot = Slot::Stopped { exit: Some(GuestExit::VmmFailed { error: message.clone() }) };
            VmmActionError::Internal { action: ACTION, message }
        };
        let vm = match prepared.finish(&config, ends, console) {
            Ok(vm) => vm,
            Err(message) => return Err(failed(message)),
        };
        let running = match vm.start() {
            Ok(running) => running,
            Err(e) => return Err(failed(crate::error_chain(&e))),
        };
        self.started = Some(running.started());
        self.slot = Slot::Live(Box::new(running));
        Ok(VmmData::Empty)
    }

    /// `Finish`: the report, once the guest has ended (waiting up to `grace`) or been stopped.
    fn finish(&mut self, grace: Duration) -> Result<VmmData, VmmActionError> {
        const ACTION: &str = "finish";
        if let Some(fd) = self.exit_fd() {
            // The wait ends at the run timeout too, which then stops the VM as timed out.
            let now = Instant::now();
            let until = self.run_deadline().map_or(grace, |d| d.saturating_duration_since(now).min(grace));
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            let ms = until.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the call; the exit fd lives as long as the VM.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.stop_if_over_run_timeout();
        }
        match self.slot {
            Slot::NotStarted | Slot::Spare(_) => return Err(self.wrong_state(ACTION, "; start it first")),
            Slot::Live(_) => {
                if !self.reap() {
                    self.teardown(StopCause::Api, Some(GuestExit::Stopped));
                }
            }
            Slot::Stopped { .. } => {}
        }
        self.finished = true;
        match &self.last {
            Some((_, Ok(report))) => Ok(VmmData::Stopped(Box::new(report.clone()))),
            Some((_, Err(e))) => {
                Err(VmmActionError::Internal { action: ACTION, message: crate::error_chain(e) })
            }
            None => {
                let message = match &self.slot {
                    Slot::Stopped { exit: Some(GuestExit::VmmFailed { error }) } => error.clone(),
                    _ => "the report was already taken".into(),
                };
                Err(VmmActionError::Internal { action: ACTION, message })
            }
        }
    }

    /// Snapshot create: the VM is paused (checked by the caller). The vCPU's state is read on
    /// its own (parked) thread; the devices' and memory through the running VM. The VM stays
    /// paused whatever happens: a failed snapshot (a full disk, say) leaves nothing behind and
    /// the session can resume.
    fn create_snapshot(
        &mut self,
        snapshot_dir: Option<&Path>,
        into: Option<crate::snapshot::SnapshotOutput>,
    ) -> Result<VmmData, VmmActionError> {
        const ACTION: &str = "create a snapshot";
        let meta = self.meta.clone();
        let vm = self.live(ACTION, VmState::Paused)?;
        let vcpu = vm
            .with_paused_vcpu(crate::snapshot::vcpu_state::save)
            .map_err(|e| vcpu_error(ACTION, e))?
            .map_err(|e| snapshot_error(ACTION, &e))?;
        let info = match (snapshot_dir, into) {
            (_, Some(files)) => crate::snapshot::create_into(files, vcpu, vm.bus(), vm.memory(), meta),
            (Some(dir), None) => crate::snapshot::create(dir, vcpu, vm.bus(), vm.memory(), meta),
            (None, None) => return Err(VmmActionError::BadRequest(format!("cannot {ACTION}: say where"))),
        }
        .map_err(|e| snapshot_error(ACTION, &e))?;
        self.metrics.snapshots_created += 1;
        Ok(VmmData::Snapshot(serde_json::to_value(&info).unwrap_or_default()))
    }

    /// A snapshot loads only into a VMM that has no VM yet (and, a spare's, has not used up
    /// the VM it made ahead).
    fn check_loadable(&self, action: &'static str) -> Result<(), VmmActionError> {
        if !matches!(self.slot, Slot::NotStarted) {
            return Err(self.wrong_state(action, "; a snapshot loads into a fresh VMM (session --restore)"));
        }
        if self.built_ahead && self.ahead.is_none() {
            return Err(VmmActionError::BadRequest(format!(
                "cannot {action}: a failed load used up the VM this spare made; start another"
            )));
        }
        Ok(())
    }

    /// Snapshot load, into a VMM that has no VM yet: checks and maps the snapshot (lazily), starts
    /// the restored vCPU, and pauses it again unless `resume`. A snapshot that cannot be used
    /// (corrupt, truncated, another format or VMM version, a CPU feature this host lacks, a
    /// missing memory file) is refused with the reason, and the VMM stays `not_started`.
    fn load_snapshot(&mut self, from: Loading<'_>, resume: bool) -> Result<VmmData, VmmActionError> {
        const ACTION: &str = "load a snapshot";
        let loaded_at = Instant::now();
        let mut options = crate::snapshot::restore::RestoreOptions::new(Box::new(std::io::stderr()));
        options.vsock_uds = self.restore.vsock_uds.clone();
        options.disk_override = self.restore.disk_override.clone();
        options.launch_start = loaded_at;
        let refused = |e: crate::snapshot::SnapshotError| {
            VmmActionError::BadRequest(format!("cannot {ACTION}: {}", crate::error_chain(&e)))
        };
        let (vm, snapshot_dir) = match from {
            Loading::Dir(dir) => (crate::snapshot::restore::load(dir, options).map_err(refused)?, Some(dir)),
            Loading::Handed(files) => {
                let vm = crate::snapshot::restore::load_files(files, &mut self.ahead, options);
                (vm.map_err(refused)?, None)
            }
        };
        let mut running = vm
            .start()
            .map_err(|e| VmmActionError::Internal { action: ACTION, message: crate::error_chain(&e) })?;
        if !resume {
            running.pause().map_err(|e| vcpu_error(ACTION, e))?;
        }
        let load_ms = loaded_at.elapsed().as_secs_f64() * 1000.0;
        self.started = Some(running.started());
        self.mem_mib = Some(running.mem_mib());
        self.slot = Slot::Live(Box::new(running));
        self.metrics.snapshots_loaded += 1;
        Ok(VmmData::Snapshot(serde_json::json!({
            "snapshot_dir": snapshot_dir,
            "state": self.state(),
            "load_ms": load_ms,
        })))
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
        let built_ahead = self.built_ahead;
        let result = match exit {
            Some(exit) => vm.stop_as(exit),
            None => vm.finish(),
        }
        .map(|report| RunReport { built_ahead, ..report });
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

/// Where a snapshot to load comes from.
enum Loading<'a> {
    Dir(&'a Path),
    Handed(crate::snapshot::SnapshotFiles),
}

/// A vCPU that would not pause or resume. Wrong-state answers are caught before this; what is
/// left is the VMM's trouble.
fn vcpu_error(action: &'static str, e: VcpuControlError) -> VmmActionError {
    VmmActionError::Internal { action, message: e.to_string() }
}

/// A snapshot that could not be written or read: the VMM's trouble (a full disk, say), with
/// the whole reason.
fn snapshot_error(action: &'static str, e: &crate::snapshot::SnapshotError) -> VmmActionError {
    VmmActionError::Internal { action, message: crate::error_chain(e) }
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
        let e = c
            .handle(VmmAction::LoadSnapshot { snapshot_dir: "/nonexistent/s".into(), resume: true })
            .unwrap_err();
        assert!(matches!(e, VmmActionError::BadRequest(_)), "{e}");
        assert!(e.to_string().contains("no snapshot state file"), "{e}");
        assert_eq!(c.state(), VmState::NotStarted);
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
