//! The session state machine, driven through [`FakeVmms`] and [`FakeStore`]: every transition,
//! every failure of a VM along the way, the reaper's passes and recovery after a restart. No
//! root, KVM or PostgreSQL; the real VMMs and database are exercised by `tests/sessions_*.rs`.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cella_audit::Actor;
use cella_proto::SessionRequest;
use time::OffsetDateTime;

use super::fake::{FakeStore, FakeVmms};
use super::manager::{SessionManager, SNAPSHOT_COMPLETE};
use super::store::{Session, SessionStore};
use super::vmm::{Attach, Frame, Source, VmState};
use super::{reaper, SessionParams, State};
use crate::config::SessionsConfig;
use crate::data_dir::DataDir;
use crate::error::ServiceError;
use crate::quotas::{QuotaOverrides, Quotas};
use crate::tenants::Caller;

const TENANT: &str = "tenant_a";
const HOST: &str = "host-a";

/// A folder of its own, removed at the end.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Case {
    m: Arc<SessionManager<FakeVmms, FakeStore>>,
    vmms: FakeVmms,
    store: FakeStore,
    config: SessionsConfig,
    _dir: Scratch,
    root: std::path::PathBuf,
}

fn actor() -> Actor {
    Actor::ApiKey("key_1".to_owned())
}

fn session_id(n: u32) -> String {
    format!("session_{n:032x}")
}

impl Case {
    fn new() -> Self {
        Self::with(FakeVmms::default(), SessionsConfig::default())
    }

    fn with(vmms: FakeVmms, config: SessionsConfig) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "cella-session-machine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(root.join("sessions")).expect("scratch folder");
        let store = FakeStore::default();
        let m = Arc::new(SessionManager::with_parts(
            store.clone(),
            config.clone(),
            DataDir::at(&root),
            HOST.to_owned(),
            vmms.clone(),
        ));
        Case { m, vmms, store, config, _dir: Scratch(root.clone()), root }
    }

    /// The same store and VMMs under a new manager: `cella serve` restarted.
    fn restarted(&self) -> Arc<SessionManager<FakeVmms, FakeStore>> {
        Arc::new(SessionManager::with_parts(
            self.store.clone(),
            self.config.clone(),
            DataDir::at(&self.root),
            HOST.to_owned(),
            self.vmms.clone(),
        ))
    }

    async fn create(&self, n: u32) -> Result<Session, ServiceError> {
        self.create_with(n, 0).await
    }

    async fn create_with(&self, n: u32, idle_suspend_secs: u64) -> Result<Session, ServiceError> {
        let id = session_id(n);
        let paths = self.m.paths(&id);
        std::fs::create_dir_all(&paths.dir).expect("session folder");
        std::fs::write(&paths.artifact, b"AKIA...").expect("artifact");
        let caller = Caller {
            tenant_id: TENANT.to_owned(),
            key_id: "key_1".to_owned(),
            quotas: QuotaOverrides::default(),
        };
        let quotas = Quotas {
            session_mem_mib: 4096,
            live_sessions: 16,
            disk_bytes: 1 << 30,
            uploads: 4,
            requests: 16,
            vm_cpu_percent: 100,
            packs: 4,
            pack_compiled_bytes: 1 << 20,
        };
        let params = SessionParams {
            max_duration_secs: 3600,
            idle_suspend_secs,
            read_policy: "redact".to_owned(),
            mem_mib: 128,
        };
        self.m.create(&id, &caller, &quotas, &actor(), Some("repo.tar"), 7, [0; 32], &params).await
    }

    async fn exec(&self, s: &Session) -> Result<super::vmm::Reply, ServiceError> {
        let audit = serde_json::json!({ "op": "stats" });
        self.m.exec(TENANT, &s.id, &actor(), SessionRequest::Stats, None, audit).await
    }

    fn row(&self, s: &Session) -> Session {
        self.store.row(&s.id)
    }

    fn pid(&self, s: &Session) -> u32 {
        self.row(s).vmm_pid.expect("a VMM recorded") as u32
    }
}

fn conflict(e: ServiceError) -> String {
    match e {
        ServiceError::Conflict(m) => m,
        other => panic!("wanted 409, got {other:?}"),
    }
}

fn vm_error(e: ServiceError) -> String {
    match e {
        ServiceError::Vm(m) => m,
        other => panic!("wanted a VM error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_created_session_runs_on_a_vm_of_its_own_with_the_tenants_cpu_quota() {
    let case = Case::new();
    case.store.set_cpu_percent(TENANT, 30);
    let s = case.create(1).await.expect("created");
    assert_eq!(s.state, State::Running);
    let vm = case.vmms.vm(case.pid(&s));
    assert!(vm.alive && vm.state == VmState::Running);
    assert!(matches!(&vm.source, Source::Artifact { name, .. } if name == "repo.tar"), "{:?}", vm.source);
    assert_eq!(vm.cpu_percent, 30);
    assert_eq!(vm.jail_uid, None, "not jailed");
    assert_eq!(vm.api, case.m.paths(&s.id).api_sock);
    assert_eq!(case.store.actions(&s.id), ["session.created", "session.started"]);
    assert_eq!(case.store.event(&s.id, "session.started")["pid"], vm.pid);
    // The guest connection made at start serves the first exec.
    let reply = case.exec(&s).await.expect("exec");
    assert_eq!(reply.response["pid"], vm.pid);
    assert_eq!(reply.frames, [Frame::Data(b"answer".to_vec())]);
    assert_eq!(case.vmms.calls().iter().filter(|c| *c == "connect").count(), 1);

    let other = case.create(2).await.expect("second");
    assert_ne!(case.pid(&other), vm.pid, "one VMM per session");
    assert_eq!(case.vmms.live().len(), 2);
}

#[tokio::test]
async fn a_vm_that_does_not_come_up_fails_the_session_and_leaves_nothing_behind() {
    let case = Case::new();
    for (n, arm) in [(1, "launch"), (2, "ready"), (3, "connect")] {
        case.vmms.arm(|f| match arm {
            "launch" => f.launch = true,
            "ready" => f.ready = true,
            _ => f.connect = true,
        });
        let s = case.create(n).await.expect("the session is recorded, failed");
        assert_eq!(s.state, State::Failed, "{arm}");
        let reason = s.failure_reason.clone().unwrap_or_default();
        assert!(reason.starts_with("the VM did not start"), "{arm}: {reason}");
        assert!(!reason.contains(&case.root.display().to_string()), "{arm}: host paths in {reason}");
        assert!(!case.m.paths(&s.id).dir.exists(), "{arm}: the artifact is deleted");
        assert_eq!(s.vmm_pid, None);
        assert_eq!(case.store.actions(&s.id).last(), Some(&"session.failed"));
    }
    assert!(case.vmms.live().is_empty(), "no VMM is left running: {:?}", case.vmms.live());
    // The one whose guest never answered was stopped through its API (it scrubbed).
    assert!(case.vmms.vms().last().is_some_and(|v| v.stopped_on_request));
}

#[tokio::test]
async fn pause_and_resume_keep_the_vm_and_repeat_as_no_ops() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let pid = case.pid(&s);
    let paused = case.m.pause(TENANT, &s.id, &actor()).await.expect("pause");
    assert_eq!(paused.state, State::Paused);
    assert_eq!(case.vmms.vm(pid).state, VmState::Paused);
    let again = case.m.pause(TENANT, &s.id, &actor()).await.expect("pause again");
    assert_eq!(again.generation, paused.generation, "a second pause changes nothing");
    assert!(conflict(case.exec(&s).await.expect_err("exec while paused")).contains("resume it first"));

    let running = case.m.resume(TENANT, &s.id, &actor()).await.expect("resume");
    assert_eq!(running.state, State::Running);
    assert_eq!(case.pid(&s), pid, "the same VMM");
    assert_eq!(case.vmms.vm(pid).state, VmState::Running);
    assert!(running.last_active_at >= paused.last_active_at);
    let again = case.m.resume(TENANT, &s.id, &actor()).await.expect("resume again");
    assert_eq!(again.generation, running.generation);
    case.exec(&s).await.expect("exec after resume");
    assert_eq!(
        case.store.actions(&s.id),
        ["session.created", "session.started", "session.paused", "session.resumed", "session.exec"]
    );
    assert_eq!(case.vmms.live().len(), 1);
}

#[tokio::test]
async fn suspend_snapshots_and_stops_the_vm_and_resume_restores_a_new_one() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let first = case.pid(&s);
    let paths = case.m.paths(&s.id);
    let suspended = case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend");
    assert_eq!(suspended.state, State::Suspended);
    assert_eq!(suspended.vmm_pid, None);
    assert!(suspended.snapshot_bytes.is_some_and(|b| b >= 8192), "{:?}", suspended.snapshot_bytes);
    assert!(paths.snapshot.join(SNAPSHOT_COMPLETE).is_file(), "the snapshot is marked complete");
    let old = case.vmms.vm(first);
    assert!(!old.alive && old.stopped_on_request, "stopped through its API, so it scrubbed");
    let event = case.store.event(&s.id, "session.suspended");
    assert_eq!(event["scrub"]["verified"], true);
    assert_eq!(event["was"], "running");
    assert_eq!(event["reason"], "requested");
    assert!(conflict(case.exec(&s).await.expect_err("exec while suspended")).contains("suspended"));

    let restored = case.m.resume(TENANT, &s.id, &actor()).await.expect("restore");
    assert_eq!(restored.state, State::Running);
    let second = case.pid(&s);
    assert_ne!(second, first, "a new VMM");
    assert!(matches!(&case.vmms.vm(second).source, Source::Snapshot { dir } if *dir == paths.snapshot));
    assert!(!paths.snapshot.exists(), "the snapshot is deleted once restored");
    assert_eq!(restored.snapshot_bytes, None);
    assert_eq!(case.store.event(&s.id, "session.restored")["pid"], second);
    assert_eq!(case.exec(&s).await.expect("exec on the restored VM").response["pid"], second);
    assert_eq!(case.vmms.live().len(), 1);
    // The old snapshot was renamed aside and is deleted in the background.
    let leftovers = || {
        std::fs::read_dir(paths.snapshot.parent().expect("the sessions folder"))
            .expect("sessions folder")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{}.snapshot", s.id)))
            .count()
    };
    for _ in 0..200 {
        if leftovers() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(leftovers(), 0, "the restored snapshot is deleted");
    // A suspend right after a restore writes its own snapshot at the same place.
    case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend again");
    assert!(paths.snapshot.join(SNAPSHOT_COMPLETE).is_file());
    case.m.resume(TENANT, &s.id, &actor()).await.expect("restore again");
}

#[tokio::test]
async fn a_paused_session_suspends_without_being_resumed_first() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.m.pause(TENANT, &s.id, &actor()).await.expect("pause");
    case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend");
    assert_eq!(case.store.event(&s.id, "session.suspended")["was"], "paused");
    assert_eq!(
        case.vmms.calls().iter().filter(|c| *c == "pause").count(),
        1,
        "paused once, by the pause call"
    );
    let again = case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend again");
    assert_eq!(again.state, State::Suspended);
}

#[tokio::test]
async fn a_failed_snapshot_leaves_the_session_as_it_was_and_removes_the_part_written() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let pid = case.pid(&s);
    case.vmms.arm(|f| f.snapshot = true);
    let message = vm_error(case.m.suspend(TENANT, &s.id, &actor()).await.expect_err("snapshot fails"));
    assert!(
        message.contains("no space left on device") && message.ends_with("it is still running"),
        "{message}"
    );
    assert_eq!(case.row(&s).state, State::Running);
    assert_eq!(case.vmms.vm(pid).state, VmState::Running, "resumed after the failed snapshot");
    assert!(!case.m.paths(&s.id).snapshot.exists(), "the partial snapshot is removed");
    assert_eq!(case.store.event(&s.id, "session.suspend_failed")["trigger"], "requested");
    case.exec(&s).await.expect("the session goes on");

    // Paused, it stays paused.
    case.m.pause(TENANT, &s.id, &actor()).await.expect("pause");
    case.vmms.arm(|f| f.snapshot = true);
    let message = vm_error(case.m.suspend(TENANT, &s.id, &actor()).await.expect_err("snapshot fails"));
    assert!(message.ends_with("it is still paused"), "{message}");
    assert_eq!(case.row(&s).state, State::Paused);
    assert_eq!(case.vmms.vm(pid).state, VmState::Paused);
}

#[tokio::test]
async fn a_vm_that_dies_while_it_snapshots_fails_the_session() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.vmms.arm(|f| f.snapshot_kills = true);
    let message = vm_error(case.m.suspend(TENANT, &s.id, &actor()).await.expect_err("the VMM died"));
    assert!(message.contains("the VMM ended while suspending"), "{message}");
    let row = case.row(&s);
    assert_eq!(row.state, State::Failed);
    assert!(!case.m.paths(&s.id).dir.exists());
    assert!(case.vmms.live().is_empty());
}

#[tokio::test]
async fn a_restore_that_fails_keeps_the_session_suspended_with_its_snapshot() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend");
    let paths = case.m.paths(&s.id);
    for arm in ["ready", "connect", "launch"] {
        case.vmms.arm(|f| match arm {
            "ready" => f.ready = true,
            "connect" => f.connect = true,
            _ => f.launch = true,
        });
        let message = vm_error(case.m.resume(TENANT, &s.id, &actor()).await.expect_err(arm));
        assert!(message.ends_with("it stays suspended"), "{arm}: {message}");
        let row = case.row(&s);
        assert_eq!(row.state, State::Suspended, "{arm}");
        assert_eq!((row.vmm_pid, row.api_sock), (None, None), "{arm}");
        assert!(paths.snapshot.join(SNAPSHOT_COMPLETE).is_file(), "{arm}: the snapshot is kept");
        assert!(case.vmms.live().is_empty(), "{arm}: the new VMM is stopped");
    }
    assert_eq!(case.store.actions(&s.id).iter().filter(|a| **a == "session.restore_failed").count(), 3);
    let restored = case.m.resume(TENANT, &s.id, &actor()).await.expect("then it restores");
    assert_eq!(restored.state, State::Running);
}

#[tokio::test]
async fn an_incomplete_snapshot_is_never_restored() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend");
    std::fs::remove_file(case.m.paths(&s.id).snapshot.join(SNAPSHOT_COMPLETE)).expect("unmark");
    let launches = case.vmms.vms().len();
    let message = vm_error(case.m.resume(TENANT, &s.id, &actor()).await.expect_err("not restored"));
    assert!(message.contains("its snapshot is missing or incomplete"), "{message}");
    assert_eq!(case.row(&s).state, State::Failed);
    assert_eq!(case.vmms.vms().len(), launches, "no VMM was started on it");
}

#[tokio::test]
async fn exec_answers_refusals_as_the_callers_mistake_and_limits_the_rate() {
    let config = SessionsConfig { exec_per_sec: 1, exec_burst: 3, ..SessionsConfig::default() };
    let case = Case::with(FakeVmms::default(), config);
    let s = case.create(1).await.expect("created");
    let policy = Attach::Policy(vec![1, 2, 3]);
    let audit = serde_json::json!({ "op": "grep" });
    let request = SessionRequest::Grep { pattern: "key".to_owned(), max_matches: 10, path_prefix: None };
    let reply = case.m.exec(TENANT, &s.id, &actor(), request, Some(policy), audit).await.expect("exec");
    assert_eq!(reply.response["attached"], 3, "the policy went with the request");
    let event = case.store.event(&s.id, "session.exec");
    assert_eq!(event["op"], "grep");
    assert_eq!(event["response_bytes"], 6);

    case.vmms.arm(|f| f.guest_refuses = true);
    match case.exec(&s).await {
        Err(ServiceError::Unprocessable(m)) => assert!(m.contains("no such file"), "{m}"),
        other => panic!("wanted 422, got {other:?}"),
    }
    assert_eq!(case.row(&s).state, State::Running, "a refusal changes nothing");
    case.exec(&s).await.expect("the connection stays usable");
    match case.exec(&s).await {
        Err(ServiceError::TooManyRequests { retry_after, .. }) => assert!(retry_after.as_millis() > 0),
        other => panic!("wanted 429 after the burst of 3, got {other:?}"),
    }
    match case.exec(&Session { id: session_id(9), ..s.clone() }).await {
        Err(ServiceError::NotFound(_)) => {}
        other => panic!("wanted 404, got {other:?}"),
    }
    match case.m.exec("tenant_b", &s.id, &actor(), SessionRequest::Stats, None, serde_json::json!({})).await {
        Err(ServiceError::NotFound(_)) => {}
        other => panic!("another tenant's session is not found, got {other:?}"),
    }
}

#[tokio::test]
async fn a_vm_that_crashed_fails_its_session_on_the_next_call() {
    let case = Case::new();
    let a = case.create(1).await.expect("created");
    let b = case.create(2).await.expect("created");
    case.vmms.crash(case.pid(&a));
    let message = vm_error(case.exec(&a).await.expect_err("the guest is gone"));
    assert!(message.contains("failed: the VMM exited"), "{message}");
    assert_eq!(case.row(&a).state, State::Failed);
    case.vmms.crash(case.pid(&b));
    vm_error(case.m.pause(TENANT, &b.id, &actor()).await.expect_err("pause of a crashed VM"));
    assert_eq!(case.row(&b).state, State::Failed);
    assert!(conflict(case.exec(&b).await.expect_err("failed")).contains("create a new session"));
}

#[tokio::test]
async fn a_call_the_vm_cannot_answer_leaves_a_live_session_as_it_is() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    // The guest's connection drops while its VMM lives (the guest is paused behind the
    // service's back): the call fails, the session stays.
    let pid = case.pid(&s);
    let api = case.m.paths(&s.id).api_sock;
    super::driver::VmmDriver::pause(&case.vmms, &api).expect("pause behind the service's back");
    let message = vm_error(case.exec(&s).await.expect_err("no answer"));
    assert!(message.ends_with("it is still running"), "{message}");
    assert_eq!(case.row(&s).state, State::Running);
    assert!(case.vmms.vm(pid).alive);
    // The next exec connects again.
    super::driver::VmmDriver::resume(&case.vmms, &api).expect("resume");
    case.exec(&s).await.expect("reconnected");
    assert_eq!(case.vmms.calls().iter().filter(|c| *c == "connect").count(), 2);
}

#[tokio::test]
async fn connect_resumes_restores_and_extends_the_deadline_never_past_the_maximum() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.m.pause(TENANT, &s.id, &actor()).await.expect("pause");
    let t0 = OffsetDateTime::now_utc();
    let c = case.m.connect(TENANT, &s.id, &actor(), Some(7200)).await.expect("connect");
    assert_eq!(c.state, State::Running);
    assert!(c.deadline >= t0 + time::Duration::seconds(7200) && c.deadline < c.max_deadline, "{c:?}");
    let event = case.store.event(&s.id, "session.connected");
    assert_eq!(event["was"], "paused");
    assert_eq!(event["extend_secs"], 7200);
    let c = case.m.connect(TENANT, &s.id, &actor(), Some(40_000)).await.expect("connect");
    assert_eq!(c.deadline, c.max_deadline, "extended to the maximum, not past it");
    // An extension shorter than what is left never moves the deadline earlier.
    let c2 = case.m.connect(TENANT, &s.id, &actor(), Some(5)).await.expect("connect");
    assert_eq!(c2.deadline, c.deadline);

    case.m.suspend(TENANT, &s.id, &actor()).await.expect("suspend");
    let c3 = case.m.connect(TENANT, &s.id, &actor(), None).await.expect("connect restores");
    assert_eq!(c3.state, State::Running);
    assert_eq!(case.store.event(&s.id, "session.connected")["was"], "suspended");
}

#[tokio::test]
async fn terminate_stops_the_vm_deletes_the_files_and_repeats_as_a_no_op() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let pid = case.pid(&s);
    let paths = case.m.paths(&s.id);
    std::fs::write(&paths.log, b"vmm log").expect("log");
    let t = case.m.terminate(TENANT, &s.id, &actor()).await.expect("terminate");
    assert_eq!(t.state, State::Terminated);
    assert!(t.terminated_at.is_some());
    assert!(case.vmms.vm(pid).stopped_on_request);
    assert!(!paths.dir.exists() && !paths.log.exists(), "artifact, sockets and log deleted");
    let event = case.store.event(&s.id, "session.terminated");
    assert_eq!(event["scrub"]["verified"], true);
    assert_eq!(event["files_deleted"], true);
    let again = case.m.terminate(TENANT, &s.id, &actor()).await.expect("again");
    assert_eq!(again.generation, t.generation);
    assert_eq!(case.m.lock_entries(), 0, "no lock entry is kept for it");

    // A suspended session's snapshot goes too, with no VMM to stop.
    let s2 = case.create(2).await.expect("created");
    case.m.suspend(TENANT, &s2.id, &actor()).await.expect("suspend");
    let stops = case.vmms.calls().iter().filter(|c| *c == "stop").count();
    case.m.terminate(TENANT, &s2.id, &actor()).await.expect("terminate");
    assert!(!case.m.paths(&s2.id).dir.exists());
    assert_eq!(case.vmms.calls().iter().filter(|c| *c == "stop").count(), stops);
}

#[tokio::test]
async fn a_vmm_deaf_to_its_control_api_is_signalled_and_a_jailed_one_cleaned_up_if_killed() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let pid = case.pid(&s);
    case.vmms.arm(|f| f.deaf_to_stop = true);
    let t = case.m.terminate(TENANT, &s.id, &actor()).await.expect("terminate");
    assert_eq!(t.state, State::Terminated);
    let calls = case.vmms.calls();
    assert!(calls.contains(&format!("continue {pid}")), "a SIGSTOPped VMM is continued first: {calls:?}");
    assert!(calls.contains(&format!("term {pid}")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("kill ")), "it ended on SIGTERM: {calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("cleanup ")), "its supervisor removed the jail: {calls:?}");

    // Jailed, a VMM that was already gone may have left its jail: cleaned up.
    let case = Case::with(FakeVmms::jailed(), SessionsConfig::default());
    let s = case.create(1).await.expect("created");
    case.vmms.crash(case.pid(&s));
    case.m.terminate(TENANT, &s.id, &actor()).await.expect("terminate");
    let jail = super::vmm::jail_id(&s.id);
    assert!(case.vmms.calls().contains(&format!("cleanup {jail}")), "{:?}", case.vmms.calls());
}

#[tokio::test]
async fn a_terminate_that_cannot_tell_whether_the_vm_is_gone_is_finished_by_the_reaper() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let pid = case.pid(&s);
    case.vmms.arm(|f| f.proc_unreadable = true);
    match case.m.terminate(TENANT, &s.id, &actor()).await {
        Err(ServiceError::Overloaded { .. }) => {}
        other => panic!("wanted 503, got {other:?}"),
    }
    assert_eq!(case.row(&s).state, State::Terminating, "nothing concluded on a guess");
    assert!(case.vmms.vm(pid).alive, "not stopped blind");
    // Nor does the reaper conclude anything while /proc stays unreadable.
    let _ = reaper::once(&case.m).await;
    assert_eq!(case.row(&s).state, State::Terminating);

    case.vmms.arm(|f| f.proc_unreadable = false);
    reaper::once(&case.m).await.expect("reaper pass");
    assert_eq!(case.row(&s).state, State::Terminated);
    assert_eq!(case.store.event(&s.id, "session.terminated")["reason"], "retried");
    assert!(!case.vmms.vm(pid).alive);
}

#[tokio::test]
async fn the_reaper_ends_expired_sessions_suspends_idle_ones_and_fails_vanished_vms() {
    let case = Case::new();
    let past = OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let expired = case.create(1).await.expect("created");
    case.store.edit(&expired.id, |r| r.deadline = past);
    let idle = case.create_with(2, 60).await.expect("created");
    case.store.edit(&idle.id, |r| r.last_active_at = past - time::Duration::seconds(60));
    let vanished = case.create(3).await.expect("created");
    case.vmms.crash(case.pid(&vanished));
    let at_backstop = case.create(4).await.expect("created");
    case.store
        .edit(&at_backstop.id, |r| r.deadline = OffsetDateTime::now_utc() + time::Duration::seconds(10));
    case.vmms.crash(case.pid(&at_backstop));
    let suspended_expired = case.create(5).await.expect("created");
    case.m.suspend(TENANT, &suspended_expired.id, &actor()).await.expect("suspend");
    case.store.edit(&suspended_expired.id, |r| r.deadline = past);
    let busy_idle = case.create_with(6, 60).await.expect("created");
    case.store.edit(&busy_idle.id, |r| r.last_active_at = past - time::Duration::seconds(60));
    let fresh = case.create_with(7, 60).await.expect("created");

    // A session busy with a call is left for the next pass.
    let busy = case.m.try_lock(&busy_idle.id).expect("lock");
    reaper::once(&case.m).await.expect("reaper pass");
    drop(busy);

    assert_eq!(case.row(&expired).state, State::Terminated);
    assert_eq!(case.store.event(&expired.id, "session.terminated")["reason"], "deadline");
    assert_eq!(case.row(&idle).state, State::Suspended);
    assert_eq!(case.store.event(&idle.id, "session.suspended")["reason"], "idle");
    let failed = case.row(&vanished);
    assert_eq!(failed.state, State::Failed);
    assert!(failed.failure_reason.unwrap_or_default().contains("exited unexpectedly"));
    assert_eq!(case.row(&at_backstop).state, State::Terminated, "its own backstop ended it: planned");
    assert_eq!(case.row(&suspended_expired).state, State::Terminated);
    assert!(!case.m.paths(&suspended_expired.id).dir.exists(), "its snapshot is deleted");
    assert_eq!(case.row(&busy_idle).state, State::Running, "busy: skipped this pass");
    assert_eq!(case.row(&fresh).state, State::Running);

    reaper::once(&case.m).await.expect("next pass");
    assert_eq!(case.row(&busy_idle).state, State::Suspended);
    assert_eq!(case.row(&fresh).state, State::Running);
    let live: Vec<u32> = case.vmms.live().iter().map(|v| v.pid).collect();
    assert_eq!(live, [case.pid(&fresh)], "only the fresh session's VMM is left");
}

#[tokio::test]
async fn an_idle_suspend_that_fails_waits_another_idle_period() {
    let case = Case::new();
    let s = case.create_with(1, 60).await.expect("created");
    let long_ago = OffsetDateTime::now_utc() - time::Duration::seconds(600);
    case.store.edit(&s.id, |r| r.last_active_at = long_ago);
    case.vmms.arm(|f| f.snapshot = true);
    reaper::once(&case.m).await.expect("reaper pass");
    let row = case.row(&s);
    assert_eq!(row.state, State::Running);
    assert!(row.last_active_at > long_ago, "the idle clock starts again");
    assert_eq!(case.store.event(&s.id, "session.suspend_failed")["trigger"], "idle");
    reaper::once(&case.m).await.expect("reaper pass");
    assert_eq!(case.row(&s).state, State::Running, "not tried again at every pass");
}

#[tokio::test]
async fn a_restarted_service_adopts_live_vms_and_settles_every_other_session() {
    let case = Case::new();
    let running = case.create(1).await.expect("created");
    let paused = case.create(2).await.expect("created");
    case.m.pause(TENANT, &paused.id, &actor()).await.expect("pause");
    // The VMM reports paused though the row says running (the service died mid-pause).
    let half_paused = case.create(3).await.expect("created");
    super::driver::VmmDriver::pause(&case.vmms, &case.m.paths(&half_paused.id).api_sock).expect("pause");
    let gone = case.create(4).await.expect("created");
    case.vmms.crash(case.pid(&gone));
    // Died mid-suspend with its snapshot complete: suspended.
    let mid_suspend = case.create(5).await.expect("created");
    case.m.suspend(TENANT, &mid_suspend.id, &actor()).await.expect("suspend");
    case.store.edit(&mid_suspend.id, |r| r.state = State::Suspending);
    let lost_snapshot = case.create(6).await.expect("created");
    case.m.suspend(TENANT, &lost_snapshot.id, &actor()).await.expect("suspend");
    std::fs::remove_dir_all(case.m.paths(&lost_snapshot.id).snapshot).expect("lose it");
    let pending = case.create(7).await.expect("created");
    case.store.edit(&pending.id, |r| r.state = State::Pending);
    let terminating = case.create(8).await.expect("created");
    case.store.edit(&terminating.id, |r| r.state = State::Terminating);
    let elsewhere = case.create(9).await.expect("created");
    case.store.edit(&elsewhere.id, |r| r.host = "host-b".to_owned());
    // Files of a session the database does not know, and anything not a session's.
    let stray = case.m.paths(&session_id(99));
    std::fs::create_dir_all(&stray.dir).expect("stray");
    std::fs::write(&stray.log, b"x").expect("stray log");
    let keep = case.root.join("sessions").join("README");
    std::fs::write(&keep, b"not a session").expect("keep");

    let after = case.restarted();
    after.recover().await.expect("recover");

    let row = |s: &Session| case.store.row(&s.id);
    assert_eq!(row(&running).state, State::Running);
    assert_eq!(row(&running).vmm_pid, running.vmm_pid, "the same VMM");
    assert_eq!(case.store.event(&running.id, "session.adopted")["vm_state"], "running");
    assert_eq!(row(&paused).state, State::Paused);
    assert_eq!(row(&half_paused).state, State::Paused, "as the VMM reports");
    let g = row(&gone);
    assert_eq!(g.state, State::Failed);
    assert!(g.failure_reason.unwrap_or_default().contains("gone when the service restarted"));
    assert_eq!(row(&mid_suspend).state, State::Suspended);
    assert_eq!(case.store.event(&mid_suspend.id, "session.suspended")["reason"], "recovered");
    assert_eq!(row(&lost_snapshot).state, State::Failed);
    assert_eq!(row(&pending).state, State::Failed);
    assert_eq!(row(&terminating).state, State::Terminated);
    assert_eq!(case.store.event(&terminating.id, "session.terminated")["reason"], "recovered");
    assert_eq!(row(&elsewhere).state, State::Running, "another host's session is not touched");
    assert!(!stray.dir.exists() && !stray.log.exists(), "unknown session files removed");
    assert!(keep.exists(), "files that are not a session's are kept");

    // The adopted sessions work through the new manager: exec connects to the guest again.
    let reply = after
        .exec(TENANT, &running.id, &actor(), SessionRequest::Stats, None, serde_json::json!({}))
        .await
        .expect("exec after the restart");
    assert_eq!(reply.response["pid"], case.pid(&running));
    after.resume(TENANT, &paused.id, &actor()).await.expect("resume after the restart");
    after.resume(TENANT, &mid_suspend.id, &actor()).await.expect("restore after the restart");
    // And a host reboot (every VMM gone): nothing is adopted.
    case.vmms.reboot();
    case.restarted().recover().await.expect("recover after a reboot");
    for s in [&running, &paused, &half_paused, &mid_suspend] {
        assert_eq!(row(s).state, State::Failed, "{}", s.id);
    }
}

#[tokio::test]
async fn another_hosts_session_is_refused_with_where_to_send_the_call() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    case.store.edit(&s.id, |r| r.host = "host-b".to_owned());
    let message = conflict(case.m.pause(TENANT, &s.id, &actor()).await.expect_err("elsewhere"));
    assert!(message.contains("runs on host host-b") && message.contains("this is host-a"), "{message}");
    conflict(case.m.terminate(TENANT, &s.id, &actor()).await.expect_err("elsewhere"));
    assert!(case.vmms.vm(case.pid(&s)).alive);
}

#[tokio::test]
async fn jailed_vmms_each_run_as_a_uid_no_live_vmm_has() {
    let config = SessionsConfig { jail_uid_base: 70_000, jail_uids: 2, ..SessionsConfig::default() };
    let case = Case::with(FakeVmms::jailed(), config);
    let a = case.create(1).await.expect("created");
    let b = case.create(2).await.expect("created");
    let uid = |s: &Session| case.vmms.vm(case.pid(s)).jail_uid;
    assert_eq!((uid(&a), uid(&b)), (Some(70_000), Some(70_001)));
    let c = case.create(3).await.expect("recorded, failed");
    assert_eq!(c.state, State::Failed);
    assert!(c.failure_reason.unwrap_or_default().contains("no jail uid is free"));

    case.m.terminate(TENANT, &a.id, &actor()).await.expect("terminate");
    let d = case.create(4).await.expect("created");
    assert_eq!(uid(&d), Some(70_000), "a terminated session's uid is free again");
    // A restored VMM gets one too, and not the one its old VMM had if that is taken.
    case.m.suspend(TENANT, &b.id, &actor()).await.expect("suspend");
    let e = case.create(5).await.expect("created");
    assert_eq!(uid(&e), Some(70_001));
    let message = vm_error(case.m.resume(TENANT, &b.id, &actor()).await.expect_err("no uid"));
    assert!(message.contains("no jail uid is free"), "{message}");
    assert_eq!(case.row(&b).state, State::Suspended);
}

#[tokio::test]
async fn a_row_changed_by_another_process_is_never_overwritten() {
    let case = Case::new();
    let s = case.create(1).await.expect("created");
    let read = case.row(&s);
    // Another process (an operator, a second `serve`) moves the row on after it was read.
    case.store.edit(&s.id, |r| r.state = State::Paused);
    let next = Session { state: State::Terminating, ..read.clone() };
    let message = conflict(case.store.transition(&read, &next, false, None).await.expect_err("fenced"));
    assert!(message.contains("changed"), "{message}");
    assert_eq!(case.row(&s).state, State::Paused);
}

#[test]
fn session_paths_stay_in_the_sessions_folder() {
    let paths = super::manager::SessionPaths::new(Path::new("/d/sessions"), &session_id(1));
    assert!(paths.dir.starts_with("/d/sessions") && paths.log.starts_with("/d/sessions"));
    assert!(!paths.log.starts_with(&paths.dir), "the log is outside the folder the jail owns");
}
