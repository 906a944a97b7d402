//! Tenant rule packs through the router against a real PostgreSQL (a fresh database per test):
//! upload (Cella TOML and gitleaks configurations), line-numbered refusals, versions, reading,
//! deleting, tenant isolation, quotas, the tenant's default policy, jobs selecting packs by
//! name and version, and what a job's evidence records of them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cella_service::api::{app, AppState};
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::metrics::Metrics;
use cella_service::queue::{self, Outcome};
use cella_service::sessions::vmm::Vmms;
use cella_service::sessions::SessionManager;
use cella_service::tenants;
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
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The status, and the problem's detail or the JSON body.
    fn expect(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }

    fn problem(&self, status: StatusCode) -> String {
        self.expect(status)["detail"].as_str().unwrap().to_owned()
    }
}

async fn api(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Api {
    let dir = common::Scratch::new(&format!("packs-{}", &cella_service::ids::new_id("t")[2..14]));
    let data_dir = DataDir::at(dir.join("data"));
    data_dir.create().unwrap();
    let mut config = Config::default();
    tweak(&mut config);
    let (_, admin) = tenants::create_admin_key(&pool).await.unwrap();
    let state = AppState {
        jobs_done: cella_service::api::wait::JobsDone::listen(pool.clone()),
        metrics: Arc::new(Metrics::default()),
        signer: None,
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

impl Api {
    async fn call(&self, method: Method, uri: &str, key: &str, body: Body, json: bool) -> Reply {
        let mut req =
            Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {key}"));
        if json {
            req = req.header("content-type", "application/json");
        }
        let response = app(self.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20).await.unwrap().to_vec();
        Reply { status, body }
    }

    async fn get(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::GET, uri, key, Body::empty(), false).await
    }

    async fn delete(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::DELETE, uri, key, Body::empty(), false).await
    }

    async fn push(&self, key: &str, query: &str, text: &str) -> Reply {
        self.call(Method::POST, &format!("/v1/packs{query}"), key, Body::from(text.to_owned()), false).await
    }

    async fn submit(&self, key: &str, query: &str) -> Reply {
        self.call(Method::POST, &format!("/v1/jobs{query}"), key, Body::from("artifact"), false).await
    }

    async fn set_default(&self, key: &str, policy: Value) -> Reply {
        let body = Body::from(json!({ "policy": policy }).to_string());
        self.call(Method::PUT, "/v1/tenant/default-policy", key, body, true).await
    }

    async fn put_license_policy(&self, key: &str, body: Value) -> Reply {
        self.call(Method::PUT, "/v1/tenant/license-policy", key, Body::from(body.to_string()), true).await
    }

    async fn tenant(&self, name: &str) -> (String, String) {
        let body = Body::from(json!({ "name": name }).to_string());
        let v = self
            .call(Method::POST, "/v1/admin/tenants", &self.admin, body, true)
            .await
            .expect(StatusCode::CREATED);
        (v["tenant"]["id"].as_str().unwrap().to_owned(), v["key"]["api_key"].as_str().unwrap().to_owned())
    }

    /// The tenant's audit events: (action, details).
    async fn events(&self, tenant: &str) -> Vec<(String, Value)> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT action, body FROM audit_events WHERE chain = $1 ORDER BY seq")
                .bind(format!("tenant:{tenant}"))
                .fetch_all(&self.state.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(a, b)| (a, serde_json::from_str::<Value>(&b).unwrap()["details"].clone()))
            .collect()
    }
}

/// A Cella pack named `name` with one rule `rule` (its keyword and token prefix `prefix`).
fn pack(name: &str, rule: &str, prefix: &str) -> String {
    format!(
        "[pack]\nname = \"{name}\"\ncategory = \"secret\"\nseverity = \"error\"\n\n[[rules]]\nid = \"{rule}\"\n\
         description = \"{rule} token\"\nregex = '''\\b({prefix}[a-z0-9]{{24}})\\b'''\nsecret_group = 1\n\
         keywords = [\"{prefix}\"]\nhelp = \"Revoke it.\"\n"
    )
}

const GITLEAKS: &str = "title = \"ours\"\n\n[[rules]]\nid = \"lunadb-token\"\ndescription = \"LunaDB access token\"\n\
                        regex = '''luna_tok_([A-Za-z0-9]{30})'''\nkeywords = [\"luna_tok_\"]\ntags = [\"db\"]\n";

#[sqlx::test(migrations = "../migrations")]
async fn packs_are_versioned_listed_read_and_deleted_with_each_change_audited(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let text = pack("acme", "acme-token", "acmt_");
    let v1 = api.push(&key, "", &text).await.expect(StatusCode::CREATED);
    assert_eq!(
        (v1["name"].clone(), v1["version"].clone(), v1["rules"].clone()),
        (json!("acme"), json!(1), json!(1))
    );
    assert_eq!(v1["format"], "cella");
    assert_eq!(v1["rule_ids"], json!(["acme-token"]));
    let sha = cella_service::ids::hex(&cella_service::ids::sha256(text.as_bytes()));
    assert_eq!(v1["sha256"], sha);
    // The server assigns versions; the same name again is version 2.
    let v2 = api.push(&key, "?name=acme", &text.replace("[a-z0-9]{24}", "[a-z0-9]{32}")).await;
    assert_eq!(v2.expect(StatusCode::CREATED)["version"], 2);
    let list = api.get("/v1/packs", &key).await.expect(StatusCode::OK);
    assert_eq!(list["packs"][0]["latest_version"], 2);
    assert_eq!(list["packs"][0]["versions"], json!([1, 2]));
    let shown = api.get("/v1/packs/acme/versions/1", &key).await.expect(StatusCode::OK);
    assert_eq!(shown["source"], text);
    assert_eq!(shown["cella_toml"], text);
    // Deleting version 1 keeps its row (and its text) for the record, and version numbers go on.
    let gone = api.delete("/v1/packs/acme/versions/1", &key).await.expect(StatusCode::OK);
    assert_eq!(gone, json!({ "name": "acme", "versions": [1] }));
    let history = api.get("/v1/packs/acme", &key).await.expect(StatusCode::OK);
    assert!(
        history["versions"][0]["deleted_at"].is_string() && history["versions"][1]["deleted_at"].is_null()
    );
    assert_eq!(history["latest_version"], 2);
    assert_eq!(api.get("/v1/packs", &key).await.expect(StatusCode::OK)["packs"][0]["versions"], json!([2]));
    assert!(api
        .delete("/v1/packs/acme/versions/1", &key)
        .await
        .problem(StatusCode::NOT_FOUND)
        .contains("acme@1"));
    let gone = api.delete("/v1/packs/acme", &key).await.expect(StatusCode::OK);
    assert_eq!(gone["versions"], json!([2]));
    assert_eq!(api.get("/v1/packs", &key).await.expect(StatusCode::OK)["packs"], json!([]));
    let v3 = api.push(&key, "", &text).await.expect(StatusCode::CREATED);
    assert_eq!(v3["version"], 3);
    let events: Vec<(String, Value)> =
        api.events(&tenant).await.into_iter().filter(|(a, _)| a.starts_with("pack.")).collect();
    let actions: Vec<&str> = events.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["pack.created", "pack.created", "pack.deleted", "pack.deleted", "pack.created"]);
    assert_eq!(
        events[0].1,
        json!({ "name": "acme", "version": 1, "format": "cella", "sha256": sha, "rules": 1,
                "compiled_bytes": v1["compiled_bytes"] })
    );
    assert_eq!(events[2].1, json!({ "name": "acme", "versions": [1] }));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_bad_pack_is_refused_with_422_naming_its_line(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    let bad = pack("acme", "acme-token", "acmt_").replace("{24}", "{24");
    let detail = api.push(&key, "", &bad).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        detail
            .starts_with("the pack is refused: line 9, column 1: rule `acme-token`: regex does not compile"),
        "{detail}"
    );
    let detail = api.push(&key, "", &format!("{}entropyy = 3\n", pack("acme", "a-b", "ab_"))).await;
    assert!(detail
        .problem(StatusCode::UNPROCESSABLE_ENTITY)
        .contains("line 13, column 1: rule `a-b`: unknown field `entropyy`"));
    let big = format!("{}# {}\n", pack("acme", "a-b", "ab_"), "x".repeat(600 << 10));
    let detail = api.push(&key, "", &big).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("larger than the limit of 524288 bytes"), "{detail}");
    let detail = api.push(&key, "?name=secrets", &pack("acme", "a-b", "ab_")).await;
    assert!(detail.problem(StatusCode::UNPROCESSABLE_ENTITY).contains("built-in pack's"));
    let detail = api.push(&key, "?format=yaml", &pack("acme", "a-b", "ab_")).await;
    assert!(detail.problem(StatusCode::UNPROCESSABLE_ENTITY).contains("format \"yaml\" is unknown"));
    // Nothing was stored.
    assert_eq!(api.get("/v1/packs", &key).await.expect(StatusCode::OK)["packs"], json!([]));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_gitleaks_configuration_is_converted_on_upload(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    // It must be named; its format is guessed (no [pack] table).
    let detail = api.push(&key, "", GITLEAKS).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("name the pack"), "{detail}");
    let v = api.push(&key, "?name=luna", GITLEAKS).await.expect(StatusCode::CREATED);
    assert_eq!((v["format"].clone(), v["rule_ids"].clone()), (json!("gitleaks"), json!(["lunadb-token"])));
    let shown = api.get("/v1/packs/luna/versions/1", &key).await.expect(StatusCode::OK);
    assert_eq!(shown["source"], GITLEAKS);
    let converted = shown["cella_toml"].as_str().unwrap();
    assert!(
        converted.contains("[pack]\nname = \"luna\"") && converted.contains("secret_group = 1"),
        "{converted}"
    );
    // A construct Cella cannot honour, by name and line.
    let detail = api
        .push(&key, "?name=luna&format=gitleaks", &format!("{GITLEAKS}path = '''\\.env$'''\n"))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("line 9, column 1: a rule's `path` is not supported"), "{detail}");
}

#[sqlx::test(migrations = "../migrations")]
async fn jobs_select_packs_by_name_or_version_and_record_the_exact_version(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, key) = api.tenant("acme").await;
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    api.push(&key, "?name=luna", GITLEAKS).await.expect(StatusCode::CREATED);
    let job = api.submit(&key, "?policy=secrets,acme,luna").await.expect(StatusCode::CREATED);
    assert_eq!(job["policy"], json!(["secrets", "acme@2", "luna@1"]));
    let job = api.submit(&key, "?policy=acme@1").await.expect(StatusCode::CREATED);
    assert_eq!(job["policy"], json!(["acme@1"]));
    // What a policy resolves to, asked before any upload (as `cella scan` does).
    let resolved = api.get("/v1/tenant/policy?policy=pii,acme", &key).await.expect(StatusCode::OK);
    assert_eq!(resolved["policy"], json!(["pii", "acme@2"]));
    assert_eq!(resolved["source"], "request");
    assert_eq!(resolved["packs"][0]["version"], 2);
    // A deleted version, an unknown pack, two versions of one pack: 422, by name.
    api.delete("/v1/packs/acme/versions/1", &key).await.expect(StatusCode::OK);
    let detail = api.submit(&key, "?policy=acme@1").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.starts_with("pack \"acme@1\" was deleted at "), "{detail}");
    let detail = api.submit(&key, "?policy=secrets,nope").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        detail,
        "unknown policy \"nope\": the built-in packs are secrets, pii, licenses; your packs are acme, luna (`cella pack ls`)"
    );
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    let detail = api.submit(&key, "?policy=acme@2,acme").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("selected twice (acme@2 and acme@3)"), "{detail}");
    // Two packs with one rule id.
    api.push(&key, "", &pack("other", "acme-token", "othr_")).await.expect(StatusCode::CREATED);
    let detail = api.submit(&key, "?policy=acme,other").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        detail,
        "rule `acme-token` is in both acme@3 and other@1: select one of them, or rename the rule"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn another_tenants_packs_answer_404_and_cannot_be_selected(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (_, alice) = api.tenant("alice").await;
    let (_, mallory) = api.tenant("mallory").await;
    api.push(&alice, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    for path in ["/v1/packs/acme", "/v1/packs/acme/versions/1"] {
        assert!(api.get(path, &mallory).await.problem(StatusCode::NOT_FOUND).contains("acme"));
        api.delete(path, &mallory).await.problem(StatusCode::NOT_FOUND);
    }
    assert_eq!(api.get("/v1/packs", &mallory).await.expect(StatusCode::OK)["packs"], json!([]));
    assert!(api
        .submit(&mallory, "?policy=acme")
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY)
        .contains("unknown policy"));
    api.set_default(&mallory, json!("acme@1")).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    // Mallory may have a pack of the same name: her own versions start at 1.
    let v = api.push(&mallory, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    assert_eq!(v["version"], 1);
    assert_eq!(
        api.get("/v1/packs/acme", &alice).await.expect(StatusCode::OK)["versions"].as_array().unwrap().len(),
        1
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn uploads_past_the_pack_quotas_answer_409(pool: PgPool) {
    let api = api(pool, |c| c.quotas.packs = 2).await;
    let (tenant, key) = api.tenant("acme").await;
    api.push(&key, "", &pack("a", "a-token", "aaa_")).await.expect(StatusCode::CREATED);
    api.push(&key, "", &pack("b", "b-token", "bbb_")).await.expect(StatusCode::CREATED);
    let detail = api.push(&key, "", &pack("c", "c-token", "ccc_")).await.problem(StatusCode::CONFLICT);
    assert!(detail.contains("packs quota: you keep 2 of 2 packs"), "{detail}");
    // A new version of a pack it keeps is no new pack.
    api.push(&key, "", &pack("a", "a-token", "aaa_")).await.expect(StatusCode::CREATED);
    // The compiled size: what its live versions take together.
    let used: i64 =
        sqlx::query_scalar("SELECT sum(compiled_bytes)::int8 FROM tenant_packs WHERE tenant_id = $1")
            .bind(&tenant)
            .fetch_one(&api.state.pool)
            .await
            .unwrap();
    sqlx::query("UPDATE tenants SET quota_pack_compiled_bytes = $2 WHERE id = $1")
        .bind(&tenant)
        .bind(used + 10)
        .execute(&api.state.pool)
        .await
        .unwrap();
    let detail = api.push(&key, "", &pack("a", "a-token", "aaa_")).await.problem(StatusCode::CONFLICT);
    assert!(detail.contains("pack_compiled_bytes"), "{detail}");
    // Deleting versions frees it.
    api.delete("/v1/packs/a/versions/1", &key).await.expect(StatusCode::OK);
    api.push(&key, "", &pack("a", "a-token", "aaa_")).await.expect(StatusCode::CREATED);
    let quotas =
        api.get(&format!("/v1/admin/tenants/{tenant}/quotas"), &api.admin).await.expect(StatusCode::OK);
    assert_eq!(
        (quotas["effective"]["packs"].clone(), quotas["usage"]["packs"].clone()),
        (json!(2), json!(2))
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_without_policy_runs_the_tenants_default(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    assert_eq!(
        api.submit(&key, "").await.expect(StatusCode::CREATED)["policy"],
        json!(["secrets", "pii", "licenses"])
    );
    let set = api.set_default(&key, json!("pii, acme")).await.expect(StatusCode::OK);
    assert_eq!(set["policy"], "pii,acme");
    assert_eq!(set["resolved"]["policy"], json!(["pii", "acme@1"]));
    assert_eq!(set["resolved"]["source"], "tenant_default");
    // `acme` means the latest version at each submission.
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    assert_eq!(api.submit(&key, "").await.expect(StatusCode::CREATED)["policy"], json!(["pii", "acme@2"]));
    assert_eq!(
        api.submit(&key, "?policy=secrets").await.expect(StatusCode::CREATED)["policy"],
        json!(["secrets"])
    );
    // Deleting what the default needs is refused; a version it does not need goes.
    let detail = api.delete("/v1/packs/acme", &key).await.problem(StatusCode::CONFLICT);
    assert!(detail.contains("your default policy \"pii,acme\" needs this pack"), "{detail}");
    api.delete("/v1/packs/acme/versions/2", &key).await.expect(StatusCode::OK);
    assert_eq!(api.submit(&key, "").await.expect(StatusCode::CREATED)["policy"], json!(["pii", "acme@1"]));
    let unknown = api.set_default(&key, json!("pii,nope")).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(unknown.contains("unknown policy \"nope\""), "{unknown}");
    let cleared = api.set_default(&key, Value::Null).await.expect(StatusCode::OK);
    assert_eq!(
        (cleared["policy"].clone(), cleared["resolved"]["source"].clone()),
        (Value::Null, json!("server_default"))
    );
    let changes: Vec<Value> = api
        .events(&tenant)
        .await
        .into_iter()
        .filter(|(a, _)| a == "tenant.default_policy_changed")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        changes,
        [json!({ "before": null, "after": "pii,acme" }), json!({ "before": "pii,acme", "after": null })]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_pack_was_deleted_after_it_was_queued_cannot_build_its_policy(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    api.push(&key, "", &pack("acme", "acme-token", "acmt_")).await.expect(StatusCode::CREATED);
    let job = api.submit(&key, "?policy=pii,acme").await.expect(StatusCode::CREATED);
    let pool = &api.state.pool;
    let policy = cella_service::packs::compiled_policy(pool, &tenant, "pii,acme@1").await.unwrap().unwrap();
    let policy: Value = serde_json::from_slice(policy.bytes()).unwrap();
    let ids: Vec<&str> =
        policy["rules"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.last(), Some(&"acme-token"));
    assert!(ids.len() > 2, "{ids:?}");
    api.delete("/v1/packs/acme", &key).await.expect(StatusCode::OK);
    let lease = queue::lease(pool, "worker-a", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!((lease.job_id.as_str(), lease.policy.as_str()), (job["id"].as_str().unwrap(), "pii,acme@1"));
    let e = cella_service::packs::compiled_policy(pool, &tenant, &lease.policy).await.unwrap_err();
    assert!(!e.retryable());
    assert_eq!(
        e.to_string(),
        "rule pack acme@1 was deleted after the job was queued; submit the job again with a live version (`cella pack ls`)"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_succeeded_jobs_evidence_names_each_tenant_pack_with_its_version_and_hash(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (tenant, key) = api.tenant("acme").await;
    let text = pack("acme", "acme-token", "acmt_");
    api.push(&key, "", &text).await.expect(StatusCode::CREATED);
    api.submit(&key, "?policy=secrets,acme").await.expect(StatusCode::CREATED);
    let pool = &api.state.pool;
    let lease = queue::lease(pool, "worker-a", Duration::from_secs(30)).await.unwrap().unwrap();
    let done = Outcome::Succeeded { summary: json!({"findings": 0}), sarif: b"{}".to_vec(), vm: json!({}) };
    assert_eq!(queue::finish(pool, &lease, &done).await.unwrap(), cella_service::jobs::JobState::Succeeded);
    let events = api.events(&tenant).await;
    let succeeded = &events.iter().find(|(a, _)| a == "job.succeeded").unwrap().1;
    assert_eq!(succeeded["packs"][0]["name"], "secrets");
    assert_eq!(
        succeeded["packs"][1],
        json!({ "name": "acme", "version": "1", "tenant_pack": true,
                "sha256": cella_service::ids::hex(&cella_service::ids::sha256(text.as_bytes())) })
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_license_policy_is_checked_kept_per_tenant_and_applied_to_jobs_that_give_none(pool: PgPool) {
    let api = api(pool, |_| {}).await;
    let (acme, key) = api.tenant("acme").await;
    let (_, other) = api.tenant("other").await;
    // Refused: an entry that is no identifier or prefix, a field of another name.
    let p = api
        .put_license_policy(&key, json!({"deny": ["MIT OR GPL-2.0"]}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p.contains("`MIT OR GPL-2.0` is not a license identifier"), "{p}");
    api.put_license_policy(&key, json!({"denied": ["MIT"]})).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let set = api
        .put_license_policy(&key, json!({"deny": ["AGPL-3.0"], "flag": ["GPL-*"]}))
        .await
        .expect(StatusCode::OK);
    assert_eq!(set, json!({"deny": ["AGPL-3.0"], "flag": ["GPL-*"]}));
    assert_eq!(api.get("/v1/tenant/license-policy", &key).await.expect(StatusCode::OK), set);
    // Another tenant's is its own.
    assert_eq!(
        api.get("/v1/tenant/license-policy", &other).await.expect(StatusCode::OK),
        json!({"deny": [], "flag": []})
    );
    let events = api.events(&acme).await;
    let (action, details) = events.last().unwrap();
    assert_eq!(action, "tenant.license_policy_changed");
    assert_eq!(details["after"], set);
    // A job that gives none runs with the tenant's; one that gives its own, with that.
    let plain = api.submit(&key, "").await.expect(StatusCode::CREATED);
    let own = api.submit(&key, "?license_flag=LGPL-2.1").await.expect(StatusCode::CREATED);
    api.submit(&key, "?license_deny=a/b").await.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let pool = &api.state.pool;
    let mut seen = std::collections::HashMap::new();
    while let Some(lease) = queue::lease(pool, "worker-a", Duration::from_secs(30)).await.unwrap() {
        seen.insert(lease.job_id.clone(), (lease.options.license_deny, lease.options.license_flag));
    }
    assert_eq!(seen[plain["id"].as_str().unwrap()], (vec!["AGPL-3.0".to_owned()], vec!["GPL-*".to_owned()]));
    assert_eq!(seen[own["id"].as_str().unwrap()], (vec![], vec!["LGPL-2.1".to_owned()]));
}
