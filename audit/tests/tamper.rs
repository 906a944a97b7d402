//! The tamper matrix: every kind of change to an exported bundle is caught, each with its own
//! first-failure message. Each test exports a real chain of 60 events (checkpoints every 10,
//! signed with key k1) from PostgreSQL, edits the bundle as a forger would (recomputing hashes
//! and the manifest where that helps them), and verifies it against the trusted key (and, where
//! the check does not depend on whose keys, against the bundle's own keys too).

mod common;

use cella_audit::bundle::{CheckpointsFile, KeyJson, KeysFile};
use cella_audit::checkpoint::Checkpoint;
use cella_audit::hash::{self, to_hex};
use cella_audit::merkle::{leaf_hash, MerkleTree};
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
    // Against the bundle's own keys the forgery is self-consistent, which is all that says;
    // pinning the real k1 exposes it.
    assert!(verify_untrusted_msg(&b).starts_with("UNTRUSTED: 60 events"), "{}", verify_untrusted_msg(&b));
    assert_eq!(verify_msg(&b, &[key.public()]), "keys.json: key k1 is not the trusted key k1");
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

/// The Merkle tree over the bundle's events (a bundle from seq 1).
fn tree_of(b: &cella_audit::bundle::Bundle) -> MerkleTree {
    MerkleTree::new(lines(b).iter().map(|l| leaf_hash(&hash_of(l))).collect())
}

/// Event 42's details changed and every event after it rechained: a flawless chain that only
/// the signed checkpoints can tell from the real one.
fn edit_and_rechain(b: &mut cella_audit::bundle::Bundle) {
    let mut ls = lines(b);
    let mut forged = body_of(&ls[41]);
    forged["details"]["note"] = "forged".into();
    ls[41] = line_for(&forged).0;
    rechain(&mut ls, 42);
    set_lines(b, &ls);
}

/// Both verdicts: against the pinned real key, and against the bundle's own keys.
fn verdicts(b: &cella_audit::bundle::Bundle, key: &SigningKey) -> (String, String) {
    (verify_msg(b, &[key.public()]), verify_untrusted_msg(b))
}

#[sqlx::test(migrations = "../migrations")]
async fn rewritten_bundle_with_every_checkpoint_stripped_is_not_covered(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    edit_and_rechain(&mut b);
    set_checkpoints(&mut b, &CheckpointsFile { checkpoints: vec![] });
    rewrite_manifest(&mut b);
    let want = "event 1: not covered by a signed checkpoint (the bundle holds no checkpoint)";
    assert_eq!(verdicts(&b, &key), (want.to_owned(), want.to_owned()));
}

#[sqlx::test(migrations = "../migrations")]
async fn rewritten_bundle_resigned_with_a_fresh_key_under_the_trusted_id_is_never_ok(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    edit_and_rechain(&mut b);
    // Every checkpoint re-signed over the forged events by the forger's own "k1", with
    // consistency proofs to match, and keys.json holding that key.
    let forger = SigningKey::generate("k1").unwrap();
    let tree = tree_of(&b);
    let mut cps = checkpoints(&b);
    let mut prev = None;
    for entry in &mut cps.checkpoints {
        let cp = entry.checkpoint.decode().unwrap();
        let root = tree.root_at(cp.tree_size);
        entry.checkpoint =
            Checkpoint::sign(&cp.chain, cp.index, cp.tree_size, root, cp.time, &forger).to_json();
        entry.consistency_proof = prev.map_or(vec![], |old| {
            tree.consistency_proof(old, cp.tree_size).iter().map(|h| to_hex(h)).collect()
        });
        prev = Some(cp.tree_size);
    }
    set_checkpoints(&mut b, &cps);
    set_keys(&mut b, &KeysFile { keys: vec![KeyJson::new(&forger.public(), None, None)] });
    let (pinned, own) = verdicts(&b, &key);
    assert_eq!(pinned, "keys.json: key k1 is not the trusted key k1");
    assert_eq!(own, "UNTRUSTED: 60 events, seq 1..60, 6 checkpoints, key(s) k1 from the bundle itself");
}

#[sqlx::test(migrations = "../migrations")]
async fn unsigned_tail_chained_onto_the_bundle_is_not_covered(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let mut ls = lines(&b);
    for seq in 61..=64u64 {
        let mut next = body_of(&ls[ls.len() - 1]);
        next["seq"] = seq.into();
        next["details"]["n"] = seq.into();
        ls.push(line_for(&next).0);
    }
    rechain(&mut ls, 60);
    set_lines(&mut b, &ls);
    rewrite_manifest(&mut b);
    let want = "event 61: not covered by a signed checkpoint (checkpoints cover 1..60)";
    assert_eq!(verdicts(&b, &key), (want.to_owned(), want.to_owned()));
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpoint_removed_from_the_middle_is_missing(pool: PgPool) {
    let (mut b, key) = fixture(&pool).await;
    let tree = tree_of(&b);
    let mut cps = checkpoints(&b);
    cps.checkpoints.remove(2);
    // The consistency proof into checkpoint 4 mended to start from checkpoint 2.
    cps.checkpoints[2].consistency_proof = tree.consistency_proof(20, 40).iter().map(|h| to_hex(h)).collect();
    set_checkpoints(&mut b, &cps);
    rewrite_manifest(&mut b);
    let want = "checkpoint 3 is missing between checkpoints 2 and 4";
    assert_eq!(verdicts(&b, &key), (want.to_owned(), want.to_owned()));
}

#[sqlx::test(migrations = "../migrations")]
async fn forged_tail_proof_of_a_range_ending_between_checkpoints_is_invalid(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    fill(&pool, "acme", 60, 10, &key).await;
    let mut b = export_range(&pool, Chain::Tenant(tenant("acme")), Some(21), Some(45)).await;
    assert_eq!(verify_msg(&b, &[key.public()]), "OK: 25 events, seq 21..45, 4 checkpoints, key(s) k1");
    let mut cps = checkpoints(&b);
    let tail = cps.checkpoints[3].tail_proof.as_mut().unwrap();
    tail.swap(0, 1);
    set_checkpoints(&mut b, &cps);
    let want = "checkpoint 5: tail proof from events 1..45 is invalid";
    assert_eq!(verdicts(&b, &key), (want.to_owned(), want.to_owned()));
}
