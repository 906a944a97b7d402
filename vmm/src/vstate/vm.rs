//! The KVM VM: created with no in-kernel irqchip and no PIT. The runner takes no interrupts,
//! and on this host they would cost ~20 ms per VM (PLATFORM.md).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

use super::memory::GuestMemfd;

/// Why the VM could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (Cella needs KVM: run as root or as a member of the `kvm` group)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm speaks API version {0}, Cella needs 12")]
    ApiVersion(i32),
    #[error("cannot create a KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] kvm_ioctls::Error),
}

/// One KVM VM and the handle to `/dev/kvm` it came from.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm` and creates an empty VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        Ok(Vm { kvm, fd })
    }

    /// Registers all of `memory` as slot 0 at guest address 0.
    pub fn register_memory(&self, memory: &GuestMemfd) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_addr(),
        };
        // SAFETY: the region describes a live mapping of exactly `memory_size` bytes that
        // outlives the VM: the VM is dropped before the memory is scrubbed and unmapped.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)
    }

    /// The `/dev/kvm` handle (for CPUID queries).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor (for creating vCPUs).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
