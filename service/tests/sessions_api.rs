//! The sessions API against a real PostgreSQL (a fresh database per test), driven through the
//! router with tower's `oneshot`, with a stand-in VM backend (no KVM): validation, tenant
//! isolation, the state machine and its 409s, deadlines, the reaper, recovery after a restart,
//! and the audit events of every transition. `sessions_e2e.rs` runs the same paths on real VMs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cella_proto::SessionRequest;
use cella_service::api::{app, AppState};
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::metrics::Metrics;
use cella_service::sessions::backend::{
    Attach, BackendError, Frame, GuestChannel, LaunchSpec, Reply, Source, VmBackend, VmState,
};
use cella_service::sessions::{reaper, SessionManager};
use cella_service::tenants;
use serde_json::{json, Value};
use sqlx::PgPool;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// A stand-in for `cella-vmm session`: VMs in memory, keyed by their control socket.

#[derive(Debug, Clone)]
struct FakeVm {
    pid: u32,
    state: VmState,
    vsock: PathBuf,
    index_id: u64,
    files: u64,
    requests: u64,
}

#[derive(Debug, Default)]
struct FakeInner {
    vms: Mutex<HashMap<PathBuf, FakeVm>>,
    next_pid: AtomicU32,
    next_index: AtomicU64,
    fail_snapshot: AtomicBool,
    launches: AtomicU32,
}

#[derive(Debug, Clone, Default)]
struct FakeBackend(Arc<FakeInner>);

impl FakeBackend {
    fn vm(&self, api: &Path) -> Option<FakeVm> {
        self.0.vms.lock().unwrap().get(api).cloned()
    }

    /// The VMM process dies (as with SIGKILL).
    fn crash_all(&self) {
        self.0.vms.lock().unwrap().clear();
    }

    fn with_vm<T>(
        &self,
        api: &Path,
        f: impl FnOnce(&mut FakeVm) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut vms = self.0.vms.lock().unwrap();
        let vm = vms
            .get_mut(api)
            .ok_or_else(|| BackendError::Control(format!("cannot connect to {}", api.display())))?;
        f(vm)
    }
}

impl VmBackend for FakeBackend {
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, BackendError> {
        self.0.launches.fetch_add(1, Ordering::SeqCst);
        let pid = 4_000_000 + self.0.next_pid.fetch_add(1, Ordering::SeqCst);
        let (index_id, files) = match &spec.source {
            Source::Artifact { path, .. } => {
                assert!(path.is_file(), "the artifact must be on disk before the VMM starts");
                (self.0.next_index.fetch_add(1, Ordering::SeqCst) + 1000, 1)
            }
            Source::Snapshot { dir } => {
                let state: Value =
                    serde_json::from_slice(&std::fs::read(dir.join("fake-state.json")).unwrap()).unwrap();
                (state["index_id"].as_u64().unwrap(), state["files"].as_u64().unwrap())
            }
        };
        let vm =
            FakeVm { pid, state: VmState::Running, vsock: spec.vsock.clone(), index_id, files, requests: 0 };
        self.0.vms.lock().unwrap().insert(spec.api_sock.clone(), vm);
        Ok(pid)
    }

    fn wait_ready(&self, _pid: u32, api_sock: &Path, _timeout: Duration) -> Result<(), BackendError> {
        self.with_vm(api_sock, |_| Ok(()))
    }

    fn state(&self, api_sock: &Path) -> Result<VmState, BackendError> {
        self.with_vm(api_sock, |vm| Ok(vm.state))
    }

    fn pause(&self, api_sock: &Path) -> Result<(), BackendError> {
        self.with_vm(api_sock, |vm| {
            vm.state = VmState::Paused;
            Ok(())
        })
    }

    fn resume(&self, api_sock: &Path) -> Result<(), BackendError> {
        self.with_vm(api_sock, |vm| {
            vm.state = VmState::Running;
            Ok(())
        })
    }

    fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, BackendError> {
        if self.0.fail_snapshot.load(Ordering::SeqCst) {
            return Err(BackendError::Control("writing the memory file: No space left on device".into()));
        }
        self.with_vm(api_sock, |vm| {
            assert_eq!(vm.state, VmState::Paused, "snapshots are taken of paused VMs");
            std::fs::write(dir.join("memory"), vec![7u8; 64 * 1024]).unwrap();
            let state = json!({ "index_id": vm.index_id, "files": vm.files });
            std::fs::write(dir.join("fake-state.json"), state.to_string()).unwrap();
            Ok(json!({ "memory_bytes": 65536 }))
        })
    }

    fn stop(&self, api_sock: &Path) -> Result<Value, BackendError> {
        self.0
            .vms
            .lock()
            .unwrap()
            .remove(api_sock)
            .map(|_| json!({ "scrub": { "verified_zero": true, "ms": 0.5 } }))
            .ok_or_else(|| BackendError::Control("no VMM".into()))
    }

    fn connect(&self, vsock: &Path, _timeout: Duration) -> Result<Box<dyn GuestChannel>, BackendError> {
        Ok(Box::new(FakeGuest { backend: self.clone(), vsock: vsock.to_owned() }))
    }

    fn alive(&self, pid: u32, api_sock: &Path) -> bool {
        self.vm(api_sock).is_some_and(|vm| vm.pid == pid)
    }

    fn signal(&self, pid: u32, _kill: bool) {
        self.0.vms.lock().unwrap().retain(|_, vm| vm.pid != pid);
    }
}

#[derive(Debug)]
struct FakeGuest {
    backend: FakeBackend,
    vsock: PathBuf,
}

impl GuestChannel for FakeGuest {
    fn exec(
        &mut self,
        request: &SessionRequest,
        attach: Option<(Attach, &[u8])>,
    ) -> Result<Reply, BackendError> {
        let mut vms = self.backend.0.vms.lock().unwrap();
        let vm = vms
            .values_mut()
            .find(|vm| vm.vsock == self.vsock)
            .ok_or_else(|| BackendError::Guest("the connection was reset".into()))?;
        if vm.state != VmState::Running {
            return Err(BackendError::Guest("the guest did not answer (paused)".into()));
        }
        vm.requests += 1;
        let reply = |response: Value, frames: Vec<Frame>| Ok(Reply { response, frames });
        match request {
            SessionRequest::Stats => reply(
                json!({ "op": "stats", "index_id": vm.index_id, "files": vm.files, "index_builds": 1 }),
                vec![],
            ),
            SessionRequest::Scan { policy_name } => {
                let (kind, policy) = attach.expect("a scan carries its policy");
                assert_eq!(kind, Attach::Policy);
                assert!(!policy.is_empty());
                reply(
                    json!({ "op": "scan", "policy_name": policy_name, "findings": 1 }),
                    vec![
                        Frame::Sarif(br#"{"version":"2.1.0","runs":[]}"#.to_vec()),
                        Frame::Summary(br#"{"findings":1}"#.to_vec()),
                    ],
                )
            }
            SessionRequest::Grep { pattern, .. } if pattern == "(" => {
                Err(BackendError::Refused("the session refused it (pattern): unclosed group".into()))
            }
            SessionRequest::Grep { .. } => {
                reply(json!({ "op": "grep", "matches": [], "truncated": false }), vec![])
            }
            SessionRequest::Read { path, .. } => {
                assert_eq!(attach.map(|a| a.0), Some(Attach::Policy));
                reply(json!({ "op": "read", "path": path }), vec![Frame::Data(b"hello".to_vec())])
            }
            SessionRequest::Add { name } => {
                assert_eq!(attach.map(|a| (a.0, a.1.to_vec())), Some((Attach::Data, b"more bytes".to_vec())));
                vm.files += 1;
                reply(json!({ "op": "add", "name": name, "files": vm.files }), vec![])
            }
            SessionRequest::Stop => reply(json!({ "op": "stop" }), vec![]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API under test.

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Api {
    state: AppState,
    backend: FakeBackend,
    admin: String,
    _dir: TempDir,
}

struct Reply2 {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Reply2 {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn manager(pool: &PgPool, config: &Config, data_dir: &DataDir, backend: &FakeBackend) -> Arc<SessionManager> {
    Arc::new(SessionManager::new(
        pool.clone(),
        config.sessions.clone(),
        data_dir.clone(),
        "test-host".into(),
        Arc::new(backend.clone()),
    ))
}

async fn api(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Api {
    let dir = std::env::temp_dir().join(format!("cella-sessions-{}", cella_service::ids::new_id("t")));
    let data_dir = DataDir::at(&dir);
    data_dir.create().unwrap();
    let mut config = Config::default();
    tweak(&mut config);
    let (_, admin) = tenants::create_admin_key(&pool).await.unwrap();
    let backend = FakeBackend::default();
    let state = AppState {
        jobs_done: cella_service::api::wait::JobsDone::listen(pool.clone()),
        sessions: manager(&pool, &config, &data_dir, &backend),
        pool,
        config: Arc::new(config),
        data_dir,
        metrics: Arc::new(Metrics::default()),
        signer: None,
    };
    Api { state, backend, admin, _dir: TempDir(dir) }
}

impl Api {
    async fn call(&self, method: Method, uri: &str, key: &str, body: Body, json: bool) -> Reply2 {
        let mut req =
            Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {key}"));
        if json {
            req = req.header("content-type", "application/json");
        }
        let response = app(self.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 64 << 20).await.unwrap().to_vec();
        Reply2 { status, content_type, body }
    }

    async fn get(&self, uri: &str, key: &str) -> Reply2 {
        self.call(Method::GET, uri, key, Body::empty(), false).await
    }

    async fn post(&self, uri: &str, key: &str) -> Reply2 {
        self.call(Method::POST, uri, key, Body::empty(), false).await
    }

    async fn exec(&self, id: &str, key: &str, request: Value) -> Reply2 {
        self.call(
            Method::POST,
            &format!("/v1/sessions/{id}/exec"),
            key,
            Body::from(request.to_string()),
            true,
        )
        .await
    }

    async fn tenant(&self, name: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/v1/admin/tenants",
                &self.admin,
                Body::from(json!({ "name": name }).to_string()),
                true,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (v["tenant"]["id"].as_str().unwrap().to_owned(), v["key"]["api_key"].as_str().unwrap().to_owned())
    }

    /// Creates a session on a small artifact; returns its view.
    async fn create(&self, key: &str, query: &str) -> Value {
        let r = self
            .call(Method::POST, &format!("/v1/sessions{query}"), key, Body::from("AKIA data"), false)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    async fn actions(&self, tenant: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = $1 ORDER BY seq")
            .bind(format!("tenant:{tenant}"))
            .fetch_all(&self.state.pool)
            .await
            .unwrap()
    }

    fn session_dir(&self, id: &str) -> PathBuf {
        self.state.data_dir.session(id)
    }
}

fn assert_problem(r: &Reply2, status: StatusCode, detail_has: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type, "application/problem+json");
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(detail_has), "detail {detail:?} lacks {detail_has:?}");
}

fn time(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrations = "../migrations")]
async fn create_stores_the_artifact_starts_the_vm_and_audits_both(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let s =
        api.create(&key, "?name=app.tar&max_duration=600&idle_suspend=60&read_policy=deny&mem_mib=128").await;
    assert_eq!(s["state"], "running");
    assert_eq!(s["artifact"]["name"], "app.tar");
    assert_eq!(s["artifact"]["bytes"], 9);
    assert_eq!((s["mem_mib"].as_i64(), s["idle_suspend_secs"].as_i64()), (Some(128), Some(60)));
    assert_eq!(s["read_policy"], "deny");
    assert_eq!(s["host"], "test-host");
    let lifetime = time(&s["deadline"]) - time(&s["created_at"]);
    assert_eq!(lifetime.whole_seconds(), 600);
    assert_eq!(std::fs::read(api.session_dir(&id(&s)).join("artifact")).unwrap(), b"AKIA data");
    assert_eq!(
        api.actions(&tenant).await,
        ["tenant.created", "api_key.created", "session.created", "session.started"]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn max_duration_over_eight_hours_answers_422(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let r = api.call(Method::POST, "/v1/sessions?max_duration=28801", &key, Body::from("x"), false).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "1 to 28800 seconds");
    // Nothing was kept.
    assert_eq!(std::fs::read_dir(api.state.data_dir.sessions()).unwrap().count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_configured_maximum_below_eight_hours_is_enforced(pool: PgPool) {
    let api = api(pool, |c| c.sessions.max_duration_secs = 60).await;
    let (_, key) = api.tenant("acme").await;
    let r = api.call(Method::POST, "/v1/sessions?max_duration=61", &key, Body::from("x"), false).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "1 to 60 seconds");
    let s = api.create(&key, "").await;
    assert_eq!((time(&s["deadline"]) - time(&s["created_at"])).whole_seconds(), 60);
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_read_policy_and_memory_answer_422(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let r = api.call(Method::POST, "/v1/sessions?read_policy=everything", &key, Body::from("x"), false).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "deny, redact, allow");
    let r = api.call(Method::POST, "/v1/sessions?mem_mib=100000", &key, Body::from("x"), false).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "mem_mib=100000");
}

#[sqlx::test(migrations = "../migrations")]
async fn unknown_sessions_answer_404(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let unknown = cella_service::ids::new_id("session");
    assert_problem(&api.get(&format!("/v1/sessions/{unknown}"), &key).await, StatusCode::NOT_FOUND, &unknown);
    assert_problem(
        &api.post(&format!("/v1/sessions/{unknown}/pause"), &key).await,
        StatusCode::NOT_FOUND,
        &unknown,
    );
    assert_problem(&api.get("/v1/sessions/..%2Fjob_1", &key).await, StatusCode::NOT_FOUND, "session");
}

#[sqlx::test(migrations = "../migrations")]
async fn another_tenants_session_answers_404_on_every_endpoint(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, alice) = api.tenant("alice").await;
    let (_, mallory) = api.tenant("mallory").await;
    let sid = id(&api.create(&alice, "").await);
    assert_problem(&api.get(&format!("/v1/sessions/{sid}"), &mallory).await, StatusCode::NOT_FOUND, &sid);
    for action in ["pause", "suspend", "resume", "connect"] {
        let r = api.post(&format!("/v1/sessions/{sid}/{action}"), &mallory).await;
        assert_problem(&r, StatusCode::NOT_FOUND, &sid);
    }
    assert_problem(&api.exec(&sid, &mallory, json!({"op": "stats"})).await, StatusCode::NOT_FOUND, &sid);
    let r = api
        .call(Method::POST, &format!("/v1/sessions/{sid}/files?name=x"), &mallory, Body::from("more"), false)
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND, &sid);
    let r = api.call(Method::DELETE, &format!("/v1/sessions/{sid}"), &mallory, Body::empty(), false).await;
    assert_problem(&r, StatusCode::NOT_FOUND, &sid);
    assert_eq!(api.get("/v1/sessions", &mallory).await.json()["sessions"], json!([]));
    // The owner's session is untouched.
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &alice).await.json()["state"], "running");
}

#[sqlx::test(migrations = "../migrations")]
async fn exec_on_a_paused_or_suspended_session_answers_409_saying_to_resume(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/pause"), &key).await.json()["state"], "paused");
    let r = api.exec(&sid, &key, json!({"op": "stats"})).await;
    assert_problem(&r, StatusCode::CONFLICT, "it is paused; resume it first");
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await.json()["state"], "suspended");
    let r = api.exec(&sid, &key, json!({"op": "stats"})).await;
    assert_problem(&r, StatusCode::CONFLICT, "it is suspended; resume it first");
    let r = api.post(&format!("/v1/sessions/{sid}/pause"), &key).await;
    assert_problem(&r, StatusCode::CONFLICT, "cannot pause session");
}

#[sqlx::test(migrations = "../migrations")]
async fn calls_on_a_terminated_session_answer_409_saying_to_create_a_new_one(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let r = api.call(Method::DELETE, &format!("/v1/sessions/{sid}"), &key, Body::empty(), false).await;
    assert_eq!(r.json()["state"], "terminated");
    for action in ["pause", "suspend", "resume", "connect"] {
        let r = api.post(&format!("/v1/sessions/{sid}/{action}"), &key).await;
        assert_problem(&r, StatusCode::CONFLICT, "it has been terminated; create a new session");
    }
    assert_problem(&api.exec(&sid, &key, json!({"op": "stats"})).await, StatusCode::CONFLICT, "terminated");
    // Terminating again changes nothing.
    let r = api.call(Method::DELETE, &format!("/v1/sessions/{sid}"), &key, Body::empty(), false).await;
    assert_eq!((r.status, r.json()["state"].clone()), (StatusCode::OK, json!("terminated")));
}

#[sqlx::test(migrations = "../migrations")]
async fn pause_and_resume_keep_the_same_vm_and_index(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let before = api.exec(&sid, &key, json!({"op": "stats"})).await.json();
    api.post(&format!("/v1/sessions/{sid}/pause"), &key).await;
    // Pausing twice is a no-op.
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/pause"), &key).await.json()["state"], "paused");
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json()["state"], "running");
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json();
    assert_eq!(before["result"]["index_id"], after["result"]["index_id"]);
    assert_eq!(api.backend.0.launches.load(Ordering::SeqCst), 1);
    let actions = api.actions(&tenant).await;
    assert_eq!(
        actions[2..],
        [
            "session.created",
            "session.started",
            "session.exec",
            "session.paused",
            "session.resumed",
            "session.exec"
        ]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn suspend_then_resume_restores_on_a_new_vmm_with_the_same_index(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let r = api
        .call(
            Method::POST,
            &format!("/v1/sessions/{sid}/files?name=extra"),
            &key,
            Body::from("more bytes"),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let before = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    let suspended = api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await.json();
    assert_eq!(suspended["state"], "suspended");
    assert!(suspended["snapshot_bytes"].as_i64().unwrap() > 0, "{suspended}");
    assert!(api.session_dir(&sid).join("snapshot/cella-snapshot.json").is_file());
    assert!(api.backend.0.vms.lock().unwrap().is_empty(), "the VMM was stopped");
    let resumed = api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json();
    assert_eq!((resumed["state"].as_str(), resumed["snapshot_bytes"].as_i64()), (Some("running"), None));
    assert_eq!(api.backend.0.launches.load(Ordering::SeqCst), 2, "a new VMM process");
    assert!(!api.session_dir(&sid).join("snapshot").exists(), "the restored snapshot is removed");
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(
        (before["index_id"].clone(), before["files"].clone()),
        (after["index_id"].clone(), after["files"].clone())
    );
    let actions = api.actions(&tenant).await;
    assert_eq!(
        actions[4..],
        ["session.exec", "session.exec", "session.suspended", "session.restored", "session.exec"]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_failed_snapshot_leaves_the_session_running(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    api.backend.0.fail_snapshot.store(true, Ordering::SeqCst);
    let r = api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await;
    assert_problem(&r, StatusCode::BAD_GATEWAY, "No space left on device; it is still running");
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &key).await.json()["state"], "running");
    assert!(!api.session_dir(&sid).join("snapshot").exists());
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
    assert!(api.actions(&tenant).await.contains(&"session.suspend_failed".to_owned()));
}

#[sqlx::test(migrations = "../migrations")]
async fn connect_never_moves_the_deadline_backwards(pool: PgPool) {
    let api = api(pool, |c| c.sessions.max_duration_secs = 7200).await;
    let (_, key) = api.tenant("acme").await;
    let s = api.create(&key, "?max_duration=3600").await;
    let sid = id(&s);
    let deadline = time(&s["deadline"]);
    let max = time(&s["max_deadline"]);
    assert_eq!((max - time(&s["created_at"])).whole_seconds(), 7200);
    // A shorter extension leaves the deadline where it was.
    let r = api.post(&format!("/v1/sessions/{sid}/connect?extend=60"), &key).await.json();
    assert_eq!(time(&r["deadline"]), deadline);
    // A longer one moves it, but not past the maximum.
    let r = api.post(&format!("/v1/sessions/{sid}/connect?extend=5000"), &key).await.json();
    let moved = time(&r["deadline"]);
    assert!(moved > deadline && moved <= max, "{r}");
    let r = api.post(&format!("/v1/sessions/{sid}/connect?extend=28800"), &key).await.json();
    assert_eq!(time(&r["deadline"]), max);
    let r = api.post(&format!("/v1/sessions/{sid}/connect"), &key).await.json();
    assert_eq!(time(&r["deadline"]), max);
    let r = api.post(&format!("/v1/sessions/{sid}/connect?extend=28801"), &key).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "extend=28801");
}

#[sqlx::test(migrations = "../migrations")]
async fn connect_restores_a_suspended_session(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await;
    let r = api.post(&format!("/v1/sessions/{sid}/connect"), &key).await.json();
    assert_eq!(r["state"], "running");
    let actions = api.actions(&tenant).await;
    assert_eq!(actions[actions.len() - 2..], ["session.restored", "session.connected"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn exec_attaches_the_policy_and_refusals_answer_422(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "secrets"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(
        (v["result"]["policy_name"].as_str(), v["sarif"]["version"].as_str()),
        (Some("secrets"), Some("2.1.0"))
    );
    let r = api.exec(&sid, &key, json!({"op": "read", "path": "a.txt"})).await.json();
    assert_eq!(r["data_base64"], "aGVsbG8=");
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "gdpr"})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "unknown policy \"gdpr\"");
    let r = api.exec(&sid, &key, json!({"op": "grep", "pattern": "("})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "unclosed group");
    let r = api.exec(&sid, &key, json!({"op": "grep", "pattern": "x", "max_matches": 0})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "max_matches");
    let r = api.exec(&sid, &key, json!({"op": "add", "name": "x"})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "/files?name=");
    let r = api.exec(&sid, &key, json!({"op": "reboot"})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "not a session request");
    // The connection survived the refusals.
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
}

#[sqlx::test(migrations = "../migrations")]
async fn terminate_stops_the_vm_and_deletes_the_files(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    assert!(api.session_dir(&sid).exists());
    let r = api.call(Method::DELETE, &format!("/v1/sessions/{sid}"), &key, Body::empty(), false).await.json();
    assert_eq!(r["state"], "terminated");
    assert!(r["terminated_at"].is_string());
    assert!(!api.session_dir(&sid).exists());
    assert!(api.backend.0.vms.lock().unwrap().is_empty());
    let body: String = sqlx::query_scalar(
        "SELECT body FROM audit_events WHERE chain = $1 AND action = 'session.terminated'",
    )
    .bind(format!("tenant:{tenant}"))
    .fetch_one(&api.state.pool)
    .await
    .unwrap();
    let details = &serde_json::from_str::<Value>(&body).unwrap()["details"];
    assert_eq!(
        (details["reason"].as_str(), details["scrub"]["verified_zero"].as_bool()),
        (Some("requested"), Some(true))
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reaper_suspends_idle_sessions(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "?idle_suspend=1").await);
    let other = id(&api.create(&key, "?idle_suspend=0").await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper::once(&api.state.sessions).await.unwrap();
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &key).await.json()["state"], "suspended");
    assert_eq!(api.get(&format!("/v1/sessions/{other}"), &key).await.json()["state"], "running");
    let body: String =
        sqlx::query_scalar("SELECT body FROM audit_events WHERE chain = $1 AND action = 'session.suspended'")
            .bind(format!("tenant:{tenant}"))
            .fetch_one(&api.state.pool)
            .await
            .unwrap();
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["details"]["reason"], "idle");
    assert_eq!(event["actor"]["id"], "session-reaper");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_failed_idle_suspend_is_retried_after_another_idle_period_not_at_every_pass(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "?idle_suspend=1").await);
    api.backend.0.fail_snapshot.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper::once(&api.state.sessions).await.unwrap();
    reaper::once(&api.state.sessions).await.unwrap();
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &key).await.json()["state"], "running");
    let failures = api.actions(&tenant).await.iter().filter(|a| *a == "session.suspend_failed").count();
    assert_eq!(failures, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reaper_terminates_sessions_past_their_deadline_and_deletes_their_files(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let running = id(&api.create(&key, "?max_duration=1").await);
    let suspended = id(&api.create(&key, "?max_duration=1").await);
    api.post(&format!("/v1/sessions/{suspended}/suspend"), &key).await;
    assert!(api.session_dir(&suspended).join("snapshot").exists());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper::once(&api.state.sessions).await.unwrap();
    for sid in [&running, &suspended] {
        let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
        assert_eq!(s["state"], "terminated", "{s}");
        assert!(!api.session_dir(sid).exists());
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reaper_fails_a_session_whose_vmm_died(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    api.backend.crash_all();
    reaper::once(&api.state.sessions).await.unwrap();
    let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
    assert_eq!(s["state"], "failed");
    assert!(s["error"].as_str().unwrap().contains("the VMM exited unexpectedly"), "{s}");
    assert_eq!(api.actions(&tenant).await.last().unwrap(), "session.failed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_restarted_service_re_adopts_live_vmms_and_never_loses_a_session(pool: PgPool) {
    let api = api(pool.clone(), |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let live = id(&api.create(&key, "").await);
    let paused = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{paused}/pause"), &key).await;
    let suspended = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{suspended}/suspend"), &key).await;

    // A new manager (a restarted `serve`) finds the VMMs still running: it adopts them.
    let restarted = manager(&pool, &api.state.config, &api.state.data_dir, &api.backend);
    restarted.recover().await.unwrap();
    let state_of = |sid: &str| {
        let pool = pool.clone();
        let sid = sid.to_owned();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM sessions WHERE id = $1")
                .bind(sid)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(state_of(&live).await, "running");
    assert_eq!(state_of(&paused).await, "paused");
    assert_eq!(state_of(&suspended).await, "suspended");
    assert_eq!(api.actions(&tenant).await.iter().filter(|a| *a == "session.adopted").count(), 2);

    // Now the VMMs are gone too (the host rebooted): the sessions fail with the reason, the
    // suspended one keeps its snapshot.
    api.backend.crash_all();
    let again = manager(&pool, &api.state.config, &api.state.data_dir, &api.backend);
    again.recover().await.unwrap();
    for sid in [&live, &paused] {
        let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
        assert_eq!(s["state"], "failed");
        assert_eq!(s["error"], "the VMM was gone when the service restarted");
    }
    assert_eq!(state_of(&suspended).await, "suspended");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_session_whose_vmm_died_mid_suspend_is_suspended_if_its_snapshot_is_complete(pool: PgPool) {
    let api = api(pool.clone(), |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await;
    // As if `serve` had died between the snapshot and recording `suspended`.
    sqlx::query(
        "UPDATE sessions SET state = 'suspending', vmm_pid = 4999999, api_sock = '/nowhere' WHERE id = $1",
    )
    .bind(&sid)
    .execute(&pool)
    .await
    .unwrap();
    manager(&pool, &api.state.config, &api.state.data_dir, &api.backend).recover().await.unwrap();
    let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
    assert_eq!(s["state"], "suspended", "{s}");
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json()["state"], "running");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_stale_generation_cannot_apply_a_transition(pool: PgPool) {
    let api = api(pool.clone(), |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let stale = cella_service::sessions::store::get(&pool, None, &sid).await.unwrap();
    api.post(&format!("/v1/sessions/{sid}/pause"), &key).await;
    api.post(&format!("/v1/sessions/{sid}/resume"), &key).await;
    // Same state (running) as the stale copy, but a newer generation: refused.
    let next = cella_service::sessions::store::Session {
        state: cella_service::sessions::State::Suspending,
        ..stale.clone()
    };
    let err =
        cella_service::sessions::store::transition(&pool, &stale, &next, false, None).await.unwrap_err();
    assert!(err.to_string().contains("changed while this call was applied"), "{err}");
}

#[sqlx::test(migrations = "../migrations")]
async fn sessions_list_newest_first_with_a_cursor(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(id(&api.create(&key, "").await));
    }
    let page = api.get("/v1/sessions?limit=2", &key).await.json();
    let first: Vec<String> = page["sessions"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(first, [ids[2].clone(), ids[1].clone()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page = api.get(&format!("/v1/sessions?limit=2&cursor={cursor}"), &key).await.json();
    assert_eq!(page["sessions"][0]["id"], ids[0]);
    assert!(page["next_cursor"].is_null());
    let r = api.get("/v1/sessions?state=sleeping", &key).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "unknown state");
}

#[sqlx::test(migrations = "../migrations")]
async fn metrics_count_sessions_by_state(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    api.create(&key, "").await;
    api.post(&format!("/v1/sessions/{sid}/pause"), &key).await;
    let r = api.get("/metrics", &api.admin).await;
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("cella_sessions{state=\"running\"} 1\n"), "{text}");
    assert!(text.contains("cella_sessions{state=\"paused\"} 1\n"), "{text}");
    assert!(text.contains("cella_sessions{state=\"suspended\"} 0\n"), "{text}");
}
