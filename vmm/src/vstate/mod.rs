//! The VM's state held in KVM and in host memory: guest memory, the VM, its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
