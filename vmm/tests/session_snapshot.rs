//! Sessions that keep their state: `cella-vmm session` processes on the real /dev/kvm, with the
//! scanner guest in session mode, driven over the control socket (`ControlClient`) and vsock
//! (`GuestSession`). The in-memory index survives pause/resume, a snapshot restored in a new
//! VMM process, and two restores of one snapshot; bad snapshots are refused with their reason;
//! a snapshot that hits a full disk fails cleanly and the session keeps running.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use cella_proto::{self as proto, SessionRequest, SessionResult};
use cella_vmm::control::ControlClient;
use cella_vmm::rpc_interface::VmState;
use cella_vmm::session_client::GuestSession;
use common::{assert_scrubbed, scratch, status_field, tar, wait_confined};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A session VMM process and its sockets.
struct Session {
    child: Option<Child>,
    api: PathBuf,
    vsock: PathBuf,
}

impl Session {
    /// `cella-vmm session --artifact` (or `--restore`) with its sockets in `dir`.
    fn spawn(dir: &Path, source: (&str, &Path)) -> Session {
        let api = dir.join("api.sock");
        let vsock = dir.join("vsock.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_cella-vmm"))
            .args(["session", "--json", "--read-policy", "allow", "--mem-mib", "128", "--api-sock"])
            .arg(&api)
            .arg("--vsock")
            .arg(&vsock)
            .arg(source.0)
            .arg(source.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let session = Session { child: Some(child), api, vsock };
        session.wait_for_api();
        session
    }

    /// `cella-vmm session` with neither --artifact nor --restore: no VM until a load.
    fn spawn_empty(dir: &Path) -> Session {
        let api = dir.join("api.sock");
        let vsock = dir.join("vsock.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_cella-vmm"))
            .args(["session", "--json", "--api-sock"])
            .arg(&api)
            .arg("--vsock")
            .arg(&vsock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let session = Session { child: Some(child), api, vsock };
        session.wait_for_api();
        session
    }

    /// `cella-vmm session --api-fd 3`: a spare session VMM, its control socket bound here at
    /// `dir/api.sock` and handed over as its descriptor 3. `vsock` is where this test binds the
    /// listener it will hand over with the load.
    fn spawn_spare(dir: &Path) -> Session {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let api = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&api).unwrap();
        let raw = listener.as_raw_fd();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cella-vmm"));
        command.args(["session", "--json", "--api-fd", "3"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: between fork and exec the child only calls dup2 or fcntl (async-signal-safe)
        // to make the listener its descriptor 3, inheritable.
        unsafe {
            command.pre_exec(move || {
                let r = if raw == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(raw, 3) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        Session { child: Some(child), api, vsock: dir.join("vsock.sock") }
    }

    fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.api.exists() {
            assert!(Instant::now() < deadline, "the session did not create its control socket");
            sleep(Duration::from_millis(5));
        }
    }

    fn control(&self) -> ControlClient {
        ControlClient::new(&self.api)
    }

    fn guest(&self) -> GuestSession {
        GuestSession::connect(&self.vsock, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect: {}", cella_vmm::error_chain(&e)))
    }

    /// Stops the VM through the API and returns the process's final report.
    fn stop(mut self) -> serde_json::Value {
        self.control().stop().unwrap();
        let output = self.child.take().unwrap().wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.lines().last().expect("a final report")).unwrap()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn artifact(dir: &Path) -> PathBuf {
    let path = dir.join("app.tar");
    let files: [(&str, &[u8]); 3] = [
        ("app/README.md", b"# demo\nTODO: write docs\n"),
        ("app/config.env", b"STRIPE=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n"),
        ("app/src/main.rs", b"fn main() {\n    // TODO: more\n}\n"),
    ];
    std::fs::write(&path, tar(&files)).unwrap();
    path
}

fn stats(guest: &mut GuestSession) -> proto::SessionStats {
    match guest.exec(&SessionRequest::Stats, None).unwrap().response.result {
        SessionResult::Stats(stats) => stats,
        other => panic!("stats answered {other:?}"),
    }
}

/// The matches of `TODO` as (path, line) pairs (an `allow` session: the masking policy that
/// every grep carries is not used).
fn todos(guest: &mut GuestSession) -> Vec<(String, u64)> {
    let request = SessionRequest::Grep { pattern: "TODO".into(), max_matches: 100, path_prefix: None };
    match guest.exec(&request, Some((proto::Kind::Policy, b"{}"))).unwrap().response.result {
        SessionResult::Grep(grep) => grep.matches.into_iter().map(|m| (m.path, m.line)).collect(),
        other => panic!("grep answered {other:?}"),
    }
}

fn add(guest: &mut GuestSession, name: &str, files: &[(&str, &[u8])]) {
    let request = SessionRequest::Add { name: name.into() };
    let reply = guest.exec(&request, Some((proto::Kind::Data, &tar(files)))).unwrap();
    assert!(reply.response.error().is_none(), "{:?}", reply.response);
}

/// Pauses, snapshots into `snap` and stops the VM of `session`; returns the snapshot's info.
fn suspend(session: Session, snap: &Path) -> serde_json::Value {
    let control = session.control();
    control.pause().unwrap();
    let info = control.snapshot_create(snap).unwrap();
    let report = session.stop();
    assert_scrubbed(&report);
    info
}

#[test]
fn the_index_survives_pause_resume_and_a_restore_in_a_new_vmm_process() {
    let dir = scratch("session-snapshot-restore");
    let first = Session::spawn(&dir.join("a").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let mut guest = first.guest();
    let before = stats(&mut guest);
    let matches = todos(&mut guest);
    assert_eq!(matches.len(), 2, "{matches:?}");

    let control = first.control();
    control.pause().unwrap();
    assert_eq!(control.state().unwrap().state, VmState::Paused);
    control.resume().unwrap();
    assert_eq!(todos(&mut guest), matches);
    assert_eq!(stats(&mut guest).index_id, before.index_id, "pause/resume rebuilt the index");

    // The connection stays open through the snapshot: the restored guest is serving it when it
    // wakes up, and only the reset the restored device sends lets it go back to accepting.
    let snap = dir.join("snap");
    let info = suspend(first, &snap);
    drop(guest);
    let written = info["memory_bytes_written"].as_u64().unwrap();
    let disk = info["memory_disk_bytes"].as_u64().unwrap();
    assert!(written > 0 && written < 128 << 20, "{info}");
    assert!(disk < 128 << 20, "the memory file holds zero pages: {info}");

    let restored = Session::spawn(&dir.join("b").tap_mkdir(), ("--restore", &snap));
    let mut guest = restored.guest();
    let after = stats(&mut guest);
    assert_eq!(after.index_id, before.index_id, "the restored session rebuilt its index");
    assert_eq!(after.index_builds, 1);
    assert_eq!((after.files, after.bytes), (before.files, before.bytes));
    assert!(after.requests > before.requests, "the request counter came back from the snapshot");
    assert_eq!(todos(&mut guest), matches);
    drop(guest);
    let report = restored.stop();
    assert_scrubbed(&report);
}

#[test]
fn one_snapshot_restores_into_two_independent_vms() {
    let dir = scratch("session-snapshot-twice");
    let source = Session::spawn(&dir.join("src").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let index_id = stats(&mut source.guest()).index_id;
    let snap = dir.join("snap");
    suspend(source, &snap);

    let one = Session::spawn(&dir.join("one").tap_mkdir(), ("--restore", &snap));
    let two = Session::spawn(&dir.join("two").tap_mkdir(), ("--restore", &snap));
    let (mut g1, mut g2) = (one.guest(), two.guest());
    add(&mut g1, "extra", &[("notes.txt", b"TODO: only in one\n")]);
    let (s1, s2) = (stats(&mut g1), stats(&mut g2));
    assert_eq!((s1.index_id, s2.index_id), (index_id, index_id));
    assert_eq!((s1.files, s2.files), (4, 3), "a file added to one VM showed up in the other");
    assert_eq!(todos(&mut g1).len(), 3);
    assert_eq!(todos(&mut g2).len(), 2);
    drop((g1, g2));
    assert_scrubbed(&one.stop());
    assert_scrubbed(&two.stop());
    // Both VMs read the same memory file; it is unchanged by what they wrote.
    let third = Session::spawn(&dir.join("three").tap_mkdir(), ("--restore", &snap));
    assert_eq!(stats(&mut third.guest()).files, 3);
    third.stop();
}

#[test]
fn a_restored_session_snapshots_back_into_its_own_folder_and_restores_again() {
    let dir = scratch("session-snapshot-chain");
    let first = Session::spawn(&dir.join("a").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let index_id = stats(&mut first.guest()).index_id;
    let snap = dir.join("snap");
    suspend(first, &snap);

    // The restored VM's memory is the snapshot's memory file, mapped privately; what it adds
    // lives in its private pages, and the next snapshot (into the same folder, as the service
    // does) must hold both.
    let second = Session::spawn(&dir.join("b").tap_mkdir(), ("--restore", &snap));
    let mut guest = second.guest();
    add(&mut guest, "later", &[("notes.txt", b"TODO: added after the first restore\n")]);
    assert_eq!(stats(&mut guest).files, 4);
    suspend(second, &snap);
    drop(guest);

    let third = Session::spawn(&dir.join("c").tap_mkdir(), ("--restore", &snap));
    let mut guest = third.guest();
    let after = stats(&mut guest);
    assert_eq!((after.index_id, after.files, after.adds), (index_id, 4, 1));
    assert_eq!(todos(&mut guest).len(), 3);
    drop(guest);
    assert_scrubbed(&third.stop());
}

#[test]
fn a_vmm_started_without_a_vm_loads_a_snapshot_over_its_control_socket() {
    let dir = scratch("session-snapshot-load-api");
    let source = Session::spawn(&dir.join("src").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let index_id = stats(&mut source.guest()).index_id;
    let snap = dir.join("snap");
    suspend(source, &snap);

    let empty = Session::spawn_empty(&dir.join("empty").tap_mkdir());
    let control = empty.control();
    assert_eq!(control.state().unwrap().state, VmState::NotStarted);
    let e = control.pause().unwrap_err();
    assert!(e.is_wrong_state(), "{e}");
    let e = control.snapshot_load(&dir.join("nothing-here"), true).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("no snapshot state file"), "{e}");
    control.snapshot_load(&snap, false).unwrap();
    assert_eq!(control.state().unwrap().state, VmState::Paused, "resume: false leaves it paused");
    let e = control.snapshot_load(&snap, true).unwrap_err();
    assert_eq!(e.status(), Some(409), "a second load: {e}");
    control.resume().unwrap();
    assert_eq!(stats(&mut empty.guest()).index_id, index_id);
    assert_scrubbed(&empty.stop());
}

#[test]
fn a_spare_session_vmm_waits_confined_and_restores_a_snapshot_handed_over_as_descriptors() {
    use std::os::fd::AsFd;
    let dir = scratch("session-snapshot-spare");
    let disk = artifact(&dir);
    let source = Session::spawn(&dir.join("src").tap_mkdir(), ("--artifact", &disk));
    let index_id = stats(&mut source.guest()).index_id;
    let snap = dir.join("snap");
    suspend(source, &snap);

    let spare = Session::spawn_spare(&dir.join("spare").tap_mkdir());
    let pid = spare.child.as_ref().unwrap().id();
    // From outside, while it waits: every thread has no-new-privs and a seccomp filter.
    let waiting = wait_confined(pid);
    for (name, status) in &waiting {
        assert_eq!(status_field(status, "NoNewPrivs"), "1", "{name}");
        assert_eq!(status_field(status, "Seccomp"), "2", "{name}");
    }
    let control = spare.control();
    assert_eq!(control.state().unwrap().state, VmState::NotStarted);
    // It opens no path: a snapshot named by its folder is refused, and it keeps waiting.
    let e = control.snapshot_load(&snap, true).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("confined to no paths"), "{e}");

    let open = |name: &str| std::fs::File::open(snap.join(name)).unwrap();
    let (state, memory, disk) = (open("state.bin"), open("memory.bin"), std::fs::File::open(&disk).unwrap());
    let vsock = std::os::unix::net::UnixListener::bind(&spare.vsock).unwrap();
    // Descriptors of the wrong kind are refused (a file as the vsock listener) and the spare
    // keeps its VM for the next load.
    let wrong = cella_vmm::control::HandedSnapshotFiles {
        state: state.as_fd(),
        memory: memory.as_fd(),
        disk: Some(disk.as_fd()),
        vsock: Some(disk.as_fd()),
    };
    let e = control.snapshot_load_handed(&wrong, true, None).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("not a socket"), "{e}");
    let files = cella_vmm::control::HandedSnapshotFiles { vsock: Some(vsock.as_fd()), ..wrong };
    let loaded = control.snapshot_load_handed(&files, true, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(loaded["state"], "running", "{loaded}");
    assert_eq!(stats(&mut spare.guest()).index_id, index_id, "the snapshot's index, served");
    let e = control.snapshot_load_handed(&files, true, None).unwrap_err();
    assert!(e.is_wrong_state(), "a second load: {e}");
    drop((state, memory, vsock));

    // It snapshots into files handed over too (it could not make them), and that snapshot
    // restores in the next spare with what was added since.
    add(&mut spare.guest(), "later", &[("notes.txt", b"TODO: added in the spare\n")]);
    control.pause().unwrap();
    let e = control.snapshot_create(&dir.join("by-path")).unwrap_err();
    assert!(!dir.join("by-path").exists(), "a confined VMM made a folder: {e}");
    let snap2 = dir.join("snap2");
    let info = control.snapshot_create_handed(&snap2).unwrap();
    assert!(info["memory_bytes_written"].as_u64().unwrap() > 0, "{info}");
    let names: Vec<_> = std::fs::read_dir(&snap2).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "only state.bin and memory.bin: {names:?}");
    assert_scrubbed(&spare.stop());

    let next = Session::spawn_spare(&dir.join("next").tap_mkdir());
    wait_confined(next.child.as_ref().unwrap().id());
    let open = |name: &str| std::fs::File::open(snap2.join(name)).unwrap();
    let (state, memory) = (open("state.bin"), open("memory.bin"));
    let vsock = std::os::unix::net::UnixListener::bind(&next.vsock).unwrap();
    let files = cella_vmm::control::HandedSnapshotFiles {
        state: state.as_fd(),
        memory: memory.as_fd(),
        disk: Some(disk.as_fd()),
        vsock: Some(vsock.as_fd()),
    };
    next.control().snapshot_load_handed(&files, true, None).unwrap();
    let mut guest = next.guest();
    let after = stats(&mut guest);
    assert_eq!((after.index_id, after.files, after.adds), (index_id, 4, 1));
    drop(guest);
    assert_scrubbed(&next.stop());
}

/// Runs `cella-vmm session --restore snap`; returns its exit code and stderr.
fn restore_fails(dir: &Path, snap: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cella-vmm"))
        .args(["session", "--api-sock"])
        .arg(dir.join("api.sock"))
        .arg("--vsock")
        .arg(dir.join("vsock.sock"))
        .arg("--restore")
        .arg(snap)
        .output()
        .unwrap();
    assert!(!dir.join("api.sock").exists(), "the control socket was left behind");
    (output.status.code().unwrap(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn corrupt_truncated_wrong_version_and_incomplete_snapshots_are_refused() {
    let dir = scratch("session-snapshot-refused");
    let source = Session::spawn(&dir.join("src").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let good = dir.join("good");
    suspend(source, &good);
    let state = std::fs::read(good.join("state.bin")).unwrap();

    let variant = |name: &str, state_bytes: &[u8], memory: bool| -> PathBuf {
        let snap = dir.join(name);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("state.bin"), state_bytes).unwrap();
        if memory {
            std::fs::copy(good.join("memory.bin"), snap.join("memory.bin")).unwrap();
        }
        snap
    };
    let mut corrupt = state.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x20;
    let mut other_version = state.clone();
    other_version[8..12].copy_from_slice(&99u32.to_le_bytes());
    let cases = [
        ("corrupt", variant("corrupt", &corrupt, true), "corrupt (checksum mismatch)"),
        ("truncated", variant("truncated", &state[..state.len() - 40], true), "truncated"),
        ("version", variant("version", &other_version, true), "99"),
        ("no-memory", variant("no-memory", &state, false), "memory file"),
        ("not-a-snapshot", dir.join("src"), "no snapshot state file"),
    ];
    for (name, snap, says) in cases {
        let run = dir.join(format!("run-{name}")).tap_mkdir();
        let (code, stderr) = restore_fails(&run, &snap);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: expected {says:?} in {stderr}");
    }
}

/// A 1 MiB tmpfs, unmounted on drop.
struct TinyDisk(PathBuf);

impl TinyDisk {
    fn mount(path: PathBuf) -> TinyDisk {
        std::fs::create_dir_all(&path).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&path).status();
        assert!(
            status.unwrap().success(),
            "cannot mount a tmpfs at {} (these tests run as root)",
            path.display()
        );
        TinyDisk(path)
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_snapshot_that_fills_the_disk_fails_cleanly_and_the_session_keeps_running() {
    let dir = scratch("session-snapshot-full-disk");
    let session = Session::spawn(&dir.join("s").tap_mkdir(), ("--artifact", &artifact(&dir)));
    let mut guest = session.guest();
    let before = stats(&mut guest);
    let disk = TinyDisk::mount(dir.join("tiny"));
    let control = session.control();
    control.pause().unwrap();
    let e = control.snapshot_create(&disk.0.join("snap")).unwrap_err();
    assert_eq!(e.status(), Some(500), "{e}");
    let message = e.to_string();
    assert!(message.contains("no space left") && message.contains("keeps running"), "{message}");
    let left: Vec<_> =
        std::fs::read_dir(disk.0.join("snap")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "a partial snapshot was left: {left:?}");
    assert_eq!(control.state().unwrap().state, VmState::Paused);
    control.resume().unwrap();
    assert_eq!(stats(&mut guest).index_id, before.index_id);
    drop(guest);
    drop(disk);
    assert_scrubbed(&session.stop());
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    /// Creates the folder and returns it.
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
