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
use cella_service::jobs::JobState;
use cella_service::metrics::Metrics;
use cella_service::queue::{self, Outcome};
use cella_service::sessions::vmm::Vmms;
use cella_service::sessions::SessionManager;
use cella_service::tenants;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tower::ServiceExt;

mod common;

struct Api {
    state: AppState,
    admin: String,
    _dir: common::Scratch,
}

struct Reply {
    status: StatusCode,
    content_type: String,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn api(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Api {
    let dir = common::Scratch::new(&format!("api-{}", &cella_service::ids::new_id("t")[2..14]));
    let data_dir = DataDir::at(dir.join("data"));
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
    Api { state, admin, _dir: dir }
}

/// One request through the router of `state`.
async fn call(
    state: &AppState,
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
    let response = app(state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 64 << 20).await.unwrap().to_vec();
    Reply { status, content_type, headers, body }
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
        call(&self.state, method, uri, key, body, headers).await
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
async fn a_baseline_name_postgres_cannot_take_is_no_baseline_not_an_internal_error(pool: PgPool) {
    // Found by the API fuzz: a NUL byte in `baseline` reached the query and answered 500.
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let r = api.submit(&key, b"data", "?policy=secrets&baseline=%00k", &[]).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "no baseline");
    assert_problem(&api.get("/v1/baselines/%00k", &key).await, StatusCode::NOT_FOUND, "baseline");
    let r = api.call(Method::DELETE, "/v1/baselines/a%00b", Some(&key), Body::empty(), &[]).await;
    assert_problem(&r, StatusCode::NOT_FOUND, "baseline");
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
    assert_eq!(queue::finish(pool, &second, &done).await.unwrap(), JobState::Succeeded);
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
    assert_eq!(queue::finish(pool, &l1, &failed).await.unwrap(), JobState::Queued);
    // Backing off: not leasable at once.
    assert!(queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap().is_none());
    sqlx::query("UPDATE jobs SET run_after = now()").execute(pool).await.unwrap();
    let l2 = queue::lease(pool, "w", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(queue::finish(pool, &l2, &failed).await.unwrap(), JobState::Failed);
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
    // A path id that is not a tenant's answers 404 before anything is looked up or audited.
    let job = api.submit(&key, b"y", "", &[]).await.json();
    for path in [
        "/v1/admin/tenants/acme/suspend",
        &format!("/v1/admin/tenants/{}/suspend", job["id"].as_str().unwrap()),
    ] {
        assert_problem(&api.post(path, &api.admin).await, StatusCode::NOT_FOUND, "tenant");
    }
    assert_problem(
        &api.get("/v1/admin/tenants/tenant_..%2F/quotas", &api.admin).await,
        StatusCode::NOT_FOUND,
        "tenant",
    );
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE chain = 'operator'")
        .fetch_one(&api.state.pool)
        .await
        .unwrap();
    assert_eq!(after, operator.len() as i64, "a refused path id was audited");
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
async fn the_operator_and_tenant_chains_name_each_action_alike(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    api.post(&format!("/v1/admin/tenants/{tenant}/keys"), &api.admin).await;
    api.post(&format!("/v1/admin/tenants/{tenant}/keys/revoke"), &api.admin).await;
    assert_eq!(api.get("/v1/jobs", &key).await.status, StatusCode::UNAUTHORIZED);
    let tenant_actions: std::collections::HashSet<String> = api.actions(&tenant).await.into_iter().collect();
    let operator: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = 'operator' ORDER BY seq")
            .fetch_all(&api.state.pool)
            .await
            .unwrap();
    let operator: std::collections::HashSet<String> = operator.into_iter().collect();
    for action in ["tenant.created", "api_key.created", "api_key.revoked"] {
        assert!(
            tenant_actions.contains(action) && operator.contains(action),
            "{action}: {tenant_actions:?} {operator:?}"
        );
    }
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
async fn every_answer_carries_hsts_nosniff_and_no_store(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let id = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    let lease = queue::lease(&api.state.pool, "w", Duration::from_secs(30)).await.unwrap().unwrap();
    let done = Outcome::Succeeded { summary: json!({"findings": 0}), sarif: b"{}".to_vec(), vm: json!({}) };
    queue::finish(&api.state.pool, &lease, &done).await.unwrap();
    let answers = [
        (Method::GET, "/healthz".to_owned(), None, StatusCode::OK),
        (Method::GET, "/v1/openapi.json".to_owned(), None, StatusCode::OK),
        (Method::GET, "/v1/jobs".to_owned(), None, StatusCode::UNAUTHORIZED),
        (Method::GET, format!("/v1/jobs/{id}"), Some(&key), StatusCode::OK),
        (Method::GET, format!("/v1/jobs/{id}/sarif"), Some(&key), StatusCode::OK),
        (Method::GET, format!("/v1/jobs/{id}/summary"), Some(&key), StatusCode::OK),
        (Method::GET, "/v1/audit/export".to_owned(), Some(&key), StatusCode::OK),
        (Method::GET, "/v1/sessions".to_owned(), Some(&key), StatusCode::OK),
        (Method::GET, "/metrics".to_owned(), Some(&api.admin), StatusCode::OK),
        (Method::GET, "/v1/nothing-here".to_owned(), Some(&key), StatusCode::NOT_FOUND),
        (Method::DELETE, "/v1/jobs".to_owned(), Some(&key), StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (method, uri, key, status) in answers {
        let r = api.call(method.clone(), &uri, key.map(String::as_str), Body::empty(), &[]).await;
        assert_eq!(r.status, status, "{method} {uri}: {}", String::from_utf8_lossy(&r.body));
        let header = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            header("strict-transport-security").as_deref(),
            Some("max-age=31536000"),
            "{method} {uri}"
        );
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{method} {uri}");
        assert_eq!(header("cache-control").as_deref(), Some("no-store"), "{method} {uri}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_upload_to_a_full_disk_is_507_and_leaves_nothing(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let artifacts = api.state.data_dir.artifacts();
    common::mount_small_disk(&artifacts, "1M");
    // An artifact that fits while the disk has room.
    let r = api.submit(&key, &[b'a'; 300 << 10], "", &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let kept = r.json()["id"].as_str().unwrap().to_owned();
    // Bigger than what is left: refused, and nothing of it stays.
    let r = api.submit(&key, &[b'b'; 900 << 10], "", &[]).await;
    assert_problem(
        &r,
        StatusCode::INSUFFICIENT_STORAGE,
        "the server is out of disk space (storing the upload)",
    );
    assert!(r.json()["detail"].as_str().unwrap().contains("try again later"));
    assert!(!r.json()["detail"].as_str().unwrap().contains(artifacts.to_str().unwrap()), "no server path");
    // Full to the last byte: even a tiny one.
    common::fill_disk(&artifacts);
    assert_problem(
        &api.submit(&key, b"x", "", &[]).await,
        StatusCode::INSUFFICIENT_STORAGE,
        "out of disk space",
    );
    let mut left: Vec<String> = std::fs::read_dir(&artifacts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["filler".to_owned(), kept]);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&api.state.pool).await.unwrap();
    assert_eq!(jobs, 1);
    assert_eq!(api.actions(&tenant).await, ["tenant.created", "api_key.created", "job.submitted"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_session_upload_to_a_full_disk_is_507_and_leaves_nothing(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let sessions = api.state.data_dir.sessions();
    common::mount_small_disk(&sessions, "1M");
    common::fill_disk(&sessions);
    let r = api.call(Method::POST, "/v1/sessions", Some(&key), Body::from(vec![b'x'; 8192]), &[]).await;
    assert_problem(
        &r,
        StatusCode::INSUFFICIENT_STORAGE,
        "the server is out of disk space (storing the upload)",
    );
    let left: Vec<String> = std::fs::read_dir(&sessions)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["filler"]);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sessions").fetch_one(&api.state.pool).await.unwrap();
    assert_eq!(rows, 0);
    assert_eq!(api.actions(&tenant).await, ["tenant.created", "api_key.created"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_database_out_of_disk_space_is_507(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    // What PostgreSQL answers when its disk is full (SQLSTATE 53100), for real, on every insert.
    sqlx::raw_sql(
        "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$;
         CREATE TRIGGER full_disk BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION full_disk();",
    )
    .execute(&api.state.pool)
    .await
    .unwrap();
    let r = api.submit(&key, b"x", "", &[]).await;
    assert_problem(&r, StatusCode::INSUFFICIENT_STORAGE, "out of disk space (its database's disk is full)");
    assert_eq!(std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn finished_jobs_past_the_retention_are_purged_with_their_files_and_audited(pool: PgPool) {
    use cella_service::janitor;
    let api = api(pool, |_| {}).await;
    let pool = &api.state.pool;
    let (acme, key) = api.tenant("acme").await;
    let (other, other_key) = api.tenant("other").await;
    let submit = |key: String, body: &'static [u8]| {
        let api = &api;
        async move { api.submit(&key, body, "", &[]).await.json()["id"].as_str().unwrap().to_owned() }
    };
    let lease = || async { queue::lease(pool, "w", Duration::from_secs(60)).await.unwrap().unwrap() };
    let succeeded =
        Outcome::Succeeded { summary: json!({"findings": 0}), sarif: b"{}".to_vec(), vm: json!({}) };
    // acme: one succeeded and one failed long ago, one succeeded within the retention, one
    // running and one queued since long ago; other: one cancelled long ago.
    let old_ok = submit(key.clone(), b"1").await;
    queue::finish(pool, &lease().await, &succeeded).await.unwrap();
    let old_failed = submit(key.clone(), b"2").await;
    let failed = Outcome::Failed { reason: "refused".into(), retryable: false, vm: None };
    queue::finish(pool, &lease().await, &failed).await.unwrap();
    let young = submit(key.clone(), b"3").await;
    queue::finish(pool, &lease().await, &succeeded).await.unwrap();
    let running = submit(key.clone(), b"4").await;
    assert_eq!(lease().await.job_id, running);
    let queued = submit(key.clone(), b"5").await;
    let old_cancelled = submit(other_key.clone(), b"6").await;
    api.post(&format!("/v1/jobs/{old_cancelled}/cancel"), &other_key).await;
    let age = |ids: Vec<String>, days: i32| async move {
        sqlx::query(
            "UPDATE jobs SET created_at = now() - make_interval(days => $2 + 1), updated_at = now() - make_interval(days => $2),
                    finished_at = CASE WHEN finished_at IS NULL THEN NULL ELSE now() - make_interval(days => $2) END
             WHERE id = ANY($1)",
        )
        .bind(ids)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    };
    age(vec![old_ok.clone(), old_failed.clone(), old_cancelled.clone(), running.clone(), queued.clone()], 91)
        .await;
    age(vec![young.clone()], 89).await;
    // Files a crash left for the old job, and the running job's SARIF log being written.
    let data = &api.state.data_dir;
    std::fs::write(data.artifact(&old_ok), b"1").unwrap();
    std::fs::write(data.work().join(janitor::sarif_name(&old_ok, 1)), b"").unwrap();
    std::fs::write(data.work().join(janitor::sarif_name(&running, 1)), b"").unwrap();

    // Retention 0 keeps everything.
    assert_eq!(janitor::purge_expired(pool, data, 0).await.unwrap().count(), 0);
    let purged = janitor::purge_expired(pool, data, 90).await.unwrap();
    let mut acme_purged = purged.jobs[&acme].clone();
    acme_purged.sort();
    let mut expected = vec![old_ok.clone(), old_failed.clone()];
    expected.sort();
    assert_eq!(acme_purged, expected);
    assert_eq!(purged.jobs[&other], std::slice::from_ref(&old_cancelled));
    assert_eq!(purged.count(), 3);
    let mut left: Vec<String> =
        sqlx::query_scalar("SELECT id FROM jobs ORDER BY id").fetch_all(pool).await.unwrap();
    left.sort();
    let mut kept = vec![young.clone(), running.clone(), queued.clone()];
    kept.sort();
    assert_eq!(left, kept);
    assert_problem(&api.get(&format!("/v1/jobs/{old_ok}/sarif"), &key).await, StatusCode::NOT_FOUND, &old_ok);
    assert!(!data.artifact(&old_ok).exists());
    assert!(!data.work().join(janitor::sarif_name(&old_ok, 1)).exists());
    assert!(data.work().join(janitor::sarif_name(&running, 1)).exists());
    assert!(data.artifact(&running).exists() && data.artifact(&queued).exists());

    // One event per tenant for the batch, naming the jobs; the jobs' own events stay.
    let purge_event = |tenant: String| async move {
        let body: String = sqlx::query_scalar(
            "SELECT body FROM audit_events WHERE chain = $1 AND action = 'job.purged' ORDER BY seq",
        )
        .bind(format!("tenant:{tenant}"))
        .fetch_one(pool)
        .await
        .unwrap();
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let event = purge_event(acme.clone()).await;
    assert_eq!(event["actor"], json!({"kind": "system", "id": "retention"}), "{event}");
    let mut ids: Vec<String> = serde_json::from_value(event["details"]["jobs"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, expected);
    assert_eq!(
        (event["details"]["count"].as_u64(), event["details"]["retention_days"].as_u64()),
        (Some(2), Some(90))
    );
    assert_eq!(purge_event(other.clone()).await["details"]["jobs"], json!([old_cancelled]));
    assert_eq!(api.actions(&acme).await.iter().filter(|a| *a == "job.submitted").count(), 5);
    assert_eq!(api.actions(&acme).await.last().unwrap(), "job.purged");

    // Nothing more to purge: no new event.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(pool).await.unwrap();
    assert_eq!(janitor::purge_expired(pool, data, 90).await.unwrap().count(), 0);
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(pool).await.unwrap();
    assert_eq!(after, events);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_hourly_sweep_removes_what_ended_jobs_left_and_nothing_under_way(pool: PgPool) {
    use cella_service::janitor::{self, Moment, Swept};
    let api = api(pool, |c| c.jobs.max_attempts = 1).await;
    let (_, key) = api.tenant("acme").await;
    let pool = &api.state.pool;
    let data = &api.state.data_dir;
    // A worker died mid-job: its lease expired and, its one attempt used, the job failed; its
    // artifact and SARIF log stay behind (the worker would have removed them).
    let died = api.submit(&key, b"x", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    queue::lease(pool, "w", Duration::from_millis(1)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(queue::rescue_expired(pool, "w2").await.unwrap(), 1);
    assert_eq!(api.get(&format!("/v1/jobs/{died}"), &key).await.json()["state"], "failed");
    std::fs::write(data.work().join(janitor::sarif_name(&died, 1)), b"").unwrap();
    assert!(data.artifact(&died).exists());
    // Under way: a queued job's artifact, an upload named just before its job is inserted, one
    // still arriving, a file on its way into a session.
    let queued = api.submit(&key, b"y", "", &[]).await.json()["id"].as_str().unwrap().to_owned();
    let uploading = cella_service::ids::new_id("job");
    let arriving = data.artifacts().join(format!("{}.part", cella_service::ids::new_id("job")));
    let adding = data.work().join("session_0123456789abcdef0123456789abcdef-add-0011223344556677");
    for path in [&data.artifact(&uploading), &arriving, &adding] {
        std::fs::write(path, b"").unwrap();
    }
    let swept = janitor::sweep(pool, data, Moment::Running).await.unwrap();
    assert_eq!(swept, Swept { work: 1, artifacts: 1 });
    assert!(!data.artifact(&died).exists());
    assert!(!data.work().join(janitor::sarif_name(&died, 1)).exists());
    for path in [&data.artifact(&queued), &data.artifact(&uploading), &arriving, &adding] {
        assert!(path.exists(), "{} was removed while under way", path.display());
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_deadlocked_or_serialization_failed_transaction_is_503_try_again(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    for code in ["deadlock_detected", "serialization_failure"] {
        sqlx::raw_sql(&format!(
            "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{code}'; END $$;
             DROP TRIGGER IF EXISTS refuse ON jobs;
             CREATE TRIGGER refuse BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse();"
        ))
        .execute(&api.state.pool)
        .await
        .unwrap();
        assert_problem(&api.submit(&key, b"x", "", &[]).await, StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn sessions_that_ended_past_the_retention_are_purged_and_audited(pool: PgPool) {
    use cella_service::janitor;
    let api = api(pool, |_| {}).await;
    let pool = &api.state.pool;
    let (tenant, key) = api.tenant("acme").await;
    // This API has no VMM: each session fails to start (a final state, like terminated).
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = api.call(Method::POST, "/v1/sessions", Some(&key), Body::from("x"), &[]).await;
        assert_eq!(r.json()["state"], "failed", "{}", String::from_utf8_lossy(&r.body));
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let (old, young, suspended) = (&ids[0], &ids[1], &ids[2]);
    // One suspended long ago (live: kept), one that failed long ago, one recently.
    sqlx::query("UPDATE sessions SET state = 'suspended' WHERE id = $1")
        .bind(suspended)
        .execute(pool)
        .await
        .unwrap();
    for (id, days) in [(old, 91), (young, 89), (suspended, 91)] {
        sqlx::query("UPDATE sessions SET updated_at = now() - make_interval(days => $2) WHERE id = $1")
            .bind(id)
            .bind(days)
            .execute(pool)
            .await
            .unwrap();
    }
    let purged = janitor::purge_expired(pool, &api.state.data_dir, 90).await.unwrap();
    assert_eq!(purged.sessions[&tenant], std::slice::from_ref(old));
    assert!(purged.jobs.is_empty());
    let mut left: Vec<String> = sqlx::query_scalar("SELECT id FROM sessions").fetch_all(pool).await.unwrap();
    left.sort();
    let mut kept = vec![young.clone(), suspended.clone()];
    kept.sort();
    assert_eq!(left, kept);
    assert_problem(&api.get(&format!("/v1/sessions/{old}"), &key).await, StatusCode::NOT_FOUND, old);
    let body: String =
        sqlx::query_scalar("SELECT body FROM audit_events WHERE chain = $1 AND action = 'session.purged'")
            .bind(format!("tenant:{tenant}"))
            .fetch_one(pool)
            .await
            .unwrap();
    let details = serde_json::from_str::<Value>(&body).unwrap()["details"].clone();
    assert_eq!(details, json!({ "sessions": [old], "count": 1, "retention_days": 90 }));
    // The session's own events stay.
    assert_eq!(api.actions(&tenant).await.iter().filter(|a| *a == "session.failed").count(), 3);
}

/// A body the test feeds chunk by chunk (and ends by dropping the sender).
fn fed_body() -> (tokio::sync::mpsc::Sender<&'static [u8]>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<&'static [u8]>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, std::io::Error>(bytes::Bytes::from_static(chunk)), rx))
    });
    (tx, Body::from_stream(stream))
}

/// Starts `POST /v1/jobs` with a fed body on a task of its own.
fn submit_fed(
    api: &Api,
    key: &str,
) -> (tokio::sync::mpsc::Sender<&'static [u8]>, tokio::task::JoinHandle<Reply>) {
    let (tx, body) = fed_body();
    let state = api.state.clone();
    let key = key.to_owned();
    let task =
        tokio::spawn(async move { call(&state, Method::POST, "/v1/jobs", Some(&key), body, &[]).await });
    (tx, task)
}

async fn jobs_of(api: &Api, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&api.state.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_key_revoked_while_its_upload_is_in_flight_creates_no_job(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let (tx, task) = submit_fed(&api, &key);
    tx.send(b"the first half, ").await.unwrap();
    // The upload is under way (past authentication) when the key is revoked.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key_id: String = sqlx::query_scalar("SELECT id FROM api_keys WHERE tenant_id = $1")
        .bind(&tenant)
        .fetch_one(&api.state.pool)
        .await
        .unwrap();
    let r = api
        .call(
            Method::POST,
            &format!("/v1/admin/tenants/{tenant}/keys/{key_id}/revoke"),
            Some(&api.admin),
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    tx.send(b"and the rest").await.unwrap();
    drop(tx);
    let r = task.await.unwrap();
    assert_problem(&r, StatusCode::UNAUTHORIZED, "not valid");
    assert_eq!(jobs_of(&api, &tenant).await, 0, "a job was created with a revoked key");
    assert_eq!(std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn uploads_over_the_tenants_quota_get_429_and_other_tenants_are_not_held_up(pool: PgPool) {
    let api = api(pool, |c| c.quotas.uploads = 2).await;
    let (tenant, key) = api.tenant("acme").await;
    let (_, other) = api.tenant("globex").await;
    let a = submit_fed(&api, &key);
    let b = submit_fed(&api, &key);
    a.0.send(b"a").await.unwrap();
    b.0.send(b"b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = api.submit(&key, b"third", "", &[]).await;
    assert_problem(&r, StatusCode::TOO_MANY_REQUESTS, "too many uploads at once (at most 2 per tenant)");
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(api.submit(&other, b"globex is not held up", "", &[]).await.status, StatusCode::CREATED);
    for (tx, task) in [a, b] {
        drop(tx);
        assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
    }
    assert_eq!(api.submit(&key, b"third, later", "", &[]).await.status, StatusCode::CREATED);
    assert_eq!(jobs_of(&api, &tenant).await, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_over_the_tenants_quota_get_429(pool: PgPool) {
    let api = api(pool, |c| c.quotas.requests = 1).await;
    let (_, key) = api.tenant("acme").await;
    let (tx, task) = submit_fed(&api, &key);
    tx.send(b"held open").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = api.get("/v1/jobs", &key).await;
    assert_problem(&r, StatusCode::TOO_MANY_REQUESTS, "too many requests at once (at most 1 per tenant)");
    drop(tx);
    assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(api.get("/v1/jobs", &key).await.status, StatusCode::OK);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_disk_quota_refuses_a_declared_upload_before_its_body_and_a_chunked_one_as_it_passes(
    pool: PgPool,
) {
    let api = api(pool, |c| c.quotas.disk_bytes = 100).await;
    let (tenant, key) = api.tenant("acme").await;
    assert_eq!(api.submit(&key, &[b'x'; 60], "", &[]).await.status, StatusCode::CREATED);
    // 60 of 100 bytes held by the queued job: a declared 50 is refused from its header alone
    // (the body here never ends, so the answer cannot have waited for it).
    let endless = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x"))])
        .chain(futures_util::stream::pending());
    let r = api
        .call(Method::POST, "/v1/jobs", Some(&key), Body::from_stream(endless), &[("content-length", "50")])
        .await;
    assert_problem(&r, StatusCode::CONFLICT, "disk quota: 50 bytes more, with 60 of 100 bytes in use");
    // Without Content-Length, it is refused once it passes the quota.
    let (tx, task) = submit_fed(&api, &key);
    tx.send(&[b'y'; 30]).await.unwrap();
    let _ = tx.send(&[b'z'; 30]).await;
    let r = task.await.unwrap();
    assert_problem(&r, StatusCode::CONFLICT, "disk quota");
    assert_eq!(jobs_of(&api, &tenant).await, 1);
    assert_eq!(
        std::fs::read_dir(api.state.data_dir.artifacts()).unwrap().count(),
        1,
        "the refused upload left a file"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn an_upload_slower_than_the_minimum_rate_is_dropped_with_408(pool: PgPool) {
    let api = api(pool, |c| {
        c.jobs.upload_idle_secs = 30;
        c.limits.upload_grace_secs = 1;
        c.limits.upload_min_bytes_per_sec = 1000;
    })
    .await;
    let (tenant, key) = api.tenant("acme").await;
    let (tx, task) = submit_fed(&api, &key);
    // One byte every 300 ms: never idle for 30 s, but far below 1000 bytes a second.
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            if tx.send(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let t0 = std::time::Instant::now();
    let r = task.await.unwrap();
    assert_problem(&r, StatusCode::REQUEST_TIMEOUT, "slower than 1000 bytes a second");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    feeder.abort();
    assert_eq!(jobs_of(&api, &tenant).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn operators_see_and_change_a_tenants_quotas_and_each_change_is_audited(pool: PgPool) {
    let api = api(pool, |c| c.quotas.uploads = 8).await;
    let (tenant, key) = api.tenant("acme").await;
    api.submit(&key, b"12345", "", &[]).await;
    let path = format!("/v1/admin/tenants/{tenant}/quotas");
    let v = api.get(&path, &api.admin).await.json();
    assert_eq!(v["overrides"]["uploads"], Value::Null);
    assert_eq!(v["effective"]["uploads"], 8);
    assert_eq!(v["effective"]["live_sessions"], 16);
    assert_eq!(v["usage"]["disk_bytes"], 5);
    let body = json!({"uploads": 1, "vm_cpu_percent": 50});
    let r = api
        .call(
            Method::PUT,
            &path,
            Some(&api.admin),
            Body::from(body.to_string()),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(
        (v["effective"]["uploads"].clone(), v["effective"]["vm_cpu_percent"].clone()),
        (json!(1), json!(50))
    );
    assert_eq!(api.actions(&tenant).await.last().unwrap(), "tenant.quotas_changed");
    let operator: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = 'operator' ORDER BY seq")
            .fetch_all(&api.state.pool)
            .await
            .unwrap();
    assert_eq!(operator.last().unwrap(), "tenant.quotas_changed");
    // The new quota applies to the tenant's next request.
    let (tx, task) = submit_fed(&api, &key);
    tx.send(b"a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.submit(&key, b"b", "", &[]).await.status, StatusCode::TOO_MANY_REQUESTS);
    drop(tx);
    task.await.unwrap();
    let bad = json!({"vm_cpu_percent": 0});
    let r = api
        .call(
            Method::PUT,
            &path,
            Some(&api.admin),
            Body::from(bad.to_string()),
            &[("content-type", "application/json")],
        )
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "vm_cpu_percent must be 1-10000");
    let r = api
        .call(Method::PUT, &path, Some(&key), Body::from("{}"), &[("content-type", "application/json")])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a tenant cannot change its own quotas");
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
