//! Builds a ready-to-run microVM from a [`VmConfig`]: checks the request and the image, creates
//! the VM and its memory, loads the guest, writes its boot structures, and sets up the vCPU.

use std::io::Write;
use std::sync::Arc;

use crate::boot_info::{self, BootInfoError};
use crate::devices::legacy::console::GuestConsole;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::IoBus;
use crate::loader::{GuestImage, ImageError};
use crate::microvm::MicroVm;
use crate::vmm_config::{ConfigError, VmConfig};
use crate::vstate::memory::{GuestMemfd, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use cella_abi::{layout, DeviceInfo, DEVICE_KIND_VIRTIO_MMIO};

/// Why a microVM could not be built. Nothing is left behind: memory already created is
/// scrubbed when dropped.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error("bad guest image")]
    Image(#[from] ImageError),
    #[error("guest does not fit")]
    Layout(#[from] BootInfoError),
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot create the VM")]
    Vm(#[from] VmError),
    #[error("cannot set up the vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("cannot open disk image {path}")]
    Disk { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot bind the vsock socket {path}")]
    Vsock { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot create the device bus")]
    Bus(#[source] std::io::Error),
}

impl BuildError {
    /// Whether the caller's request was at fault (as opposed to this host).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            BuildError::Config(_) | BuildError::Image(_) | BuildError::Layout(_) | BuildError::Disk { .. }
        )
    }
}

/// Builds the microVM described by `config`, with guest console output going to `console`.
pub fn build(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<MicroVm, BuildError> {
    Prebuilt::new(config)?.finish(config, console)
}

/// A VM whose disk is at least this large gets 2 MiB pages for its heap (see
/// [`GuestMemfd::advise_huge_pages`]): a 200 MiB scan runs ~13% faster on them here, while a
/// small job would pay for zeroing and scrubbing whole 2 MiB pages it barely uses.
pub const HUGE_PAGES_MIN_DISK: u64 = 16 << 20;

/// A VM whose disk is at least this large gets a helper vCPU (see
/// [`cella_abi::BootInfo::helpers`]) when the host has a second CPU: the scan spreads its
/// largest stage (a history's file versions) over both. A small job would only pay for the
/// extra thread.
pub const HELPER_MIN_DISK: u64 = 8 << 20;

/// Whether this process may run on more than one CPU (its affinity mask), so a helper vCPU
/// could run beside the boot vCPU.
pub fn host_has_second_cpu() -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, filled in by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed, valid for the kernel to write.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    // SAFETY: `set` was filled in by sched_getaffinity.
    ok && unsafe { libc::CPU_COUNT(&set) } >= 2
}

/// Creates the helper vCPU (index 1) of `vm` for a job whose disk is `disk_size` bytes, if it
/// is large enough ([`HELPER_MIN_DISK`]) and the host could run it. Made on the launch (a
/// spare's filter allows it), so a small job never pays for it.
pub(crate) fn helper_vcpu(vm: &Vm, disk_size: Option<u64>) -> Result<Option<Vcpu>, VcpuError> {
    let wanted = disk_size.is_some_and(|size| size >= HELPER_MIN_DISK) && host_has_second_cpu();
    wanted.then(|| Vcpu::new(vm, 1)).transpose()
}

/// A built VM before it becomes a [`MicroVm`] (the snapshot tests drive its vCPU by hand).
#[derive(Debug)]
pub(crate) struct BuiltParts {
    pub vm: Vm,
    pub vcpu: Vcpu,
    /// The helper vCPU, configured, if the VM has one.
    pub helper: Option<Vcpu>,
    pub memory: GuestMemfd,
    pub bus: Arc<IoBus>,
}

/// The part of a build that needs no input from the job beyond its [`VmConfig`]'s image and
/// memory size: the image read and checked, the VM and its memory made, the image loaded, the
/// vCPU created with its CPUID. A spare VMM (`cella-vmm spare`) does this before its launch;
/// [`Prebuilt::finish_with`] does the rest.
#[derive(Debug)]
pub struct Prebuilt {
    image: GuestImage,
    vm: Vm,
    vcpu: Vcpu,
    memory: GuestMemfd,
}

impl Prebuilt {
    /// The first half of [`build`]. `config` must be the one later given to [`Prebuilt::finish`].
    pub fn new(config: &VmConfig) -> Result<Prebuilt, BuildError> {
        config.validate()?;
        let image = GuestImage::open(&config.image)?;
        let vm = Vm::new()?;
        let memory = GuestMemfd::new(config.mem_bytes())?;
        vm.register_memory(&memory)?;
        image.load(memory.memory())?;
        let vcpu = Vcpu::new(&vm, 0)?;
        Ok(Prebuilt { image, vm, vcpu, memory })
    }

    /// The guest image's entry point.
    pub fn entry(&self) -> u64 {
        self.image.entry()
    }

    /// The second half of [`build`]: the VM's disk and devices, its boot structures and the
    /// vCPU's registers. Nothing of the guest has run yet.
    pub fn finish(self, config: &VmConfig, console: Box<dyn Write + Send>) -> Result<MicroVm, BuildError> {
        let ends = HostEnds::open(config)?;
        self.finish_with(config, ends, console)
    }

    /// [`Prebuilt::finish`] with the devices' host ends already made (a spare's, from the
    /// descriptors its launch handed over): `config`'s `disk` and `vsock_uds` are not used.
    pub fn finish_with(
        self,
        config: &VmConfig,
        ends: HostEnds,
        console: Box<dyn Write + Send>,
    ) -> Result<MicroVm, BuildError> {
        let BuiltParts { vm, vcpu, helper, memory, bus } = self.finish_parts(config, ends, console)?;
        Ok(MicroVm::new(vm, vcpu, memory, bus, config).with_helper(helper))
    }

    fn finish_parts(
        self,
        config: &VmConfig,
        ends: HostEnds,
        console: Box<dyn Write + Send>,
    ) -> Result<BuiltParts, BuildError> {
        let Prebuilt { image, vm, vcpu, memory } = self;
        let args = config.args_block();
        let mut boot =
            boot_info::plan(config.mem_bytes(), image.start(), image.end(), args.len(), config.args.len())?;
        let HostEnds { disk, vsock } = ends;
        if disk.as_ref().is_some_and(|d| d.size() >= HUGE_PAGES_MIN_DISK) {
            // Not having them only costs speed (a kernel without transparent huge pages refuses).
            let _ = memory.advise_huge_pages(boot.heap_start..boot.heap_end);
        }
        vcpu.configure(image.entry(), boot.stack_top)?;
        let helper = helper_vcpu(&vm, disk.as_ref().map(Block::size))?;
        if let Some(helper) = &helper {
            helper.configure(image.entry(), layout::HELPER_STACK_TOP)?;
            boot.helpers = 1;
        }

        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(disk) = disk {
            devices.push(Box::new(disk));
        }
        if let Some(vsock) = vsock {
            devices.push(Box::new(vsock));
        }
        let mmio_base = layout::mmio_base(config.mem_bytes());
        for (i, device) in devices.iter().enumerate() {
            boot.devices[i] = DeviceInfo {
                kind: DEVICE_KIND_VIRTIO_MMIO,
                id: device.device_type(),
                base: mmio_base + i as u64 * layout::MMIO_DEVICE_SIZE,
                size: layout::MMIO_DEVICE_SIZE,
            };
        }
        boot.device_count = devices.len() as u32;
        let transports =
            devices.into_iter().map(|d| MmioTransport::new(d, memory.memory().clone())).collect();

        let serial = SerialDevice::new(GuestConsole::new(console, config.console_limits));
        let bus = IoBus::new(serial, memory.memory().clone())
            .map_err(BuildError::Bus)?
            .with_virtio(mmio_base, transports);
        boot_info::write(memory.memory(), &boot, &args)?;
        Ok(BuiltParts { vm, vcpu, helper, memory, bus: Arc::new(bus) })
    }
}

/// The host ends of a VM's devices: its disk and its vsock device, opened from paths or made
/// from descriptors a launch handed over.
#[derive(Debug, Default)]
pub struct HostEnds {
    pub disk: Option<Block>,
    pub vsock: Option<Vsock>,
}

impl HostEnds {
    /// Opens `config`'s disk and binds its vsock socket.
    pub fn open(config: &VmConfig) -> Result<HostEnds, BuildError> {
        let disk = match &config.disk {
            Some(path) => {
                Some(Block::open(path).map_err(|source| BuildError::Disk { path: path.clone(), source })?)
            }
            None => None,
        };
        let vsock = match &config.vsock_uds {
            Some(path) => {
                Some(Vsock::new(path).map_err(|source| BuildError::Vsock { path: path.clone(), source })?)
            }
            None => None,
        };
        Ok(HostEnds { disk, vsock })
    }
}

/// Everything [`build`] does: the request and image checked, VM, memory, devices and boot
/// structures made, the vCPU at the guest's first instruction.
pub(crate) fn build_parts(
    config: &VmConfig,
    console: Box<dyn Write + Send>,
) -> Result<BuiltParts, BuildError> {
    let prebuilt = Prebuilt::new(config)?;
    let ends = HostEnds::open(config)?;
    prebuilt.finish_parts(config, ends, console)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::default_runner_image;

    /// The VmFlags of the mappings of this process that start inside `[start, end)`, by start.
    fn vm_flags(start: u64, end: u64) -> Vec<(u64, String)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut found = Vec::new();
        let mut current: Option<u64> = None;
        for line in smaps.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if let Some(at) = current.take() {
                    found.push((at, flags.trim().to_owned()));
                }
            } else if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, _)) = range.split_once('-') {
                    if let Ok(lo) = u64::from_str_radix(lo, 16) {
                        current = (start..end).contains(&lo).then_some(lo);
                    }
                }
            }
        }
        found
    }

    fn built_with_disk(disk_bytes: u64, name: &str) -> (BuiltParts, std::path::PathBuf) {
        let disk = std::env::temp_dir().join(format!("cella-builder-{name}-{}", std::process::id()));
        std::fs::File::create(&disk).unwrap().set_len(disk_bytes).unwrap();
        let image =
            default_runner_image().unwrap_or_else(|e| panic!("{e}; run scripts/build-guest.sh first"));
        let config =
            VmConfig { mem_mib: 64, disk: Some(disk.clone()), ..VmConfig::new(image, vec!["hello".into()]) };
        (build_parts(&config, Box::new(std::io::sink())).unwrap(), disk)
    }

    #[test]
    fn a_large_disk_gets_huge_pages_for_the_heap_and_a_small_one_does_not() {
        let (parts, disk) = built_with_disk(HUGE_PAGES_MIN_DISK, "large");
        let base = parts.memory.host_addr();
        let flags = vm_flags(base, base + parts.memory.size());
        // The heap from the first whole 2 MiB page on is its own mapping, advised huge; the
        // low memory (page tables, image, boot info) is not.
        let heap = flags.iter().find(|(at, _)| *at == base + (4 << 20));
        assert!(heap.is_some_and(|(_, f)| f.split(' ').any(|x| x == "hg")), "{flags:?}");
        assert!(flags.iter().any(|(at, f)| *at == base && !f.split(' ').any(|x| x == "hg")), "{flags:?}");
        drop(parts);
        let _ = std::fs::remove_file(disk);

        let (parts, disk) = built_with_disk(HUGE_PAGES_MIN_DISK - 512, "small");
        let base = parts.memory.host_addr();
        let flags = vm_flags(base, base + parts.memory.size());
        assert!(flags.iter().all(|(_, f)| !f.split(' ').any(|x| x == "hg")), "{flags:?}");
        drop(parts);
        let _ = std::fs::remove_file(disk);
    }
}
