//! virtio-blk and virtio-vsock end to end: real /dev/kvm, the real runner driving the devices,
//! real Unix sockets on the host side. Includes a hostile guest for each refused case.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Deterministic pseudo-random bytes (no dependency on a RNG crate).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn spawn_vm(args: &[&str]) -> Child {
    cella_vmm(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("cella-vmm starts")
}

fn finish(child: Child) -> (std::process::Output, serde_json::Value) {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no report; stderr: {}", stderr(&output)));
    (output.clone(), serde_json::from_str(last).unwrap())
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(5), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn read_disk_sees_exactly_the_file_padded_to_sectors() {
    let dir = scratch("read-disk");
    let disk = dir.join("disk.bin");
    let mut data = noise(3_000_000, 7);
    std::fs::write(&disk, &data).unwrap();
    data.resize(data.len().next_multiple_of(512), 0);
    let (output, report) = run_json(&["--disk", disk.to_str().unwrap()], &["read-disk"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let expected = format!("disk: {} bytes, fnv1a64 {:#018x}", data.len(), fnv1a64(&data));
    assert!(stderr(&output).contains(&expected), "wanted {expected:?} in {}", stderr(&output));
    assert_scrubbed(&report);
}

#[test]
fn missing_disk_file_is_refused_before_launch() {
    let output =
        cella_vmm(&["run", "--disk", "/nonexistent/artifact.tar", "--", "read-disk"]).output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("cannot open disk image /nonexistent/artifact.tar"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn each_hostile_device_request_ends_the_vm_with_its_reason() {
    let dir = scratch("hostile");
    let disk = dir.join("disk.bin");
    std::fs::write(&disk, noise(8192, 3)).unwrap();
    let cases = [
        ("loop-chain", "descriptor chain starting at 0 loops"),
        ("outside-memory", "outside guest memory"),
        ("length-overflow", "overflows the address space"),
        ("wrong-direction", "request header must be read-only, but the guest made it write-only"),
        ("queue-size", "size 100 is not a power of two"),
        ("bad-notify", "notified queue 5, which does not exist"),
    ];
    for (kind, reason) in cases {
        let (output, report) = run_json(&["--disk", disk.to_str().unwrap()], &["hostile", kind]);
        assert_eq!(code(&output), 241, "{kind}: {}", stderr(&output));
        assert_eq!(report["exit"]["kind"], "device_error", "{kind}: {report}");
        assert_eq!(report["exit"]["device"], "virtio-blk");
        let got = report["exit"]["reason"].as_str().unwrap();
        assert!(got.contains(reason), "{kind}: reason {got:?} lacks {reason:?}");
        assert_scrubbed(&report);
    }
}

/// Binds the host listener for guest connections to `port` on a VM with socket `uds`.
fn host_listener(uds: &Path, port: u32) -> UnixListener {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    UnixListener::bind(PathBuf::from(path)).unwrap()
}

/// Connects to the VM's socket, asks for guest `port`, and checks the `OK <host_port>` answer.
/// Connects to the VMM's vsock socket. The file appears at `bind`, a moment before `listen`: a
/// connection refused in that moment is tried again.
fn connect_uds(uds: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(uds) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.unwrap(),
        }
    }
}

fn connect_in(uds: &Path, port: u32) -> UnixStream {
    let mut stream = connect_uds(uds);
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK ") && line.ends_with(b"\n"), "{:?}", String::from_utf8_lossy(&line));
    stream
}

fn echo_through(stream: &mut UnixStream, data: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().unwrap();
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });
    stream.write_all(data).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    receiver.join().unwrap()
}

#[test]
fn guest_connects_out_and_echoes_megabytes_with_flow_control() {
    let dir = scratch("vsock-out");
    let uds = dir.join("v.sock");
    let listener = host_listener(&uds, 1024);
    let child = spawn_vm(&["run", "--json", "--vsock", uds.to_str().unwrap(), "--", "vsock-echo", "1024"]);
    let (mut stream, _) = listener.accept().unwrap();
    // More than every buffer on the way (guest 4 MiB, device 1 MiB) so credit must flow.
    let data = noise(12 << 20, 11);
    let got = echo_through(&mut stream, &data);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echo differs");
    let (output, report) = finish(child);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("echoed {} bytes", data.len())));
    assert_scrubbed(&report);
}

#[test]
fn host_connects_in_with_the_connect_handshake() {
    let dir = scratch("vsock-in");
    let uds = dir.join("v.sock");
    let child = spawn_vm(&["run", "--json", "--vsock", uds.to_str().unwrap(), "--", "vsock-serve", "5000"]);
    wait_for(&uds);
    let mut stream = connect_in(&uds, 5000);
    let data = noise(700_000, 5);
    assert!(echo_through(&mut stream, &data) == data);
    let (output, _) = finish(child);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

#[test]
fn a_garbage_handshake_is_dropped_and_the_vm_still_serves() {
    let dir = scratch("vsock-garbage");
    let uds = dir.join("v.sock");
    let child = spawn_vm(&["run", "--json", "--vsock", uds.to_str().unwrap(), "--", "vsock-serve", "5000"]);
    wait_for(&uds);
    let mut bad = connect_uds(&uds);
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0, "a refused client is closed");
    let mut good = connect_in(&uds, 5000);
    assert!(echo_through(&mut good, b"still here") == b"still here");
    let (output, _) = finish(child);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

#[test]
fn a_host_peer_that_disconnects_mid_stream_does_not_wedge_the_vmm() {
    let dir = scratch("vsock-drop");
    let uds = dir.join("v.sock");
    let listener = host_listener(&uds, 1024);
    let started = Instant::now();
    let child = spawn_vm(&[
        "run",
        "--json",
        "--timeout-ms",
        "20000",
        "--vsock",
        uds.to_str().unwrap(),
        "--",
        "vsock-echo",
        "1024",
    ]);
    let (mut stream, _) = listener.accept().unwrap();
    stream.write_all(&noise(3 << 20, 9)).unwrap();
    drop(stream);
    let (output, report) = finish(child);
    assert!(started.elapsed() < Duration::from_secs(10), "VMM took {:?}", started.elapsed());
    assert_ne!(report["exit"]["kind"], "timed_out", "{}", stderr(&output));
    assert_eq!(report["exit"]["kind"], "exited", "{report}");
    assert_scrubbed(&report);
}

#[test]
fn a_guest_connection_to_a_port_nobody_listens_on_is_refused() {
    let dir = scratch("vsock-refused");
    let uds = dir.join("v.sock");
    let (output, report) = run_json(&["--vsock", uds.to_str().unwrap()], &["vsock-echo", "4444"]);
    assert_eq!(report["exit"]["code"], 122, "{report}");
    assert!(stderr(&output).contains("vsock connect: Refused"), "{}", stderr(&output));
}

#[test]
fn a_guest_waiting_for_the_host_burns_no_cpu() {
    let dir = scratch("vsock-idle");
    let uds = dir.join("v.sock");
    // The runner waits in accept() (wait exits) until the VMM's 1.5 s limit stops it.
    let started = Instant::now();
    let child = spawn_vm(&[
        "run",
        "--json",
        "--timeout-ms",
        "1500",
        "--vsock",
        uds.to_str().unwrap(),
        "--",
        "vsock-serve",
        "5000",
    ]);
    let pid = child.id() as libc::pid_t;
    // Reaped below with wait4, for its resource usage.
    std::mem::forget(child);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; status and usage are valid out-parameters.
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    let wall = started.elapsed();
    let cpu = Duration::from_micros(
        (usage.ru_utime.tv_sec * 1_000_000
            + usage.ru_utime.tv_usec
            + usage.ru_stime.tv_sec * 1_000_000
            + usage.ru_stime.tv_usec) as u64,
    );
    assert!(wall >= Duration::from_millis(1400), "the VM ended early ({wall:?})");
    assert!(cpu < wall / 10, "an idle guest used {cpu:?} of CPU in {wall:?}");
    assert_eq!(libc::WEXITSTATUS(status), 242, "expected a timeout");
}
