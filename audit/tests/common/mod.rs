//! Helpers shared by the audit integration tests (real PostgreSQL through `sqlx::test`).
#![allow(dead_code)]

use cella_audit::bundle::{self, Bundle, CheckpointsFile, KeysFile, Manifest, SeqRange};
use cella_audit::canonical;
use cella_audit::checkpoint::CheckpointPolicy;
use cella_audit::event::{export_line, split_line};
use cella_audit::export::{export, ExportRequest};
use cella_audit::hash::{self, Hash};
use cella_audit::store::{append, cut_checkpoint};
use cella_audit::verify::{verify_bundle, verify_tar, Failure, Options, Report, Trust, VerifyError};
use cella_audit::{Actor, Chain, NewEvent, PublicKey, Resource, SigningKey, TenantId};
use serde_json::{json, Value};
use sqlx::PgPool;

pub fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

pub fn event(t: &str, n: u64) -> NewEvent {
    NewEvent::tenant(
        tenant(t),
        Actor::ApiKey("key_1".into()),
        "job.created",
        Resource::new("job", format!("job-{n}")),
        json!({"n": n, "note": "hello"}),
    )
}

/// Appends one event in its own transaction.
pub async fn append_one(pool: &PgPool, e: &NewEvent) -> u64 {
    let mut tx = pool.begin().await.unwrap();
    let a = append(&mut tx, e).await.unwrap();
    tx.commit().await.unwrap();
    a.seq
}

/// Appends `n` events to `t`, forcing a checkpoint every `every` events.
pub async fn fill(pool: &PgPool, t: &str, n: u64, every: u64, key: &SigningKey) {
    for i in 1..=n {
        append_one(pool, &event(t, i)).await;
        if i % every == 0 {
            cut_checkpoint(pool, &Chain::Tenant(tenant(t)), key, CheckpointPolicy::default(), true)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

pub async fn export_bundle(pool: &PgPool, chain: Chain) -> Bundle {
    export_range(pool, chain, None, None).await
}

/// Exports seq `from..=to` of `chain` (defaults as `cella audit export` has them).
pub async fn export_range(pool: &PgPool, chain: Chain, from: Option<u64>, to: Option<u64>) -> Bundle {
    let mut out = Vec::new();
    export(pool, &ExportRequest { chain, from, to, ocsf: false }, &mut out).await.unwrap();
    Bundle::read(&out[..]).unwrap()
}

/// Cuts a checkpoint of tenant `t`'s chain now.
pub async fn cut(pool: &PgPool, t: &str, key: &SigningKey) {
    cut_checkpoint(pool, &Chain::Tenant(tenant(t)), key, CheckpointPolicy::default(), true)
        .await
        .unwrap()
        .unwrap();
}

/// Verifies `b` against the pinned keys `trusted`, in memory and streamed from its tar file,
/// which must say the same.
pub fn verify(b: &Bundle, trusted: &[PublicKey]) -> Result<Report, Failure> {
    verify_with(b, Trust::Pinned(trusted.to_vec()))
}

/// Verifies `b` against its own keys (`--insecure-trust-bundle-keys`).
pub fn verify_untrusted(b: &Bundle) -> Result<Report, Failure> {
    verify_with(b, Trust::BundleKeys)
}

/// What `cella audit verify --insecure-trust-bundle-keys` would print first.
pub fn verify_untrusted_msg(b: &Bundle) -> String {
    match verify_untrusted(b) {
        Ok(r) => r.to_string(),
        Err(f) => f.to_string(),
    }
}

fn verify_with(b: &Bundle, trust: Trust) -> Result<Report, Failure> {
    let options = Options { trust, threads: 2 };
    let in_memory = verify_bundle(b, &options);
    let mut tar = Vec::new();
    b.write(&mut tar).unwrap();
    let streamed = verify_tar(std::io::Cursor::new(tar), &options).map_err(|e| match e {
        VerifyError::Failed(f) => f,
        VerifyError::Read(e) => panic!("cannot read the bundle back: {e}"),
    });
    assert_eq!(streamed, in_memory, "streamed from a file and in memory");
    in_memory
}

pub fn verify_msg(b: &Bundle, trusted: &[PublicKey]) -> String {
    match verify(b, trusted) {
        Ok(r) => r.to_string(),
        Err(f) => f.to_string(),
    }
}

pub fn lines(b: &Bundle) -> Vec<Vec<u8>> {
    b.files[bundle::EVENTS].split(|c| *c == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

/// Replaces events.jsonl and fixes the manifest's hashes, as a forger would.
pub fn set_lines(b: &mut Bundle, lines: &[Vec<u8>]) {
    let mut data = Vec::new();
    for l in lines {
        data.extend_from_slice(l);
        data.push(b'\n');
    }
    b.files.insert(bundle::EVENTS.to_owned(), data);
    b.refresh_manifest();
}

pub fn checkpoints(b: &Bundle) -> CheckpointsFile {
    serde_json::from_slice(&b.files[bundle::CHECKPOINTS]).unwrap()
}

pub fn keys(b: &Bundle) -> KeysFile {
    serde_json::from_slice(&b.files[bundle::KEYS]).unwrap()
}

pub fn set_keys(b: &mut Bundle, keys: &KeysFile) {
    b.files.insert(bundle::KEYS.to_owned(), serde_json::to_vec_pretty(keys).unwrap());
    b.refresh_manifest();
}

/// Rewrites the manifest's range and counts to match the bundle's files, as a forger would.
pub fn rewrite_manifest(b: &mut Bundle) {
    let mut manifest: Manifest = serde_json::from_slice(&b.files[bundle::MANIFEST]).unwrap();
    let ls = lines(b);
    let seq = |l: &Vec<u8>| body_of(l)["seq"].as_u64().unwrap();
    manifest.range = SeqRange { from: seq(&ls[0]), to: seq(&ls[ls.len() - 1]) };
    manifest.counts.events = ls.len() as u64;
    manifest.counts.checkpoints = checkpoints(b).checkpoints.len() as u64;
    manifest.counts.keys = keys(b).keys.len() as u64;
    b.files.insert(bundle::MANIFEST.to_owned(), serde_json::to_vec_pretty(&manifest).unwrap());
    b.refresh_manifest();
}

/// Renumbers nothing but rechains every line from `from` (0-based) on: each `prev_hash` set to
/// the hash of the line before and each hash recomputed, so the chain itself is flawless again.
pub fn rechain(ls: &mut [Vec<u8>], from: usize) {
    let mut prev = if from == 0 { hash::GENESIS } else { hash_of(&ls[from - 1]) };
    for line in ls.iter_mut().skip(from) {
        let mut body = body_of(line);
        body["prev_hash"] = hash::to_hex(&prev).into();
        let (new_line, h) = line_for(&body);
        *line = new_line;
        prev = h;
    }
}

pub fn set_checkpoints(b: &mut Bundle, cps: &CheckpointsFile) {
    b.files.insert(bundle::CHECKPOINTS.to_owned(), serde_json::to_vec_pretty(cps).unwrap());
    b.refresh_manifest();
}

/// The event body of a line as JSON.
pub fn body_of(line: &[u8]) -> Value {
    serde_json::from_slice(split_line(line).unwrap().0).unwrap()
}

/// A line for `body`, with a correctly computed hash.
pub fn line_for(body: &Value) -> (Vec<u8>, Hash) {
    let e = canonical::to_vec(body);
    let h = hash::sha256(&e);
    let mut line = Vec::new();
    export_line(&e, &h, &mut line);
    (line, h)
}

pub fn hash_of(line: &[u8]) -> Hash {
    split_line(line).unwrap().1
}
