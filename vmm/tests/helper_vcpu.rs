//! A VM with a helper vCPU under the enforcing seccomp filters: pause parks both vCPUs and
//! resume starts both again, a snapshot of it is refused by name (it would hold only the boot
//! vCPU), and a stop ends both and scrubs. Its own test binary: the seccomp mode is
//! process-wide.

mod common;

use std::time::{Duration, Instant};

use cella_vmm::seccomp::{self, Mode};
use cella_vmm::vstate::vcpu::VcpuControlError;
use cella_vmm::{build, GuestExit, SharedBuffer, VmConfig};

#[test]
fn a_vm_with_a_helper_pauses_resumes_and_stops_whole_and_is_never_snapshotted_half() {
    seccomp::set_mode(Mode::Enforce);
    let disk = common::scratch("helper-vcpu-pause").join("disk");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let config = VmConfig {
        disk: Some(disk),
        ..VmConfig::new(common::runner_image(), vec!["helper".into(), "spin".into()])
    };
    // A thread of its own becomes the VMM thread: MicroVm::start confines it for good.
    let vmm = std::thread::spawn(move || {
        let vm = build(&config, Box::new(SharedBuffer::default())).unwrap();
        assert!(vm.has_helper(), "an 8 MiB disk gets a helper vCPU");
        let mut vm = vm.start().unwrap();
        // No sleeping: the `vmm` filter has no clock_nanosleep.
        let spin = |ms| {
            let until = Instant::now() + Duration::from_millis(ms);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        };
        spin(50);
        vm.pause().unwrap();
        let snapshot = vm.with_paused_vcpu(|fd| fd.get_regs().map(|r| r.rip));
        spin(20);
        vm.resume().unwrap();
        spin(50);
        let ended_early = vm.has_ended();
        (snapshot.map(|_| ()), ended_early, vm.stop().unwrap())
    });
    let (snapshot, ended_early, report) = vmm.join().unwrap();
    assert_eq!(snapshot, Err(VcpuControlError::HelperRunning));
    assert!(!ended_early, "both vCPUs run again after the resume");
    assert_eq!(report.exit, GuestExit::Stopped);
    assert_eq!(report.vcpus, 2);
    assert!(report.scrub.verified_zero && report.scrub.released);
}
