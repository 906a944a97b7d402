//! The sessions API against a real PostgreSQL (a fresh database per test), driven through the
//! router with tower's `oneshot`, on real session VMs: `cella-vmm session` processes on
//! /dev/kvm with the session-mode scanner guest, jailed through the real `cella-jailer` (the
//! service's default under root). Covers validation, tenant isolation, the state machine and its
//! 409s, deadlines, the reaper, recovery after a restart (a second manager on the same database
//! and data folder), jail uids, and the audit events of every transition. Failures are real
//! too: a snapshot that hits a full disk, VMMs killed with SIGKILL.
//!
//! They need the scanner image (`bash scripts/build-guest.sh`), `DATABASE_URL`, and root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cella_service::api::{app, AppState};
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::metrics::Metrics;
use cella_service::sessions::vmm::Vmms;
use cella_service::sessions::{reaper, SessionManager};
use cella_service::tenants;
use common::{assert_confined, jail_leftovers, jailed_vmm, Scratch};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tower::ServiceExt;

/// The artifact of most sessions here.
fn sample() -> Vec<u8> {
    common::tar(&[
        ("app/a.txt", b"hello\n"),
        ("app/config.env", b"STRIPE=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n"),
        ("app/src/main.rs", b"fn main() {\n    // TODO: more\n}\n"),
    ])
}

struct Api {
    state: AppState,
    admin: String,
    _dir: Scratch,
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

/// A session manager as `cella serve` makes one (a restarted `serve` makes a second).
fn manager(pool: &PgPool, config: &Config, data_dir: &DataDir) -> Arc<SessionManager> {
    let vmms = Vmms::new(
        config.worker.vmm.clone().unwrap(),
        config.worker.scanner_image.clone(),
        config.worker.is_jailed(),
    );
    Arc::new(SessionManager::new(
        pool.clone(),
        config.sessions.clone(),
        data_dir.clone(),
        "test-host".into(),
        vmms,
    ))
}

async fn api(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Api {
    let dir = Scratch::new(&format!("api-{}", &cella_service::ids::new_id("t")[2..14]));
    let data_dir = DataDir::at(dir.join("data"));
    data_dir.create().unwrap();
    let mut config = Config::default();
    config.worker.vmm = Some(common::vmm());
    config.sessions.mem_mib = 64;
    tweak(&mut config);
    assert!(config.worker.is_jailed(), "these tests run as root, where session VMMs are jailed");
    let (_, admin) = tenants::create_admin_key(&pool).await.unwrap();
    let state = AppState {
        jobs_done: cella_service::api::wait::JobsDone::listen(pool.clone()),
        sessions: manager(&pool, &config, &data_dir),
        pool,
        config: Arc::new(config),
        data_dir,
        metrics: Arc::new(Metrics::default()),
        signer: None,
        limits: Default::default(),
    };
    Api { state, admin, _dir: dir }
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

    async fn delete(&self, id: &str, key: &str) -> Reply2 {
        self.call(Method::DELETE, &format!("/v1/sessions/{id}"), key, Body::empty(), false).await
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

    /// Creates a session on [`sample`]; returns its view.
    async fn create(&self, key: &str, query: &str) -> Value {
        self.create_on(key, query, sample()).await
    }

    /// Creates a session on `artifact`; returns its view.
    async fn create_on(&self, key: &str, query: &str, artifact: Vec<u8>) -> Value {
        let r =
            self.call(Method::POST, &format!("/v1/sessions{query}"), key, Body::from(artifact), false).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        let s = r.json();
        assert_eq!(s["state"], "running", "{s}");
        s
    }

    async fn actions(&self, tenant: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = $1 ORDER BY seq")
            .bind(format!("tenant:{tenant}"))
            .fetch_all(&self.state.pool)
            .await
            .unwrap()
    }

    /// The details of the tenant's last `action` event.
    async fn details(&self, tenant: &str, action: &str) -> Value {
        let body: String = sqlx::query_scalar(
            "SELECT body FROM audit_events WHERE chain = $1 AND action = $2 ORDER BY seq DESC LIMIT 1",
        )
        .bind(format!("tenant:{tenant}"))
        .bind(action)
        .fetch_one(&self.state.pool)
        .await
        .unwrap();
        serde_json::from_str::<Value>(&body).unwrap()["details"].clone()
    }

    /// A restarted `serve`: a new manager on the same database and data folder recovers the
    /// sessions; the old one goes, with its guest connections, as a dead process's would.
    async fn restart(&mut self) {
        let fresh = manager(&self.state.pool, &self.state.config, &self.state.data_dir);
        drop(std::mem::replace(&mut self.state.sessions, fresh));
        self.state.sessions.recover().await.unwrap();
    }

    fn session_dir(&self, id: &str) -> PathBuf {
        self.state.data_dir.session(id)
    }

    /// Where session `id`'s snapshot is written (beside its folder, never in it).
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.state.data_dir.sessions().join(format!("{id}.snapshot"))
    }

    fn log(&self, id: &str) -> PathBuf {
        self.state.data_dir.sessions().join(format!("{id}.vmm.log"))
    }

    /// The pid the session's VMM was recorded with (jailed: its supervisor).
    async fn pid(&self, id: &str) -> Option<u32> {
        let pid: Option<i32> = sqlx::query_scalar("SELECT vmm_pid FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&self.state.pool)
            .await
            .unwrap();
        pid.map(|p| p as u32)
    }

    async fn state_of(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT state FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&self.state.pool)
            .await
            .unwrap()
    }

    /// Mounts a tmpfs of `size` over the data folder's `sessions/`, so that sessions created
    /// from now on live on it: a snapshot bigger than what is left fails with ENOSPC, for real
    /// (the jail binds the session's folder from the tmpfs). Unmounted when the test's folder
    /// goes.
    fn small_disk(&self, size: &str) {
        common::mount_small_disk(&self.state.data_dir.sessions(), size);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X'])))
}

/// SIGKILL to the VMM's process group (the supervisor the service started, with setsid): the
/// jailed VMM dies with it (its parent-death signal), unscrubbed, and its jail is left.
fn kill_group(pid: u32) {
    let group = format!("-{pid}");
    assert!(Command::new("kill").args(["-s", "KILL", "--", &group]).status().unwrap().success());
    let start = std::time::Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{pid} survived SIGKILL: {}",
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
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
    assert_eq!(s["artifact"]["bytes"], sample().len());
    assert_eq!((s["mem_mib"].as_i64(), s["idle_suspend_secs"].as_i64()), (Some(128), Some(60)));
    assert_eq!(s["read_policy"], "deny");
    assert_eq!(s["host"], "test-host");
    let lifetime = time(&s["deadline"]) - time(&s["created_at"]);
    assert_eq!(lifetime.whole_seconds(), 600);
    assert_eq!(std::fs::read(api.session_dir(&id(&s)).join("artifact")).unwrap(), sample());
    assert_eq!(
        api.actions(&tenant).await,
        ["tenant.created", "api_key.created", "session.created", "session.started"]
    );
    let stats = api.exec(&id(&s), &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!((stats["files"].as_u64(), stats["index_builds"].as_u64()), (Some(3), Some(1)), "{stats}");
}

#[sqlx::test(migrations = "../migrations")]
async fn session_vmms_run_jailed_each_as_a_uid_of_its_own_never_one_a_live_vmm_has(pool: PgPool) {
    let mut api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let first = id(&api.create(&key, "").await);
    let second = id(&api.create(&key, "").await);
    let mut uids = Vec::new();
    for sid in [&first, &second] {
        let vmm = jailed_vmm(api.pid(sid).await.unwrap());
        let uid = assert_confined(vmm);
        assert!((65_000..66_000).contains(&uid), "uid {uid} is outside sessions.jail_uid_base's range");
        // While it runs, the folder is the jail uid's (mode 0700); the log is beside it, root's.
        let dir = std::fs::metadata(api.session_dir(sid)).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o777), (uid, 0o700));
        let log = std::fs::metadata(api.log(sid)).unwrap();
        assert_eq!((log.uid(), log.mode() & 0o777), (0, 0o600));
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1]);

    // A restarted service re-adopts both and gives a new session neither uid.
    api.restart().await;
    let third = id(&api.create(&key, "").await);
    let uid = assert_confined(jailed_vmm(api.pid(&third).await.unwrap()));
    assert!(!uids.contains(&uid), "uid {uid} of a live VMM was given again ({uids:?})");

    // Terminated: the jail is gone, and so are the folder and the log.
    for sid in [&first, &second, &third] {
        assert_eq!(api.delete(sid, &key).await.json()["state"], "terminated");
        assert_eq!(jail_leftovers(sid), Vec::<String>::new());
        assert!(!api.session_dir(sid).exists() && !api.log(sid).exists());
    }
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
async fn a_tenant_at_its_session_limit_gets_409_until_it_terminates_one(pool: PgPool) {
    let api = api(pool, |c| c.sessions.max_per_tenant = 1).await;
    let (_, key) = api.tenant("acme").await;
    let (_, other) = api.tenant("globex").await;
    let first = id(&api.create(&key, "").await);
    let r = api.call(Method::POST, "/v1/sessions", &key, Body::from(sample()), false).await;
    assert_problem(&r, StatusCode::CONFLICT, "the most allowed is 1");
    // Refused before the body is read: this body never ends, so the answer did not wait for it.
    let endless = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(sample()))])
        .chain(futures_util::stream::pending());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        api.call(Method::POST, "/v1/sessions", &key, Body::from_stream(endless), false),
    )
    .await
    .expect("the refusal waited for the body");
    assert_problem(&r, StatusCode::CONFLICT, "the most allowed is 1");
    // Nothing of the refused session was kept; another tenant is not affected.
    assert_eq!(
        std::fs::read_dir(api.state.data_dir.sessions())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count(),
        1
    );
    let theirs = id(&api.create(&other, "").await);
    api.delete(&first, &key).await;
    let second = id(&api.create(&key, "").await);
    api.delete(&second, &key).await;
    api.delete(&theirs, &other).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn session_memory_is_a_tenant_quota_suspended_sessions_free_theirs_and_restoring_needs_it_back(
    pool: PgPool,
) {
    let api = api(pool, |c| c.quotas.session_mem_mib = 160).await;
    let (_, key) = api.tenant("acme").await;
    let first = id(&api.create(&key, "?mem_mib=96").await);
    let r = api.call(Method::POST, "/v1/sessions?mem_mib=96", &key, Body::from(sample()), false).await;
    assert_problem(&r, StatusCode::CONFLICT, "session memory quota: 96 MiB more, with 96 of 160 MiB in use");
    let small = id(&api.create(&key, "?mem_mib=64").await);
    // Suspended: its memory is free again for another session, and it needs it back to restore.
    assert_eq!(api.post(&format!("/v1/sessions/{first}/suspend"), &key).await.status, StatusCode::OK);
    let third = id(&api.create(&key, "?mem_mib=96").await);
    let r = api.post(&format!("/v1/sessions/{first}/resume"), &key).await;
    assert_problem(&r, StatusCode::CONFLICT, "session memory quota");
    assert_eq!(api.state_of(&first).await, "suspended");
    api.delete(&third, &key).await;
    assert_eq!(api.post(&format!("/v1/sessions/{first}/resume"), &key).await.status, StatusCode::OK);
    for sid in [first, small] {
        api.delete(&sid, &key).await;
    }
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
    assert_problem(&api.delete(&sid, &mallory).await, StatusCode::NOT_FOUND, &sid);
    assert_eq!(api.get("/v1/sessions", &mallory).await.json()["sessions"], json!([]));
    // The owner's session is untouched.
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &alice).await.json()["state"], "running");
    assert_eq!(api.exec(&sid, &alice, json!({"op": "stats"})).await.status, StatusCode::OK);
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
    assert_eq!(api.delete(&sid, &key).await.json()["state"], "terminated");
    for action in ["pause", "suspend", "resume", "connect"] {
        let r = api.post(&format!("/v1/sessions/{sid}/{action}"), &key).await;
        assert_problem(&r, StatusCode::CONFLICT, "it has been terminated; create a new session");
    }
    assert_problem(&api.exec(&sid, &key, json!({"op": "stats"})).await, StatusCode::CONFLICT, "terminated");
    // Terminating again changes nothing.
    let r = api.delete(&sid, &key).await;
    assert_eq!((r.status, r.json()["state"].clone()), (StatusCode::OK, json!("terminated")));
}

#[sqlx::test(migrations = "../migrations")]
async fn pause_and_resume_keep_the_same_vm_and_index(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let pid = api.pid(&sid).await.unwrap();
    let before = api.exec(&sid, &key, json!({"op": "stats"})).await.json();
    api.post(&format!("/v1/sessions/{sid}/pause"), &key).await;
    // Pausing twice is a no-op.
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/pause"), &key).await.json()["state"], "paused");
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json()["state"], "running");
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json();
    assert_eq!(before["result"]["index_id"], after["result"]["index_id"]);
    assert_eq!(after["result"]["index_builds"], 1);
    assert_eq!(api.pid(&sid).await, Some(pid), "the same VMM process");
    assert!(alive(pid));
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
    assert_eq!(before["files"], 4, "{before}");
    let first = api.pid(&sid).await.unwrap();
    let suspended = api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await.json();
    assert_eq!(suspended["state"], "suspended");
    assert!(suspended["snapshot_bytes"].as_i64().unwrap() > 0, "{suspended}");
    // The snapshot and its marker are root's, beside the folder (which the jail handed back).
    let marker = api.snapshot_dir(&sid).join("cella-snapshot.json");
    assert_eq!(std::fs::metadata(&marker).unwrap().uid(), 0);
    assert_eq!(std::fs::metadata(api.session_dir(&sid)).unwrap().uid(), 0);
    assert!(!alive(first), "the VMM was stopped");
    assert_eq!(jail_leftovers(&sid), Vec::<String>::new());
    let resumed = api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json();
    assert_eq!((resumed["state"].as_str(), resumed["snapshot_bytes"].as_i64()), (Some("running"), None));
    let second = api.pid(&sid).await.unwrap();
    assert_ne!(first, second, "a new VMM process");
    assert_confined(jailed_vmm(second));
    assert!(!api.snapshot_dir(&sid).exists(), "the restored snapshot is removed");
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(
        (before["index_id"].clone(), before["files"].clone(), after["index_builds"].clone()),
        (after["index_id"].clone(), after["files"].clone(), json!(1))
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
    api.small_disk("1m");
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let before = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    let r = api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await;
    assert_problem(&r, StatusCode::BAD_GATEWAY, "no space left on the device");
    assert_problem(&r, StatusCode::BAD_GATEWAY, "; it is still running");
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &key).await.json()["state"], "running");
    assert!(!api.snapshot_dir(&sid).exists());
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(after["index_id"], before["index_id"]);
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
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
}

#[sqlx::test(migrations = "../migrations")]
async fn exec_attaches_the_policy_and_refusals_answer_422(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "?read_policy=redact").await);
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "secrets"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["sarif"]["version"], "2.1.0", "{v}");
    assert!(v["result"]["findings"].as_u64().unwrap() >= 1, "the Stripe key was not found: {v}");
    let r = api.exec(&sid, &key, json!({"op": "read", "path": "app/a.txt"})).await.json();
    assert_eq!(r["data_base64"], "aGVsbG8K", "{r}");
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "gdpr"})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "unknown policy \"gdpr\"");
    let r = api.exec(&sid, &key, json!({"op": "grep", "pattern": "("})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "the session refused it");
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
    let pid = api.pid(&sid).await.unwrap();
    assert!(api.session_dir(&sid).exists() && api.log(&sid).exists());
    let r = api.delete(&sid, &key).await.json();
    assert_eq!(r["state"], "terminated");
    assert!(r["terminated_at"].is_string());
    assert!(!api.session_dir(&sid).exists() && !api.log(&sid).exists());
    assert!(!alive(pid));
    assert_eq!(jail_leftovers(&sid), Vec::<String>::new());
    let details = api.details(&tenant, "session.terminated").await;
    assert_eq!(
        (details["reason"].as_str(), details["scrub"]["verified_zero"].as_bool()),
        (Some("requested"), Some(true)),
        "{details}"
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
    api.small_disk("1m");
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "?idle_suspend=1").await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper::once(&api.state.sessions).await.unwrap();
    reaper::once(&api.state.sessions).await.unwrap();
    assert_eq!(api.get(&format!("/v1/sessions/{sid}"), &key).await.json()["state"], "running");
    let failures = api.actions(&tenant).await.iter().filter(|a| *a == "session.suspend_failed").count();
    assert_eq!(failures, 1);
    let details = api.details(&tenant, "session.suspend_failed").await;
    assert!(details["reason"].as_str().unwrap().contains("no space left on the device"), "{details}");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reaper_terminates_sessions_past_their_deadline_and_deletes_their_files(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let running = id(&api.create(&key, "?max_duration=1").await);
    let suspended = id(&api.create(&key, "?max_duration=1").await);
    let pid = api.pid(&running).await.unwrap();
    api.post(&format!("/v1/sessions/{suspended}/suspend"), &key).await;
    assert!(api.snapshot_dir(&suspended).exists());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reaper::once(&api.state.sessions).await.unwrap();
    for sid in [&running, &suspended] {
        let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
        assert_eq!(s["state"], "terminated", "{s}");
        assert!(!api.session_dir(sid).exists() && !api.log(sid).exists());
        assert_eq!(jail_leftovers(sid), Vec::<String>::new());
    }
    assert!(!alive(pid));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reaper_fails_a_session_whose_vmm_died_and_cleans_up_its_jail(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    // One whose supervisor is killed (the VMM dies with it; the jail is left behind), one
    // whose VMM is killed inside its jail (the supervisor removes the jail and exits).
    let supervisor_killed = id(&api.create(&key, "").await);
    let vmm_killed = id(&api.create(&key, "").await);
    kill_group(api.pid(&supervisor_killed).await.unwrap());
    assert!(!jail_leftovers(&supervisor_killed).is_empty(), "a SIGKILLed supervisor leaves its jail");
    let supervisor = api.pid(&vmm_killed).await.unwrap();
    assert!(Command::new("kill")
        .arg("-KILL")
        .arg(jailed_vmm(supervisor).to_string())
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    while alive(supervisor) {
        assert!(start.elapsed() < Duration::from_secs(10), "the supervisor outlived its VMM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reaper::once(&api.state.sessions).await.unwrap();
    for sid in [&supervisor_killed, &vmm_killed] {
        let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
        assert_eq!(s["state"], "failed", "{s}");
        assert!(s["error"].as_str().unwrap().contains("the VMM exited unexpectedly"), "{s}");
        assert_eq!(jail_leftovers(sid), Vec::<String>::new(), "cella-jailer cleanup was not run for {sid}");
        assert!(!api.session_dir(sid).exists() && !api.log(sid).exists());
    }
    assert_eq!(api.actions(&tenant).await.last().unwrap(), "session.failed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_restarted_service_re_adopts_live_vmms_and_never_loses_a_session(pool: PgPool) {
    let mut api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let live = id(&api.create(&key, "").await);
    let stats = api.exec(&live, &key, json!({"op": "stats"})).await.json()["result"].clone();
    let paused = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{paused}/pause"), &key).await;
    let suspended = id(&api.create(&key, "").await);
    api.post(&format!("/v1/sessions/{suspended}/suspend"), &key).await;
    let pids = [api.pid(&live).await.unwrap(), api.pid(&paused).await.unwrap()];

    // A new manager (a restarted `serve`) finds the VMMs still running: it adopts them.
    api.restart().await;
    assert_eq!(api.state_of(&live).await, "running");
    assert_eq!(api.state_of(&paused).await, "paused");
    assert_eq!(api.state_of(&suspended).await, "suspended");
    assert_eq!(api.actions(&tenant).await.iter().filter(|a| *a == "session.adopted").count(), 2);
    assert_eq!([api.pid(&live).await.unwrap(), api.pid(&paused).await.unwrap()], pids);
    // The adopted VMM answers through the new manager with the same index.
    let after = api.exec(&live, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(after["index_id"], stats["index_id"]);

    // Now the VMMs are gone too (killed, their jails left): the sessions fail with the reason,
    // the jails are cleaned up, the suspended one keeps its snapshot.
    for pid in pids {
        kill_group(pid);
    }
    api.restart().await;
    for sid in [&live, &paused] {
        let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
        assert_eq!(s["state"], "failed");
        assert_eq!(s["error"], "the VMM was gone when the service restarted");
        assert_eq!(jail_leftovers(sid), Vec::<String>::new());
    }
    assert_eq!(api.state_of(&suspended).await, "suspended");
    assert!(api.snapshot_dir(&suspended).join("cella-snapshot.json").is_file());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_session_whose_vmm_died_mid_suspend_is_suspended_if_its_snapshot_is_complete(pool: PgPool) {
    let api = api(pool.clone(), |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let stats = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await;
    // As if `serve` had died between the snapshot and recording `suspended`.
    sqlx::query(
        "UPDATE sessions SET state = 'suspending', vmm_pid = 4999999, api_sock = '/nowhere' WHERE id = $1",
    )
    .bind(&sid)
    .execute(&pool)
    .await
    .unwrap();
    manager(&pool, &api.state.config, &api.state.data_dir).recover().await.unwrap();
    let s = api.get(&format!("/v1/sessions/{sid}"), &key).await.json();
    assert_eq!(s["state"], "suspended", "{s}");
    assert_eq!(api.post(&format!("/v1/sessions/{sid}/resume"), &key).await.json()["state"], "running");
    let after = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(after["index_id"], stats["index_id"]);
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

/// The secret the probing attack goes after, and another of the same shape and length.
const PROBED: &str = "sk_live_Q7w2Er9tY4uI8oP3aS6dF1gH";
const PROBED_TWIN: &str = "sk_live_m4N8b1V5c9X2z6L0k3J7h4Gq";
/// An SSN the fingerprint brute force goes after (first and last digit are what a job's
/// redacted snippet would show: `5****9`).
const SSN: &str = "523-71-4309";

/// A session artifact with the secret mid-line behind known context, and the SSN.
fn probed_artifact(secret: &str) -> Vec<u8> {
    let line = format!("# {} STRIPE={secret}\nid: {SSN}\n", "x".repeat(60));
    common::tar(&[("app/config.env", line.as_bytes()), ("app/a.txt", b"hello\n")])
}

/// The red team's position-probing attack on a session: for each next character, one grep
/// whose alternatives are `.{i}<known context><candidate i>` (the context: the last 4 known
/// characters); leftmost-first matching makes the match start `i` characters before the
/// context when candidate `i` is right, so the column says which. Returns what it recovered of
/// the secret, and every answer it got.
async fn probe_attack(api: &Api, sid: &str, key: &str) -> (String, Vec<Value>) {
    let charset: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').chain(['_']).collect();
    let mut known = String::from("STRIPE=");
    let mut answers = Vec::new();
    for _ in 0..PROBED.len() {
        let context = &known[known.len() - 4..];
        let alternatives: Vec<String> = charset
            .iter()
            .enumerate()
            .map(|(i, c)| format!(".{{{i}}}{}{c}", regex_escape(context)))
            .collect();
        let r = api
            .exec(sid, key, json!({"op": "grep", "pattern": alternatives.join("|"), "max_matches": 10}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        answers.push(v["result"].clone());
        let Some(hit) = v["result"]["matches"].as_array().and_then(|m| m.first()) else { break };
        // `STRIPE=` starts at column 64 (after "# ", 60 x's and a space), the context 4
        // characters before the end of what is known.
        let context_column = 64 + known.len() - 4;
        let i = context_column - hit["column"].as_u64().unwrap() as usize;
        known.push(charset[i]);
    }
    // Where each line ends, as the red team used `(?m)$` under `deny` to learn the layout.
    let r = api.exec(sid, key, json!({"op": "grep", "pattern": "(?m)$", "max_matches": 100})).await;
    answers.push(r.json()["result"].clone());
    (known.trim_start_matches("STRIPE=").to_owned(), answers)
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_string() } else { format!("\\{c}") })
        .collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn the_position_probing_grep_attack_recovers_nothing_under_redact_or_deny(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    // The attack works where the policy allows reading anyway: it recovers the whole secret.
    let open = id(&api.create_on(&key, "?read_policy=allow", probed_artifact(PROBED)).await);
    assert_eq!(probe_attack(&api, &open, &key).await.0, PROBED, "the attack itself is broken");
    assert_eq!(api.delete(&open, &key).await.status, StatusCode::OK);
    for policy in ["redact", "deny"] {
        let query = format!("?read_policy={policy}");
        let a = id(&api.create_on(&key, &query, probed_artifact(PROBED)).await);
        let b = id(&api.create_on(&key, &query, probed_artifact(PROBED_TWIN)).await);
        let (recovered, answers) = probe_attack(&api, &a, &key).await;
        assert_eq!(recovered, "", "{policy}: the attack recovered {recovered:?}");
        // Every answer is the same for a different secret behind the mask: nothing about the
        // secret reaches the tenant, whatever the patterns.
        let (_, twin_answers) = probe_attack(&api, &b, &key).await;
        assert_eq!(answers, twin_answers, "{policy}: answers depend on the masked secret");
        let layout = answers.last().unwrap();
        if policy == "deny" {
            assert!(layout["matches"].as_array().unwrap().is_empty(), "deny gave positions: {layout}");
            assert_eq!(layout["counts"][0]["path"], "app/config.env", "{layout}");
        } else {
            let lines: Vec<&str> =
                layout["matches"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
            assert!(lines.iter().all(|l| !l.contains("sk_live") && !l.contains(SSN)), "{lines:?}");
        }
        for sid in [a, b] {
            assert_eq!(api.delete(&sid, &key).await.status, StatusCode::OK);
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn fingerprints_are_keyed_per_tenant_and_a_nine_digit_value_cannot_be_brute_forced(pool: PgPool) {
    use ring::digest::{digest, SHA256};
    use ring::hmac;
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let (_, other_key) = api.tenant("globex").await;
    let fingerprint_of_ssn = |v: &Value| -> (String, String) {
        let results = v["sarif"]["runs"][0]["results"].as_array().unwrap();
        let r =
            results.iter().find(|r| r["ruleId"] == "us-ssn").unwrap_or_else(|| panic!("no SSN finding: {v}"));
        (
            r["partialFingerprints"]["secretHmac/v1"].as_str().unwrap().to_owned(),
            r["message"]["text"].as_str().unwrap().to_owned(),
        )
    };
    let mut fingerprints = Vec::new();
    for (k, policy) in [(&key, "redact"), (&key, "deny"), (&other_key, "redact")] {
        let sid = id(&api.create_on(k, &format!("?read_policy={policy}"), probed_artifact(PROBED)).await);
        let r = api.exec(&sid, k, json!({"op": "scan", "policy_name": "secrets,pii"})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        let (fp, message) = fingerprint_of_ssn(&r.json());
        // The snippet is masked whole: not even the first and last digit.
        assert!(message.ends_with(": ****"), "{message}");
        fingerprints.push(fp);
        assert_eq!(api.delete(&sid, k).await.status, StatusCode::OK);
    }
    assert_eq!(fingerprints[0], fingerprints[1], "one tenant's findings still deduplicate");
    assert_ne!(fingerprints[0], fingerprints[2], "two tenants' fingerprints of one value differ");
    // The brute force: every candidate the redacted `5****9` allows is tried — near the true
    // value, and the true value itself — with every function an attacker could compute without
    // the tenant's key. None gives the fingerprint.
    let target = &fingerprints[0];
    let zero_key = hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]);
    let truth: u32 = SSN.replace('-', "").parse().unwrap();
    for n in truth.saturating_sub(20_000)..truth + 20_000 {
        let digits = format!("{n:09}");
        if !(digits.starts_with('5') && digits.ends_with('9')) {
            continue;
        }
        let value = format!("{}-{}-{}", &digits[..3], &digits[3..5], &digits[5..]);
        let input = format!("us-ssn\0{value}");
        let unkeyed = cella_service::ids::hex(digest(&SHA256, input.as_bytes()).as_ref());
        let zero = cella_service::ids::hex(hmac::sign(&zero_key, input.as_bytes()).as_ref());
        assert!(&unkeyed != target && &zero != target, "{value} gives the fingerprint");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn probing_ids_leaves_no_session_lock_behind(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
    for _ in 0..300 {
        let probe = cella_service::ids::new_id("session");
        assert_eq!(api.exec(&probe, &key, json!({"op": "stats"})).await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            api.post(&format!("/v1/sessions/{probe}/pause"), &key).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(api.delete(&probe, &key).await.status, StatusCode::NOT_FOUND);
    }
    // One entry: the running session's, which holds its guest connection.
    assert_eq!(api.state.sessions.lock_entries(), 1);
    assert_eq!(api.delete(&sid, &key).await.status, StatusCode::OK);
    assert_eq!(api.state.sessions.lock_entries(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn execs_beyond_a_sessions_rate_answer_429_with_retry_after(pool: PgPool) {
    let api = api(pool, |c| {
        c.sessions.exec_per_sec = 1;
        c.sessions.exec_burst = 3;
    })
    .await;
    let (_, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    for _ in 0..3 {
        assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
    }
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("/v1/sessions/{sid}/exec"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({"op": "stats"}).to_string()))
        .unwrap();
    let response = app(api.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
    assert_eq!(api.delete(&sid, &key).await.status, StatusCode::OK);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_wedged_vmm_times_out_exec_and_terminate_still_stops_and_scrubs_it(pool: PgPool) {
    let api = api(pool, |c| c.sessions.exec_timeout_secs = 2).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    assert_eq!(api.exec(&sid, &key, json!({"op": "stats"})).await.status, StatusCode::OK);
    let vmm = common::jailed_vmm(api.pid(&sid).await.unwrap());
    // SAFETY: kill(2) with plain integers; `vmm` is the session's VMM, found just now.
    assert_eq!(unsafe { libc::kill(vmm as i32, libc::SIGSTOP) }, 0);
    let t0 = std::time::Instant::now();
    let r = api.exec(&sid, &key, json!({"op": "stats"})).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", String::from_utf8_lossy(&r.body));
    assert!(t0.elapsed() < Duration::from_secs(10), "exec waited {:?}", t0.elapsed());
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("did not answer within 2s") && detail.contains("still running"), "{detail}");
    assert!(!detail.contains(&api.state.data_dir.root().display().to_string()), "host path in {detail}");
    assert_eq!(api.state_of(&sid).await, "running", "a slow guest is not a dead one");
    let t0 = std::time::Instant::now();
    assert_eq!(api.delete(&sid, &key).await.status, StatusCode::OK);
    assert!(t0.elapsed() < Duration::from_secs(20), "terminate took {:?}", t0.elapsed());
    assert!(!alive(vmm), "the wedged VMM is still there");
    let scrub = &api.details(&tenant, "session.terminated").await["scrub"];
    assert_eq!(scrub["verified_zero"], true, "the wedged VM was not scrubbed: {scrub}");
}

#[sqlx::test(migrations = "../migrations")]
async fn adding_a_file_on_a_full_disk_is_507_and_the_session_runs_on(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let work = api.state.data_dir.work();
    common::mount_small_disk(&work, "1M");
    common::fill_disk(&work);
    let file = common::tar(&[("notes.txt", b"more\n")]);
    let r = api
        .call(Method::POST, &format!("/v1/sessions/{sid}/files?name=extra"), &key, Body::from(file), false)
        .await;
    assert_problem(
        &r,
        StatusCode::INSUFFICIENT_STORAGE,
        "the server is out of disk space (storing the upload)",
    );
    let left: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["filler"]);
    let stats = api.exec(&sid, &key, json!({"op": "stats"})).await.json()["result"].clone();
    assert_eq!(stats["files"].as_u64(), Some(3), "{stats}");
    // Only the stats call is recorded: the refused add never reached the guest.
    assert_eq!(api.actions(&tenant).await.iter().filter(|a| *a == "session.exec").count(), 1);
    assert_eq!(api.delete(&sid, &key).await.json()["state"], "terminated");
}

/// The CPU quota of process `pid`'s cgroup, in percent of one CPU (cgroup v1 or v2).
fn cpu_quota_percent(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok()?;
            let (quota, period) = max.trim().split_once(' ')?;
            return Some(quota.parse::<u64>().ok()? * 100 / period.parse::<u64>().ok()?);
        }
        if controllers.split(',').any(|c| c == "cpu") {
            let dir = format!("/sys/fs/cgroup/{controllers}{path}");
            let quota: i64 =
                std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us")).ok()?.trim().parse().ok()?;
            let period: u64 =
                std::fs::read_to_string(format!("{dir}/cpu.cfs_period_us")).ok()?.trim().parse().ok()?;
            return u64::try_from(quota).ok().map(|q| q * 100 / period);
        }
    }
    None
}

#[sqlx::test(migrations = "../migrations")]
async fn a_session_vmm_runs_under_its_tenants_cpu_quota(pool: PgPool) {
    let api = api(pool, |c| c.quotas.vm_cpu_percent = 100).await;
    let (tenant, key) = api.tenant("acme").await;
    let (_, other) = api.tenant("globex").await;
    let r = api
        .call(
            Method::PUT,
            &format!("/v1/admin/tenants/{tenant}/quotas"),
            &api.admin,
            Body::from(json!({"vm_cpu_percent": 25}).to_string()),
            true,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let limited = id(&api.create(&key, "").await);
    let default = id(&api.create(&other, "").await);
    let vmm = common::jailed_vmm(api.pid(&limited).await.unwrap());
    assert_eq!(cpu_quota_percent(vmm), Some(25));
    let vmm = common::jailed_vmm(api.pid(&default).await.unwrap());
    assert_eq!(cpu_quota_percent(vmm), Some(100));
    api.delete(&limited, &key).await;
    api.delete(&default, &other).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_session_scan_runs_the_tenants_packs_and_its_default_policy(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let pack = "[pack]\nname = \"orbit\"\ncategory = \"secret\"\nseverity = \"error\"\n\n[[rules]]\nid = \"orbit-key\"\n\
                description = \"Orbit key\"\nregex = '''\\b(orbk_[a-z0-9]{20})\\b'''\nsecret_group = 1\n\
                keywords = [\"orbk_\"]\nhelp = \"Revoke it.\"\n";
    let r = api.call(Method::POST, "/v1/packs", &key, Body::from(pack), false).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let artifact = common::tar(&[("app/keys.env", b"ORBIT=orbk_0a1b2c3d4e5f6a7b8c9d\n")]);
    let sid = id(&api.create_on(&key, "", artifact).await);
    let rules = |v: &Value| -> Vec<String> {
        v["sarif"]["runs"][0]["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ruleId"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "secrets,orbit"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["result"]["policy_name"], "secrets,orbit@1");
    assert_eq!(rules(&v), ["orbit-key"]);
    // Without a policy: the tenant's default, once it has one.
    let r = api.exec(&sid, &key, json!({"op": "scan"})).await.json();
    assert_eq!((r["result"]["policy_name"].clone(), rules(&r)), (json!("secrets,pii,licenses"), vec![]));
    let body = Body::from(json!({ "policy": "orbit" }).to_string());
    let r = api.call(Method::PUT, "/v1/tenant/default-policy", &key, body, true).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let r = api.exec(&sid, &key, json!({"op": "scan"})).await.json();
    assert_eq!(
        (r["result"]["policy_name"].clone(), rules(&r)),
        (json!("orbit@1"), vec!["orbit-key".to_owned()])
    );
    let r = api.exec(&sid, &key, json!({"op": "scan", "policy_name": "orbit@2"})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "unknown policy \"orbit@2\"");
    assert_eq!(api.delete(&sid, &key).await.status, StatusCode::OK);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_left_in_a_sessions_folder_is_never_followed_by_a_restore(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sid = id(&api.create(&key, "").await);
    let suspended = api.post(&format!("/v1/sessions/{sid}/suspend"), &key).await.json();
    assert_eq!(suspended["state"], "suspended");
    // A booted VMM owns its session's folder while it runs: one taken over could leave the
    // artifact a link to a host file, for the restore (made by root) to hand to the next VM.
    // The host file is the artifact's size, so only the refusal to follow the link stops it.
    let artifact = api.session_dir(&sid).join("artifact");
    let size = std::fs::metadata(&artifact).unwrap().len() as usize;
    let host_file = api.state.data_dir.sessions().with_file_name("host-secret");
    std::fs::write(&host_file, &"host secret\n".repeat(size / 12 + 1).as_bytes()[..size]).unwrap();
    std::fs::remove_file(&artifact).unwrap();
    std::os::unix::fs::symlink(&host_file, &artifact).unwrap();
    let r = api.post(&format!("/v1/sessions/{sid}/resume"), &key).await;
    assert_problem(&r, StatusCode::BAD_GATEWAY, "it stays suspended");
    assert_eq!(api.state_of(&sid).await, "suspended");
    assert!(api.actions(&tenant).await.contains(&"session.restore_failed".to_owned()));
    // The snapshot was never in reach: it lies beside the folder, not in it.
    assert!(!api.snapshot_dir(&sid).starts_with(api.session_dir(&sid)));
    assert!(api.snapshot_dir(&sid).join("cella-snapshot.json").is_file());
}
