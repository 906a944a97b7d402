//! Tenant rule packs end to end: `cella serve` and the `cella` command line as real processes,
//! real (jailed, as root) microVMs. A gitleaks configuration written for this test is pushed
//! with `cella pack push`, tried locally with `cella pack test`, selected by `cella scan --pack`
//! and by the tenant's default policy, finds its planted secrets in real jobs, and is named
//! with its version and SHA-256 in the jobs' evidence; a pack deleted while its job is queued
//! fails that job with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use sqlx::PgPool;

mod common;

use cella_service::client::ApiClient;
use common::{cella, test_db_url, Serve, Server};

/// A gitleaks configuration in gitleaks' documented format (the vendor and its token formats
/// are made up for this test).
const GITLEAKS: &str = r#"title = "Ferrule Labs secrets"

[[allowlists]]
description = "test fixtures"
paths = ['''(?:^|/)testdata/''']

[[rules]]
id = "ferrule-deploy-key"
description = "Ferrule Labs deploy key"
regex = '''\b(frl_dk_[0-9a-f]{40})\b'''
keywords = ["frl_dk_"]
entropy = 3.0
tags = ["ferrule", "deploy"]

[[rules]]
id = "ferrule-signing-secret"
description = "Ferrule webhook signing secret in an assignment"
regex = '''(?i)ferrule[\w.-]{0,20}signing[\w.-]{0,10}\s*[:=]\s*["']?([A-Za-z0-9+/]{32,44})'''
secretGroup = 1
keywords = ["ferrule"]
[rules.allowlist]
stopwords = ["example"]
"#;

const DEPLOY_KEY: &str = "frl_dk_4c1d9e07b2a85f36e0d14c9b7a2f58e3d6c0b914";
const SIGNING: &str = "Zq3Lm9Xv2Rt7Kp4Wn8Bc5Hy1Jd6Fg0Ts+Ae";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cella-packs-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cella serve` with a short lease and drain, jailed as root (the common harness).
fn serve(data: &Path, db: &str, env: &[(&str, &str)]) -> Server {
    let jailed = if common::is_root() { "1" } else { "0" };
    Serve::new(data)
        .db(Some(db))
        .envs(&[("CELLA_JAILED", jailed), ("CELLA_LEASE_SECS", "2"), ("CELLA_DRAIN_SECS", "1")])
        .envs(env)
        .start()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tenant made with the CLI; its id and API key.
fn tenant(data: &Path, name: &str) -> (String, String) {
    let o = cella(data, None, &["tenant", "create", name]);
    assert!(o.status.success(), "{}", err(&o));
    let stdout = out(&o);
    let field = |p: &str| stdout.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_owned();
    (field("tenant  "), field("API key "))
}

/// A folder of samples: `files` as (path, contents).
fn samples(dir: &Path, files: &[(&str, String)]) -> PathBuf {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir.to_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    cella_service::ids::hex(&cella_service::ids::sha256(bytes))
}

/// The job ids of `cella scan`'s `job … submitted` line.
fn job_id(o: &Output) -> String {
    err(o).lines().find_map(|l| l.strip_prefix("job ")?.split(' ').next().map(str::to_owned)).unwrap()
}

async fn events(pool: &PgPool, tenant: &str, action: &str) -> Vec<Value> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT body FROM audit_events WHERE chain = $1 AND action = $2 ORDER BY seq")
            .bind(format!("tenant:{tenant}"))
            .bind(action)
            .fetch_all(pool)
            .await
            .unwrap();
    rows.iter().map(|b| serde_json::from_str::<Value>(b).unwrap()).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_gitleaks_pack_pushed_with_the_cli_finds_its_secrets_in_real_jobs(pool: PgPool) {
    let dir = scratch("cli");
    let server = serve(&dir.join("data"), &test_db_url(&pool), &[]);
    let data = server.data.clone();
    let (tenant, key) = tenant(&data, "ferrule");
    let config = dir.join(".gitleaks.toml");
    std::fs::write(&config, GITLEAKS).unwrap();
    let sha = sha256_hex(GITLEAKS.as_bytes());
    let vmm = common::vmm();
    let vmm = vmm.to_str().unwrap();

    // Tried locally first: every rule finds its sample (exit 0)...
    let all = samples(
        &dir.join("samples"),
        &[
            ("app/deploy.env", format!("DEPLOY_KEY={DEPLOY_KEY}\n")),
            // Not the shape of the built-in `generic-secret-assignment` (a quoted value after a
            // secret-looking name): that rule comes first in the job's policy and would report
            // the same secret instead, until the engine prefers specific rules over generic ones.
            ("app/settings.py", format!("FERRULE_SIGNING_KEY={SIGNING}\n")),
            ("testdata/fixture.env", format!("DEPLOY_KEY={DEPLOY_KEY}\n")),
        ],
    );
    let o =
        cella(&data, None, &["pack", "test", config.to_str().unwrap(), all.to_str().unwrap(), "--vmm", vmm]);
    assert!(o.status.success(), "{}\n{}", out(&o), err(&o));
    let table = out(&o);
    assert!(table.contains("app/deploy.env:1") && table.contains("app/settings.py:1"), "{table}");
    assert!(!table.contains("testdata/"), "the allowlisted fixture was reported: {table}");
    assert!(table.contains("pack gitleaks (gitleaks, 2 rule(s)) on "), "{table}");
    assert!(table.contains("0 of 2 rule(s) found nothing"), "{table}");
    // ... one rule without a sample: exit 1, naming it ...
    let some = samples(&dir.join("some"), &[("deploy.env", format!("KEY={DEPLOY_KEY}\n"))]);
    let o =
        cella(&data, None, &["pack", "test", config.to_str().unwrap(), some.to_str().unwrap(), "--vmm", vmm]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", out(&o), err(&o));
    assert!(
        err(&o).contains("1 rule(s) of the pack found nothing in the samples: ferrule-signing-secret"),
        "{}",
        err(&o)
    );
    // ... and a broken pack: exit 2, with its line.
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, GITLEAKS.replace("[0-9a-f]{40}", "[0-9a-f]{40")).unwrap();
    let o =
        cella(&data, None, &["pack", "test", broken.to_str().unwrap(), some.to_str().unwrap(), "--vmm", vmm]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("line 10, column 1: rule `ferrule-deploy-key`: regex does not compile"),
        "{}",
        err(&o)
    );

    // Pushed, listed, shown.
    let o = cella(&data, Some(&key), &["pack", "push", config.to_str().unwrap(), "--name", "ferrule"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o).trim(), format!("pushed ferrule@1: 2 rule(s), gitleaks (converted), sha256 {sha}"));
    let o = cella(&data, Some(&key), &["pack", "ls", "--json"]);
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (list["packs"][0]["name"].as_str(), list["packs"][0]["latest_version"].as_i64()),
        (Some("ferrule"), Some(1))
    );
    let o = cella(&data, Some(&key), &["pack", "show", "ferrule@1"]);
    assert!(
        out(&o).contains("[pack]\nname = \"ferrule\"") && out(&o).contains("id = \"ferrule-signing-secret\""),
        "{}",
        out(&o)
    );
    let o = cella(&data, Some(&key), &["pack", "show", "ferrule@1", "--source"]);
    assert_eq!(out(&o), GITLEAKS);

    // A bad name is refused before anything is packed or uploaded: no job.
    let o = cella(&data, Some(&key), &["scan", all.to_str().unwrap(), "--pack", "nope"]);
    assert_eq!(o.status.code(), Some(5), "{}", err(&o));
    assert!(
        err(&o).contains("unknown policy \"nope\"") && err(&o).contains("your packs are ferrule"),
        "{}",
        err(&o)
    );
    let client = server.client(&key);
    assert_eq!(client.json(Method::GET, "/v1/jobs").await.unwrap()["jobs"], serde_json::json!([]));

    // A real job: the built-in packs plus the tenant's, at the version checked.
    let report = dir.join("report.json");
    let o = cella(
        &data,
        Some(&key),
        &["scan", all.to_str().unwrap(), "--pack", "ferrule", "--json", report.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "findings at error fail the gate: {}", err(&o));
    let id = job_id(&o);
    let job = client.json(Method::GET, &format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(job["policy"], serde_json::json!(["secrets", "pii", "licenses", "ferrule@1"]));
    let findings: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let mut found: Vec<(String, String)> = findings["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["rule"].as_str().unwrap().to_owned(), f["path"].as_str().unwrap().to_owned()))
        .filter(|(rule, _)| rule.starts_with("ferrule-"))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("ferrule-deploy-key".to_owned(), "app/deploy.env".to_owned()),
            ("ferrule-signing-secret".to_owned(), "app/settings.py".to_owned()),
        ]
    );
    // Its evidence names the pack, its version and the SHA-256 of the file pushed.
    let succeeded = events(&pool, &tenant, "job.succeeded").await;
    let packs = &succeeded[0]["details"]["packs"];
    assert_eq!(
        packs[3],
        serde_json::json!({ "name": "ferrule", "version": "1", "sha256": sha, "tenant_pack": true })
    );
    assert_eq!(packs[0]["name"], "secrets");

    // The tenant's default policy: a job with no policy runs it.
    let o = cella(&data, Some(&key), &["pack", "default", "set", "pii,ferrule"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("runs now:       pii,ferrule@1"), "{}", out(&o));
    let o = cella(&data, Some(&key), &["scan", all.to_str().unwrap(), "--fail-on", "never"]);
    assert!(o.status.success(), "{}", err(&o));
    let job = client.json(Method::GET, &format!("/v1/jobs/{}", job_id(&o))).await.unwrap();
    assert_eq!(job["policy"], serde_json::json!(["pii", "ferrule@1"]));
    assert_eq!(job["findings"], 2, "{job}");

    // What the default needs cannot be deleted; once cleared, it can.
    let o = cella(&data, Some(&key), &["pack", "rm", "ferrule"]);
    assert_eq!(o.status.code(), Some(5), "{}", err(&o));
    assert!(err(&o).contains("409") && err(&o).contains("default policy"), "{}", err(&o));
    assert!(cella(&data, Some(&key), &["pack", "default", "clear"]).status.success());
    let o = cella(&data, Some(&key), &["pack", "rm", "ferrule@1"]);
    assert_eq!(out(&o).trim(), "deleted ferrule@1", "{}", err(&o));
    let o = cella(&data, Some(&key), &["scan", all.to_str().unwrap(), "--pack", "ferrule@1"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(err(&o).contains("pack \"ferrule@1\" was deleted"), "{}", err(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process killed (if still running) when the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_pack_deleted_while_its_job_is_queued_fails_the_job_with_the_reason(pool: PgPool) {
    let dir = scratch("deleted");
    let db = test_db_url(&pool);
    // No worker yet: the job stays queued.
    let server = serve(&dir.join("data"), &db, &[("CELLA_WORKER", "0")]);
    let (tenant, key) = tenant(&server.data, "ferrule");
    let client = server.client(&key);
    let push = client.request(Method::POST, "/v1/packs?name=ferrule").body(GITLEAKS);
    client.send(push).await.unwrap();
    let submit = client.request(Method::POST, "/v1/jobs?policy=ferrule").body(format!("KEY={DEPLOY_KEY}\n"));
    let job: Value = client.send(submit).await.unwrap().json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["policy"], serde_json::json!(["ferrule@1"]));
    client.json(Method::DELETE, "/v1/packs/ferrule").await.unwrap();
    let _worker = Proc(
        Command::new(env!("CARGO_BIN_EXE_cella"))
            .args(["worker", "--concurrency", "1", "--data-dir"])
            .arg(&server.data)
            .env("DATABASE_URL", &db)
            .env("CELLA_VMM", common::vmm())
            .env("CELLA_JAILED", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let job = loop {
        let job = client.json(Method::GET, &format!("/v1/jobs/{id}?wait=5")).await.unwrap();
        if job["state"] != "queued" && job["state"] != "running" {
            break job;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
    };
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(
        job["error"],
        "rule pack ferrule@1 was deleted after the job was queued; submit the job again with a live version (`cella pack ls`)"
    );
    // Failed at once, not retried: one lease.
    assert_eq!(job["attempt"], 1);
    assert_eq!(events(&pool, &tenant, "job.failed").await.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The VM report the worker stored for job `id`.
async fn vm_of(pool: &PgPool, id: &str) -> Value {
    sqlx::query_scalar("SELECT vm FROM jobs WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

/// Submits `body` under `policy` (the tenant's default if none) and waits for the job to end.
async fn run_job(client: &ApiClient, policy: Option<&str>, body: String) -> Value {
    let path = match policy {
        Some(p) => format!("/v1/jobs?policy={p}"),
        None => "/v1/jobs".to_owned(),
    };
    let job: Value =
        client.send(client.request(Method::POST, &path).body(body)).await.unwrap().json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    loop {
        let job = client.json(Method::GET, &format!("/v1/jobs/{id}?wait=5")).await.unwrap();
        if job["state"] != "queued" && job["state"] != "running" {
            assert_eq!(job["state"], "succeeded", "{job}");
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn spares_come_from_their_policys_template_never_another_tenants_and_a_new_image_makes_new_ones(
    pool: PgPool,
) {
    let dir = scratch("template");
    let db = test_db_url(&pool);
    let image = dir.join("cella-scanner");
    std::fs::copy(cella_host::images::default_scanner_image().unwrap(), &image).unwrap();
    let server = serve(&dir.join("data"), &db, &[("CELLA_SCANNER_IMAGE", image.to_str().unwrap())]);
    let (tenant_id, key) = tenant(&server.data, "templated");
    let client = server.client(&key);

    // The default policy: the template's engine, no policy sent.
    let job = run_job(&client, None, "nothing to see\n".into()).await;
    let vm = vm_of(&pool, job["id"].as_str().unwrap()).await;
    let first = vm["template"].as_str().unwrap_or_else(|| panic!("no template: {vm}")).to_owned();
    assert_eq!(vm["policy_preloaded"], true, "{vm}");

    // A tenant pack: its first job runs in the default template, its own policy sent and used.
    client.send(client.request(Method::POST, "/v1/packs?name=ferrule").body(GITLEAKS)).await.unwrap();
    let job = run_job(&client, Some("ferrule"), format!("KEY={DEPLOY_KEY}\n")).await;
    assert_eq!(job["findings"], 1, "{job}");
    let vm = vm_of(&pool, job["id"].as_str().unwrap()).await;
    assert_eq!(
        (vm["template"].as_str(), &vm["policy_preloaded"]),
        (Some(first.as_str()), &Value::Bool(false))
    );
    // Then the pack's own template is made, and the tenant's next jobs of it are restored from
    // it, with the engine already built.
    let mut own = None;
    for _ in 0..20 {
        let job = run_job(&client, Some("ferrule"), format!("KEY={DEPLOY_KEY}\n")).await;
        assert_eq!(job["findings"], 1, "{job}");
        let vm = vm_of(&pool, job["id"].as_str().unwrap()).await;
        if vm["policy_preloaded"] == true {
            own = vm["template"].as_str().map(str::to_owned);
            break;
        }
        assert_eq!(vm["template"].as_str(), Some(first.as_str()), "{vm}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let own = own.expect("the tenant's pack got no template of its own");
    assert_ne!(own, first);
    let succeeded = events(&pool, &tenant_id, "job.succeeded").await;
    assert_eq!(succeeded.last().unwrap()["details"]["template"], own.as_str());

    // Another tenant's job, in the slot whose spare holds that pack: never in a VM holding
    // another tenant's rules. Its VM comes from the default template.
    let (_, neighbour) = tenant(&server.data, "neighbour");
    let job = run_job(&server.client(&neighbour), None, "nothing to see\n".into()).await;
    let vm = vm_of(&pool, job["id"].as_str().unwrap()).await;
    assert_eq!(
        (vm["template"].as_str(), &vm["policy_preloaded"]),
        (Some(first.as_str()), &Value::Bool(true))
    );

    // The image changes (one more byte after the ELF's last segment): the next spare made
    // comes from a new template, of the new image. The spare already waiting runs one job.
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(&image).unwrap().write_all(b"\n").unwrap();
    let mut templates = Vec::new();
    for _ in 0..3 {
        let job = run_job(&client, None, "nothing to see\n".into()).await;
        let vm = vm_of(&pool, job["id"].as_str().unwrap()).await;
        assert_eq!(vm["policy_preloaded"], true, "{vm}");
        templates.push(vm["template"].as_str().unwrap().to_owned());
    }
    assert_ne!(templates[2], first, "{templates:?}");
    // The old template's folder is gone; one template folder is left.
    let spares: Vec<String> = std::fs::read_dir(server.data.join("spares"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("-template-"))
        .collect();
    assert_eq!(spares.len(), 1, "{spares:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
