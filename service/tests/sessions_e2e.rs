//! Sessions end to end: the real `cella serve` over HTTPS, real `cella-vmm session` processes
//! on /dev/kvm with the session-mode scanner guest, jailed by the real `cella-jailer` (the
//! service's default under root), a fresh PostgreSQL database per test. A session keeps its
//! index across pause/resume and suspend/restore on a new VMM process; the idle policy and the
//! maximum duration are enforced; a SIGKILLed `serve` re-adopts its sessions (the jailed VMMs
//! live on); every session VMM runs confined as a jail uid of its own, and leaves no jail and
//! no files behind; every transition is in the tenant's audit chain, which verifies offline.
//!
//! They need the session-mode scanner image (`bash scripts/build-guest.sh`, which
//! `scripts/test.sh` runs), `DATABASE_URL`, and root.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cella_service::client::{ApiClient, ClientError};
use common::{assert_confined, jail_leftovers, jailed_vmm, sample_tar, test_db_url, Scratch, Serve, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;

/// `cella serve` with no worker and a reaper that looks every 200 ms.
fn serve(data: &Path, db: &str, env: &[(&str, &str)]) -> Server {
    Serve::new(data)
        .db(Some(db))
        .arg("--no-worker")
        .env_remove("CELLA_JAILED")
        .env("CELLA_SESSIONS_REAPER_INTERVAL_MS", "200")
        .envs(env)
        .start()
}

async fn create(client: &ApiClient, query: &str) -> Value {
    let req = client.request(Method::POST, &format!("/v1/sessions{query}")).body(sample_tar());
    let s: Value = client.send(req).await.unwrap().json().await.unwrap();
    assert_eq!(s["state"], "running", "{s}");
    s
}

async fn exec(client: &ApiClient, id: &str, request: Value) -> Result<Value, ClientError> {
    client.post_json(&format!("/v1/sessions/{id}/exec"), &request).await
}

async fn post(client: &ApiClient, id: &str, action: &str) -> Value {
    client.json(Method::POST, &format!("/v1/sessions/{id}/{action}")).await.unwrap()
}

async fn session(client: &ApiClient, id: &str) -> Value {
    client.json(Method::GET, &format!("/v1/sessions/{id}")).await.unwrap()
}

async fn wait_state(client: &ApiClient, id: &str, state: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let s = session(client, id).await;
        if s["state"] == state {
            return s;
        }
        assert!(start.elapsed() < within, "session {id} never became {state}: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 30 s) for the spare session VMM in `spares` to answer on its control socket;
/// returns its folder's name.
async fn wait_for_session_spare(spares: &Path) -> String {
    let start = std::time::Instant::now();
    loop {
        let found = std::fs::read_dir(spares).ok().and_then(|d| {
            d.filter_map(Result::ok).filter(|e| e.path().is_dir()).find_map(|e| {
                let client = cella_host::client::ControlClient::new(e.path().join("api.sock"));
                client.state().ok().map(|_| e.file_name().to_string_lossy().into_owned())
            })
        });
        if let Some(name) = found {
            // The pool keeps it once it has answered it too.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            return name;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no spare session VMM in {}",
            spares.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The first process whose command line names `sock` (a VMM found by its control socket).
fn serving(sock: &Path) -> Option<i32> {
    let want = sock.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline.split(|b| *b == 0).any(|a| a == want).then_some(pid)
    })
}

async fn vmm_pid(pool: &PgPool, id: &str) -> Option<i32> {
    sqlx::query_scalar("SELECT vmm_pid FROM sessions WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

/// The session VMM recorded as `pid` (the jail's supervisor `serve` started) runs jailed: its
/// VMM child runs as a session jail uid (`sessions.jail_uid_base` = 65000 up), every thread
/// with no effective capability and a seccomp filter. Returns that uid.
fn assert_jailed(pid: i32) -> u32 {
    let uid = assert_confined(jailed_vmm(pid as u32));
    assert!((65_000..66_000).contains(&uid), "the session VMM runs as uid {uid}");
    uid
}

/// Nothing of session `id` is left: no jail folder or cgroup, no session folder, no VMM log.
fn assert_gone(server: &Server, id: &str) {
    assert_eq!(jail_leftovers(id), Vec::<String>::new());
    let sessions = server.data.join("sessions");
    assert!(!sessions.join(id).exists(), "the folder of {id} is left");
    assert!(!sessions.join(format!("{id}.vmm.log")).exists(), "the VMM log of {id} is left");
}

async fn actions(pool: &PgPool, tenant: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT action FROM audit_events WHERE chain = $1 ORDER BY seq")
        .bind(format!("tenant:{tenant}"))
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Exports the tenant's chain with the CLI and verifies it offline.
fn export_and_verify(server: &Server, tenant: &str, dir: &Path) -> String {
    let bundle = dir.join("audit.tar");
    let cella = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cella"))
            .args(args)
            .env("CELLA_DATA_DIR", &server.data)
            .env_remove("CELLA_URL")
            .env_remove("CELLA_CA")
            .output()
            .unwrap()
    };
    let out = cella(&["admin", "audit-export", "--tenant", tenant, "--out", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = server.data.join("audit-signing.key.pub");
    let out = cella(&["audit", "verify", bundle.to_str().unwrap(), "--trusted-key", key.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.starts_with("OK: "), "{stdout}");
    stdout
}

#[sqlx::test(migrations = "../migrations")]

async fn a_session_keeps_its_index_across_pause_suspend_and_restore(pool: PgPool) {
    let dir = Scratch::new("life");
    let server = serve(&dir.join("data"), &test_db_url(&pool), &[]);
    let (tenant, _, client) = server.tenant("acme").await;
    let s = create(&client, "?name=sample-app.tar&read_policy=redact").await;
    let id = s["id"].as_str().unwrap().to_owned();

    // Queries on the indexed artifact.
    let stats = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    assert_eq!(
        (stats["index_builds"].as_u64(), stats["artifact_name"].is_string()),
        (Some(1), true),
        "{stats}"
    );
    // Under `redact` grep searches the masked text: the key's line is found by its name, with
    // the key masked, and never by the key itself.
    let grep = exec(&client, &id, json!({"op": "grep", "pattern": "stripe_key"})).await.unwrap();
    let lines = grep["result"]["matches"].as_array().unwrap();
    assert!(!lines.is_empty(), "{grep}");
    assert!(lines.iter().all(|m| !m["text"].as_str().unwrap().contains("sk_live_")), "{grep}");
    let secret = exec(&client, &id, json!({"op": "grep", "pattern": "sk_live_[0-9a-zA-Z]+"})).await.unwrap();
    assert!(secret["result"]["matches"].as_array().unwrap().is_empty(), "{secret}");
    let scan = exec(&client, &id, json!({"op": "scan", "policy_name": "secrets,pii"})).await.unwrap();
    assert!(scan["result"]["findings"].as_u64().unwrap() >= 2, "{scan}");
    assert_eq!(scan["sarif"]["version"], "2.1.0");

    // Paused: exec is refused with what to do; resumed: the same index answers.
    assert_eq!(post(&client, &id, "pause").await["state"], "paused");
    match exec(&client, &id, json!({"op": "stats"})).await {
        Err(ClientError::Api { status: StatusCode::CONFLICT, detail }) => {
            assert!(detail.contains("resume it first"), "{detail}")
        }
        other => panic!("exec on a paused session: {other:?}"),
    }
    assert_eq!(post(&client, &id, "resume").await["state"], "running");
    let again = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    assert_eq!(again["index_id"], stats["index_id"]);

    // Suspended: the VMM process ends; resumed on a new one with the same index and answers.
    let first_pid = vmm_pid(&pool, &id).await.unwrap();
    assert_jailed(first_pid);
    let suspended = post(&client, &id, "suspend").await;
    assert_eq!(suspended["state"], "suspended");
    assert!(suspended["snapshot_bytes"].as_i64().unwrap() > 0, "{suspended}");
    assert!(!process_exists(first_pid), "the suspended session's VMM {first_pid} still runs");
    // The restore takes the spare session VMM serve keeps ready: already in its jail, confined,
    // waiting for the snapshot's files as descriptors.
    let spares = server.data.join("sessions").join(".spares");
    let spare = wait_for_session_spare(&spares).await;
    assert_eq!(post(&client, &id, "resume").await["state"], "running");
    let api: String = sqlx::query_scalar("SELECT api_sock FROM sessions WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(Path::new(&api), spares.join(&spare).join("api.sock"), "the restore took {spare}");
    let second_pid = vmm_pid(&pool, &id).await.unwrap();
    assert_ne!(first_pid, second_pid);
    assert_jailed(second_pid);
    let restored = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    assert_eq!(
        (restored["index_id"].clone(), restored["files"].clone()),
        (stats["index_id"].clone(), stats["files"].clone())
    );
    assert_eq!(restored["index_builds"], 1, "the index was not rebuilt: {restored}");
    let grep_again = exec(&client, &id, json!({"op": "grep", "pattern": "stripe_key"})).await.unwrap();
    assert_eq!(grep_again["result"], grep["result"]);

    // Terminated: VMM gone, files deleted.
    let gone = client.json(Method::DELETE, &format!("/v1/sessions/{id}")).await.unwrap();
    assert_eq!(gone["state"], "terminated");
    assert!(!process_exists(second_pid));
    assert_gone(&server, &id);
    assert!(!spares.join(&spare).exists(), "the spare's folder is left");
    assert_eq!(common::jail_leftovers_of(&spare), Vec::<String>::new(), "the spare's jail is left");

    let names = actions(&pool, &tenant).await;
    for action in [
        "session.created",
        "session.started",
        "session.exec",
        "session.paused",
        "session.resumed",
        "session.suspended",
        "session.restored",
        "session.terminated",
    ] {
        assert!(names.iter().any(|a| a == action), "{action} missing from {names:?}");
    }
    export_and_verify(&server, &tenant, &dir);
    drop(server);
}

#[sqlx::test(migrations = "../migrations")]

async fn an_idle_session_is_suspended_and_connect_restores_it(pool: PgPool) {
    let dir = Scratch::new("idle");
    let server = serve(&dir.join("data"), &test_db_url(&pool), &[]);
    let (tenant, _, client) = server.tenant("acme").await;
    let id = create(&client, "?idle_suspend=2").await["id"].as_str().unwrap().to_owned();
    let stats = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    wait_state(&client, &id, "suspended", Duration::from_secs(20)).await;
    let connected =
        client.json(Method::POST, &format!("/v1/sessions/{id}/connect?extend=600")).await.unwrap();
    assert_eq!(connected["state"], "running");
    let restored = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    assert_eq!(restored["index_id"], stats["index_id"]);
    assert_jailed(vmm_pid(&pool, &id).await.unwrap());
    let names = actions(&pool, &tenant).await;
    assert!(
        names.ends_with(&["session.restored".into(), "session.connected".into(), "session.exec".into()]),
        "{names:?}"
    );
    export_and_verify(&server, &tenant, &dir);
    client.json(Method::DELETE, &format!("/v1/sessions/{id}")).await.unwrap();
    assert_gone(&server, &id);
    drop(server);
}

#[sqlx::test(migrations = "../migrations")]

async fn a_session_past_its_maximum_duration_is_terminated_and_its_files_deleted(pool: PgPool) {
    let dir = Scratch::new("max");
    let server = serve(&dir.join("data"), &test_db_url(&pool), &[("CELLA_SESSIONS_MAX_DURATION_SECS", "4")]);
    let (tenant, _, client) = server.tenant("acme").await;
    let running = create(&client, "").await["id"].as_str().unwrap().to_owned();
    let suspended = create(&client, "").await["id"].as_str().unwrap().to_owned();
    post(&client, &suspended, "suspend").await;
    let pid = vmm_pid(&pool, &running).await.unwrap();
    for id in [&running, &suspended] {
        let s = wait_state(&client, id, "terminated", Duration::from_secs(20)).await;
        assert!(s["terminated_at"].is_string());
        assert_gone(&server, id);
    }
    assert!(!process_exists(pid));
    let names = actions(&pool, &tenant).await;
    assert_eq!(names.iter().filter(|a| *a == "session.terminated").count(), 2);
    export_and_verify(&server, &tenant, &dir);
    drop(server);
}

#[sqlx::test(migrations = "../migrations")]

async fn a_sigkilled_serve_re_adopts_its_sessions_on_restart(pool: PgPool) {
    let dir = Scratch::new("adopt");
    let data = dir.join("data");
    let db = test_db_url(&pool);
    let mut server = serve(&data, &db, &[]);
    let (tenant, key, client) = server.tenant("acme").await;
    let id = create(&client, "").await["id"].as_str().unwrap().to_owned();
    let stats = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    let pid = vmm_pid(&pool, &id).await.unwrap();
    let uid = assert_jailed(pid);
    let jailed = jailed_vmm(pid as u32);
    let spares = data.join("sessions").join(".spares");
    let spare = wait_for_session_spare(&spares).await;
    let spare_sock = spares.join(&spare).join("api.sock");
    let spare_pid = serving(&spare_sock).expect("the spare session VMM's supervisor");
    server.kill();
    assert!(process_exists(pid), "the jail's supervisor died with serve");
    assert!(process_exists(jailed as i32), "the jailed session VMM died with serve");
    assert!(process_exists(spare_pid), "the spare died with serve");

    let server = serve(&data, &db, &[]);
    // The spare the killed serve kept is ended (no session took it), its folder and jail gone.
    let start = std::time::Instant::now();
    while process_exists(spare_pid) || spares.join(&spare).exists() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the old spare {spare} is left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    while !common::jail_leftovers_of(&spare).is_empty() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the old spare's jail is left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let client = server.client(&key);
    assert_eq!(session(&client, &id).await["state"], "running");
    assert_eq!(vmm_pid(&pool, &id).await, Some(pid));
    assert_eq!((jailed_vmm(pid as u32), assert_jailed(pid)), (jailed, uid), "a new VMM, or a new uid");
    let after = exec(&client, &id, json!({"op": "stats"})).await.unwrap()["result"].clone();
    assert_eq!(after["index_id"], stats["index_id"]);
    assert!(actions(&pool, &tenant).await.contains(&"session.adopted".to_owned()));
    // The adopted VMM is driven like any other.
    assert_eq!(post(&client, &id, "suspend").await["state"], "suspended");
    assert!(!process_exists(pid));
    assert_eq!(post(&client, &id, "resume").await["state"], "running");
    assert_jailed(vmm_pid(&pool, &id).await.unwrap());
    export_and_verify(&server, &tenant, &dir);
    client.json(Method::DELETE, &format!("/v1/sessions/{id}")).await.unwrap();
    assert_gone(&server, &id);
    drop(server);
}
