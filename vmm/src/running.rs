//! A started microVM ([`MicroVm::start`](crate::MicroVm::start)): its vCPU runs or is paused;
//! it ends when the guest exits or when it is stopped, and its teardown always scrubs: stop the
//! vCPU → close the VM → flush the console → zero guest memory, verify, release.
//!
//! `RunningVm` is driven from one thread, the VMM thread (the one that started it, now under
//! the `vmm` seccomp filter). It holds what a snapshot needs: the guest memory, the I/O bus
//! with the device states, and the parked vCPU through [`RunningVm::with_paused_vcpu`].

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::devices::IoBus;
use crate::microvm::{exit_of, GuestExit, RunError, RunReport};
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vcpu::{VcpuControlError, VcpuHandle, VcpuOutcome};
use crate::vstate::vm::Vm;

/// How long pause and resume wait for the vCPU thread before giving up. Both normally take
/// well under a millisecond; the bound only matters if the thread is wedged.
pub const VCPU_CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

pub use cella_host::report::PauseStats;

/// A microVM whose vCPU thread has started.
#[derive(Debug)]
pub struct RunningVm {
    // Field order is drop order: the helper vCPU stops before the boot vCPU (it may signal
    // that one's thread until it ends), the vCPU threads before the VM closes, and the memory
    // (scrubbed on drop) goes last.
    helper: Option<VcpuHandle>,
    vcpu: VcpuHandle,
    vm: Vm,
    bus: Arc<IoBus>,
    memory: GuestMemfd,
    launch_start: Instant,
    started: Instant,
    mem_mib: u64,
    stats: PauseStats,
    paused_since: Option<Instant>,
    paused_before: Duration,
}

impl RunningVm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: Vm,
        vcpu: VcpuHandle,
        helper: Option<VcpuHandle>,
        memory: GuestMemfd,
        bus: Arc<IoBus>,
        launch_start: Instant,
        started: Instant,
        mem_mib: u64,
    ) -> Self {
        RunningVm {
            helper,
            vcpu,
            vm,
            bus,
            memory,
            launch_start,
            started,
            mem_mib,
            stats: PauseStats::default(),
            paused_since: None,
            paused_before: Duration::ZERO,
        }
    }

    /// Whether the vCPU is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpu.is_paused()
    }

    /// Whether the guest has ended on its own (exit, crash); [`RunningVm::finish`] reports it.
    pub fn has_ended(&mut self) -> bool {
        self.vcpu.has_ended()
    }

    /// When the vCPU thread was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Guest memory in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// A descriptor that becomes readable when the guest has ended (for an event loop).
    pub fn exit_fd(&self) -> RawFd {
        self.vcpu.exit_fd()
    }

    /// The guest memory (snapshot create writes it out).
    pub fn memory(&self) -> &GuestMemfd {
        &self.memory
    }

    /// The I/O bus (snapshot create saves the device states through it).
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Pause and resume counters, with the time paused so far.
    pub fn pause_stats(&self) -> PauseStats {
        let current = self.paused_since.map_or(Duration::ZERO, |since| since.elapsed());
        PauseStats { paused_ms: (self.paused_before + current).as_millis() as u64, ..self.stats.clone() }
    }

    /// Pauses the vCPU; returns how long that took. The guest keeps its memory and devices; its
    /// vCPU thread is parked and uses no CPU.
    pub fn pause(&mut self) -> Result<Duration, VcpuControlError> {
        let asked = Instant::now();
        if let Some(helper) = &mut self.helper {
            helper.pause(VCPU_CONTROL_TIMEOUT)?;
        }
        self.vcpu.pause(VCPU_CONTROL_TIMEOUT)?;
        let took = asked.elapsed();
        self.paused_since = Some(Instant::now());
        self.stats.pauses += 1;
        self.stats.last_pause_us = Some(took.as_micros() as u64);
        Ok(took)
    }

    /// Waits up to `timeout` for the guest to park itself (a template build); the vCPU is then
    /// paused, ready for its snapshot.
    pub fn wait_guest_park(&mut self, timeout: Duration) -> Result<(), VcpuControlError> {
        self.vcpu.wait_guest_park(timeout)?;
        self.paused_since = Some(Instant::now());
        Ok(())
    }

    /// Resumes a paused vCPU; returns how long that took.
    pub fn resume(&mut self) -> Result<Duration, VcpuControlError> {
        let asked = Instant::now();
        self.vcpu.resume(VCPU_CONTROL_TIMEOUT)?;
        if let Some(helper) = &mut self.helper {
            helper.resume(VCPU_CONTROL_TIMEOUT)?;
        }
        let took = asked.elapsed();
        if let Some(since) = self.paused_since.take() {
            self.paused_before += since.elapsed();
        }
        self.stats.resumes += 1;
        self.stats.last_resume_us = Some(took.as_micros() as u64);
        Ok(took)
    }

    /// Runs `f` with the paused vCPU's fd on the vCPU thread (e.g. saving its registers).
    pub fn with_paused_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
    ) -> Result<R, VcpuControlError> {
        if self.helper.is_some() {
            return Err(VcpuControlError::HelperRunning);
        }
        self.vcpu.with_paused_vcpu(f)
    }

    /// Waits up to `timeout` for the guest to end on its own; true if it has.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        self.vcpu.wait_end(timeout)
    }

    /// Stops the VM and tears it down. If the guest had already ended on its own, the report
    /// says how; otherwise it says `stopped`.
    pub fn stop(mut self) -> Result<RunReport, RunError> {
        if self.vcpu.has_ended() {
            return self.finish();
        }
        self.stop_as(GuestExit::Stopped)
    }

    /// Stops the VM and tears it down, reporting `exit` as how it ended (e.g. `timed_out` at the
    /// maximum duration) whatever the vCPU was doing.
    pub fn stop_as(self, exit: GuestExit) -> Result<RunReport, RunError> {
        self.teardown(Some(exit))
    }

    /// Tears down a VM whose guest has ended (see [`RunningVm::wait`]) and reports how it ended.
    pub fn finish(self) -> Result<RunReport, RunError> {
        self.teardown(None)
    }

    fn teardown(self, kicked_as: Option<GuestExit>) -> Result<RunReport, RunError> {
        let RunningVm { helper, mut vcpu, vm, bus, memory, launch_start, mem_mib, .. } = self;
        let vcpus = 1 + u32::from(helper.is_some());
        if let Some(mut helper) = helper {
            helper.stop();
        }
        let outcome = vcpu.stop();
        drop(vcpu);
        drop(vm);
        let console =
            Arc::try_unwrap(bus).map(|bus| bus.into_serial().into_console().finish()).unwrap_or_default();
        let scrub = memory.scrub()?;
        let (exit, launch_us, run_us, exits) = match outcome {
            Some(VcpuOutcome { stop, times }) => (
                kicked_as.unwrap_or_else(|| exit_of(stop)),
                times.first_exit.map_or(0, |t| t.duration_since(launch_start).as_micros() as u64),
                times.stopped.duration_since(times.entered).as_micros() as u64,
                times.exits,
            ),
            None => {
                (GuestExit::VmmFailed { error: "the vCPU thread ended without a report".into() }, 0, 0, 0)
            }
        };
        Ok(RunReport { exit, launch_us, run_us, exits, scrub, console, mem_mib, built_ahead: false, vcpus })
    }
}
