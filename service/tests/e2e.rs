//! `cella serve` and `cella worker` as real processes: HTTPS with the generated CA, a real
//! PostgreSQL (a fresh database per test, or the private cluster `serve` runs itself), real
//! jailed microVMs on /dev/kvm. Covers the whole path of a job and the failures around it: a
//! cancelled running job, a worker killed with SIGKILL, a worker drained by SIGTERM, and
//! PostgreSQL restarting while jobs flow.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cella_service::client::ApiClient;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::PgPool;

mod common;

use common::{cella, repo, sample_tar, signal, test_db_url, vmm, Serve, Server};

/// A stand-in `cella-vmm` for a job that runs until stopped: the real spare the worker asks
/// for, with the runner image and its `spin` mode as the guest (a stop through the API, or
/// SIGTERM, stops it and scrubs it).
fn spinning_vmm(dir: &Path) -> PathBuf {
    let path = dir.join("spinning-vmm");
    let runner = repo().join("target/cella/cella-runner");
    let script = format!("#!/bin/sh\nexec {} \"$@\" --image {} -- spin\n", vmm().display(), runner.display());
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cella-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cella serve` with a short lease and drain, so failures show within the test.
fn serve(data: &Path, db: Option<&str>, env: &[(&str, &str)]) -> Server {
    Serve::new(data).db(db).envs(&[("CELLA_LEASE_SECS", "2"), ("CELLA_DRAIN_SECS", "1")]).envs(env).start()
}

/// Submits `artifact`; returns the job id.
async fn submit(
    client: &ApiClient,
    artifact: &[u8],
    idempotency_key: Option<&str>,
) -> Result<String, String> {
    let mut req = client.request(Method::POST, "/v1/jobs").body(artifact.to_vec());
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let job: Value =
        client.send(req).await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
    Ok(job["id"].as_str().unwrap().to_owned())
}

async fn job(client: &ApiClient, id: &str) -> Value {
    client.json(Method::GET, &format!("/v1/jobs/{id}")).await.unwrap()
}

/// Waits until `done(job)` holds.
async fn wait_job(client: &ApiClient, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Ok(job) = client.json(Method::GET, &format!("/v1/jobs/{id}")).await {
            if done(&job) {
                return job;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "job {id} never {what}: {job}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn actions(pool: &PgPool, tenant: &str) -> Vec<(String, Value)> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT action, body FROM audit_events WHERE chain = $1 ORDER BY seq")
            .bind(format!("tenant:{tenant}"))
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().map(|(a, body)| (a, serde_json::from_str::<Value>(&body).unwrap())).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_scan_submitted_over_https_runs_jailed_and_its_audit_chain_verifies(pool: PgPool) {
    let dir = scratch("scan");
    let server = serve(&dir.join("data"), Some(&test_db_url(&pool)), &[("CELLA_JAILED", "1")]);
    let data = server.data.clone();
    // The operator creates a tenant with the CLI, on the server's host.
    let out = cella(&data, None, &["tenant", "create", "acme"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let tenant = stdout.lines().find_map(|l| l.strip_prefix("tenant  ")).unwrap().trim().to_owned();
    let key = stdout.lines().find_map(|l| l.strip_prefix("API key ")).unwrap().trim().to_owned();
    assert!(key.starts_with("cella_") && key.len() == 6 + 64);
    // ... and sets and reads back its quotas.
    let out = cella(
        &data,
        None,
        &["tenant", "quota", &tenant, "--uploads", "3", "--vm-cpu-percent", "50", "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let quotas: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (quotas["effective"]["uploads"].clone(), quotas["overrides"]["vm_cpu_percent"].clone()),
        (json!(3), json!(50))
    );
    let out = cella(&data, None, &["tenant", "quota", &tenant, "--vm-cpu-percent", "default"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["uploads", "3", "3", "-"]),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vm_cpu_percent", "default", "100", "-"]),
        "{table}"
    );
    // Listings parse as JSON; the key id `cella key revoke` takes is in `cella key ls`.
    let json_of = |args: &[&str], key: Option<&str>| -> Value {
        let out = cella(&data, key, args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}"))
    };
    let keys = json_of(&["key", "ls", &tenant, "--json"], None);
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert!(
        keys[0]["key_id"].as_str().unwrap().starts_with("key_") && keys[0]["revoked_at"].is_null(),
        "{keys}"
    );
    let tenants = json_of(&["tenant", "ls", "--json"], None);
    assert!(tenants.as_array().unwrap().iter().any(|t| t["id"] == tenant.as_str()), "{tenants}");
    assert!(json_of(&["admin", "workers", "--json"], None).is_array());
    assert!(json_of(&["admin", "vms", "--json"], None).is_array());
    assert!(json_of(&["job", "ls", "--json"], Some(&key))["jobs"].is_array());
    let out = cella(&data, None, &["tenant", "quota", &tenant, "--uploads", "many"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--uploads takes a number or `default`"));

    // The tenant scans the sample folder: the Stripe key and card number are errors, so exit 1.
    let sarif = dir.join("out.sarif");
    let sample = repo().join("examples/sample-app");
    let out =
        cella(&data, Some(&key), &["scan", sample.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("stripe-secret-key") && stdout.contains(" config/settings.yaml:5"), "{stdout}");
    assert!(stdout.contains("5 finding(s) (0 suppressed); 2 at or above --fail-on error"), "{stdout}");
    let log: Value = serde_json::from_slice(&std::fs::read(&sarif).unwrap()).unwrap();
    assert_eq!(log["version"], "2.1.0");
    assert_eq!(log["runs"][0]["results"].as_array().unwrap().len(), 5);
    // The worker keeps a spare ready (jail made, VMM started, its VM built), confined from
    // before it serves anything: seen from outside, every thread of the waiting VMM has no
    // capabilities, no-new-privs and a seccomp filter, and runs as the slot's uid.
    let serve_pid = server.child.as_ref().unwrap().id();
    let spare_before = common::wait_for_spare(serve_pid, "job", &[]).await;
    let uid_before = spare_vmm_confined(&spare_before);
    // A spare waits as long as it must: it does not end with the runtime thread that asked for
    // it (tokio lets an idle blocking thread go after 10 s; a parent-death signal tied to one
    // would end the spare with it).
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(spare_vmm_confined(&spare_before), uid_before, "the spare still waits");
    let waiting = common::spares_of(serve_pid, "job");
    // A threshold above every finding: exit 0.
    let out = cella(
        &data,
        Some(&key),
        &["scan", sample.to_str().unwrap(), "--fail-on", "never", "--sarif", sarif.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    // One of the spares that waited (each slot keeps one; the job's slot is not known here) was
    // taken by the launch.
    let after = common::spares_of(serve_pid, "job");
    assert!(
        waiting.iter().any(|s| !after.contains(s)),
        "the launch took none of {waiting:?} ({after:?} now)"
    );
    let vm: Value =
        sqlx::query_scalar("SELECT vm FROM jobs WHERE state = 'succeeded' ORDER BY finished_at DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(vm["built_ahead"], true, "{vm}");
    // Restored from the worker's template, whose engine is the job's default policy's: the
    // runner got no policy, it had the engine built already.
    let template = vm["template"].as_str().unwrap_or_else(|| panic!("no template: {vm}")).to_owned();
    assert_eq!(template.len(), 64, "{vm}");
    assert_eq!(vm["policy_preloaded"], true, "{vm}");
    // The next spare is made while the scan runs; slot 0's VMMs share its uid (each is
    // confined to no path access, in a PID namespace of its own).
    let spare_after = common::wait_for_spare(serve_pid, "job", &[spare_before]).await;
    let uid_after = spare_vmm_confined(&spare_after);
    assert_eq!((uid_before, uid_after), (64_100, 64_100));

    // Every transition is audited, with the scrub evidence of a jailed VM.
    let events = actions(&pool, &tenant).await;
    let names: Vec<&str> = events.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        &names[..9],
        [
            "tenant.created",
            "api_key.created",
            "tenant.quotas_changed",
            "tenant.quotas_changed",
            "job.submitted",
            "job.leased",
            "job.vm_started",
            "job.scrubbed",
            "job.succeeded"
        ]
    );
    let started = &events[6].1["details"];
    assert_eq!(started["jailed"], true, "{started}");
    let scrub = &events[7].1["details"]["scrub"];
    assert_eq!(
        (scrub["verified_zero"].as_bool(), scrub["released"].as_bool()),
        (Some(true), Some(true)),
        "{scrub}"
    );
    // The tenant downloads its audit log and verifies it offline.
    let bundle = dir.join("audit.tar");
    let out = cella(&data, Some(&key), &["audit", "download", "--out", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pubkey = data.join("audit-signing.key.pub");
    let out = cella(
        &data,
        None,
        &["audit", "verify", bundle.to_str().unwrap(), "--trusted-key", pubkey.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.starts_with(&format!("OK: {} events", events.len())), "{stdout}");

    // The job's terminal event binds the SARIF log: a reviewer checks the file against it.
    let succeeded = &events[8].1["details"];
    let job_id = events[8].1["resource"]["id"].as_str().unwrap().to_owned();
    assert_eq!(succeeded["artifact"]["name"], "sample-app.tar", "{succeeded}");
    assert_eq!(succeeded["artifact"]["sha256"].as_str().unwrap().len(), 64, "{succeeded}");
    let packs: Vec<&str> =
        succeeded["packs"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(packs, ["secrets", "pii", "licenses"], "{succeeded}");
    assert!(succeeded["packs"][0]["sha256"].as_str().unwrap().len() == 64, "{succeeded}");
    assert_eq!(succeeded["cella_version"], env!("CARGO_PKG_VERSION"));
    assert!(succeeded["engine_version"].is_string(), "{succeeded}");
    assert_eq!(succeeded["template"], template.as_str(), "{succeeded}");
    let verify_sarif = |file: &Path| {
        cella(
            &data,
            None,
            &[
                "audit",
                "verify",
                bundle.to_str().unwrap(),
                "--trusted-key",
                pubkey.to_str().unwrap(),
                "--sarif",
                file.to_str().unwrap(),
                "--job",
                &job_id,
            ],
        )
    };
    let out = verify_sarif(&sarif);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.contains(&format!("is job {job_id}'s SARIF log")), "{stdout}");
    let forged = dir.join("forged.sarif");
    let mut bytes = std::fs::read(&sarif).unwrap();
    let at = bytes.iter().position(|b| *b == b'5').unwrap();
    bytes[at] = b'6';
    std::fs::write(&forged, bytes).unwrap();
    let out = verify_sarif(&forged);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAILED:") && stdout.contains("is not job"), "{stdout}");

    // Metrics saw the launches and scrubs.
    let metrics = String::from_utf8(server.admin().bytes("/metrics").await.unwrap()).unwrap();
    assert!(metrics.contains("cella_vm_launch_seconds_count 2"), "{metrics}");
    assert!(metrics.contains("cella_jobs{state=\"succeeded\"} 2"), "{metrics}");
    assert!(metrics.contains("cella_vm_scrub_seconds_count 2"), "{metrics}");
    // A hostile archive: the job fails with the runner's reason, and `cella scan` exits 4.
    let evil = dir.join("evil.tar");
    std::fs::write(&evil, cella_e2e::ustar(&[("../../etc/passwd", b"root:x:0:0")])).unwrap();
    let out = cella(&data, Some(&key), &["scan", evil.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("failed") && stderr.contains("../../etc/passwd"), "{stderr}");
    // Every output format a CI system reads, parsed back by a real parser: JSON (serde), CSV
    // and JUnit XML (Python's csv and xml.etree).
    let (json_out, csv_out, junit_out) = (dir.join("f.json"), dir.join("f.csv"), dir.join("f.xml"));
    let out = cella(
        &data,
        Some(&key),
        &[
            "scan",
            sample.to_str().unwrap(),
            "--format",
            "json",
            "--json",
            json_out.to_str().unwrap(),
            "--csv",
            csv_out.to_str().unwrap(),
            "--junit",
            junit_out.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    assert_eq!(printed, written);
    let findings = written["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 5, "{written}");
    assert!(findings.iter().any(|f| f["rule"] == "stripe-secret-key" && f["line"] == 5), "{written}");
    assert!(written["summary"]["files_scanned"].as_u64().unwrap() > 0, "{written}");
    let parsed = Command::new("python3")
        .arg("-c")
        .arg(
            "import csv, sys, xml.etree.ElementTree as et\n\
             rows = list(csv.DictReader(open(sys.argv[1], newline='')))\n\
             suite = et.parse(sys.argv[2]).getroot()\n\
             print(len(rows), rows[0]['rule'] != '', suite.get('tests'), suite.get('failures'),\n\
                   len(suite.findall('.//testcase')), len(suite.findall('.//failure')))",
        )
        .args([&csv_out, &junit_out])
        .output()
        .unwrap();
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    assert_eq!(String::from_utf8_lossy(&parsed.stdout).trim(), "5 True 5 2 5 2");
    // A path that does not exist is the user's mistake: exit 2, naming it.
    let out = cella(&data, Some(&key), &["scan", "/nonexistent/app"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/app"));
    // Nothing of the tenant's artifacts stays on the host, and no spare jail once serve stops.
    assert_eq!(std::fs::read_dir(data.join("artifacts")).unwrap().count(), 0);
    let mut server = server;
    server.stop();
    assert_eq!(common::spares_of(serve_pid, "job"), Vec::<String>::new());
    assert_eq!(common::spares_of(serve_pid, "session"), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_running_job_stops_its_vm_and_records_the_scrub(pool: PgPool) {
    let dir = scratch("cancel");
    let spin = spinning_vmm(&dir);
    let server = serve(
        &dir.join("data"),
        Some(&test_db_url(&pool)),
        &[("CELLA_VMM", spin.to_str().unwrap()), ("CELLA_JAILED", "0")],
    );
    let (tenant, _, client) = server.tenant("acme").await;
    let id = submit(&client, b"anything", None).await.unwrap();
    wait_job(&client, &id, "ran", |j| j["state"] == "running").await;
    // The operator sees the VM.
    wait_for_action(&pool, &tenant, "job.vm_started").await;
    let vms = server.admin().json(Method::GET, "/v1/admin/vms").await.unwrap();
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["job_id"] == id.as_str())
        .expect("the running VM is listed")
        .clone();
    let pid = vm["pid"].as_i64().unwrap();
    let cancelled = client.json(Method::POST, &format!("/v1/jobs/{id}/cancel")).await.unwrap();
    assert_eq!(cancelled["cancel_requested"], true);
    let job = wait_job(&client, &id, "was cancelled", |j| j["state"] == "cancelled").await;
    assert!(job["error"].as_str().unwrap().contains("cancelled while running"), "{job}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the VMM {pid} still runs");
    let events = actions(&pool, &tenant).await;
    let names: Vec<&str> = events.iter().map(|(a, _)| a.as_str()).collect();
    assert!(names.ends_with(&["job.cancel_requested", "job.scrubbed", "job.cancelled"]), "{names:?}");
    let scrub = &events[events.len() - 2].1["details"]["scrub"];
    assert_eq!(scrub["verified_zero"], true, "{scrub}");
    assert_eq!(
        client
            .send(client.request(Method::POST, &format!("/v1/jobs/{id}/cancel")))
            .await
            .unwrap_err()
            .to_string()
            .split(':')
            .next(),
        Some("409 Conflict")
    );

    // `cella scan` in CI: a job still running when --wait-secs runs out is exit 6, not "failed".
    let out = cella(&server.data, None, &["tenant", "create", "ci"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = stdout.lines().find_map(|l| l.strip_prefix("API key ")).unwrap().trim().to_owned();
    let file = dir.join("one.txt");
    std::fs::write(&file, b"nothing to see\n").unwrap();
    let out = cella(&server.data, Some(&key), &["scan", file.to_str().unwrap(), "--wait-secs", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("is still running after 2 s") && stderr.contains("cella job show"), "{stderr}");
    // Helpful refusals: http:// and an untrusted certificate say what to do.
    let bare = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_cella"))
            .args(["scan", file.to_str().unwrap()])
            .env("CELLA_URL", url)
            .env("CELLA_API_KEY", &key)
            .env("CELLA_DATA_DIR", dir.join("no-such-data"))
            .env_remove("CELLA_CA")
            .output()
            .unwrap()
    };
    let out = bare(&server.url.replace("https://", "http://"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Cella serves HTTPS only; use https://"), "{stderr}");
    let out = bare(&server.url);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("not signed by a CA this client trusts; pass --ca FILE"), "{stderr}");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A VMM that does not end at its time limit (a hostile or wedged one; here one stopped with
/// SIGSTOP while its guest spins) is killed by the worker `KILL_GRACE` (30 s) after the limit:
/// its job fails with the reason, the process is gone, and the slot serves the next job.
#[sqlx::test(migrations = "../migrations")]
async fn a_job_vmm_that_never_ends_is_killed_after_its_time_limit_and_the_slot_serves_on(pool: PgPool) {
    let dir = scratch("wedged");
    let spin = spinning_vmm(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("cella.toml"), "[worker]\ntimeout_secs = 2\n\n[jobs]\nmax_attempts = 1\n")
        .unwrap();
    let server = serve(
        &data,
        Some(&test_db_url(&pool)),
        &[
            ("CELLA_VMM", spin.to_str().unwrap()),
            ("CELLA_JAILED", "0"),
            ("CELLA_WORKER_CONCURRENCY", "1"),
            ("CELLA_TEMPLATES", "0"),
        ],
    );
    let (tenant, _, client) = server.tenant("acme").await;
    let id = submit(&client, b"anything", None).await.unwrap();
    wait_for_action(&pool, &tenant, "job.vm_started").await;
    let vms = server.admin().json(Method::GET, "/v1/admin/vms").await.unwrap();
    let pid = vms.as_array().unwrap().iter().find(|v| v["job_id"] == id.as_str()).expect("the VM is listed")
        ["pid"]
        .as_i64()
        .unwrap();
    // SAFETY: a plain signal to the VMM this test's server started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let job = wait_job(&client, &id, "ended", |j| j["state"] != "running").await;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = "the scan's VM did not end within its time limit and was killed";
    assert_eq!(job["error"], reason, "{job}");
    // Not the VMM's own limit (it could not act): the worker's kill, after the grace.
    assert!(stopped.elapsed() > Duration::from_secs(25), "ended after {:?}: {job}", stopped.elapsed());
    wait_until_gone(pid).await;
    let names: Vec<String> = actions(&pool, &tenant).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(names.last().map(String::as_str), Some("job.failed"), "{names:?}");

    // The slot is free: the next job gets a VM, which ends at its time limit by itself.
    let next = submit(&client, b"anything", None).await.unwrap();
    let started = Instant::now();
    let done = wait_job(&client, &next, "ended", |j| j["state"] == "failed").await;
    assert!(done["error"].as_str().unwrap().contains("ran past its limit of 2 s"), "{done}");
    assert!(started.elapsed() < Duration::from_secs(25), "the next job took {:?}", started.elapsed());
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Checks every thread of the VMM waiting in the spare jail `spare` (up to 20 s for it to get
/// there): no capabilities, no-new-privs, a seccomp filter; returns its uid.
fn spare_vmm_confined(spare: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let root = Path::new("/dev/shm/cella-jailer/cella-vmm").join(spare).join("root");
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let field = |status: &str, name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().trim().to_owned()
    };
    let start = Instant::now();
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            // A jailed process's root is its jail's root folder (seen through /proc/PID/root/).
            if id(&entry.path().join("root/")).is_none_or(|r| Some(r) != id(&root)) {
                continue;
            }
            let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else { continue };
            let statuses: Vec<String> = tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                .collect();
            // Both threads (main and API) up, both under their filters.
            if statuses.len() < 2 || statuses.iter().any(|s| field(s, "Seccomp:") != "2") {
                continue;
            }
            for status in &statuses {
                assert_eq!(field(status, "NoNewPrivs:"), "1", "{status}");
                for caps in ["CapPrm:", "CapEff:", "CapBnd:"] {
                    assert_eq!(field(status, caps), "0000000000000000", "{caps} {status}");
                }
            }
            let uid = field(&statuses[0], "Uid:");
            return uid.split_whitespace().next().and_then(|u| u.parse().ok()).expect("a uid");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no confined VMM waits in {spare}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `tenant`'s audit log holds `action`.
async fn wait_for_action(pool: &PgPool, tenant: &str, action: &str) {
    let start = Instant::now();
    while !actions(pool, tenant).await.iter().any(|(a, _)| a == action) {
        assert!(start.elapsed() < Duration::from_secs(60), "no {action} event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until_gone(pid: i64) {
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (if still running) when the test ends, pass or fail.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(data: &Path, db: &str, vmm: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_cella"))
            .args(["worker", "--concurrency", "1", "--data-dir"])
            .arg(data)
            .env("DATABASE_URL", db)
            .env("CELLA_VMM", vmm)
            .env("CELLA_JAILED", "0")
            .env("CELLA_LEASE_SECS", "2")
            .env("CELLA_DRAIN_SECS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

#[sqlx::test(migrations = "../migrations")]
async fn a_worker_killed_mid_job_loses_its_lease_and_another_finishes_the_job(pool: PgPool) {
    let dir = scratch("sigkill");
    let db = test_db_url(&pool);
    let server = serve(&dir.join("data"), Some(&db), &[("CELLA_WORKER", "0")]);
    let (tenant, _, client) = server.tenant("acme").await;
    let id = submit(&client, &sample_tar(), None).await.unwrap();
    let mut stuck = start_worker(&server.data, &db, &spinning_vmm(&dir));
    wait_for_action(&pool, &tenant, "job.vm_started").await;
    let first_pid: i32 =
        sqlx::query_scalar("SELECT vm_pid FROM jobs WHERE id = $1").bind(&id).fetch_one(&pool).await.unwrap();
    signal(&stuck.0, "KILL");
    stuck.0.wait().unwrap();
    // Its VM does not outlive it.
    wait_until_gone(first_pid.into()).await;
    let mut rescuer = start_worker(&server.data, &db, &vmm());
    let job = wait_job(&client, &id, "succeeded", |j| j["state"] == "succeeded").await;
    assert_eq!((job["attempt"].as_i64(), job["findings"].as_i64()), (Some(2), Some(5)));
    let events = actions(&pool, &tenant).await;
    let count = |a: &str| events.iter().filter(|(x, _)| x == a).count();
    assert_eq!(
        (count("job.leased"), count("job.lease_expired"), count("job.succeeded")),
        (2, 1, 1),
        "{events:?}"
    );
    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE sarif IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(results, 1);
    signal(&rescuer.0, "TERM");
    assert!(rescuer.0.wait().unwrap().success());
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn sigterm_drains_a_worker_and_hands_its_running_job_back(pool: PgPool) {
    let dir = scratch("drain");
    let db = test_db_url(&pool);
    let server = serve(&dir.join("data"), Some(&db), &[("CELLA_WORKER", "0")]);
    let (tenant, _, client) = server.tenant("acme").await;
    let id = submit(&client, b"x", None).await.unwrap();
    let mut worker = start_worker(&server.data, &db, &spinning_vmm(&dir));
    wait_for_action(&pool, &tenant, "job.vm_started").await;
    signal(&worker.0, "TERM");
    assert!(worker.0.wait().unwrap().success(), "the worker exits cleanly after draining");
    let job = job(&client, &id).await;
    assert_eq!(job["state"], "queued", "{job}");
    let names: Vec<String> = actions(&pool, &tenant).await.into_iter().map(|(a, _)| a).collect();
    assert!(names.ends_with(&["job.scrubbed".to_owned(), "job.handed_back".to_owned()]), "{names:?}");
    let stopped: Option<bool> =
        sqlx::query_scalar("SELECT stopped_at IS NOT NULL FROM workers").fetch_optional(&pool).await.unwrap();
    assert_eq!(stopped, Some(true));
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn restarting_postgres_while_jobs_flow_loses_none_and_runs_none_twice() {
    let dir = scratch("pg-restart");
    // The private cluster `cella serve` runs itself, so restarting it disturbs no other test.
    let server = serve(&dir.join("data"), None, &[("CELLA_JAILED", "0"), ("CELLA_WORKER_CONCURRENCY", "2")]);
    let (_, _, client) = server.tenant("acme").await;
    let artifact = sample_tar();
    let mut ids = Vec::new();
    for i in 0..12 {
        if i == 4 {
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_ctl())
                .arg("-D")
                .arg(server.data.join("postgres/data"))
                .args(["-m", "fast", "-w", "restart"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        }
        // A client retries a failed submission with the same Idempotency-Key.
        let key = format!("submission-{i}");
        let start = Instant::now();
        let id = loop {
            match submit(&client, &artifact, Some(&key)).await {
                Ok(id) => break id,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(60), "submission {i} kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        ids.push(id);
    }
    for id in &ids {
        let job =
            wait_job(&client, id, "ended", |j| matches!(j["state"].as_str(), Some("succeeded" | "failed")))
                .await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // Exactly one completion per job, in the database and in the audit log.
    let options = cella_service::postgres::PrivatePostgres::attach(&server.data).unwrap();
    let pool = sqlx::PgPool::connect_with(options).await.unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&pool).await.unwrap();
    assert_eq!(jobs, ids.len() as i64, "no job was lost or created twice");
    for id in &ids {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'job.succeeded' AND body LIKE $1",
        )
        .bind(format!("%\"{id}\"%"))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(done, 1, "job {id} completed {done} times");
    }
    pool.close().await;
    let mut server = server;
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pg_ctl() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .map(|e| e.unwrap().path().join("bin/pg_ctl"))
        .collect();
    versions.sort();
    versions.pop().unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_rejected_upload_gets_its_answer_while_the_client_is_still_sending(pool: PgPool) {
    let dir = scratch("rejected-upload");
    let server = serve(
        &dir.join("data"),
        Some(&test_db_url(&pool)),
        &[("CELLA_WORKER", "0"), ("CELLA_MAX_ARTIFACT_BYTES", "65536")],
    );
    let (_, _, client) = server.tenant("acme").await;
    // Answered before the body is read: too large by Content-Length, and a bad parameter. The
    // server reads and drops the rest as it closes, so the answer reaches the client every time
    // instead of a broken connection.
    for (query, status) in [("?policy=secrets", 413u16), ("?policy=no-such-pack", 422)] {
        for round in 0..5 {
            let body = vec![b'a'; 2 << 20];
            let request = client.request(Method::POST, &format!("/v1/jobs{query}")).body(body);
            match client.send(request).await {
                Err(cella_service::client::ClientError::Api { status: got, .. }) => {
                    assert_eq!(got.as_u16(), status, "{query}, round {round}")
                }
                other => panic!("{query}, round {round}: {other:?}"),
            }
        }
    }
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn a_restart_after_sigkill_removes_the_leftovers_but_not_a_running_jobs_files(pool: PgPool) {
    let dir = scratch("leftovers");
    let db = test_db_url(&pool);
    let mut server = serve(&dir.join("data"), Some(&db), &[("CELLA_WORKER", "0")]);
    let (_, _, client) = server.tenant("acme").await;
    let running = submit(&client, b"one", None).await.unwrap();
    let queued = submit(&client, b"two", None).await.unwrap();
    let ended = submit(&client, b"three", None).await.unwrap();
    client.json(Method::POST, &format!("/v1/jobs/{ended}/cancel")).await.unwrap();
    // A `cella worker` elsewhere, sharing the data folder, runs `running` and writes its log.
    let lease = cella_service::queue::lease(&pool, "worker_elsewhere", Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((lease.job_id.as_str(), lease.attempt), (running.as_str(), 1));
    let data = server.data.clone();
    let (work, artifacts) = (data.join("work"), data.join("artifacts"));
    let sarif = cella_service::janitor::sarif_name;
    let keep = [work.join(sarif(&running, 1)), artifacts.join(&running), artifacts.join(&queued)];
    let leftovers = [
        // A worker killed mid-scan: the log of an attempt no worker runs, of a job now queued.
        work.join(sarif(&queued, 1)),
        work.join(sarif(&ended, 1)),
        // A file on its way into a session when serve was killed.
        work.join("session_0123456789abcdef0123456789abcdef-add-0011223344556677.part"),
        work.join("session_0123456789abcdef0123456789abcdef-add-8899aabbccddeeff"),
        // An upload stored just before serve was killed (no job), one half-written, and the
        // artifact of a job that ended.
        artifacts.join(cella_service::ids::new_id("job")),
        artifacts.join(format!("{}.part", cella_service::ids::new_id("job"))),
        artifacts.join(&ended),
        // Keys and certificates a start killed while writing them left half-written.
        data.join("admin.key.tmp"),
        data.join("tls/ca.key.tmp"),
    ];
    for path in leftovers.iter().chain(keep.iter().take(1)) {
        std::fs::write(path, b"").unwrap();
    }
    let mut child = server.child.take().unwrap();
    signal(&child, "KILL");
    child.wait().unwrap();
    let server = serve(&data, Some(&db), &[("CELLA_WORKER", "0")]);
    for path in &leftovers {
        assert!(!path.exists(), "{} is still there after the restart", path.display());
    }
    for path in &keep {
        assert!(path.exists(), "{} was removed, but its job runs or waits", path.display());
    }
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn control_characters_in_an_archive_entry_name_reach_no_message_raw(pool: PgPool) {
    let dir = scratch("control-chars");
    let server = serve(&dir.join("data"), Some(&test_db_url(&pool)), &[("CELLA_JAILED", "0")]);
    let data = server.data.clone();
    let out = cella(&data, None, &["tenant", "create", "acme"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let tenant = stdout.lines().find_map(|l| l.strip_prefix("tenant  ")).unwrap().trim().to_owned();
    let key = stdout.lines().find_map(|l| l.strip_prefix("API key ")).unwrap().trim().to_owned();
    // An entry that would clear the screen, ring the bell and overwrite its own line.
    let evil = dir.join("evil.tar");
    std::fs::write(&evil, cella_e2e::ustar(&[("../\x1b[2J\x07owned\r", b"x")])).unwrap();
    let out = cella(&data, Some(&key), &["scan", evil.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = "artifact entry `../\\x1b[2J\\x07owned\\r` escapes the archive root";
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(shown), "{stderr}");
    assert!(!stderr.contains(['\x1b', '\x07', '\r']), "{stderr:?}");
    // Stored, answered and audited escaped too.
    let error: String = sqlx::query_scalar("SELECT error FROM jobs").fetch_one(&pool).await.unwrap();
    assert_eq!(error, format!("artifact refused: {shown}"));
    let id: String = sqlx::query_scalar("SELECT id FROM jobs").fetch_one(&pool).await.unwrap();
    let client = ApiClient::new(&server.url, &key, Some(&server.ca)).unwrap();
    assert_eq!(job(&client, &id).await["error"], error.as_str());
    let failed = actions(&pool, &tenant).await.into_iter().find(|(a, _)| a == "job.failed").unwrap().1;
    assert_eq!(failed["details"]["reason"], error.as_str());
    // `cella job ls` prints it as stored.
    let out = cella(&data, Some(&key), &["job", "ls"]);
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.contains(shown) && !listed.contains(['\x1b', '\x07', '\r']), "{listed:?}");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
