//! Snapshot tests against real KVM and real files.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cella_abi::ports;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::bench::{build_parts, touch, Parts};
use super::format::{self, encode_raw, FORMAT_VERSION, MAX_STATE_FILE, VMM_VERSION};
use super::*;
use crate::devices::legacy::console::SharedBuffer;
use crate::devices::IoResult;
use crate::microvm::GuestExit;
use crate::vmm_config::{default_runner_image, VmConfig};

/// These tests build VMs and write files; run them one at a time (2 cores here).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cella-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn image() -> PathBuf {
    default_runner_image().unwrap_or_else(|e| panic!("{e}; run scripts/build-guest.sh first"))
}

fn parts(args: &[&str], mem_mib: u64, vsock: Option<&Path>) -> (Parts, SharedBuffer) {
    let console = SharedBuffer::default();
    let config = VmConfig {
        mem_mib,
        vsock_uds: vsock.map(Path::to_owned),
        ..VmConfig::new(image(), args.iter().map(|a| a.to_string()).collect())
    };
    (build_parts(&config, Box::new(console.clone())).unwrap(), console)
}

/// A snapshot of a freshly built `hello` VM (never run) in `dir`.
fn hello_snapshot(dir: &Path) -> SnapshotInfo {
    let (p, _) = parts(&["hello"], 64, None);
    touch(&p.memory, 16 << 20, 1 << 20);
    let state = vcpu_state::save(&p.vcpu).unwrap();
    create(dir, state, &p.bus, &p.memory, SnapshotMeta::default()).unwrap()
}

fn load_err(dir: &Path) -> SnapshotError {
    load(dir, RestoreOptions::new(Box::new(std::io::sink()))).map(|_| ()).unwrap_err()
}

// --- the state file ---

#[test]
fn state_file_round_trips() {
    let _s = serial();
    let dir = scratch("roundtrip");
    let info = hello_snapshot(&dir);
    assert!(info.state_bytes > 1000 && info.state_bytes < MAX_STATE_FILE, "{info:?}");
    let bytes = std::fs::read(dir.join(STATE_FILE)).unwrap();
    assert_eq!(&bytes[..8], b"CELLSNAP");
    let state = format::decode(&dir.join(STATE_FILE), &bytes).unwrap();
    assert_eq!(state.memory.size, 64 << 20);
    assert_eq!(format::encode(&state), bytes, "re-encoding a read state gives the same file");
    remove(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn refuses_damaged_and_foreign_state_files() {
    let _s = serial();
    let dir = scratch("refusals");
    hello_snapshot(&dir);
    let path = dir.join(STATE_FILE);
    let good = std::fs::read(&path).unwrap();
    let decode = |bytes: &[u8]| format::decode(&path, bytes).unwrap_err();

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    assert!(matches!(decode(&flipped), SnapshotError::Corrupt { .. }));
    let mut flipped_sum = good.clone();
    *flipped_sum.last_mut().unwrap() ^= 0x80;
    assert!(matches!(decode(&flipped_sum), SnapshotError::Corrupt { .. }));

    let err = decode(&good[..good.len() - 100]);
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("is truncated"), "{err}");
    assert!(matches!(decode(&good[..5]), SnapshotError::Truncated { .. }));
    assert!(matches!(decode(&[]), SnapshotError::Truncated { .. }));

    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    let err = decode(&magic);
    assert!(matches!(err, SnapshotError::BadMagic { .. }));
    assert!(err.to_string().contains("not a Cella snapshot state file"), "{err}");

    let body_at = 14 + VMM_VERSION.len() + 8;
    let body = &good[body_at..good.len() - 32];
    let err = decode(&encode_raw(FORMAT_VERSION + 1, VMM_VERSION, body));
    assert!(
        matches!(err, SnapshotError::UnsupportedFormat { found, supported, .. } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
        "{err}"
    );
    let err = decode(&encode_raw(FORMAT_VERSION, "0.0.1-old", body));
    assert!(matches!(&err, SnapshotError::VmmVersion { snapshot, .. } if snapshot == "0.0.1-old"), "{err}");
    assert!(err.to_string().contains("restore it with cella-vmm 0.0.1-old"), "{err}");
    let err = decode(&encode_raw(FORMAT_VERSION, VMM_VERSION, b"{\"not\":\"a state\"}"));
    assert!(matches!(err, SnapshotError::Malformed { .. }), "{err}");

    // Oversize: refused from the file's size, before reading it.
    let big = dir.join("big.bin");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_STATE_FILE + 1).unwrap();
    let err = format::read(&big).unwrap_err();
    assert!(matches!(err, SnapshotError::Oversize { size, .. } if size == MAX_STATE_FILE + 1), "{err}");

    // The same refusals through `load`, from the files.
    std::fs::write(&path, &flipped).unwrap();
    assert!(matches!(load_err(&dir), SnapshotError::Corrupt { .. }));
    std::fs::write(&path, &good).unwrap();
    let _ = std::fs::remove_file(&big);
    remove(&dir).unwrap();
}

#[test]
fn refuses_a_missing_or_resized_memory_file() {
    let _s = serial();
    let dir = scratch("memfile-refusals");
    hello_snapshot(&dir);
    let memory = dir.join(MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&memory).unwrap();
    f.set_len((64 << 20) - 4096).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(err, SnapshotError::MemoryFileSize { expected, actual, .. } if expected == 64 << 20 && actual == (64 << 20) - 4096),
        "{err}"
    );
    std::fs::remove_file(&memory).unwrap();
    let err = load_err(&dir);
    assert!(matches!(err, SnapshotError::MissingMemoryFile { .. }), "{err}");
    assert!(err.to_string().contains("memory.bin is missing"), "{err}");
    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    assert!(matches!(load_err(&dir), SnapshotError::MissingStateFile { .. }));
    remove(&dir).unwrap();
}

#[test]
fn refuses_a_host_without_the_snapshots_cpu_features() {
    let _s = serial();
    let dir = scratch("cpu");
    hello_snapshot(&dir);
    let path = dir.join(STATE_FILE);
    let mut state = format::read(&path).unwrap();
    // Forge features this host cannot have: an unnamed CPUID bit (reserved, 7.0:EDX[1]) and
    // an extension name no CPU reports.
    state.vcpu.features.leaf7_edx |= 1 << 1;
    state.vcpu.features.host.push("quantum-entanglement".into());
    std::fs::write(&path, format::encode(&state)).unwrap();
    let err = load_err(&dir);
    let text = err.to_string();
    assert!(matches!(err, SnapshotError::CpuFeaturesMissing { .. }), "{text}");
    assert!(text.contains("CPUID.7.0:EDX[bit 1]") && text.contains("quantum-entanglement"), "{text}");
    remove(&dir).unwrap();
}

// --- the memory file ---

#[test]
fn memory_file_holds_only_non_zero_pages() {
    let _s = serial();
    let dir = scratch("sparse");
    let memory = crate::vstate::memory::GuestMemfd::new(64 << 20).unwrap();
    // 100 non-zero pages, plus 200 pages that were touched but hold zeros.
    for i in 0..100u64 {
        memory.memory().write_obj(i + 1, GuestAddress(i * 3 * 4096 + 8)).unwrap();
    }
    memory.memory().write_slice(&vec![0u8; 200 * 4096], GuestAddress(32 << 20)).unwrap();
    let path = dir.join("memory.bin");
    let report = memory_file::write(&memory, &path).unwrap();
    assert_eq!(report.pages, 100);
    assert_eq!(report.bytes_written, 100 * 4096);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    let on_disk = meta.blocks() * 512;
    assert!((100 * 4096..=100 * 4096 + (64 << 10)).contains(&on_disk), "{on_disk} bytes on disk");
    let file = std::fs::File::open(&path).unwrap();
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 7 * 3 * 4096 + 8).unwrap();
    assert_eq!(u64::from_le_bytes(word), 8);
    drop(memory);
    remove(&dir).unwrap();
}

#[test]
fn private_mapping_reads_the_file_keeps_writes_private_and_scrubs_them() {
    let _s = serial();
    let dir = scratch("private");
    let memory = crate::vstate::memory::GuestMemfd::new(16 << 20).unwrap();
    touch(&memory, 1 << 20, 2 << 20);
    let path = dir.join("memory.bin");
    memory_file::write(&memory, &path).unwrap();

    let restored = crate::vstate::memory::GuestMemfd::from_snapshot(&path, 16 << 20).unwrap();
    assert!(restored.is_restored());
    let (mut a, mut b) = (vec![0u8; 3 << 20], vec![0u8; 3 << 20]);
    memory.memory().read_slice(&mut a, GuestAddress(0)).unwrap();
    restored.memory().read_slice(&mut b, GuestAddress(0)).unwrap();
    assert!(a == b, "the restored memory reads as the original");
    drop(memory);

    // Writes through the mapping stay private: the file is unchanged.
    let before = std::fs::read(&path).unwrap();
    restored.memory().write_slice(&[0xAB; 5 * 4096], GuestAddress(1 << 20)).unwrap();
    restored.memory().write_obj(0x5EC2E7u64, GuestAddress(10 << 20)).unwrap();
    assert!(std::fs::read(&path).unwrap() == before, "a guest write reached the snapshot file");
    // The written pages are what the scrub finds and zeroes.
    let ranges = restored.content_ranges().unwrap();
    assert!(ranges.iter().any(|r| r.contains(&(10 << 20))), "{ranges:?}");
    // A second snapshot of the restored memory holds the file's data and the new writes.
    let second = dir.join("memory2.bin");
    memory_file::write(&restored, &second).unwrap();
    let again = crate::vstate::memory::GuestMemfd::from_snapshot(&second, 16 << 20).unwrap();
    assert_eq!(again.memory().read_obj::<u64>(GuestAddress(10 << 20)).unwrap(), 0x5EC2E7);
    assert_eq!(again.memory().read_obj::<u8>(GuestAddress((1 << 20) + 4095)).unwrap(), 0xAB);
    assert_eq!(again.memory().read_obj::<u64>(GuestAddress(2 << 20)).unwrap(), 2 << 20);
    drop(again);

    let report = restored.scrub().unwrap();
    assert_eq!(report.bytes, 6 * 4096, "{report:?}");
    assert_eq!(report.pages_verified, 6);
    assert!(report.verified_zero && report.released && report.blocks_after_release == 0);
    assert!(std::fs::read(&path).unwrap() == before, "the scrub must not touch the snapshot file");
    std::fs::remove_file(&second).unwrap(); // not a snapshot file name, so `remove` leaves it
    remove(&dir).unwrap();
    assert!(!dir.exists(), "the test left {}", dir.display());
}

#[test]
fn a_full_disk_gives_a_clear_error_and_leaves_no_file() {
    let _s = serial();
    let dir = scratch("enospc");
    let mnt = dir.join("tiny");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "cella-snap-test"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs (the tests run as root)");
    let result = std::panic::catch_unwind(|| {
        let (p, _) = parts(&["hello"], 64, None);
        touch(&p.memory, 16 << 20, 4 << 20);
        let state = vcpu_state::save(&p.vcpu).unwrap();
        let snap = mnt.join("snap");
        let err = create(&snap, state, &p.bus, &p.memory, SnapshotMeta::default()).unwrap_err();
        assert!(matches!(err, SnapshotError::NoSpace { .. }), "{err}");
        assert!(
            err.to_string().contains("no space left") && err.to_string().contains("keeps running"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(&snap).unwrap().collect();
        assert!(left.is_empty(), "partial files left: {left:?}");
        // The VM is untouched: its memory still reads as before.
        assert_eq!(p.memory.memory().read_obj::<u64>(GuestAddress(16 << 20)).unwrap(), 16 << 20);
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    result.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- the vCPU ---

#[test]
fn vcpu_state_restores_into_another_vm() {
    let _s = serial();
    let (a, _) = parts(&["hello"], 64, None);
    let mut regs = a.vcpu.get_regs().unwrap();
    regs.rax = 0x1234_5678_9abc_def0;
    regs.r15 = 42;
    a.vcpu.set_regs(&regs).unwrap();
    let saved = vcpu_state::save(&a.vcpu).unwrap();
    assert!(saved.xsave.is_some() || saved.fpu.is_some());
    assert!(saved.msrs.iter().any(|m| m.index == 0x10), "IA32_TSC saved: {:?}", saved.msrs);
    eprintln!(
        "saved {} MSRs, refused {:x?}; xsave: {}; xcrs: {}; tsc_khz {:?}",
        saved.msrs.len(),
        saved.msrs_refused,
        saved.xsave.is_some(),
        saved.xcrs.is_some(),
        saved.tsc_khz
    );

    let (b, _) = parts(&["exit", "3"], 64, None);
    vcpu_state::restore(&b.vcpu, &saved).unwrap();
    let back = vcpu_state::save(&b.vcpu).unwrap();
    let json = |s: &VcpuState| serde_json::to_value(s).unwrap();
    let (mut x, mut y) = (json(&saved), json(&back));
    // The TSC moved on between save and read-back; everything else must match exactly.
    for v in [&mut x, &mut y] {
        let msrs = v["msrs"].as_array_mut().unwrap();
        msrs.retain(|m| m["index"] != 0x10);
    }
    assert_eq!(x, y);
    let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x10).unwrap().data;
    assert!(tsc(&back) >= tsc(&saved), "the restored TSC continues from the saved one");
    assert_eq!(back.regs.rax, 0x1234_5678_9abc_def0);
}

// --- whole VMs ---

#[test]
fn a_snapshot_of_a_built_vm_restores_and_runs() {
    let _s = serial();
    let dir = scratch("hello");
    hello_snapshot(&dir);
    let console = SharedBuffer::default();
    let vm = load(&dir, RestoreOptions::new(Box::new(console.clone()))).unwrap();
    let report = vm.run().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_eq!(console.text(), "hello from cella-runner\n");
    assert!(report.scrub.verified_zero && report.scrub.released, "{:?}", report.scrub);
    // Twice from one snapshot: two independent VMs.
    let console = SharedBuffer::default();
    let report = load(&dir, RestoreOptions::new(Box::new(console.clone()))).unwrap().run().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_eq!(console.text(), "hello from cella-runner\n");
    let removed = remove(&dir).unwrap();
    assert!(removed.bytes_zeroed >= 1 << 20, "{removed:?}");
    assert!(!dir.exists());
}

/// Runs `vcpu` by hand until the guest's `waits`-th wait exit, then parks it the way a pause
/// must: a `KVM_RUN` with `immediate_exit` set, so KVM completes the last exit.
fn run_until_wait(vcpu: &mut VcpuFd, bus: &crate::devices::IoBus, waits: u32) {
    let mut seen = 0;
    loop {
        let result = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) if port == ports::WAIT => {
                seen += 1;
                if seen >= waits {
                    break;
                }
                bus.port_write(port, data)
            }
            VcpuExit::IoOut(port, data) => bus.port_write(port, data),
            VcpuExit::IoIn(port, data) => bus.port_read(port, data),
            VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
            other => panic!("unexpected exit {other:?}"),
        };
        assert_eq!(result, IoResult::Done);
    }
    vcpu.set_kvm_immediate_exit(1);
    let parked = vcpu.run().map(|_| ()).unwrap_err();
    assert_eq!(parked.errno(), libc::EINTR);
    vcpu.set_kvm_immediate_exit(0);
}

#[test]
fn a_running_guest_resumes_after_restore_and_serves_vsock_at_a_new_path() {
    let _s = serial();
    let dir = scratch("vsock");
    let (mut a, console_a) = parts(&["vsock-serve", "5000"], 64, Some(&dir.join("a.sock")));
    run_until_wait(&mut a.vcpu, &a.bus, 2);
    let state = vcpu_state::save(&a.vcpu).unwrap();
    let snap = dir.join("snap");
    create(&snap, state, &a.bus, &a.memory, SnapshotMeta::default()).unwrap();
    drop(a);
    assert_eq!(console_a.text(), "");

    let console = SharedBuffer::default();
    let mut opts = RestoreOptions::new(Box::new(console.clone()));
    let uds = dir.join("b.sock");
    opts.vsock_uds = Some(uds.clone());
    opts.timeout = Some(Duration::from_secs(20));
    let vm = load(&snap, opts).unwrap();
    let running = std::thread::spawn(move || vm.run().unwrap());

    let mut stream = UnixStream::connect(&uds).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    stream.write_all(b"state survived the snapshot").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"state survived the snapshot");
    let report = running.join().unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 }, "console: {}", console.text());
    assert_eq!(console.text(), "echoed 27 bytes\n");
    assert!(report.scrub.verified_zero && report.scrub.released);
    assert!(report.scrub.bytes > 0, "the restored guest wrote pages: {:?}", report.scrub);
    remove(&snap).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "benchmark: cargo test -p cella-vmm --lib snapshot::tests::bench -- --ignored --nocapture"]
fn bench_snapshot() {
    let _s = serial();
    let dir = scratch("bench");
    let rows = super::bench::run(&image(), &dir, &[(64, 16), (512, 64)]).unwrap();
    println!("{}", super::bench::table(&rows));
    let _ = std::fs::remove_dir_all(&dir);
}
