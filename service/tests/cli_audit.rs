//! Runs the real `cella` binary: keygen, checkpoint and export against a real PostgreSQL
//! database (one per test, from `sqlx::test`), then verify and prove, checking exit statuses
//! and output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cella_audit::store::append;
use cella_audit::{Actor, NewEvent, Resource, TenantId};
use serde_json::json;
use sqlx::PgPool;

fn cella(args: &[&str], db: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cella"));
    cmd.args(args).env_remove("CELLA_AUDIT_KEY");
    if let Some(url) = db {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The URL of this test's own database.
fn test_db_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.split_once('?').unwrap_or((&base, "")).0.rsplit_once('/').unwrap();
    format!("{server}/{}", pool.connect_options().get_database().unwrap())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cella-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// 30 events for tenant `acme`, a key `k1`, a checkpoint, and an exported bundle.
async fn exported(pool: &PgPool, name: &str) -> (PathBuf, PathBuf) {
    for i in 0..30 {
        let mut tx = pool.begin().await.unwrap();
        let e = NewEvent::tenant(
            TenantId::new("acme").unwrap(),
            Actor::ApiKey("key_1".into()),
            "job.created",
            Resource::new("job", format!("job-{i}")),
            json!({"note": "hello"}),
        );
        append(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
    }
    let url = test_db_url(pool);
    let dir = temp_dir(name);
    let key = dir.join("k1.key");
    let o = cella(&["audit", "keygen", "--id", "k1", "--out", p(&key)], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cella(&["audit", "checkpoint", "--key", p(&key), "--force"], Some(&url));
    assert_eq!(stdout(&o), "tenant:acme: checkpoint 1 at tree size 30, key k1\n", "{}", stderr(&o));
    let bundle = dir.join("acme.tar");
    let o = cella(&["audit", "export", "--tenant", "acme", "--out", p(&bundle)], Some(&url));
    assert!(o.status.success(), "{}", stderr(&o));
    (bundle, dir.join("k1.key.pub"))
}

#[sqlx::test(migrations = "../migrations")]
async fn verify_of_an_exported_bundle_prints_ok_and_exits_0(pool: PgPool) {
    let (bundle, public) = exported(&pool, "ok").await;
    let o = cella(&["audit", "verify", p(&bundle), "--trusted-key", p(&public)], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "OK: 30 events, seq 1..30, 1 checkpoints, key(s) k1\n");
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn verify_of_a_tampered_bundle_prints_the_failure_and_exits_1(pool: PgPool) {
    let (bundle, public) = exported(&pool, "tampered").await;
    let mut b = cella_audit::bundle::Bundle::read(&std::fs::read(&bundle).unwrap()[..]).unwrap();
    let events = String::from_utf8(b.files["events.jsonl"].clone()).unwrap();
    let mut lines: Vec<String> = events.lines().map(str::to_owned).collect();
    lines[6] = lines[6].replace("hello", "hellO");
    b.files.insert("events.jsonl".into(), (lines.join("\n") + "\n").into_bytes());
    let mut out = Vec::new();
    b.write(&mut out).unwrap();
    std::fs::write(&bundle, out).unwrap();
    let o = cella(&["audit", "verify", p(&bundle), "--trusted-key", p(&public)], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "FAILED: event 7: hash mismatch\n");
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn prove_writes_a_proof_that_verify_checks_alone(pool: PgPool) {
    let (bundle, public) = exported(&pool, "prove").await;
    let proof = bundle.with_file_name("seq12.json");
    let o = cella(&["audit", "prove", p(&bundle), "--seq", "12", "--out", p(&proof)], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cella(&["audit", "verify", p(&proof), "--trusted-key", p(&public)], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "OK: event 12 of tenant:acme is included in checkpoint 1 (tree size 30), key(s) k1\n"
    );
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[test]
fn verify_of_a_missing_file_exits_2() {
    let o = cella(&["audit", "verify", "/nonexistent/bundle.tar"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("cella: /nonexistent/bundle.tar: No such file"), "{}", stderr(&o));
}

#[test]
fn checkpoint_refuses_a_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perms");
    let key = dir.join("k.key");
    assert!(cella(&["audit", "keygen", "--id", "k1", "--out", p(&key)], None).status.success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = cella(&["audit", "checkpoint", "--key", p(&key)], Some("postgres://unused@localhost/none"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("has mode 0640; signing keys must be readable by their owner only"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_without_database_url_says_how_to_set_it() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cella"));
    let o = cmd
        .args(["audit", "export", "--tenant", "acme", "--out", "/tmp/x.tar"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("DATABASE_URL is not set"), "{}", stderr(&o));
}
