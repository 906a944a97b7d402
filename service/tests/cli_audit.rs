//! Runs the real `cella` binary: keygen, checkpoint and export against a real PostgreSQL
//! database (one per test, from `sqlx::test`), then verify and prove, checking exit statuses
//! and output: OK only against a trusted key, UNTRUSTED (exit 1) against the bundle's own keys,
//! a usage error (exit 2) without any key, FAILED (exit 1) for forged bundles.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cella_audit::bundle::{Bundle, CheckpointsFile, KeyJson, KeysFile, Manifest};
use cella_audit::checkpoint::Checkpoint;
use cella_audit::store::append;
use cella_audit::{Actor, NewEvent, Resource, SigningKey, TenantId};
use serde_json::json;
use sqlx::PgPool;

fn cella(args: &[&str], db: Option<&str>) -> Output {
    cella_env(args, db, &[])
}

fn cella_env(args: &[&str], db: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cella"));
    cmd.args(args)
        .env_remove("CELLA_AUDIT_KEY")
        .env_remove("CELLA_AUDIT_TRUSTED_KEY")
        .envs(env.iter().copied());
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

async fn append_events(pool: &PgPool, range: std::ops::Range<u32>) {
    for i in range {
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
}

/// 30 events for tenant `acme`, a key `k1`, a checkpoint, and an exported bundle.
async fn exported(pool: &PgPool, name: &str) -> (PathBuf, PathBuf) {
    append_events(pool, 0..30).await;
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
    assert_eq!(o.status.code(), Some(2), "no trusted key");
    assert!(stderr(&o).starts_with("cella: no trusted key: pass --trusted-key FILE"), "{}", stderr(&o));
    assert!(!proof.exists());
    let o = cella(
        &["audit", "prove", p(&bundle), "--seq", "12", "--out", p(&proof), "--trusted-key", p(&public)],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cella(&["audit", "verify", p(&proof), "--trusted-key", p(&public)], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "OK: event 12 of tenant:acme is included in checkpoint 1 (tree size 30), key(s) k1\n"
    );
    // The proof's own key: checked, never OK.
    let o = cella(&["audit", "verify", p(&proof), "--insecure-trust-bundle-keys"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "UNTRUSTED: event 12 of tenant:acme is included in checkpoint 1 (tree size 30), key(s) k1 from the proof itself\n"
    );
    // Proving against the bundle's own keys writes the proof but exits 1, saying so.
    let o = cella(&["audit", "prove", p(&bundle), "--seq", "12", "--insecure-trust-bundle-keys"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with('{'), "the proof still goes to stdout: {}", stdout(&o));
    assert!(stderr(&o).starts_with("UNTRUSTED: the proof of event 12"), "{}", stderr(&o));
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn verify_without_a_trusted_key_refuses_to_say_ok_and_exits_2(pool: PgPool) {
    let (bundle, _) = exported(&pool, "nokey").await;
    let o = cella(&["audit", "verify", p(&bundle)], None);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).starts_with(
            "cella: no trusted key: pass --trusted-key FILE with the server's audit public key \
             (`cella audit download` saves it next to the bundle as cella-audit-<key id>.pub"
        ),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn verify_takes_pinned_keys_from_cella_audit_trusted_key(pool: PgPool) {
    let (bundle, public) = exported(&pool, "envkey").await;
    let dir = bundle.parent().unwrap();
    let other = dir.join("k0.key");
    assert!(cella(&["audit", "keygen", "--id", "k0", "--out", p(&other)], None).status.success());
    let both = format!("{}.pub:{}", p(&other), p(&public));
    let o = cella_env(&["audit", "verify", p(&bundle)], None, &[("CELLA_AUDIT_TRUSTED_KEY", &both)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "OK: 30 events, seq 1..30, 1 checkpoints, key(s) k1\n");
    // Only the other key pinned: k1 is not trusted.
    let only_other = format!("{}.pub", p(&other));
    let o = cella_env(&["audit", "verify", p(&bundle)], None, &[("CELLA_AUDIT_TRUSTED_KEY", &only_other)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "FAILED: checkpoint 1: key k1 is not trusted\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn verify_against_the_bundles_own_keys_says_untrusted_and_exits_1(pool: PgPool) {
    let (bundle, public) = exported(&pool, "insecure").await;
    let o = cella(&["audit", "verify", p(&bundle), "--insecure-trust-bundle-keys"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "UNTRUSTED: 30 events, seq 1..30, 1 checkpoints, key(s) k1 from the bundle itself\n"
    );
    assert!(stderr(&o).contains("proves nothing about who made it"), "{}", stderr(&o));
    // Not with a trusted key at the same time.
    let o = cella(
        &["audit", "verify", p(&bundle), "--insecure-trust-bundle-keys", "--trusted-key", p(&public)],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

fn read_bundle(path: &Path) -> Bundle {
    Bundle::read(&std::fs::read(path).unwrap()[..]).unwrap()
}

fn write_bundle(b: &Bundle, path: &Path) {
    let mut out = Vec::new();
    b.write(&mut out).unwrap();
    std::fs::write(path, out).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn bundle_with_its_checkpoints_stripped_fails_with_and_without_a_trusted_key(pool: PgPool) {
    let (bundle, public) = exported(&pool, "stripped").await;
    let mut b = read_bundle(&bundle);
    b.files.insert("checkpoints.json".into(), br#"{"checkpoints":[]}"#.to_vec());
    let mut manifest: Manifest = serde_json::from_slice(&b.files["manifest.json"]).unwrap();
    manifest.counts.checkpoints = 0;
    b.files.insert("manifest.json".into(), serde_json::to_vec(&manifest).unwrap());
    b.refresh_manifest();
    write_bundle(&b, &bundle);
    let want = "FAILED: event 1: not covered by a signed checkpoint (the bundle holds no checkpoint)\n";
    for trust in [vec!["--trusted-key", p(&public)], vec!["--insecure-trust-bundle-keys"]] {
        let o = cella(&[&["audit", "verify", p(&bundle)][..], &trust].concat(), None);
        assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(1), want), "{trust:?}");
    }
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn bundle_resigned_with_a_fresh_key_under_the_real_id_is_never_ok(pool: PgPool) {
    let (bundle, public) = exported(&pool, "resigned").await;
    let forger = SigningKey::generate("k1").unwrap();
    let mut b = read_bundle(&bundle);
    let mut cps: CheckpointsFile = serde_json::from_slice(&b.files["checkpoints.json"]).unwrap();
    for entry in &mut cps.checkpoints {
        let cp = entry.checkpoint.decode().unwrap();
        entry.checkpoint =
            Checkpoint::sign(&cp.chain, cp.index, cp.tree_size, cp.root, cp.time, &forger).to_json();
    }
    b.files.insert("checkpoints.json".into(), serde_json::to_vec(&cps).unwrap());
    let keys = KeysFile { keys: vec![KeyJson::new(&forger.public(), None, None)] };
    b.files.insert("keys.json".into(), serde_json::to_vec(&keys).unwrap());
    b.refresh_manifest();
    write_bundle(&b, &bundle);
    let o = cella(&["audit", "verify", p(&bundle), "--trusted-key", p(&public)], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "FAILED: keys.json: key k1 is not the trusted key k1\n");
    let o = cella(&["audit", "verify", p(&bundle), "--insecure-trust-bundle-keys"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("UNTRUSTED: ") && !stdout(&o).contains("OK"), "{}", stdout(&o));
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn export_stops_at_the_newest_checkpoint_and_refuses_a_to_beyond_it(pool: PgPool) {
    let (bundle, public) = exported(&pool, "clamp").await;
    append_events(&pool, 30..35).await;
    let url = test_db_url(&pool);
    let o = cella(&["audit", "export", "--tenant", "acme", "--out", p(&bundle)], Some(&url));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(
            "note: events 31..35 are not yet covered by a signed checkpoint, so the bundle stops at 30; \
             --sign-with KEY_FILE cuts a checkpoint first and exports them too\n"
        ),
        "{}",
        stderr(&o)
    );
    let o = cella(&["audit", "verify", p(&bundle), "--trusted-key", p(&public)], None);
    assert_eq!(stdout(&o), "OK: 30 events, seq 1..30, 1 checkpoints, key(s) k1\n");

    let o = cella(&["audit", "export", "--tenant", "acme", "--to", "33", "--out", p(&bundle)], Some(&url));
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "cella: event 33 of tenant:acme is not yet covered by a signed checkpoint (the newest covers 1..30); \
         export up to 30, or cut a checkpoint first (`cella audit export --sign-with KEY_FILE` cuts one as part \
         of the export)\n"
    );
    // Cutting one first: up to 33, with checkpoint 2 (size 35) and its tail proof.
    let key = public.with_extension("");
    let o = cella(
        &["audit", "export", "--tenant", "acme", "--to", "33", "--sign-with", p(&key), "--out", p(&bundle)],
        Some(&url),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = cella(&["audit", "verify", p(&bundle), "--trusted-key", p(&public)], None);
    assert_eq!(stdout(&o), "OK: 33 events, seq 1..33, 2 checkpoints, key(s) k1\n");
    std::fs::remove_dir_all(bundle.parent().unwrap()).unwrap();
}

#[test]
fn verify_of_a_missing_file_exits_2() {
    let o = cella(&["audit", "verify", "/nonexistent/bundle.tar", "--insecure-trust-bundle-keys"], None);
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

#[test]
fn keygen_and_fingerprint_print_the_same_sha256_fingerprint() {
    let dir = temp_dir("fingerprint");
    let key = dir.join("k7.key");
    let o = cella(&["audit", "keygen", "--id", "k7", "--out", p(&key)], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let public = cella_audit::PublicKey::read(&dir.join("k7.key.pub")).unwrap();
    let fingerprint = public.fingerprint();
    // SHA256: and 43 characters of unpadded base64 (32 bytes).
    assert!(fingerprint.starts_with("SHA256:") && fingerprint.len() == 7 + 43, "{fingerprint}");
    assert!(stderr(&o).ends_with(&format!("(fingerprint {fingerprint})\n")), "{}", stderr(&o));
    let o = cella(&["audit", "fingerprint", &format!("{}.pub", p(&key))], None);
    assert_eq!((o.status.code(), stdout(&o)), (Some(0), format!("{fingerprint} (key k7)\n")));
    let o = cella(&["audit", "fingerprint", p(&key)], None);
    assert_eq!(o.status.code(), Some(2), "a private key file is not a public key file");
    assert!(stderr(&o).contains("is not a Cella audit public key file"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}
