//! Saving a paused vCPU's state under the real seccomp filters: the VMM thread runs under
//! `vmm`, the vCPU thread under `vcpu`, both enforcing (a forbidden syscall kills this test
//! process with SIGSYS). The vCPU thread reads every register set a snapshot needs through
//! `with_paused_vcpu`. Its own test binary: the seccomp mode is process-wide.

mod common;

use std::time::Duration;

use cella_vmm::seccomp::{self, Mode};
use cella_vmm::{build, GuestExit, SharedBuffer, VmConfig};
use kvm_bindings::{kvm_msr_entry, Msrs};

/// `MSR_EFER` and `MSR_IA32_TSC`.
const MSRS: [u32; 2] = [0xc000_0080, 0x10];

#[test]
fn a_paused_vcpu_yields_its_state_under_the_enforcing_filters() {
    seccomp::set_mode(Mode::Enforce);
    let image = common::runner_image();
    let loaded = cella_vmm::loader::GuestImage::open(&image).unwrap();
    let (start, end) = (loaded.start(), loaded.end());
    // A thread of its own becomes the VMM thread: MicroVm::start confines it for good.
    let vmm = std::thread::spawn(move || {
        let config = VmConfig::new(image, vec!["spin".into()]);
        let mut vm = build(&config, Box::new(SharedBuffer::default())).unwrap().start().unwrap();
        // Let the guest run a while (no sleeping: the `vmm` filter has no clock_nanosleep).
        let ran = std::time::Instant::now();
        while ran.elapsed() < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        vm.pause().unwrap();
        let saved = vm
            .with_paused_vcpu(|fd| {
                let regs = fd.get_regs().unwrap();
                let sregs = fd.get_sregs().unwrap();
                fd.get_fpu().unwrap();
                fd.get_xsave().unwrap();
                fd.get_xcrs().unwrap();
                fd.get_vcpu_events().unwrap();
                fd.get_debug_regs().unwrap();
                fd.get_mp_state().unwrap();
                fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
                let tsc_khz = fd.get_tsc_khz().ok();
                let entries: Vec<kvm_msr_entry> =
                    MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
                let mut msrs = Msrs::from_entries(&entries).unwrap();
                let read = fd.get_msrs(&mut msrs).unwrap();
                (regs.rip, sregs.efer, read, tsc_khz)
            })
            .unwrap();
        vm.resume().unwrap();
        let report = vm.stop().unwrap();
        (saved, report)
    });
    let ((rip, efer, msrs_read, tsc_khz), report) = vmm.join().unwrap();
    println!("paused at rip {rip:#x}, EFER {efer:#x}, {msrs_read} MSRs read, TSC {tsc_khz:?} kHz");
    assert!((start..end).contains(&rip), "rip {rip:#x} is outside the image {start:#x}..{end:#x}");
    assert_ne!(efer & (1 << 10), 0, "EFER.LMA is clear: not in long mode");
    assert_eq!(msrs_read, MSRS.len());
    assert_eq!(report.exit, GuestExit::Stopped);
    assert!(report.scrub.verified_zero && report.scrub.released);
}
