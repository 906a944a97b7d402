//! Rebuilding a microVM from a snapshot directory: check the state file, the host's CPU and
//! the memory file; create the VM; map the memory file privately as its memory (no copy:
//! pages fault in on first touch); create the vCPU with this host's CPUID and load its saved
//! state; rebuild the devices and the bus. The result runs like a freshly built VM, and its
//! memory is scrubbed at teardown like any other (the pages the guest wrote; see
//! [`crate::scrub`]).
//!
//! Measured on this host (debug build, `bench snapshot`): `load` takes 1.6–3 ms for 64 and
//! 512 MiB alike. The restored guest's first `KVM_RUN` costs ~9 ms the first time any VM maps
//! a given memory file and ~0.3–0.4 ms afterwards (a cold launch: ~0.2–0.3 ms); touching the
//! same pages from the VMM costs 1–5 µs a page, so that first-time cost is in this (nested,
//! PVM) KVM's fault path, not in the page cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cpu::CpuFeatures;
use super::format;
use super::memory_file;
use super::vcpu_state;
use super::{SnapshotError, SnapshotState, MEMORY_FILE, STATE_FILE};
use crate::devices::legacy::console::{ConsoleLimits, GuestConsole};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{DeviceState, VirtioDevice};
use crate::devices::{IoBus, StateError};
use crate::microvm::MicroVm;
use crate::vmm_config::VmConfig;
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// How to restore: where the new VM's host-side resources go, and how it runs.
pub struct RestoreOptions {
    /// Bind the vsock device's host socket here (default: the path saved in the snapshot).
    pub vsock_uds: Option<PathBuf>,
    /// Open this file as the disk instead of the saved path (same size required).
    pub disk_override: Option<PathBuf>,
    /// Where guest console output goes.
    pub console: Box<dyn Write + Send>,
    pub console_limits: ConsoleLimits,
    /// Wall-clock limit from the restored guest's first instruction.
    pub timeout: Option<Duration>,
    /// Set to stop the VM from outside.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The instant `launch_us` counts from.
    pub launch_start: Instant,
}

impl RestoreOptions {
    /// Defaults: saved vsock path and disk, console to `console` with the default limits, no
    /// timeout, no cancel flag.
    pub fn new(console: Box<dyn Write + Send>) -> Self {
        RestoreOptions {
            vsock_uds: None,
            disk_override: None,
            console,
            console_limits: ConsoleLimits::default(),
            timeout: None,
            cancel: None,
            launch_start: Instant::now(),
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("vsock_uds", &self.vsock_uds)
            .field("disk_override", &self.disk_override)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Reads and checks the snapshot in `snapshot_dir` without building anything: the state file
/// (format, checksum, VMM version) and the memory file (present, right size). The CPU
/// features need a vCPU of this host and are checked by [`load`].
pub fn check(snapshot_dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let state = format::read(&snapshot_dir.join(STATE_FILE))?;
    memory_file::check(&snapshot_dir.join(MEMORY_FILE), state.memory.size)?;
    Ok(state)
}

/// Rebuilds the microVM saved in `snapshot_dir`, ready to [`MicroVm::run`].
pub fn load(snapshot_dir: &Path, opts: RestoreOptions) -> Result<MicroVm, SnapshotError> {
    let state = check(snapshot_dir)?;
    let vm = Vm::new()?;
    let vcpu = Vcpu::new(&vm, 0)?;
    state.vcpu.features.check_on(&CpuFeatures::of_vcpu(vcpu.fd())?)?;
    let memory = GuestMemfd::from_snapshot(&snapshot_dir.join(MEMORY_FILE), state.memory.size)?;
    vm.register_memory(&memory)?;
    vcpu_state::restore(vcpu.fd(), &state.vcpu)?;

    let mut transports = Vec::with_capacity(state.devices.virtio.len());
    for saved in &state.devices.virtio {
        let device: Box<dyn VirtioDevice> = match &saved.device {
            DeviceState::Block(block) => Box::new(Block::restore(block, opts.disk_override.as_deref())?),
            DeviceState::Vsock(vsock) => {
                let path = opts.vsock_uds.as_deref().unwrap_or(&vsock.uds_path);
                Box::new(
                    Vsock::restore(path, vsock)
                        .map_err(|source| StateError::Vsock { path: path.to_owned(), source })?,
                )
            }
        };
        transports.push(MmioTransport::restore(device, memory.memory().clone(), saved)?);
    }
    let console = GuestConsole::new(opts.console, opts.console_limits);
    let serial = SerialDevice::restore(&state.devices.serial, console).map_err(StateError::from)?;
    let bus = IoBus::new(serial, memory.memory().clone())
        .map_err(SnapshotError::Bus)?
        .with_virtio(state.devices.mmio_base, transports);

    let config = VmConfig {
        mem_mib: state.memory.size >> 20,
        timeout: opts.timeout,
        cancel: opts.cancel,
        launch_start: opts.launch_start,
        console_limits: opts.console_limits,
        ..VmConfig::new(state.meta.image.clone().unwrap_or_default(), state.meta.args.clone())
    };
    Ok(MicroVm::new(vm, vcpu, memory, Arc::new(bus), &config))
}
