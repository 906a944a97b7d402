//! The tamper matrix: every kind of change to an exported bundle is caught, each with its own
//! first-failure message. Each test exports a real chain of 60 events (checkpoints every 10,
//! signed with key k1) from PostgreSQL, edits the bundle as a forger would (recomputing hashes
//! and the manifest where that helps them), and verifies it against the trusted key.

mod common;

use cella_audit::checkpoint::Checkpoint;
use cella_audit::hash::{self, to_hex};
use cella_audit::{Chain, SigningKey};
use common::*;
use sqlx::PgPool;

async fn fixture(pool: &PgPool) -> (cella_audit::bundle::Bundle, SigningKey) {
    let key = SigningKey::generate("k1").unwrap();
    fill(pool, "acme", 60, 10, &key).await;
    (export_bundle(pool, Chain::Tenant(tenant("acme"))).await, key)
}

#[sqlx::test(migrations = "../migrations")]
async fn untouched_bundle_verifies(pool: PgPool) {
    let (b, key) = fixture(&pool).await;
    assert_eq!(verify_msg(&b, &[key.public()]), "OK: 60 events, seq 1..60, 6 checkpoints, key(s) k1");
}

#[sqlx::test(migrations = "../migrations")]
async fn changed_byte_in_details_is_a_hash_mismatch(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    let line = String::from_utf8(ls[41].clone()).unwrap().replace("hello", "hellp");
    ls[41] = line.into_bytes();
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "event 42: hash mismatch");
}

#[sqlx::test(migrations = "../migrations")]
async fn deleted_event_is_a_gap(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    ls.remove(41);
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "gap after 41");
}

#[sqlx::test(migrations = "../migrations")]
async fn inserted_forged_event_with_recomputed_hash_is_a_duplicate_seq(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    let mut forged = body_of(&ls[41]);
    forged["details"]["note"] = "forged".into();
    forged["prev_hash"] = to_hex(&hash_of(&ls[40])).into();
    ls.insert(41, line_for(&forged).0);
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "event 42: duplicate seq");
}

#[sqlx::test(migrations = "../migrations")]
async fn inserted_forged_event_with_the_rest_rechained_breaks_the_signed_root(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    let mut forged = body_of(&ls[41]);
    forged["details"]["note"] = "forged".into();
    ls.insert(41, Vec::new());
    // Renumber and re-link everything from the forged event on, recomputing every hash: the
    // chain itself is then flawless, and only the signed checkpoints can tell.
    let mut prev = hash_of(&ls[40]);
    for (i, line) in ls.iter_mut().enumerate().skip(41) {
        let mut body = if i == 41 { forged.clone() } else { body_of(line) };
        body["seq"] = (i as u64 + 1).into();
        body["prev_hash"] = to_hex(&prev).into();
        let (new_line, h) = line_for(&body);
        *line = new_line;
        prev = h;
    }
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "checkpoint 5: root hash does not match events 1..50");
}

#[sqlx::test(migrations = "../migrations")]
async fn swapped_events_are_out_of_order(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    ls.swap(41, 42);
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "event 43: out of order after 41");
}

#[sqlx::test(migrations = "../migrations")]
async fn truncated_tail_is_caught_by_the_last_checkpoint(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    ls.truncate(55);
    set_lines(&mut b, &ls);
    assert_eq!(verify_msg(&b, &[key.public()]), "truncated after 55: checkpoint 6 covers events up to 60");
}

#[sqlx::test(migrations = "../migrations")]
async fn replaced_checkpoint_signature_is_invalid(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut cps = checkpoints(&b);
    let other = SigningKey::generate("k1").unwrap();
    let cp = cps.checkpoints[2].checkpoint.decode().unwrap();
    cps.checkpoints[2].checkpoint.signature = to_hex(&other.sign(cp.signed_body().as_bytes()));
    set_checkpoints(&mut b, &cps);
    assert_eq!(verify_msg(&b, &[key.public()]), "checkpoint 3 signature invalid for key k1");
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpoints_resigned_with_an_untrusted_key_are_rejected(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let forger = SigningKey::generate("k9").unwrap();
    let mut cps = checkpoints(&b);
    for entry in &mut cps.checkpoints {
        let cp = entry.checkpoint.decode().unwrap();
        let resigned = Checkpoint::sign(&cp.chain, cp.index, cp.tree_size, cp.root, cp.time, &forger);
        entry.checkpoint = resigned.to_json();
    }
    set_checkpoints(&mut b, &cps);
    let mut keys: cella_audit::bundle::KeysFile = serde_json::from_slice(&b.files["keys.json"]).unwrap();
    keys.keys.push(cella_audit::bundle::KeyJson::new(&forger.public(), None, None));
    b.files.insert("keys.json".into(), serde_json::to_vec(&keys).unwrap());
    b.refresh_manifest();
    assert_eq!(verify_msg(&b, &[key.public()]), "checkpoint 1: key k9 is not trusted");
}

#[sqlx::test(migrations = "../migrations")]
async fn untrusted_key_posing_under_a_trusted_id_is_an_invalid_signature(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let forger = SigningKey::generate("k1").unwrap();
    let mut cps = checkpoints(&b);
    for entry in &mut cps.checkpoints {
        let cp = entry.checkpoint.decode().unwrap();
        entry.checkpoint =
            Checkpoint::sign(&cp.chain, cp.index, cp.tree_size, cp.root, cp.time, &forger).to_json();
    }
    set_checkpoints(&mut b, &cps);
    let keys = cella_audit::bundle::KeysFile {
        keys: vec![cella_audit::bundle::KeyJson::new(&forger.public(), None, None)],
    };
    b.files.insert("keys.json".into(), serde_json::to_vec(&keys).unwrap());
    b.refresh_manifest();
    // Without pinned keys the forgery is self-consistent; pinning the real k1 exposes it.
    assert!(verify(&b, &[]).is_ok());
    assert_eq!(verify_msg(&b, &[key.public()]), "checkpoint 1 signature invalid for key k1");
}

#[sqlx::test(migrations = "../migrations")]
async fn older_checkpoint_not_extended_by_the_newer_one_is_rejected(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut cps = checkpoints(&b);
    // A validly signed checkpoint from a forked history: same index and size, different root.
    let cp = cps.checkpoints[2].checkpoint.decode().unwrap();
    let fork = Checkpoint::sign(&cp.chain, cp.index, cp.tree_size, hash::sha256(b"fork"), cp.time, &key);
    cps.checkpoints[2].checkpoint = fork.to_json();
    set_checkpoints(&mut b, &cps);
    assert_eq!(verify_msg(&b, &[key.public()]), "checkpoint 3 is not extended by checkpoint 4");
}

#[sqlx::test(migrations = "../migrations")]
async fn edited_file_with_a_stale_manifest_is_reported_by_the_manifest_check(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    b.files.get_mut("keys.json").unwrap().push(b' ');
    assert_eq!(verify_msg(&b, &[key.public()]), "manifest: sha256 of keys.json does not match");
}

#[sqlx::test(migrations = "../migrations")]
async fn line_that_is_not_an_event_is_reported_with_its_line_number(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    ls[9] = b"garbage".to_vec();
    set_lines(&mut b, &ls);
    assert_eq!(
        verify_msg(&b, &[key.public()]),
        "events.jsonl line 10: not a Cella audit event (expected {\"event\":…,\"hash\":\"…\"})"
    );
}
