//! The typed results a VMM hands its host: how a VM ended ([`GuestExit`]), its run report
//! with the scrub evidence ([`RunReport`], [`ScrubReport`]), and what its control API answers
//! about it ([`VmInfo`], [`VmMetrics`]). Both sides use these types: the VMM serializes them,
//! the host reads them back.

use serde::{Deserialize, Serialize};

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
    /// The VM was built ahead of its launch, in a spare (`cella-vmm spare`): `launch_us` counts
    /// from the launch (`PUT /vm`), not from the VMM's start.
    #[serde(default)]
    pub built_ahead: bool,
    /// vCPUs the guest ran on: 1, or 2 with a helper vCPU (a scan of a large artifact).
    #[serde(default = "one_vcpu")]
    pub vcpus: u32,
}

/// What a report from before helper vCPUs means.
pub fn one_vcpu() -> u32 {
    1
}

/// What the console passed on and what it dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleStats {
    /// Guest bytes written to the host.
    pub bytes: u64,
    /// Guest bytes dropped over the limits.
    pub dropped: u64,
}

/// The evidence a scrub leaves, recorded in the run report and (later) the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Bytes zeroed: every page the guest or the VMM touched.
    pub bytes: u64,
    /// Pages read back through the memory file and found to be zero.
    pub pages_verified: u64,
    /// Whether every touched byte read back as zero (always true in a returned report).
    pub verified_zero: bool,
    /// Whether the memory was released (hole-punched) and found to hold no blocks.
    pub released: bool,
    /// Blocks the memory file held after release (always 0 in a returned report).
    pub blocks_after_release: u64,
    /// Guest memory size: what the guest was given.
    pub mem_bytes: u64,
    /// Contiguous touched ranges.
    pub ranges: u64,
    /// Wall time of the whole scrub, in milliseconds.
    pub ms: f64,
}

/// Pause and resume counters and latencies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseStats {
    pub pauses: u64,
    pub resumes: u64,
    /// The last pause, from the request to the vCPU parked, in µs.
    pub last_pause_us: Option<u64>,
    /// The last resume, from the request to the vCPU about to enter the guest, in µs.
    pub last_resume_us: Option<u64>,
    /// Time spent paused, the current pause included, in ms.
    pub paused_ms: u64,
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
    /// Snapshots written by this VMM.
    #[serde(default)]
    pub snapshots_created: u64,
    /// Snapshots loaded by this VMM (0 or 1).
    #[serde(default)]
    pub snapshots_loaded: u64,
}
