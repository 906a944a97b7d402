//! The API against a real PostgreSQL (a fresh database per test from `sqlx::test`), driven
//! through the router with tower's `oneshot` (no socket): authentication, tenant isolation,
//! idempotency, pagination, cancellation, problem documents, the queue's leasing rules, and the
//! audit events that go with each state change.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cella_audit::Actor;
use cella_service::api::{app, AppState};
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::metrics::Metrics;
use cella_service::queue::{self, Outcome};
use cella_service::sessions::vmm::Vmms;
use cella_service::sessions::SessionManager;
use cella_service::tenants;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tower::ServiceExt;

struct Api {
    state: AppState,
    admin: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn api(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Api {
    let dir = std::env::temp_dir().join(format!("cella-api-{}", cella_service::ids::new_id("t")));
    let data_dir = DataDir::at(&dir);
    data_dir.create().unwrap();
    let mut config = Config::default();
    tweak(&mut config);
    let (_, admin) = tenants::create_admin_key(&pool).await.unwrap();
    let state = AppState {
        jobs_done: cella_service::api::wait::JobsDone::listen(pool.clone()),
        metrics: Arc::new(Metrics::default()),
        // As `cella serve` has it: audit exports cut a checkpoint first.
        signer: Some(Arc::new(cella_audit::SigningKey::generate("k1").unwrap())),
        // These tests touch no session; the session tests (sessions_api.rs) use a stand-in VM.
        sessions: Arc::new(SessionManager::new(
            pool.clone(),
            config.sessions.clone(),
            data_dir.clone(),
            "test-host".into(),
            Vmms::new("/nonexistent/cella-vmm".into(), None, false),
        )),
        pool,
        config: Arc::new(config),
        data_dir,
        limits: Default::default(),
    };
    Api { state, admin, _dir: TempDir(dir) }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Body,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = app(self.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 64 << 20).await.unwrap().to_vec();
        Reply { status, content_type, body }
    }

    async fn get(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::GET, uri, Some(key), Body::empty(), &[]).await
    }

    async fn post(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::POST, uri, Some(key), Body::empty(), &[]).await
    }

    async fn tenant(&self, name: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/v1/admin/tenants",
                Some(&self.admin),
                Body::from(json!({ "name": name }).to_string()),
                &[("content-type", "application/json")],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (v["tenant"]["id"].as_str().unwrap().to_owned(), v["key"]["api_key"].as_str().unwrap().to_owned())
    }

    async fn submit(&self, key: &str, body: &[u8], query: &str, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::POST, &format!("/v1/jobs{query}"), Some(key), Body::from(body.to_vec()), headers)
            .await
    }

    async fn actions(&self, tenant: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = $1 ORDER BY seq")
            .bind(format!("tenant:{tenant}"))
            .fetch_all(&self.state.pool)
            .await
            .unwrap()
    }
}

fn assert_problem(r: &Reply, status: StatusCode, detail_has: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type, "application/problem+json");
    let v = r.json();
    assert_eq!(v["status"], status.as_u16());
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains(detail_has), "detail {detail:?} lacks {detail_has:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn submit_stores_the_artifact_queues_the_job_and_audits_it(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let r = api.submit(&key, b"AKIA...", "?policy=secrets&name=app.txt", &[]).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let job = r.json();
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["state"], "queued");
    assert_eq!(job["policy"], json!(["secrets"]));
    assert_eq!(job["artifact"]["bytes"], 7);
    assert_eq!(job["artifact"]["name"], "app.txt");
    assert_eq!(std::fs::read(api.state.data_dir.artifact(id)).unwrap(), b"AKIA...");
    assert_eq!(api.get(&format!("/v1/jobs/{id}"), &key).await.json()["id"], id);
    assert_eq!(api.actions(&tenant).await, ["tenant.created", "api_key.created", "job.submitted"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn no_key_bad_key_and_revoked_key_answer_401(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let r = api.call(Method::GET, "/v1/jobs", None, Body::empty(), &[]).await;
    assert_problem(&r, StatusCode::UNAUTHORIZED, "Authorization");
    assert_problem(&api.get("/v1/jobs", "cella_0000").await, StatusCode::UNAUTHORIZED, "not valid");
    assert_problem(&api.get("/v1/jobs", &api.admin).await, StatusCode::UNAUTHORIZED, "not valid");
    assert_eq!(api.get("/v1/jobs", &key).await.status, StatusCode::OK);
    let r = api.post(&format!("/v1/admin/tenants/{tenant}/keys/revoke"), &api.admin).await;
    assert_eq!(r.json()["revoked"], 1);
    assert_problem(&api.get("/v1/jobs", &key).await, StatusCode::UNAUTHORIZED, "not valid");
    // A tenant key is no admin credential.
    let (_, other) = api.tenant("other").await;
    assert_problem(&api.get("/v1/admin/tenants", &other).await, StatusCode::UNAUTHORIZED, "not valid");
}

#[sqlx::test(migrations = "../migrations")]
async fn another_tenants_ids_answer_404_on_every_endpoint(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, alice) = api.tenant("alice").await;
    let (_, mallory) = api.tenant("mallory").await;
    let id = api.submit(&alice, b"data", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    for path in ["", "/sarif", "/summary"] {
        let r = api.get(&format!("/v1/jobs/{id}{path}"), &mallory).await;
        assert_problem(&r, StatusCode::NOT_FOUND, &id);
    }
    assert_problem(&api.post(&format!("/v1/jobs/{id}/cancel"), &mallory).await, StatusCode::NOT_FOUND, &id);
    assert_eq!(api.get("/v1/jobs", &mallory).await.json()["jobs"], json!([]));
    // Malformed ids are plain 404s too.
    assert_problem(&api.get("/v1/jobs/..%2F..%2Fetc", &mallory).await, StatusCode::NOT_FOUND, "job");
    // And the owner still sees it, uncancelled.
    assert_eq!(api.get(&format!("/v1/jobs/{id}"), &alice).await.json()["state"], "queued");
}

#[sqlx::test(migrations = "../migrations")]
async fn idempotency_key_replays_the_same_job_and_refuses_a_different_body(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let h = [("idempotency-key", "build-42")];
    let first = api.submit(&key, b"same bytes", "?policy=pii", &h).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = api.submit(&key, b"same bytes", "?policy=pii", &h).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["id"], first.json()["id"]);
    let different = api.submit(&key, b"other bytes", "?policy=pii", &h).await;
    assert_problem(&different, StatusCode::UNPROCESSABLE_ENTITY, "Idempotency-Key");
    let other_policy = api.submit(&key, b"same bytes", "?policy=secrets", &h).await;
    assert_eq!(other_policy.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Another tenant's identical key is its own.
    let (_, key2) = api.tenant("other").await;
    assert_eq!(api.submit(&key2, b"same bytes", "?policy=pii", &h).await.status, StatusCode::CREATED);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&api.state.pool).await.unwrap();
    assert_eq!(jobs, 2);
    let submitted = api.actions(&tenant).await.iter().filter(|a| *a == "job.submitted").count();
    assert_eq!(submitted, 1);
    // Only one artifact file per created job is kept.
    assert_eq!(std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(), 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn oversized_upload_is_413_and_leaves_nothing(pool: PgPool) {
    let api = api(pool, |c| c.jobs.max_artifact_bytes = 1000).await;
    let (_, key) = api.tenant("acme").await;
    assert_problem(
        &api.submit(&key, &[b'x'; 1001], "", &[]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "1000 bytes",
    );
    // Without a Content-Length the stream is cut off at the limit.
    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 100]))),
    );
    let r = api.call(Method::POST, "/v1/jobs", Some(&key), Body::from_stream(chunks), &[]).await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "1000 bytes");
    assert_eq!(std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(), 0);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&api.state.pool).await.unwrap();
    assert_eq!(jobs, 0);
    assert_problem(&api.submit(&key, b"", "", &[]).await, StatusCode::BAD_REQUEST, "empty");
}

#[sqlx::test(migrations = "../migrations")]
async fn unknown_policy_is_422_naming_it(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    assert_problem(
        &api.submit(&key, b"x", "?policy=secrets,hipaa", &[]).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "\"hipaa\"",
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn malformed_json_is_400_and_wrong_fields_422(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let json = [("content-type", "application/json")];
    let r =
        api.call(Method::POST, "/v1/admin/tenants", Some(&api.admin), Body::from("{\"name\": "), &json).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "malformed JSON");
    let r = api
        .call(Method::POST, "/v1/admin/tenants", Some(&api.admin), Body::from("{\"nom\": \"x\"}"), &json)
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "nom");
    let r = api
        .call(Method::POST, "/v1/admin/tenants", Some(&api.admin), Body::from("{\"name\": \"../x\"}"), &json)
        .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "not valid");
    let r = api.call(Method::GET, "/v1/jobs?limit=many", Some(&api.admin), Body::empty(), &[]).await;
    assert_eq!(r.content_type, "application/problem+json");
    assert_problem(&api.get("/v1/nothing-here", &api.admin).await, StatusCode::NOT_FOUND, "no such endpoint");
}

#[sqlx::test(migrations = "../migrations")]
async fn list_pages_with_cursors_and_filters_by_state(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            api.submit(&key, format!("artifact {i}").as_bytes(), "", &[]).await.json()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    api.post(&format!("/v1/jobs/{}/cancel", ids[0]), &key).await;
    let mut seen = Vec::new();
    let mut uri = "/v1/jobs?limit=3".to_owned();
    loop {
        let page = api.get(&uri, &key).await.json();
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/jobs?limit=3&cursor={c}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each exactly once");
    let queued = api.get("/v1/jobs?state=queued", &key).await.json();
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 6);
    let cancelled = api.get("/v1/jobs?state=cancelled", &key).await.json();
    assert_eq!(cancelled["jobs"][0]["id"], ids[6]);
    assert_problem(&api.get("/v1/jobs?state=done", &key).await, StatusCode::BAD_REQUEST, "unknown state");
    assert_problem(&api.get("/v1/jobs?cursor=abc", &key).await, StatusCode::BAD_REQUEST, "cursor");
}

#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_queued_job_ends_it_and_removes_its_artifact(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let id = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), &key).await;
    assert_eq!(r.json()["state"], "cancelled");
    assert!(!api.state.data_dir.artifact(&id).exists());
    assert_problem(
        &api.post(&format!("/v1/jobs/{id}/cancel"), &key).await,
        StatusCode::CONFLICT,
        "cancelled",
    );
    assert!(queue::lease(&api.state.pool, "w1", Duration::from_secs(30)).await.unwrap().is_none());
    assert_eq!(api.actions(&tenant).await.last().unwrap(), "job.cancelled");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_worker_that_lost_its_lease_cannot_write_a_result(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let id = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    let pool = &api.state.pool;
    let first = queue::lease(pool, "worker-a", Duration::from_millis(1)).await.unwrap().unwrap();
    assert_eq!((first.job_id.as_str(), first.attempt), (id.as_str(), 1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(queue::rescue_expired(pool, "worker-b").await.unwrap(), 1);
    let second = queue::lease(pool, "worker-b", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(queue::heartbeat(pool, &first, Duration::from_secs(30)).await.unwrap(), None);
    let done = Outcome::Succeeded { summary: json!({"findings": 1}), sarif: b"{}".to_vec(), vm: json!({}) };
    assert!(matches!(queue::finish(pool, &first, &done).await, Err(queue::QueueError::LeaseLost(..))));
    assert_eq!(queue::finish(pool, &second, &done).await.unwrap(), "succeeded");
    assert_eq!(api.get(&format!("/v1/jobs/{id}/sarif"), &key).await.body, b"{}");
    let actions = api.actions(&tenant).await;
    let leased = actions.iter().filter(|a| *a == "job.leased").count();
    assert_eq!(leased, 2);
    assert!(actions.contains(&"job.lease_expired".to_owned()));
    assert_eq!(actions.iter().filter(|a| *a == "job.succeeded").count(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn retryable_failures_back_off_then_fail_for_good(pool: PgPool) {
    let api = api(pool, |c| c.jobs.max_attempts = 2).await;
    let (_, key) = api.tenant("acme").await;
    let id = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    let pool = &api.state.pool;
    let failed =
        Outcome::Failed { reason: "the VMM failed (exit status 243)".into(), retryable: true, vm: None };
    let l1 = queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(queue::finish(pool, &l1, &failed).await.unwrap(), "queued");
    // Backing off: not leasable at once.
    assert!(queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap().is_none());
    sqlx::query("UPDATE jobs SET run_after = now()").execute(pool).await.unwrap();
    let l2 = queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(queue::finish(pool, &l2, &failed).await.unwrap(), "failed");
    let job = api.get(&format!("/v1/jobs/{id}"), &key).await.json();
    assert_eq!((job["state"].as_str(), job["attempt"].as_i64()), (Some("failed"), Some(2)));
    assert!(job["error"].as_str().unwrap().contains("243"));
}

#[sqlx::test(migrations = "../migrations")]
async fn dequeue_is_round_robin_across_tenants_and_respects_their_caps(pool: PgPool) {
    let api = api(pool, |c| c.jobs.tenant_max_concurrent = 2).await;
    let (busy, busy_key) = api.tenant("busy").await;
    let (quiet, quiet_key) = api.tenant("quiet").await;
    for i in 0..10 {
        api.submit(&busy_key, format!("b{i}").as_bytes(), "", &[]).await;
    }
    api.submit(&quiet_key, b"q", "", &[]).await;
    let pool = &api.state.pool;
    let mut order = Vec::new();
    while let Some(lease) = queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap() {
        order.push(lease.tenant_id);
    }
    // The quiet tenant's single job is not stuck behind the busy tenant's backlog, and the busy
    // tenant never has more than its cap running.
    assert_eq!(order.len(), 3, "{order:?}");
    assert!(order[..2].contains(&quiet), "{order:?}");
    assert_eq!(order.iter().filter(|t| **t == busy).count(), 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_suspended_tenant_is_refused_and_its_jobs_wait(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    api.submit(&key, b"x", "", &[]).await;
    let r = api.post(&format!("/v1/admin/tenants/{tenant}/suspend"), &api.admin).await;
    assert_eq!(r.json()["suspended"], true);
    assert_problem(&api.get("/v1/jobs", &key).await, StatusCode::FORBIDDEN, "suspended");
    assert!(queue::lease(&api.state.pool, "w", Duration::from_secs(30)).await.unwrap().is_none());
    api.post(&format!("/v1/admin/tenants/{tenant}/reinstate"), &api.admin).await;
    assert!(queue::lease(&api.state.pool, "w", Duration::from_secs(30)).await.unwrap().is_some());
    let operator: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = 'operator' ORDER BY seq")
            .fetch_all(&api.state.pool)
            .await
            .unwrap();
    assert!(
        operator.ends_with(&["tenant.suspended".to_owned(), "tenant.reinstated".to_owned()]),
        "{operator:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn rotating_keys_revokes_the_old_ones_and_is_audited(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, old) = api.tenant("acme").await;
    let r = api.post(&format!("/v1/admin/tenants/{tenant}/keys/rotate"), &api.admin).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let new = r.json()["api_key"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/v1/jobs", &old).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.get("/v1/jobs", &new).await.status, StatusCode::OK);
    let actions = api.actions(&tenant).await;
    assert!(actions.ends_with(&["api_key.created".to_owned(), "api_key.revoked".to_owned()]), "{actions:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_hash = sha256($1::bytea)")
        .bind(new.as_bytes())
        .fetch_one(&api.state.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "only the SHA-256 of a key is stored");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_openapi_document_lists_every_route(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let r = api.call(Method::GET, "/v1/openapi.json", None, Body::empty(), &[]).await;
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/sarif",
        "/v1/jobs/{id}/cancel",
        "/v1/audit/export",
        "/v1/audit/keys",
        "/v1/admin/tenants",
        "/v1/admin/vms",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    let _ = Actor::System("x".into());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_tenant_exports_only_its_own_audit_chain_and_it_verifies(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let (_, other) = api.tenant("other").await;
    api.submit(&key, b"x", "", &[]).await;
    api.submit(&other, b"y", "", &[]).await;
    let r = api.get("/v1/audit/export", &key).await;
    assert_eq!((r.status, r.content_type.as_str()), (StatusCode::OK, "application/x-tar"));
    let bundle = cella_audit::bundle::Bundle::read(&r.body[..]).unwrap();
    let public = api.state.signer.as_ref().unwrap().public();
    let options = cella_audit::verify::Options::pinned(vec![public]).with_threads(1);
    let report = cella_audit::verify::verify_bundle(&bundle, &options).unwrap();
    assert_eq!((report.chain, report.events), (format!("tenant:{tenant}"), 3));
    let r = api.get("/v1/audit/export?from=2&to=3", &key).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_problem(
        &api.get("/v1/audit/export?from=yesterday", &key).await,
        StatusCode::BAD_REQUEST,
        "RFC 3339",
    );
    assert_problem(
        &api.get("/v1/audit/export?from=5&to=9", &key).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "1..3",
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_tenant_gets_the_audit_public_keys_with_their_fingerprints(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let k1 = api.state.signer.as_ref().unwrap().public();
    let k2 = cella_audit::SigningKey::generate("k2").unwrap().public();
    let mut conn = api.state.pool.acquire().await.unwrap();
    cella_audit::store::register_key(&mut conn, &k1).await.unwrap();
    cella_audit::store::register_key(&mut conn, &k2).await.unwrap(); // a rotation
    drop(conn);
    let r = api.get("/v1/audit/keys", &key).await;
    assert_eq!((r.status, r.content_type.as_str()), (StatusCode::OK, "application/json"));
    let keys: cella_service::api::audit::AuditKeys = serde_json::from_slice(&r.body).unwrap();
    let summary: Vec<(&str, &str, bool, bool)> = keys
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.fingerprint.as_str(), k.current, k.retired_at.is_some()))
        .collect();
    assert_eq!(
        summary,
        [("k1", k1.fingerprint().as_str(), false, true), ("k2", k2.fingerprint().as_str(), true, false)]
    );
    let file = &keys.keys[1].public_key_file;
    assert_eq!(cella_audit::PublicKey::from_file_text(std::path::Path::new("k2.pub"), file).unwrap(), k2);
    assert_eq!(keys.keys[1].public_key, cella_audit::hash::to_hex(&k2.key));
    assert_problem(&api.get("/v1/audit/keys", "cella_nope").await, StatusCode::UNAUTHORIZED, "");
}

#[sqlx::test(migrations = "../migrations")]
async fn waiting_for_a_job_answers_when_it_ends(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let id = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    // Still queued after the wait: answered at the deadline, in its current state.
    let start = std::time::Instant::now();
    assert_eq!(api.get(&format!("/v1/jobs/{id}?wait=1"), &key).await.json()["state"], "queued");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // A worker finishes it while the request waits: answered at once.
    let pool = api.state.pool.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lease = queue::lease(&pool, "w", Duration::from_secs(30)).await.unwrap().unwrap();
        let done =
            Outcome::Succeeded { summary: json!({"findings": 0}), sarif: b"{}".to_vec(), vm: json!({}) };
        queue::finish(&pool, &lease, &done).await.unwrap();
    });
    let start = std::time::Instant::now();
    let job = api.get(&format!("/v1/jobs/{id}?wait=30"), &key).await.json();
    assert_eq!(job["state"], "succeeded");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    finisher.await.unwrap();
    assert_problem(
        &api.get(&format!("/v1/jobs/{id}?wait=61"), &key).await,
        StatusCode::BAD_REQUEST,
        "60 seconds",
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_stalled_upload_is_dropped_with_408_and_leaves_nothing(pool: PgPool) {
    let api = api(pool, |c| c.jobs.upload_idle_secs = 1).await;
    let (_, key) = api.tenant("acme").await;
    let first = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"partial"))]);
    let stalled = first.chain(futures_util::stream::pending());
    let r = api.call(Method::POST, "/v1/jobs", Some(&key), Body::from_stream(stalled), &[]).await;
    assert_problem(&r, StatusCode::REQUEST_TIMEOUT, "sent nothing for 1 s");
    assert_eq!(std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn beyond_the_connection_limit_only_the_health_check_and_the_operator_are_served(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let beyond = |method: Method, uri: &str, token: Option<&str>| {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(cella_service::server::BeyondTheLimit { retry_after: Duration::from_secs(2) });
        app(api.state.clone()).oneshot(req)
    };
    // A tenant's request: 503, try again in 2 s, connection closed.
    let r = beyond(Method::GET, "/v1/jobs", Some(&key)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.headers()["connection"], "close");
    let body: Value =
        serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(body["type"], "https://cella.dev/problems/overloaded");
    // The health check and the operator get through; a forged operator key gets 401, not more.
    let r = beyond(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = beyond(Method::GET, "/v1/admin/tenants", Some(&api.admin)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = beyond(Method::GET, "/v1/admin/tenants", Some("cella_admin_forged")).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Within the limit, the same tenant request is served.
    assert_eq!(api.get("/v1/jobs", &key).await.status, StatusCode::OK);
}
