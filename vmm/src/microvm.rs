//! A built microVM: runs it to its end and tears it down, always scrubbing its memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::console::ConsoleStats;
use crate::devices::IoBus;
use crate::scrub::{ScrubError, ScrubReport};
use crate::vmm_config::VmConfig;
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome, VcpuStop};
use crate::vstate::vm::Vm;

/// How often the run loop looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestExit {
    /// The guest ended itself with a status.
    Exited { code: u32 },
    /// The guest faulted or did something no device answers.
    Crashed {
        reason: String,
        #[serde(serialize_with = "hex", deserialize_with = "from_hex")]
        rip: u64,
    },
    /// The guest broke a device's contract (the device refused what it wrote).
    DeviceError { device: String, reason: String },
    /// The wall-clock limit passed.
    TimedOut { timeout_ms: u64 },
    /// Stopped from outside (the cancel flag).
    Stopped,
    /// The VMM could not keep the VM running.
    VmmFailed { error: String },
}

fn hex<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{value:#x}"))
}

fn from_hex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    let digits =
        text.strip_prefix("0x").ok_or_else(|| serde::de::Error::custom("rip is not 0x-prefixed hex"))?;
    u64::from_str_radix(digits, 16).map_err(serde::de::Error::custom)
}

/// Everything a run produced (`cella-vmm run --json` prints it; a jailed scan reads it back).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub exit: GuestExit,
    /// From `VmConfig::launch_start` to the guest's first VM exit, in µs.
    pub launch_us: u64,
    /// From the first `KVM_RUN` to the vCPU stopping, in µs.
    pub run_us: u64,
    /// VM exits handled.
    pub exits: u64,
    pub scrub: ScrubReport,
    pub console: ConsoleStats,
    pub mem_mib: u64,
}

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
    memory: GuestMemfd,
    bus: Arc<IoBus>,
    timeout: Option<Duration>,
    cancel: Option<Arc<AtomicBool>>,
    launch_start: Instant,
    mem_mib: u64,
}

impl MicroVm {
    pub(crate) fn new(vm: Vm, vcpu: Vcpu, memory: GuestMemfd, bus: Arc<IoBus>, config: &VmConfig) -> Self {
        MicroVm {
            vm,
            vcpu,
            memory,
            bus,
            timeout: config.timeout,
            cancel: config.cancel.clone(),
            launch_start: config.launch_start,
            mem_mib: config.mem_mib,
        }
    }

    /// Runs the guest until it exits, crashes, times out or is stopped; then stops the vCPU,
    /// closes the VM, flushes the console and scrubs guest memory.
    pub fn run(self) -> Result<RunReport, RunError> {
        let MicroVm { vm, vcpu, memory, bus, timeout, cancel, launch_start, mem_mib } = self;
        let started = Instant::now();
        let mut handle = vcpu.start(bus.clone())?;
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
        let deadline = timeout.map(|t| started + t);
        let (outcome, kicked_as) = loop {
            let now = Instant::now();
            let until_deadline = deadline.map(|d| d.saturating_duration_since(now));
            let slice = match (&cancel, until_deadline) {
                (Some(_), Some(d)) => d.min(CANCEL_POLL),
                (Some(_), None) => CANCEL_POLL,
                (None, Some(d)) => d,
                (None, None) => Duration::from_secs(3600),
            };
            if let Some(outcome) = handle.wait(slice) {
                break (Some(outcome), None);
            }
            if cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire)) {
                break (handle.stop(), Some(GuestExit::Stopped));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let timeout_ms = timeout.unwrap_or_default().as_millis() as u64;
                break (handle.stop(), Some(GuestExit::TimedOut { timeout_ms }));
            }
        };
        drop(handle);
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
        Ok(RunReport { exit, launch_us, run_us, exits, scrub, console, mem_mib })
    }
}

fn exit_of(stop: VcpuStop) -> GuestExit {
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
