//! Templates: one scanner VM, set up once, that every job's VM is restored from.
//!
//! [`build`] runs `cella-runner template` with the policy on a disk: the runner sets up its
//! virtio devices and builds its scan engine, then parks ([`cella_abi::ports::PARK`]); the
//! VMM snapshots it there and scrubs it. The directory then holds the snapshot (`state.bin`,
//! `memory.bin`, see [`crate::snapshot`]) and `template.json`, the template's identity.
//!
//! [`TemplateVm::load`] is the part of a job's launch that needs no job: the state checked,
//! a VM made with the memory file mapped privately (copy-on-write: a job's writes land in
//! pages of its own process, never in the file or another job's VM), the vCPU's registers
//! restored. A spare does it before it confines itself. [`TemplateVm::finish`] then gives it
//! the job's devices — the job's disk and channel behind the devices the runner set up — and
//! the job's arguments, written into its boot-info block; the runner goes on after its park
//! with them. Its memory is scrubbed at teardown like any VM's.
//!
//! A template is only ever read: the state and memory files are opened read-only, and nothing
//! a restored VM does reaches them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_abi::{layout, BootInfo};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::builder::{helper_vcpu, HostEnds, Prebuilt};
use crate::devices::legacy::console::{GuestConsole, SharedBuffer};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{DeviceState, VirtioDevice};
use crate::devices::{IoBus, StateError};
use crate::microvm::MicroVm;
use crate::snapshot::cpu::CpuFeatures;
use crate::snapshot::{self, vcpu_state, SnapshotError, SnapshotMeta, SnapshotState};
use crate::vmm_config::VmConfig;
use crate::vstate::memory::GuestMemfd;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::BuildError;

pub use cella_host::template::{BadIdentity, TemplateIdentity, TEMPLATE_FILE};

/// The guest arguments a template is built with.
pub const TEMPLATE_ARGS: &[&str] = &["template"];
/// How long a template build waits for the runner to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(60);
/// The policy disk's length prefix (as `cella_runner::mode::TEMPLATE_POLICY_HEADER`).
const POLICY_HEADER: usize = 8;
const SECTOR: usize = 512;

/// Why a template could not be built or a VM not be restored from one.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot write the template's policy disk {path}")]
    PolicyDisk { path: PathBuf, source: std::io::Error },
    #[error("cannot build the template VM")]
    Build(#[from] BuildError),
    #[error("cannot run the template VM")]
    Run(#[from] crate::RunError),
    #[error("the template's runner did not park: it {exit}; its console said: {console}")]
    DidNotPark { exit: String, console: String },
    #[error("cannot {what} the parked template VM: {reason}")]
    Parked { what: &'static str, reason: String },
    #[error("the template's snapshot cannot be written or restored")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot read the image {path} to record its hash")]
    Image { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}")]
    Identity { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    BadIdentity(#[from] BadIdentity),
    #[error("the template has a {0} device, but the launch gave it none")]
    MissingDevice(&'static str),
    #[error("the template's vsock device had streams open; it was not built by `cella-vmm template`")]
    OpenStreams,
    #[error("cannot restore the template's devices")]
    Device(#[from] StateError),
    #[error("cannot create the device bus")]
    Bus(#[source] std::io::Error),
    #[error("the guest arguments take {len} bytes, over the {max}-byte argument block")]
    ArgsTooLong { len: usize, max: u64 },
    #[error("cannot write the job's arguments or its helper count into the restored VM")]
    WriteArgs(#[source] vm_memory::GuestMemoryError),
}

impl TemplateError {
    /// Whether the template named was at fault (missing, damaged, not a template), as opposed
    /// to this host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TemplateError::BadIdentity(_) | TemplateError::Snapshot(_) => true,
            TemplateError::Build(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// What [`build`] made and how long it took.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuiltTemplate {
    pub identity: TemplateIdentity,
    pub dir: PathBuf,
    /// Bytes of guest memory the template holds (non-zero pages).
    pub memory_bytes: u64,
    /// From starting the VM to the runner's park, in ms.
    pub prepare_ms: f64,
    /// The whole build, in ms.
    pub total_ms: f64,
}

/// Builds a template of `image` (a cella-scanner) with `mem_mib` of memory whose engine is
/// built from `policy` (a serialized policy, as a job's `Policy` frame carries), into `dir`.
/// A template already in `dir` is replaced (its files by name: VMs restored from it keep
/// theirs).
pub fn build(image: &Path, mem_mib: u64, policy: &[u8], dir: &Path) -> Result<BuiltTemplate, TemplateError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir)
        .map_err(|source| TemplateError::Identity { path: dir.to_owned(), source })?;
    let image_bytes =
        std::fs::read(image).map_err(|source| TemplateError::Image { path: image.to_owned(), source })?;
    let mut identity = TemplateIdentity::new(policy, &image_bytes, mem_mib, env!("CARGO_PKG_VERSION"));
    drop(image_bytes);

    let disk_path = dir.join("policy.disk.tmp");
    let result = write_policy_disk(&disk_path, policy).and_then(|()| {
        let disk = Block::open(&disk_path)
            .map_err(|source| TemplateError::PolicyDisk { path: disk_path.clone(), source })?;
        let vsock = Vsock::with_channels(Vec::new()).map_err(TemplateError::Bus)?;
        prepare_and_snapshot(image, mem_mib, HostEnds { disk: Some(disk), vsock: Some(vsock) }, dir)
    });
    let _ = std::fs::remove_file(&disk_path);
    let (memory_bytes, prepare_ms, entry) = result?;
    identity.entry = entry;
    // Jailed spares run as other users and read the template through read-only binds. It
    // holds the runner and the policy's engine, nothing of any job.
    for name in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
        let path = dir.join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|source| TemplateError::Identity { path, source })?;
    }

    let path = dir.join(TEMPLATE_FILE);
    let tmp = dir.join("template.json.tmp");
    let write = || -> std::io::Result<()> {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(&identity).unwrap_or_default())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| TemplateError::Identity { path: path.clone(), source })?;
    Ok(BuiltTemplate {
        identity,
        dir: dir.to_owned(),
        memory_bytes,
        prepare_ms,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// The runner's policy disk: the policy's length as a little-endian `u64`, the policy, zeros
/// to a whole sector.
fn write_policy_disk(path: &Path, policy: &[u8]) -> Result<(), TemplateError> {
    let mut bytes = Vec::with_capacity(POLICY_HEADER + policy.len() + SECTOR);
    bytes.extend((policy.len() as u64).to_le_bytes());
    bytes.extend(policy);
    bytes.resize(bytes.len().next_multiple_of(SECTOR), 0);
    std::fs::write(path, bytes).map_err(|source| TemplateError::PolicyDisk { path: path.to_owned(), source })
}

/// Runs the runner to its park and snapshots it into `dir`; returns the bytes of memory the
/// snapshot holds, the time to the park in ms, and the image's entry point.
fn prepare_and_snapshot(
    image: &Path,
    mem_mib: u64,
    ends: HostEnds,
    dir: &Path,
) -> Result<(u64, f64, u64), TemplateError> {
    let args: Vec<String> = TEMPLATE_ARGS.iter().map(|a| (*a).to_owned()).collect();
    let config = VmConfig { mem_mib, timeout: Some(PARK_TIMEOUT), ..VmConfig::new(image, args.clone()) };
    let console = SharedBuffer::default();
    let prebuilt = Prebuilt::new(&config)?;
    let entry = prebuilt.entry();
    // The policy disk is small, so the template VM has no helper: its snapshot holds one vCPU.
    let vm = prebuilt.finish_with(&config, ends, Box::new(console.clone()))?;
    debug_assert!(!vm.has_helper());
    vm.bus().allow_park();
    let started = Instant::now();
    let mut running = vm.start()?;
    if let Err(e) = running.wait_guest_park(PARK_TIMEOUT) {
        let report = running.stop()?;
        let exit = match e {
            crate::vstate::vcpu::VcpuControlError::Ended => format!("ended ({:?})", report.exit),
            other => other.to_string(),
        };
        return Err(TemplateError::DidNotPark { exit, console: console.text().trim().to_owned() });
    }
    let prepare_ms = started.elapsed().as_secs_f64() * 1e3;
    let parked = |what| move |reason: String| TemplateError::Parked { what, reason };
    let vcpu = running
        .with_paused_vcpu(vcpu_state::save)
        .map_err(|e| parked("save the vCPU of")(e.to_string()))?
        .map_err(|e| parked("save the vCPU of")(crate::error_chain(&e)))?;
    let meta = SnapshotMeta { image: Some(image.to_owned()), args, label: Some("template".into()) };
    let info = snapshot::create(dir, vcpu, running.bus(), running.memory(), meta);
    running.stop()?;
    Ok((info?.memory_bytes_written, prepare_ms, entry))
}

/// A VM restored from a template as far as it can be without the job: what a spare holds
/// while it waits.
#[derive(Debug)]
pub struct TemplateVm {
    identity: TemplateIdentity,
    state: SnapshotState,
    vm: Vm,
    vcpu: Vcpu,
    memory: GuestMemfd,
}

impl TemplateVm {
    /// Checks the template in `dir` and makes its VM: memory mapped from the template's
    /// memory file (privately), the vCPU with this host's CPUID and the saved registers.
    pub fn load(dir: &Path) -> Result<TemplateVm, TemplateError> {
        let identity = TemplateIdentity::read(dir)?;
        let state = snapshot::restore::check(dir)?;
        let vm = Vm::new().map_err(SnapshotError::from)?;
        let vcpu = Vcpu::new(&vm, 0).map_err(SnapshotError::from)?;
        state.vcpu.features.check_on(&CpuFeatures::of_vcpu(vcpu.fd())?)?;
        let memory = GuestMemfd::from_snapshot(&dir.join(snapshot::MEMORY_FILE), state.memory.size)
            .map_err(SnapshotError::from)?;
        vm.register_memory(&memory).map_err(SnapshotError::from)?;
        // Each page the template holds gets its private copy now, while the spare waits: the
        // guest's first touch of a page mapped from the file costs ~8 µs here (nested KVM), and
        // a small job touches most of them (measured: 1.6 ms in the VM instead of 5.8 ms). A
        // kernel without MADV_POPULATE_WRITE (before 5.14) only loses that speed.
        let _ = memory.prefault();
        vcpu_state::restore(vcpu.fd(), &state.vcpu)?;
        Ok(TemplateVm { identity, state, vm, vcpu, memory })
    }

    /// What the template is.
    pub fn identity(&self) -> &TemplateIdentity {
        &self.identity
    }

    /// Guest memory in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.state.memory.size >> 20
    }

    /// Gives the VM the job's devices and arguments (`config.args`; `config`'s image, memory,
    /// disk and socket paths are not used), ready to start. The runner goes on after its park.
    pub fn finish(
        self,
        config: &VmConfig,
        ends: HostEnds,
        console: Box<dyn Write + Send>,
    ) -> Result<MicroVm, TemplateError> {
        let TemplateVm { identity, state, vm, vcpu, memory } = self;
        let HostEnds { mut disk, mut vsock } = ends;
        // A template from before helpers does not name the entry a helper would start at.
        let disk_size = disk.as_ref().map(Block::size).filter(|_| identity.entry != 0);
        let helper = helper_vcpu(&vm, disk_size).map_err(SnapshotError::from)?;
        if let Some(helper) = &helper {
            helper.configure(identity.entry, layout::HELPER_STACK_TOP).map_err(SnapshotError::from)?;
        }
        write_helpers(&memory, u32::from(helper.is_some()))?;
        let mut transports = Vec::with_capacity(state.devices.virtio.len());
        for saved in &state.devices.virtio {
            let device: Box<dyn VirtioDevice> = match &saved.device {
                DeviceState::Block(_) => Box::new(disk.take().ok_or(TemplateError::MissingDevice("disk"))?),
                DeviceState::Vsock(saved_vsock) => {
                    if !saved_vsock.connections.is_empty() {
                        return Err(TemplateError::OpenStreams);
                    }
                    Box::new(vsock.take().ok_or(TemplateError::MissingDevice("vsock"))?.adopt(saved_vsock))
                }
            };
            transports.push(MmioTransport::restore(device, memory.memory().clone(), saved)?);
        }
        let console = GuestConsole::new(console, config.console_limits);
        let serial = SerialDevice::restore(&state.devices.serial, console).map_err(StateError::from)?;
        let bus = IoBus::new(serial, memory.memory().clone())
            .map_err(TemplateError::Bus)?
            .with_virtio(state.devices.mmio_base, transports);
        write_args(&memory, &config.args_block(), config.args.len())?;
        let config = VmConfig { mem_mib: state.memory.size >> 20, ..config.clone() };
        Ok(MicroVm::from_parts(vm, vcpu, memory, Arc::new(bus), &config).with_helper(helper))
    }
}

/// Writes how many helper vCPUs the restored VM has into its boot-info block (the template's
/// says none), where the runner reads it after its park.
fn write_helpers(memory: &GuestMemfd, helpers: u32) -> Result<(), TemplateError> {
    let at = GuestAddress(layout::BOOT_INFO_ADDR + std::mem::offset_of!(BootInfo, helpers) as u64);
    memory.memory().write_obj(helpers, at).map_err(TemplateError::WriteArgs)
}

/// Writes `args` (`argc` NUL-terminated strings) into the argument block and their size into
/// the boot-info block, where the runner reads them after its park.
fn write_args(memory: &GuestMemfd, args: &[u8], argc: usize) -> Result<(), TemplateError> {
    if args.len() as u64 > layout::ARGS_MAX_LEN {
        return Err(TemplateError::ArgsTooLong { len: args.len(), max: layout::ARGS_MAX_LEN });
    }
    let mem = memory.memory();
    mem.write_slice(args, GuestAddress(layout::ARGS_ADDR)).map_err(TemplateError::WriteArgs)?;
    let at = |offset: usize| GuestAddress(layout::BOOT_INFO_ADDR + offset as u64);
    mem.write_obj(args.len() as u32, at(std::mem::offset_of!(BootInfo, args_len)))
        .map_err(TemplateError::WriteArgs)?;
    mem.write_obj(argc as u32, at(std::mem::offset_of!(BootInfo, argc))).map_err(TemplateError::WriteArgs)?;
    Ok(())
}
