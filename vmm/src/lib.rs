//! Cella's virtual machine monitor: one process, one microVM, one tenant.
//!
//! This crate owns everything between a launch request and a scrubbed teardown: guest memory
//! (a memfd, via vm-memory), the KVM VM and its vCPU (kvm-ioctls), the guest image loader
//! (linux-loader), the boot structures for a CPL-3 guest, the devices (an 8250 console via
//! vm-superio), the vCPU exit loop, and the memory scrub. [`build`] turns a [`VmConfig`] into a
//! [`MicroVm`]; [`MicroVm::run`] runs it to its end and returns a [`RunReport`].

pub mod arch;
pub mod boot_info;
pub mod builder;
pub mod confine;
pub mod control;
pub mod devices;
pub mod handover;
pub use cella_host::job;
pub mod loader;
pub mod microvm;
pub mod rpc_interface;
pub mod running;
pub mod scan;
pub use cella_host::scan_report;
pub mod scrub;
pub mod seccomp;
pub use cella_host::session as session_client;
pub mod snapshot;
pub mod template;
pub use cella_host::spare;
pub mod vmm_config;
pub mod vstate;

pub use builder::{build, BuildError, Prebuilt};
pub use devices::legacy::console::{ConsoleLimits, ConsoleStats, SharedBuffer};
pub use microvm::{GuestExit, MicroVm, RunError, RunReport};
pub use running::RunningVm;
pub use scrub::ScrubReport;
pub use vmm_config::{default_runner_image, default_scanner_image, ConfigError, VmConfig};

/// An error and its sources on one line: `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
