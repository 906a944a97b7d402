//! Rebuilding a microVM from a snapshot directory: check the state file, the host's CPU and
//! the memory file; create the VM; map the memory file privately as its memory (no copy:
//! pages fault in on first touch); create the vCPU with this host's CPUID and load its saved
//! state; rebuild the devices and the bus. The result runs like a freshly built VM, and its
//! memory is scrubbed at teardown like any other (the pages the guest wrote; see
//! [`crate::scrub`]).
//!
//! [`load_files`] does the same from the snapshot's files handed over as descriptors, into a VM
//! and vCPU made [`Ahead`]: a spare session VMM (`cella-vmm session --api-fd`) makes those
//! before it confines itself to no paths, so the whole restore opens nothing.
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
    let ahead = Ahead::new()?;
    state.vcpu.features.check_on(&ahead.features)?;
    let memory = GuestMemfd::from_snapshot(&snapshot_dir.join(MEMORY_FILE), state.memory.size)?;
    let ends = Ends::Paths { vsock_uds: opts.vsock_uds.clone(), disk: opts.disk_override.clone() };
    assemble(state, ahead.vm, ahead.vcpu, memory, ends, opts)
}

/// A VM and its vCPU made ahead of the snapshot they will restore, with what making them needs
/// a path for (`/dev/kvm`, the host's CPUID, `/proc/self/pagemap`): a spare session VMM makes
/// them before it confines itself to no paths, and [`load_files`] needs none.
#[derive(Debug)]
pub struct Ahead {
    vm: Vm,
    vcpu: Vcpu,
    features: CpuFeatures,
    pagemap: std::fs::File,
}

impl Ahead {
    pub fn new() -> Result<Ahead, SnapshotError> {
        let vm = Vm::new()?;
        let vcpu = Vcpu::new(&vm, 0)?;
        let features = CpuFeatures::of_vcpu(vcpu.fd())?;
        let pagemap = crate::vstate::memory::open_pagemap()?;
        Ok(Ahead { vm, vcpu, features, pagemap })
    }
}

/// A snapshot's files, handed over as descriptors: the state file, the memory file, the disk
/// (if the VM had one) and a listening Unix socket for the vsock device (if it had one).
#[derive(Debug)]
pub struct SnapshotFiles {
    pub state: std::fs::File,
    pub memory: std::fs::File,
    pub disk: Option<std::fs::File>,
    pub vsock: Option<std::os::unix::net::UnixListener>,
}

/// [`load`] from handed-over files into the VM made `ahead` (made now if there is none; then
/// paths are opened): a snapshot that fails its checks leaves `ahead` in place for the next
/// load. `opts`' paths are not used.
pub fn load_files(
    files: SnapshotFiles,
    ahead: &mut Option<Ahead>,
    opts: RestoreOptions,
) -> Result<MicroVm, SnapshotError> {
    let SnapshotFiles { state, memory, disk, vsock } = files;
    let state = format::read_file(state, Path::new("(the state descriptor)"))?;
    let size = memory
        .metadata()
        .map_err(|_| SnapshotError::MissingMemoryFile { path: "(the memory descriptor)".into() })?
        .len();
    if size != state.memory.size {
        return Err(SnapshotError::MemoryFileSize {
            path: "(the memory descriptor)".into(),
            expected: state.memory.size,
            actual: size,
        });
    }
    if ahead.is_none() {
        *ahead = Some(Ahead::new()?);
    }
    if let Some(made) = ahead.as_ref() {
        state.vcpu.features.check_on(&made.features)?;
    }
    let ahead = ahead.take().expect("made above");
    let memory = GuestMemfd::from_snapshot_file(memory, size, ahead.pagemap)?;
    assemble(state, ahead.vm, ahead.vcpu, memory, Ends::Handed { disk, vsock }, opts)
}

/// Where the restored devices' host ends come from.
enum Ends {
    /// Opened and bound at paths (the saved ones unless given).
    Paths { vsock_uds: Option<PathBuf>, disk: Option<PathBuf> },
    /// Handed over, each taken by its device.
    Handed { disk: Option<std::fs::File>, vsock: Option<std::os::unix::net::UnixListener> },
}

/// The VM from its parts: memory registered, the vCPU's state loaded, the devices rebuilt.
fn assemble(
    state: SnapshotState,
    vm: Vm,
    vcpu: Vcpu,
    memory: GuestMemfd,
    mut ends: Ends,
    opts: RestoreOptions,
) -> Result<MicroVm, SnapshotError> {
    vm.register_memory(&memory)?;
    vcpu_state::restore(vcpu.fd(), &state.vcpu)?;

    let mut transports = Vec::with_capacity(state.devices.virtio.len());
    for saved in &state.devices.virtio {
        let device: Box<dyn VirtioDevice> =
            match (&saved.device, &mut ends) {
                (DeviceState::Block(block), Ends::Paths { disk, .. }) => {
                    Box::new(Block::restore(block, disk.as_deref())?)
                }
                (DeviceState::Block(block), Ends::Handed { disk, .. }) => {
                    let file = disk.take().ok_or(SnapshotError::NotHandedOver("disk"))?;
                    Box::new(Block::restore_file(block, file)?)
                }
                (DeviceState::Vsock(vsock), Ends::Paths { vsock_uds, .. }) => {
                    let path = vsock_uds.as_deref().unwrap_or(&vsock.uds_path);
                    Box::new(
                        Vsock::restore(path, vsock)
                            .map_err(|source| StateError::Vsock { path: path.to_owned(), source })?,
                    )
                }
                (DeviceState::Vsock(saved_vsock), Ends::Handed { vsock, .. }) => {
                    let listener = vsock.take().ok_or(SnapshotError::NotHandedOver("vsock device"))?;
                    Box::new(Vsock::restore_listening(listener, saved_vsock).map_err(|source| {
                        StateError::Vsock { path: "(the vsock descriptor)".into(), source }
                    })?)
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
