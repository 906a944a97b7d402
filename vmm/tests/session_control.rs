//! Pause, resume and stop against the real /dev/kvm: through the `rpc_interface` contract with
//! no HTTP, through the control socket with `ControlClient`, and through `cella-vmm session`
//! as a process. A spinning guest pauses promptly; a paused VM uses no CPU; stop scrubs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use cella_vmm::control::{action_channel, run_vmm, ApiServer, ControlClient, VmmLimits};
use cella_vmm::rpc_interface::{StopCause, VmState, VmmAction, VmmActionError, VmmController, VmmData};
use cella_vmm::{build, GuestExit, RunReport, SharedBuffer, VmConfig};
use common::{assert_scrubbed, runner_image, scratch};

/// These tests measure CPU time, so they must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A generous bound: pausing takes well under a millisecond; this is not a benchmark.
const PROMPT: Duration = Duration::from_secs(1);
/// How long the CPU-time checks watch.
const WATCH: Duration = Duration::from_millis(500);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// User + system CPU time of every thread of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    total
}

/// CPU ticks `pid` used over [`WATCH`].
fn cpu_over_watch(pid: &str) -> u64 {
    let before = cpu_ticks(pid);
    sleep(WATCH);
    cpu_ticks(pid) - before
}

fn started_vm(config: VmConfig) -> VmmController {
    let vm = build(&config, Box::new(SharedBuffer::default())).unwrap();
    VmmController::new(vm.start().unwrap())
}

fn stop_report(controller: &mut VmmController) -> RunReport {
    match controller.handle(VmmAction::Stop).unwrap() {
        VmmData::Stopped(report) => *report,
        other => panic!("stop answered {other:?}"),
    }
}

fn state(controller: &mut VmmController) -> VmState {
    match controller.handle(VmmAction::GetState).unwrap() {
        VmmData::State(info) => info.state,
        other => panic!("get state answered {other:?}"),
    }
}

fn report_json(report: &RunReport) -> serde_json::Value {
    serde_json::to_value(report).unwrap()
}

#[test]
fn contract_pauses_a_spinning_guest_promptly_and_a_paused_vm_uses_no_cpu() {
    let _serial = serial();
    let mut vm = started_vm(VmConfig::new(runner_image(), vec!["spin".into()]));
    sleep(Duration::from_millis(200));
    let spinning = cpu_over_watch("self");
    let asked = Instant::now();
    assert!(matches!(vm.handle(VmmAction::Pause), Ok(VmmData::Empty)));
    let latency = asked.elapsed();
    println!("pause latency of a guest spinning at 100%: {latency:?}");
    assert!(latency < PROMPT, "pause took {latency:?}");
    assert_eq!(state(&mut vm), VmState::Paused);
    let paused = cpu_over_watch("self");
    println!("CPU ticks over {WATCH:?}: spinning {spinning}, paused {paused}");
    assert!(paused <= 2, "a paused VM used {paused} ticks of CPU in {WATCH:?}");

    let asked = Instant::now();
    assert!(matches!(vm.handle(VmmAction::Resume), Ok(VmmData::Empty)));
    println!("resume latency: {:?}", asked.elapsed());
    assert_eq!(state(&mut vm), VmState::Running);
    let resumed = cpu_over_watch("self");
    println!("CPU ticks over {WATCH:?} after resume: {resumed}");
    assert!(resumed >= 10, "the resumed guest used only {resumed} ticks in {WATCH:?}");

    let report = stop_report(&mut vm);
    assert_eq!(report.exit, GuestExit::Stopped);
    assert_scrubbed(&report_json(&report));
    assert_eq!(state(&mut vm), VmState::Stopped);
}

#[test]
fn contract_refuses_actions_in_the_wrong_state() {
    let _serial = serial();
    let mut vm = started_vm(VmConfig::new(runner_image(), vec!["spin".into()]));
    let wrong = |r: Result<VmmData, VmmActionError>| match r {
        Err(e @ VmmActionError::WrongState { .. }) => e.to_string(),
        other => panic!("expected a wrong-state error, got {other:?}"),
    };
    assert_eq!(wrong(vm.handle(VmmAction::Resume)), "cannot resume: the VM is running already");
    let snap = scratch("contract-wrong-state").join("snap");
    let e = wrong(vm.handle(VmmAction::CreateSnapshot { snapshot_dir: snap.clone() }));
    assert!(e.contains("pause it first"), "{e}");
    vm.handle(VmmAction::Pause).unwrap();
    assert_eq!(wrong(vm.handle(VmmAction::Pause)), "cannot pause: the VM is paused already");
    let e = wrong(vm.handle(VmmAction::LoadSnapshot { snapshot_dir: snap.clone(), resume: true }));
    assert!(e.contains("fresh VMM"), "{e}");
    let VmmData::Snapshot(info) = vm.handle(VmmAction::CreateSnapshot { snapshot_dir: snap }).unwrap() else {
        panic!("a snapshot answers with its info")
    };
    assert!(info["memory_pages"].as_u64().unwrap() > 0, "{info}");
    // The pause stats say what happened.
    let VmmData::Metrics(m) = vm.handle(VmmAction::GetMetrics).unwrap() else { panic!() };
    assert_eq!((m.pause.pauses, m.pause.resumes, m.snapshots_created), (1, 0, 1));
    assert!(m.pause.last_pause_us.is_some());
    // A paused VM stops (and is scrubbed) like a running one.
    let report = stop_report(&mut vm);
    assert_eq!(report.exit, GuestExit::Stopped);
    assert_scrubbed(&report_json(&report));
    wrong(vm.handle(VmmAction::Stop));
    wrong(vm.handle(VmmAction::Pause));
}

#[test]
fn a_guest_that_exits_on_its_own_is_reaped_and_reported() {
    let _serial = serial();
    let mut vm = started_vm(VmConfig::new(runner_image(), vec!["exit".into(), "5".into()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vm.reap() {
        assert!(Instant::now() < deadline, "the guest did not exit");
        sleep(Duration::from_millis(5));
    }
    let VmmData::State(info) = vm.handle(VmmAction::GetState).unwrap() else { panic!() };
    assert_eq!(info.state, VmState::Stopped);
    assert_eq!(info.exit, Some(GuestExit::Exited { code: 5 }));
    let (cause, report) = vm.take_final().unwrap();
    assert_eq!(cause, StopCause::Guest);
    assert_scrubbed(&report_json(&report.unwrap()));
}

/// `CONNECT port` over the VM's vsock socket, then echo `payload` through the guest.
fn vsock_echo(uds: &Path, port: u32, payload: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{}", String::from_utf8_lossy(&line));
    stream.write_all(payload).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).unwrap();
    echoed
}

#[test]
fn a_guest_blocked_in_a_wait_exit_pauses_promptly_and_works_after_resume() {
    let _serial = serial();
    let dir = scratch("session-wait-exit");
    let uds = dir.join("vsock.sock");
    let config = VmConfig {
        vsock_uds: Some(uds.clone()),
        ..VmConfig::new(runner_image(), vec!["vsock-serve".into(), "1025".into()])
    };
    let mut vm = started_vm(config);
    // The runner listens and idles in its wait exit until a host connection arrives.
    sleep(Duration::from_millis(300));
    let idle = cpu_over_watch("self");
    let asked = Instant::now();
    vm.handle(VmmAction::Pause).unwrap();
    let latency = asked.elapsed();
    println!("pause latency of a guest blocked in a wait exit: {latency:?} (idle CPU ticks: {idle})");
    assert!(latency < PROMPT, "pause took {latency:?}");
    let paused = cpu_over_watch("self");
    assert!(paused <= 2, "a paused VM used {paused} ticks of CPU in {WATCH:?}");
    vm.handle(VmmAction::Resume).unwrap();
    // The guest resumes where it was, in the middle of its wait: it still accepts and echoes.
    assert_eq!(
        vsock_echo(&uds, 1025, b"ping through a paused and resumed VM"),
        b"ping through a paused and resumed VM"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !vm.reap() {
        assert!(Instant::now() < deadline, "the guest did not exit after the echo");
        sleep(Duration::from_millis(10));
    }
    let (_, report) = vm.take_final().unwrap();
    let report = report.unwrap();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_scrubbed(&report_json(&report));
}

/// A VMM thread serving a control socket in this process, as the session command does.
struct InProcessVmm {
    sock: PathBuf,
    thread: Option<std::thread::JoinHandle<(StopCause, RunReport)>>,
}

impl InProcessVmm {
    fn join(mut self) -> (StopCause, RunReport) {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for InProcessVmm {
    /// A failed test must not leave its guest spinning under the next test's CPU measurements.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = ControlClient::new(&self.sock).stop();
            let _ = thread.join();
        }
    }
}

fn serve_in_process(name: &str, guest: &[&str]) -> InProcessVmm {
    let dir = scratch(name);
    let sock = dir.join("api.sock");
    let config = VmConfig::new(runner_image(), guest.iter().map(|s| s.to_string()).collect());
    let thread_sock = sock.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let (actions, receiver) = action_channel().unwrap();
        let vm = build(&config, Box::new(SharedBuffer::default())).unwrap();
        let server = ApiServer::start(&thread_sock, actions).unwrap();
        let mut controller = VmmController::new(vm.start().unwrap());
        ready_tx.send(()).unwrap();
        run_vmm(&mut controller, &receiver, &VmmLimits::default());
        drop(receiver);
        server.shutdown();
        let (cause, report) = controller.take_final().unwrap();
        (cause, report.unwrap())
    });
    ready.recv().unwrap();
    InProcessVmm { sock, thread: Some(thread) }
}

/// A well-formed request with a JSON body.
fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// Sends `raw` bytes as a request and returns the status and body.
fn raw_exchange(sock: &Path, raw: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (413) and close before taking all of an oversize body.
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        // Closing a Unix socket with unread input (the rest of an oversize body) resets it; the
        // answer has arrived in full before that.
        assert!(e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty(), "{e}");
    }
    let answer = String::from_utf8(answer).unwrap();
    let status = answer.get(9..12).unwrap_or_else(|| {
        panic!("no status line in {answer:?} for {:?}", String::from_utf8_lossy(&raw[..raw.len().min(60)]))
    });
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status.parse().unwrap(), body)
}

#[test]
fn socket_client_pauses_resumes_and_stops_a_spinning_guest() {
    let _serial = serial();
    let vmm = serve_in_process("session-socket", &["spin"]);
    let client = ControlClient::new(&vmm.sock);
    assert_eq!(client.state().unwrap().state, VmState::Running);
    sleep(Duration::from_millis(100));
    let asked = Instant::now();
    client.pause().unwrap();
    let latency = asked.elapsed();
    println!("pause latency over the control socket: {latency:?}");
    assert!(latency < PROMPT);
    assert_eq!(client.state().unwrap().state, VmState::Paused);
    let paused = cpu_over_watch("self");
    assert!(paused <= 2, "a paused VM used {paused} ticks of CPU in {WATCH:?}");
    let again = client.pause().unwrap_err();
    assert!(again.is_wrong_state(), "{again}");
    assert!(again.to_string().contains("already"), "{again}");
    client.resume().unwrap();
    assert!(client.resume().unwrap_err().is_wrong_state());
    assert!(cpu_over_watch("self") >= 10, "the resumed guest does not run");
    let metrics = client.metrics().unwrap();
    assert_eq!((metrics.pause.pauses, metrics.pause.resumes), (1, 1));

    let report = client.stop().unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
    assert_scrubbed(&report_json(&report));
    let sock = vmm.sock.clone();
    let (cause, final_report) = vmm.join();
    assert_eq!(cause, StopCause::Api);
    // The same scrub (its duration read back from JSON may differ in the last bit).
    let without_ms = |s: &cella_vmm::ScrubReport| cella_vmm::ScrubReport { ms: 0.0, ..s.clone() };
    assert_eq!(without_ms(&final_report.scrub), without_ms(&report.scrub));
    assert!((final_report.scrub.ms - report.scrub.ms).abs() < 1e-9);
    assert!(!sock.exists(), "the control socket was not removed");
}

#[test]
fn bad_requests_get_their_status_and_the_vm_keeps_running() {
    let _serial = serial();
    let vmm = serve_in_process("session-bad-requests", &["spin"]);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "request line"),
        (b"GET /vm HTTP/1.1\nHost: x\n\n".to_vec(), 400, ""),
        (b"GET /nope HTTP/1.1\r\n\r\n".to_vec(), 404, "no route /nope"),
        (b"DELETE /vm HTTP/1.1\r\n\r\n".to_vec(), 405, "allowed: GET, PATCH"),
        (b"PATCH /vm HTTP/1.1\r\nContent-Length: 9\r\n\r\nnot json!".to_vec(), 400, "bad JSON"),
        (b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400, "Content-Length"),
        (
            [
                format!("PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 65 << 10).as_bytes(),
                &[b'x'; 65 << 10],
            ]
            .concat(),
            413,
            "over the 65536-byte limit",
        ),
        (request("PUT", "/snapshot/create", r#"{"snapshot_dir":"snaps"}"#), 400, "absolute"),
    ];
    for (raw, status, says) in cases {
        let (got, body) = raw_exchange(&vmm.sock, &raw);
        assert_eq!(got, status, "{}: {body}", String::from_utf8_lossy(&raw[..raw.len().min(60)]));
        let fault: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
        assert!(fault["fault_message"].as_str().unwrap().contains(says), "{fault}");
    }
    let client = ControlClient::new(&vmm.sock);
    assert_eq!(client.state().unwrap().state, VmState::Running);
    let e = client.snapshot_create(Path::new("/tmp/snap")).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    client.pause().unwrap();
    let snap = scratch("control-socket-snapshot").join("snap");
    let e = client.snapshot_create(Path::new("relative/snap")).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let info = client.snapshot_create(&snap).unwrap();
    assert!(info["memory_disk_bytes"].as_u64().unwrap() > 0, "{info}");
    assert!(snap.join("state.bin").is_file() && snap.join("memory.bin").is_file());
    assert_eq!(client.state().unwrap().state, VmState::Paused, "a snapshot leaves the VM paused");
    let report = client.stop().unwrap();
    assert_scrubbed(&report_json(&report));
    vmm.join();
}

// ---- `cella-vmm session` as a process ----

struct SessionProcess {
    child: Child,
    sock: PathBuf,
}

fn spawn_session(name: &str, extra: &[&str]) -> SessionProcess {
    let dir = scratch(name);
    let sock = dir.join("api.sock");
    let artifact = dir.join("artifact.txt");
    std::fs::write(&artifact, "hello session\n").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cella-vmm"));
    command
        .args(["session", "--json", "--api-sock"])
        .arg(&sock)
        .arg("--vsock")
        .arg(dir.join("vsock.sock"))
        .arg("--artifact")
        .arg(&artifact)
        .arg("--image")
        .arg(runner_image())
        .args(extra)
        .args(["--", "spin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the session did not create its control socket");
        sleep(Duration::from_millis(10));
    }
    SessionProcess { child, sock }
}

/// Waits for the process; returns its exit code, the report on its last stdout line, stderr.
fn finish(session: SessionProcess, within: Duration) -> (i32, serde_json::Value, String) {
    let SessionProcess { mut child, .. } = session;
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the session process did not end within {within:?}");
        }
        sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no report on stdout; stderr: {stderr}"));
    let report = serde_json::from_str(last).unwrap_or_else(|e| panic!("bad report {last:?}: {e}"));
    (output.status.code().expect("exited, not killed"), report, stderr)
}

#[test]
fn session_process_answers_pause_resume_and_stop_then_exits_zero() {
    let _serial = serial();
    let session = spawn_session("session-cli", &[]);
    let client = ControlClient::new(&session.sock);
    let pid = session.child.id().to_string();
    assert_eq!(client.state().unwrap().state, VmState::Running);
    client.pause().unwrap();
    let paused = cpu_over_watch(&pid);
    assert!(paused <= 2, "a paused session VMM used {paused} ticks of CPU in {WATCH:?}");
    assert!(client.pause().unwrap_err().is_wrong_state());
    client.resume().unwrap();
    let resumed = cpu_over_watch(&pid);
    assert!(resumed >= 10, "the resumed session VMM used only {resumed} ticks");
    let report = client.stop().unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
    let sock = session.sock.clone();
    let (code, final_report, stderr) = finish(session, Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(final_report["exit"]["kind"], "stopped");
    assert_scrubbed(&final_report);
    assert!(!sock.exists(), "the control socket was not removed");
}

#[test]
fn session_process_stops_with_a_scrub_on_sigterm() {
    let _serial = serial();
    let session = spawn_session("session-sigterm", &[]);
    let client = ControlClient::new(&session.sock);
    client.pause().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(session.child.id() as i32, libc::SIGTERM) }, 0);
    let sock = session.sock.clone();
    let (code, report, stderr) = finish(session, Duration::from_secs(10));
    assert_eq!(code, 244, "{stderr}");
    assert_eq!(report["exit"]["kind"], "stopped");
    assert_scrubbed(&report);
    assert!(!sock.exists(), "the control socket was not removed");
}

#[test]
fn session_process_ends_itself_at_its_maximum_duration() {
    let _serial = serial();
    let started = Instant::now();
    let session = spawn_session("session-max-duration", &["--max-duration-secs", "1"]);
    let (code, report, stderr) = finish(session, Duration::from_secs(15));
    let took = started.elapsed();
    assert_eq!(code, 242, "{stderr}");
    assert_eq!(report["exit"], serde_json::json!({"kind": "timed_out", "timeout_ms": 1000}));
    assert_scrubbed(&report);
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "took {took:?}");
}
