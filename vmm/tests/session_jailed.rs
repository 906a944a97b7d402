//! `cella-vmm session --jailed` end to end, against the real jailer and KVM: the session's one
//! folder (artifact, sockets, snapshot) is bound into the jail at its own path, so the host
//! drives the jailed VMM through the same paths it would use unjailed. A jailed session answers
//! over its control and vsock sockets from a confined VMM; a snapshot taken inside the jail
//! restores in a new jail with the same index and a verified scrub (which reads the jail's own
//! `/proc/self/pagemap`); a session outlives whoever launched it; every test checks that no
//! jail folder, mount or cgroup is left and that the folder is root's again.
//!
//! What a jailed VMM can open with `/proc` mounted (its own pagemap, no host file, not even
//! through `/proc/self/fd`) is tested on the jailer itself (`jailer/tests/jail.rs`), with the
//! flags `session --jailed --restore` passes.
//!
//! The jail needs a statically linked `cella-vmm`; [`binaries`] builds it and `cella-jailer`
//! once per run, as `jailed_scan.rs` does, before any test starts a process.

mod common;

use cella_e2e::status_field;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use cella_proto::{self as proto, SessionRequest, SessionResult};
use cella_vmm::control::ControlClient;
use cella_vmm::rpc_interface::VmState;
use cella_vmm::session_client::GuestSession;
use common::{assert_scrubbed, jail_binaries, tar, JailBinaries};
use serde_json::Value;

/// The uid/gid of the jailed session VMMs here (distinct from the other jailed tests').
const UID: u32 = 64_031;
const GID: u32 = 64_032;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The jailer and static VMM these tests run (see `common::jail_binaries`).
fn binaries() -> &'static JailBinaries {
    jail_binaries("session-jailed-tests")
}

/// One test's places: a chroot base and a session folder (mode 0700, root's) holding the
/// artifact, as the service would make them.
struct Cell {
    base: PathBuf,
    dir: PathBuf,
}

impl Cell {
    fn new(test: &str) -> Cell {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("session-jailed").join(test);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.join("session");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let files: [(&str, &[u8]); 3] = [
            ("app/README.md", b"# demo\nTODO: write docs\n"),
            ("app/config.env", b"STRIPE=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n"),
            ("app/src/main.rs", b"fn main() {\n    // TODO: more\n}\n"),
        ];
        std::fs::write(dir.join("app.tar"), tar(&files)).unwrap();
        Cell { base: root.join("jails"), dir }
    }

    fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// `cella-vmm session --json --jailed ...` with this cell's sockets and `source`
    /// (`--artifact` or `--restore` and its path).
    fn command(&self, id: &str, source: (&str, &Path)) -> Command {
        let b = binaries();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cella-vmm"));
        command.args(["session", "--json", "--read-policy", "allow", "--mem-mib", "128"]);
        command.args(["--jailed", "--jailer"]).arg(&b.jailer).arg("--vmm-binary").arg(&b.static_vmm);
        command.arg("--chroot-base").arg(&self.base).args(["--jail-id", id]);
        command.args(["--jail-uid", &UID.to_string(), "--jail-gid", &GID.to_string()]);
        command.arg("--api-sock").arg(self.api()).arg("--vsock").arg(self.vsock());
        command.arg(source.0).arg(source.1).stdin(Stdio::null());
        command
    }

    /// Starts a jailed session and waits until its control API answers.
    fn start(&self, id: &str, source: (&str, &Path)) -> Session {
        let started = Instant::now();
        let child = self.command(id, source).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut session = Session { child: Some(child), api: self.api(), vsock: self.vsock(), started };
        session.wait_for_api();
        session
    }

    /// Asserts that nothing of the jail `id` is left (no jail folder, mount or cgroup) and that
    /// the session folder and everything in it are root's again.
    fn assert_clean(&self, id: &str) {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.base.join("cella-vmm")) {
            found.extend(entries.flatten().map(|e| format!("jail folder {}", e.path().display())));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for place in [&self.base, &self.dir] {
            let text = place.display().to_string();
            found.extend(mountinfo.lines().filter(|l| l.contains(&text)).map(|l| format!("mount {l}")));
        }
        for parent in cella_e2e::cgroup_parents() {
            if parent.join(id).exists() {
                found.push(format!("cgroup {}", parent.join(id).display()));
            }
        }
        assert_eq!(found, Vec::<String>::new());
        let mut stack = vec![self.dir.clone()];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{} was not given back to root", path.display());
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
            }
        }
        assert!(!self.api().exists() && !self.vsock().exists(), "sockets left in the session folder");
    }
}

/// A running jailed session: the outer process (which became the jail's supervisor) and its
/// sockets.
struct Session {
    child: Option<Child>,
    api: PathBuf,
    vsock: PathBuf,
    started: Instant,
}

impl Session {
    fn wait_for_api(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.api.exists() && self.control().state().is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let output = self.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "the jailed session ended early ({status}): {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            assert!(Instant::now() < deadline, "the jailed session's control API never answered");
            sleep(Duration::from_millis(2));
        }
    }

    fn control(&self) -> ControlClient {
        ControlClient::new(&self.api)
    }

    fn guest(&self) -> GuestSession {
        GuestSession::connect(&self.vsock, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect: {}", cella_vmm::error_chain(&e)))
    }

    /// The jailed VMM: the supervisor's child, once it runs `cella-vmm`.
    fn vmm_pid(&self) -> u32 {
        let outer = self.child.as_ref().unwrap().id();
        let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
        let pid: u32 =
            children.split_whitespace().next().expect("the supervisor has a child").parse().unwrap();
        assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "cella-vmm");
        pid
    }

    /// Stops the VM through the API; returns the final report the VMM printed on stdout.
    fn stop(mut self) -> Value {
        self.control().stop().unwrap();
        let output = self.child.take().unwrap().wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or_else(|| panic!("no report on stdout; stderr: {stderr}"));
        serde_json::from_str(last).unwrap()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, not SIGKILL: the supervisor stops the VM and removes the jail.
            // SAFETY: kill(2) to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
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

/// Every thread of `pid` has no capabilities, no-new-privs, a seccomp filter, and the jail's uid.
fn assert_confined(pid: u32) {
    // The main, API and vCPU threads, each with the filter it installs when it starts.
    cella_e2e::wait_until_threads_confined(pid, 3);
    let tasks = cella_e2e::threads(pid);
    for task in &tasks {
        let status = format!("/proc/{pid}/task/{task}/status");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&status, cap), "0000000000000000", "{cap} of task {task}");
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "task {task}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "task {task}");
        let uid = UID.to_string();
        assert_eq!(status_field(&status, "Uid").split_whitespace().collect::<Vec<_>>(), [&uid; 4]);
        let gid = GID.to_string();
        assert_eq!(status_field(&status, "Gid").split_whitespace().collect::<Vec<_>>(), [&gid; 4]);
    }
}

#[test]
fn a_jailed_session_answers_over_its_sockets_from_a_confined_vmm() {
    binaries();
    let cell = Cell::new("answers");
    let id = format!("jsess-answers-{}", std::process::id());
    let session = cell.start(&id, ("--artifact", &cell.dir.join("app.tar")));
    let api_ms = session.started.elapsed().as_secs_f64() * 1e3;
    let mut guest = session.guest();
    let before = stats(&mut guest);
    let first_answer_ms = session.started.elapsed().as_secs_f64() * 1e3;
    eprintln!("jailed session launch: control API after {api_ms:.1} ms, first guest answer after {first_answer_ms:.1} ms");
    assert_eq!(before.files, 3);
    let matches = todos(&mut guest);
    assert_eq!(matches.len(), 2, "{matches:?}");

    let vmm = session.vmm_pid();
    assert_confined(vmm);
    // Its sockets are where the host put them, and the jail uid's.
    for socket in [&cell.api(), &cell.vsock()] {
        assert_eq!(std::fs::metadata(socket).unwrap().uid(), UID, "{}", socket.display());
    }
    // A booted session gets no /proc: scans and boots keep the smaller cell.
    assert!(!Path::new(&format!("/proc/{vmm}/root/proc/self")).exists());

    let control = session.control();
    control.pause().unwrap();
    assert_eq!(control.state().unwrap().state, VmState::Paused);
    control.resume().unwrap();
    assert_eq!(control.state().unwrap().state, VmState::Running);
    assert_eq!(todos(&mut guest), matches);
    assert_eq!(stats(&mut guest).index_id, before.index_id, "pause/resume rebuilt the index");
    drop(guest);
    let report = session.stop();
    assert_eq!(report["exit"]["kind"], "stopped", "{report}");
    assert_scrubbed(&report);
    cell.assert_clean(&id);
}

#[test]
fn a_snapshot_taken_in_a_jail_restores_in_a_new_jail_with_the_same_index_and_a_verified_scrub() {
    binaries();
    let cell = Cell::new("restore");
    let id = format!("jsess-snap-{}", std::process::id());
    let session = cell.start(&id, ("--artifact", &cell.dir.join("app.tar")));
    let mut guest = session.guest();
    let before = stats(&mut guest);
    let matches = todos(&mut guest);
    drop(guest);
    let control = session.control();
    control.pause().unwrap();
    // The snapshot folder is named by its host path: the jail sees the session folder there.
    let snap = cell.dir.join("snapshot");
    let info = control.snapshot_create(&snap).unwrap();
    assert_eq!(info["dir"], snap.display().to_string(), "{info}");
    assert_scrubbed(&session.stop());
    cell.assert_clean(&id);
    assert!(snap.join("state.bin").is_file() && snap.join("memory.bin").is_file());

    // A new VMM in a new jail, restored from the snapshot in the same session folder.
    let id = format!("jsess-restore-{}", std::process::id());
    let restored = cell.start(&id, ("--restore", &snap));
    let mut guest = restored.guest();
    let after = stats(&mut guest);
    let first_answer_ms = restored.started.elapsed().as_secs_f64() * 1e3;
    eprintln!("jailed restore: first guest answer after {first_answer_ms:.1} ms");
    assert_eq!(after.index_id, before.index_id, "the restored session rebuilt its index");
    assert_eq!(after.index_builds, 1);
    assert_eq!(todos(&mut guest), matches);
    drop(guest);

    let vmm = restored.vmm_pid();
    assert_confined(vmm);
    // The restored VMM has a /proc: its own PID namespace's, where it is the only process.
    let proc_dir = format!("/proc/{vmm}/root/proc");
    let mut seen: Vec<String> = std::fs::read_dir(&proc_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["1", "self", "thread-self"], "the jail's /proc shows more than the VMM");

    // The scrub of the restored memory found the pages the guest wrote through pagemap.
    let report = restored.stop();
    assert_scrubbed(&report);
    assert!(
        report["scrub"]["bytes"].as_u64().unwrap() > 0,
        "the restored scrub found no written pages: {report}"
    );
    cell.assert_clean(&id);
}

#[test]
fn a_jailed_session_outlives_its_launcher_and_cleans_up_when_stopped() {
    binaries();
    let cell = Cell::new("orphan");
    let id = format!("jsess-orphan-{}", std::process::id());
    // The launcher (a shell) starts the session in the background and exits at once, the way a
    // service restarting leaves its sessions behind; the report goes to a file.
    let command = cell.command(&id, ("--artifact", &cell.dir.join("app.tar")));
    let mut line: Vec<String> = vec![command.get_program().to_string_lossy().into_owned()];
    line.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    let report_file = cell.dir.parent().unwrap().join("report.json");
    let script = format!("{} >{} 2>/dev/null </dev/null &", line.join(" "), report_file.display());
    let status = Command::new("/bin/sh").args(["-c", &script]).status().unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(20);
    while !(cell.api().exists() && ControlClient::new(cell.api()).state().is_ok()) {
        assert!(Instant::now() < deadline, "the orphaned session never answered");
        sleep(Duration::from_millis(5));
    }
    let mut guest = GuestSession::connect(&cell.vsock(), CONNECT_TIMEOUT).unwrap();
    assert_eq!(stats(&mut guest).files, 3);
    drop(guest);

    let report = ControlClient::new(cell.api()).stop().unwrap();
    assert!(report.scrub.verified_zero);
    // The supervisor removes the jail and hands the folder back once the VMM is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(cell.base.join("cella-vmm")).map(|mut d| d.next().is_some()).unwrap_or(false)
        || std::fs::metadata(&cell.dir).unwrap().uid() != 0
    {
        assert!(Instant::now() < deadline, "the orphaned session's jail was not removed");
        sleep(Duration::from_millis(10));
    }
    sleep(Duration::from_millis(100));
    cell.assert_clean(&id);
    let written = std::fs::read_to_string(&report_file).unwrap();
    let printed: Value = serde_json::from_str(written.lines().last().unwrap()).unwrap();
    assert_scrubbed(&printed);
}

#[test]
fn a_jailed_session_refuses_paths_outside_its_folder_and_a_folder_open_to_others() {
    binaries();
    let cell = Cell::new("refused");
    let id = format!("jsess-refused-{}", std::process::id());
    let elsewhere = cell.dir.parent().unwrap().join("elsewhere.tar");
    std::fs::copy(cell.dir.join("app.tar"), &elsewhere).unwrap();
    let output = cell.command(&id, ("--artifact", &elsewhere)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let expected =
        format!("--artifact {} is not inside the session folder {}", elsewhere.display(), cell.dir.display());
    assert!(stderr.contains(&expected), "{stderr}");

    std::fs::set_permissions(&cell.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let output = cell.command(&id, ("--artifact", &cell.dir.join("app.tar"))).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be closed to everyone but its owner (mode 0700)"), "{stderr}");
    assert!(!cell.base.exists(), "a refused launch created the jail base");
}

#[test]
fn sigterm_to_a_jailed_session_stops_the_vm_scrubs_it_and_removes_the_jail() {
    binaries();
    let cell = Cell::new("sigterm");
    let id = format!("jsess-term-{}", std::process::id());
    let mut session = cell.start(&id, ("--artifact", &cell.dir.join("app.tar")));
    assert_eq!(stats(&mut session.guest()).files, 3);
    let child = session.child.take().unwrap();
    // SAFETY: kill(2) to our own child process (the jail's supervisor).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(244), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().expect("a report")).unwrap();
    assert_eq!(report["exit"]["kind"], "stopped", "{report}");
    assert_scrubbed(&report);
    cell.assert_clean(&id);
}
