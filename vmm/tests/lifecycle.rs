//! The `vmm` library driven directly: many VMs in one process, console capture, no leaks.

mod common;

use cella_vmm::{build, GuestExit, SharedBuffer, VmConfig};
use common::runner_image;

/// The tests count this process's descriptors and memory, so they must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn run_hello() {
    let console = SharedBuffer::default();
    let config = VmConfig::new(runner_image(), vec!["hello".into()]);
    let report = build(&config, Box::new(console.clone())).unwrap().run().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_eq!(console.text(), "hello from cella-runner\n");
    assert!(report.scrub.verified_zero && report.scrub.released);
}

#[test]
fn two_hundred_vms_leave_fds_and_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10 {
        run_hello();
    }
    let (fds, rss) = (open_fds(), rss_kib());
    for _ in 0..200 {
        run_hello();
    }
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    assert_eq!(fds_after, fds, "open fds went from {fds} to {fds_after}");
    assert!(rss_after <= rss + 4096, "RSS went from {rss} KiB to {rss_after} KiB");
}

#[test]
fn failed_builds_leave_nothing_open() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run_hello();
    let fds = open_fds();
    let dir = common::scratch("failed-builds");
    let too_big = dir.join("big.elf");
    common::write_elf(&too_big, 64 << 20);
    let long_args = VmConfig::new(runner_image(), vec!["x".repeat(100_000)]);
    let no_fit = VmConfig { mem_mib: 16, ..VmConfig::new(too_big, vec![]) };
    for config in [long_args, no_fit] {
        let err = build(&config, Box::new(std::io::sink())).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
    }
    assert_eq!(open_fds(), fds);
}
