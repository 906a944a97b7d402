//! A built microVM: [`MicroVm::start`] starts it as a [`RunningVm`] (pause, resume, stop);
//! [`MicroVm::run`] runs it to its end. Either way the teardown always scrubs its memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::IoBus;
use crate::running::RunningVm;
use crate::scrub::ScrubError;
use crate::vmm_config::VmConfig;
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuStop};
use crate::vstate::vm::Vm;

/// How often the run loop looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

pub use cella_host::report::{GuestExit, RunReport};

/// Why a run could not be reported. The VM is gone either way.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the vCPU")]
    Start(#[from] VcpuError),
    #[error("cannot confine the VMM's main thread")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("the guest memory scrub failed; this VM's memory cannot be shown to be clean")]
    Scrub(#[from] ScrubError),
}

/// A VM ready to run.
#[derive(Debug)]
pub struct MicroVm {
    vm: Vm,
    vcpu: Vcpu,
    /// A helper vCPU, configured, started beside `vcpu` (see [`cella_abi::BootInfo::helpers`]).
    helper: Option<Vcpu>,
    memory: GuestMemfd,
    bus: Arc<IoBus>,
    timeout: Option<Duration>,
    cancel: Option<Arc<AtomicBool>>,
    launch_start: Instant,
    mem_mib: u64,
}

impl MicroVm {
    /// Assembles a VM from its parts: what [`crate::build`] does at the end, and what a restore
    /// does with a VM, vCPU, memory and bus rebuilt from a snapshot.
    pub fn from_parts(vm: Vm, vcpu: Vcpu, memory: GuestMemfd, bus: Arc<IoBus>, config: &VmConfig) -> Self {
        MicroVm {
            vm,
            vcpu,
            helper: None,
            memory,
            bus,
            timeout: config.timeout,
            cancel: config.cancel.clone(),
            launch_start: config.launch_start,
            mem_mib: config.mem_mib,
        }
    }

    pub(crate) fn new(vm: Vm, vcpu: Vcpu, memory: GuestMemfd, bus: Arc<IoBus>, config: &VmConfig) -> Self {
        Self::from_parts(vm, vcpu, memory, bus, config)
    }

    /// Gives the VM a helper vCPU, configured and announced to the guest in its boot info.
    pub(crate) fn with_helper(self, helper: Option<Vcpu>) -> Self {
        MicroVm { helper, ..self }
    }

    /// Whether the VM has a helper vCPU.
    pub fn has_helper(&self) -> bool {
        self.helper.is_some()
    }

    /// The guest memory (e.g. to fill it from a snapshot before starting).
    pub fn memory(&self) -> &GuestMemfd {
        &self.memory
    }

    /// The I/O bus with the devices (e.g. to restore device states before starting).
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// The vCPU, not yet started (e.g. to load restored registers).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    /// Starts the vCPU thread and confines the calling thread (the VMM thread from now on) with
    /// its seccomp filter. The configuration's `timeout` and `cancel` are [`MicroVm::run`]'s
    /// business; a caller of `start` enforces its own limits.
    pub fn start(self) -> Result<RunningVm, RunError> {
        let MicroVm { vm, vcpu, helper, memory, bus, launch_start, mem_mib, .. } = self;
        let started = Instant::now();
        let handle = vcpu.start(bus.clone())?;
        // If the helper cannot start, the boot vCPU's handle stops it when dropped.
        let helper = helper.map(|h| h.start_helper(bus.clone(), &handle)).transpose()?;
        let running = RunningVm::new(vm, handle, helper, memory, bus, launch_start, started, mem_mib);
        // On error the running VM is dropped: its vCPU stops and its memory is scrubbed.
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
        Ok(running)
    }

    /// Runs the guest until it exits, crashes, times out or is stopped; then stops the vCPU,
    /// closes the VM, flushes the console and scrubs guest memory.
    pub fn run(self) -> Result<RunReport, RunError> {
        let (timeout, cancel) = (self.timeout, self.cancel.clone());
        let mut running = self.start()?;
        let deadline = timeout.map(|t| running.started() + t);
        loop {
            let now = Instant::now();
            let until_deadline = deadline.map(|d| d.saturating_duration_since(now));
            let slice = match (&cancel, until_deadline) {
                (Some(_), Some(d)) => d.min(CANCEL_POLL),
                (Some(_), None) => CANCEL_POLL,
                (None, Some(d)) => d,
                (None, None) => Duration::from_secs(3600),
            };
            if running.wait(slice) {
                return running.finish();
            }
            if cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire)) {
                return running.stop_as(GuestExit::Stopped);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let timeout_ms = timeout.unwrap_or_default().as_millis() as u64;
                return running.stop_as(GuestExit::TimedOut { timeout_ms });
            }
        }
    }
}

pub(crate) fn exit_of(stop: VcpuStop) -> GuestExit {
    match stop {
        VcpuStop::GuestExit(code) => GuestExit::Exited { code },
        VcpuStop::TripleFault { rip } => {
            GuestExit::Crashed { reason: "triple fault: the guest faulted and has no handler".into(), rip }
        }
        VcpuStop::InternalError { suberror, rip } => GuestExit::Crashed {
            reason: format!(
                "KVM could not emulate a guest instruction (internal error, suberror {suberror})"
            ),
            rip,
        },
        VcpuStop::UnhandledIo { what, rip } => {
            GuestExit::Crashed { reason: format!("unhandled {what}"), rip }
        }
        VcpuStop::DeviceFailure { device, reason } => {
            GuestExit::DeviceError { device: device.to_owned(), reason }
        }
        VcpuStop::UnexpectedExit { exit, rip } => {
            GuestExit::Crashed { reason: format!("unexpected VM exit: {exit}"), rip }
        }
        VcpuStop::EntryFailed { reason } => {
            GuestExit::VmmFailed { error: format!("VM entry failed (hardware reason {reason:#x})") }
        }
        VcpuStop::Kvm(e) => GuestExit::VmmFailed { error: format!("KVM_RUN failed: {e}") },
        VcpuStop::Seccomp(e) => GuestExit::VmmFailed { error: crate::error_chain(&e) },
        VcpuStop::Kicked => GuestExit::Stopped,
        VcpuStop::ThreadLost => {
            GuestExit::VmmFailed { error: "the vCPU thread ended without a report".into() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cella_host::{ConsoleStats, ScrubReport};

    #[test]
    fn a_run_report_reads_back_from_its_json() {
        // `scan --jailed` reads the jailed VMM's `run --json` line back into a report.
        let report = RunReport {
            exit: GuestExit::Crashed { reason: "triple fault".into(), rip: 0x20_1a2b },
            launch_us: 4100,
            run_us: 33_000,
            exits: 12,
            scrub: ScrubReport {
                bytes: 8192,
                pages_verified: 2,
                verified_zero: true,
                released: true,
                blocks_after_release: 0,
                mem_bytes: 128 << 20,
                ranges: 1,
                ms: 0.25,
            },
            console: ConsoleStats { bytes: 10, dropped: 0 },
            mem_mib: 128,
            built_ahead: true,
            vcpus: 2,
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#""rip":"0x201a2b""#), "{text}");
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back.exit, report.exit);
        assert_eq!(back.scrub, report.scrub);
        assert_eq!((back.launch_us, back.run_us, back.exits, back.mem_mib), (4100, 33_000, 12, 128));
        for exit in [GuestExit::Exited { code: 3 }, GuestExit::Stopped, GuestExit::TimedOut { timeout_ms: 5 }]
        {
            let text = serde_json::to_string(&exit).unwrap();
            assert_eq!(serde_json::from_str::<GuestExit>(&text).unwrap(), exit);
        }
        assert!(serde_json::from_str::<GuestExit>(r#"{"kind":"crashed","reason":"x","rip":"12"}"#).is_err());
    }
}
