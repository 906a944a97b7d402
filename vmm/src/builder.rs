//! Builds a ready-to-run microVM from a [`VmConfig`]: checks the request and the image, creates
//! the VM and its memory, loads the guest, writes its boot structures, and sets up the vCPU.

use std::io::Write;
use std::sync::Arc;

use crate::boot_info::{self, BootInfoError};
use crate::devices::legacy::console::GuestConsole;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::IoBus;
use crate::loader::{GuestImage, ImageError};
use crate::microvm::MicroVm;
use crate::vmm_config::{ConfigError, VmConfig};
use crate::vstate::memory::{GuestMemfd, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

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
}

impl BuildError {
    /// Whether the caller's request was at fault (as opposed to this host).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, BuildError::Config(_) | BuildError::Image(_) | BuildError::Layout(_))
    }
}

/// Builds the microVM described by `config`, with guest console output going to `console`.
pub fn build(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<MicroVm, BuildError> {
    config.validate()?;
    let image = GuestImage::open(&config.image)?;
    let args = config.args_block();
    let boot =
        boot_info::plan(config.mem_bytes(), image.start(), image.end(), args.len(), config.args.len())?;

    let vm = Vm::new()?;
    let memory = GuestMemfd::new(config.mem_bytes())?;
    vm.register_memory(&memory)?;
    image.load(memory.memory())?;
    boot_info::write(memory.memory(), &boot, &args)?;

    let vcpu = Vcpu::new(&vm, 0)?;
    vcpu.configure(image.entry(), boot.stack_top)?;

    let serial = SerialDevice::new(GuestConsole::new(console, config.console_limits));
    let bus = Arc::new(IoBus::new(serial, memory.memory().clone()));
    Ok(MicroVm::new(vm, vcpu, memory, bus, config))
}
