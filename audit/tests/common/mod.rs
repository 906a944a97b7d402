//! Helpers shared by the audit integration tests (real PostgreSQL through `sqlx::test`).
#![allow(dead_code)]

use cella_audit::bundle::{self, Bundle, CheckpointsFile};
use cella_audit::canonical;
use cella_audit::checkpoint::CheckpointPolicy;
use cella_audit::event::{export_line, split_line};
use cella_audit::export::{export, ExportRequest};
use cella_audit::hash::{self, Hash};
use cella_audit::store::{append, cut_checkpoint};
use cella_audit::verify::{verify_bundle, verify_tar, Failure, Options, Report, VerifyError};
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
    let mut out = Vec::new();
    export(pool, &ExportRequest { chain, from: None, to: None, ocsf: false }, &mut out).await.unwrap();
    Bundle::read(&out[..]).unwrap()
}

/// Verifies `b` in memory, and streamed from its tar file, which must say the same.
pub fn verify(b: &Bundle, trusted: &[PublicKey]) -> Result<Report, Failure> {
    let options = Options { trusted: trusted.to_vec(), threads: 2 };
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
