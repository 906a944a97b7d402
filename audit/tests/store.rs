//! The log in PostgreSQL: appends inside the caller's transaction, concurrency, tampering in
//! the database, checkpoints and key rotation, exports and proofs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cella_audit::checkpoint::CheckpointPolicy;
use cella_audit::export::{export, seq_range_for_times, Clamped, Export, ExportRequest};
use cella_audit::proof::{prove, verify_proof};
use cella_audit::store::{append, cut_checkpoint, register_key, run_checkpointer, StoreError};
use cella_audit::verify::{Options, Trust};
use cella_audit::{Actor, Chain, NewEvent, Resource, SigningKey};
use common::*;
use serde_json::json;
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

fn pinned(key: &SigningKey) -> Trust {
    Trust::Pinned(vec![key.public()])
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn eight_concurrent_writers_make_one_gapless_chain_of_10000(_: PgPoolOptions, opts: PgConnectOptions) {
    // Each append commits on its own, and commits to one chain are serialized by the head-row
    // lock, so the WAL flush of every commit would dominate this test's run time. Crash
    // durability is not what it checks (ordering and gaplessness are), so skip the flush wait.
    let opts = opts.options([("synchronous_commit", "off")]);
    let pool: PgPool = PoolOptions::<Postgres>::new().max_connections(10).connect_with(opts).await.unwrap();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..1250 {
                    append_one(&pool, &event("acme", w * 10_000 + i)).await;
                }
            })
        })
        .collect();
    // A checkpointer runs alongside the writers, as it will in the service.
    let done = Arc::new(AtomicBool::new(false));
    let key = Arc::new(SigningKey::generate("k1").unwrap());
    let checkpointer = tokio::spawn({
        let (pool, done, key) = (pool.clone(), done.clone(), key.clone());
        async move {
            let policy = CheckpointPolicy { every_events: 1000, every_secs: 3600 };
            let mut cut = 0;
            while !done.load(Ordering::Relaxed) {
                if cut_checkpoint(&pool, &Chain::Tenant(tenant("acme")), &key, policy, false)
                    .await
                    .unwrap()
                    .is_some()
                {
                    cut += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cut
        }
    });
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut cut = checkpointer.await.unwrap();
    // The export holds only signed events: sign the rest, as the service does at shutdown.
    let last =
        cut_checkpoint(&pool, &Chain::Tenant(tenant("acme")), &key, CheckpointPolicy::default(), true).await;
    cut += u64::from(last.unwrap().is_some());
    assert_eq!(count(&pool, "SELECT count(*) FROM audit_events WHERE chain = 'tenant:acme'").await, 10_000);
    assert_eq!(count(&pool, "SELECT max(seq) FROM audit_events WHERE chain = 'tenant:acme'").await, 10_000);
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    let report = verify(&b, &[key.public()]).unwrap();
    assert_eq!((report.events, report.first_seq, report.last_seq), (10_000, 1, 10_000));
    assert!(
        cut >= 2 && report.checkpoints == cut,
        "the checkpointer cut {cut} checkpoints while writers ran"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn two_tenants_have_independent_chains(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    for i in 1..=20 {
        append_one(&pool, &event("alpha", i)).await;
        if i % 2 == 0 {
            append_one(&pool, &event("beta", i)).await;
        }
    }
    cut_checkpoint(&pool, &Chain::Tenant(tenant("alpha")), &key, CheckpointPolicy::default(), true)
        .await
        .unwrap();
    cut_checkpoint(&pool, &Chain::Tenant(tenant("beta")), &key, CheckpointPolicy::default(), true)
        .await
        .unwrap();
    let a = export_bundle(&pool, Chain::Tenant(tenant("alpha"))).await;
    let b = export_bundle(&pool, Chain::Tenant(tenant("beta"))).await;
    assert_eq!(verify_msg(&a, &[key.public()]), "OK: 20 events, seq 1..20, 1 checkpoints, key(s) k1");
    assert_eq!(verify_msg(&b, &[key.public()]), "OK: 10 events, seq 1..10, 1 checkpoints, key(s) k1");
    assert!(!String::from_utf8_lossy(&a.files["events.jsonl"]).contains("beta"));
    // A bundle of one tenant's events cannot pass as another's.
    let mut mixed = b.clone();
    mixed.files.insert("events.jsonl".into(), a.files["events.jsonl"].clone());
    mixed.refresh_manifest();
    assert_eq!(verify_msg(&mixed, &[key.public()]), "event 1: belongs to tenant:alpha, not tenant:beta");
}

#[sqlx::test(migrations = "../migrations")]
async fn operator_events_go_to_their_own_chain(pool: PgPool) {
    append_one(&pool, &event("acme", 1)).await;
    let op = NewEvent::operator(
        Some(tenant("acme")),
        Actor::Admin("ops-1".into()),
        "api_key.revoked",
        Resource::new("api_key", "key_1"),
        json!({}),
    );
    assert_eq!(append_one(&pool, &op).await, 1);
    assert_eq!(append_one(&pool, &op).await, 2);
    assert_eq!(append_one(&pool, &event("acme", 2)).await, 2);
    let key = SigningKey::generate("k1").unwrap();
    cut_checkpoint(&pool, &Chain::Operator, &key, CheckpointPolicy::default(), true).await.unwrap().unwrap();
    let b = export_bundle(&pool, Chain::Operator).await;
    let r = verify(&b, &[key.public()]).unwrap();
    assert_eq!((r.chain.as_str(), r.events), ("operator", 2));
}

async fn make_state_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE state_changes (id text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn rolled_back_state_change_leaves_no_audit_event(pool: PgPool) {
    make_state_table(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO state_changes (id) VALUES ('job-1')").execute(&mut *tx).await.unwrap();
    assert_eq!(append(&mut tx, &event("acme", 1)).await.unwrap().seq, 1);
    tx.rollback().await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM state_changes").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM audit_events").await, 0);
    // The next event still gets seq 1: the rolled-back one left no hole.
    assert_eq!(append_one(&pool, &event("acme", 2)).await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn failed_audit_append_rolls_back_the_state_change(pool: PgPool) {
    make_state_table(&pool).await;
    // Someone wrote seq 1 behind the head row's back: the append must fail on the unique key.
    sqlx::query(
        "INSERT INTO audit_events (chain, seq, tenant, event_time, action, body, hash)
         VALUES ('tenant:acme', 1, 'acme', now(), 'x', '{}', decode(repeat('00', 32), 'hex'))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO state_changes (id) VALUES ('job-1')").execute(&mut *tx).await.unwrap();
    let err = append(&mut tx, &event("acme", 1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Db(_)), "{err}");
    drop(tx);
    assert_eq!(count(&pool, "SELECT count(*) FROM state_changes").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn database_refuses_update_and_delete_of_audit_rows(pool: PgPool) {
    append_one(&pool, &event("acme", 1)).await;
    let err = sqlx::query("UPDATE audit_events SET action = 'x'").execute(&pool).await.unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = sqlx::query("DELETE FROM audit_events").execute(&pool).await.unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
}

async fn tampered_db(pool: &PgPool) -> SigningKey {
    let key = SigningKey::generate("k1").unwrap();
    fill(pool, "acme", 60, 10, &key).await;
    // A database owner can switch the guard off; verification must still catch them.
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        .execute(pool)
        .await
        .unwrap();
    key
}

#[sqlx::test(migrations = "../migrations")]
async fn update_of_an_audit_row_in_the_database_is_detected_by_export_and_verify(pool: PgPool) {
    let key = tampered_db(&pool).await;
    sqlx::query("UPDATE audit_events SET body = replace(body, 'hello', 'HELLO') WHERE seq = 42")
        .execute(&pool)
        .await
        .unwrap();
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    assert_eq!(verify_msg(&b, &[key.public()]), "event 42: hash mismatch");
}

#[sqlx::test(migrations = "../migrations")]
async fn update_with_recomputed_hash_in_the_database_is_detected_by_export_and_verify(pool: PgPool) {
    let key = tampered_db(&pool).await;
    sqlx::query(
        "UPDATE audit_events SET body = replace(body, 'hello', 'HELLO'),
                hash = sha256(convert_to(replace(body, 'hello', 'HELLO'), 'UTF8')) WHERE seq = 42",
    )
    .execute(&pool)
    .await
    .unwrap();
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    assert_eq!(verify_msg(&b, &[key.public()]), "event 43: prev_hash does not match the hash of event 42");
}

#[sqlx::test(migrations = "../migrations")]
async fn delete_of_an_audit_row_in_the_database_is_detected_by_export_and_verify(pool: PgPool) {
    let key = tampered_db(&pool).await;
    sqlx::query("DELETE FROM audit_events WHERE seq = 42").execute(&pool).await.unwrap();
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    assert_eq!(verify_msg(&b, &[key.public()]), "gap after 41");
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpointer_refuses_to_sign_over_a_tampered_row(pool: PgPool) {
    let key = tampered_db(&pool).await;
    append_one(&pool, &event("acme", 61)).await;
    sqlx::query("UPDATE audit_events SET body = replace(body, 'hello', 'HELLO') WHERE seq = 61")
        .execute(&pool)
        .await
        .unwrap();
    let err = cut_checkpoint(&pool, &Chain::Tenant(tenant("acme")), &key, CheckpointPolicy::default(), true)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "chain tenant:acme is corrupt at seq 61: hash mismatch; refusing to sign a checkpoint over it"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpoint_is_cut_after_n_events(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    let chain = Chain::Tenant(tenant("acme"));
    let policy = CheckpointPolicy { every_events: 10, every_secs: 3600 };
    for i in 1..=9 {
        append_one(&pool, &event("acme", i)).await;
    }
    assert!(cut_checkpoint(&pool, &chain, &key, policy, false).await.unwrap().is_none());
    append_one(&pool, &event("acme", 10)).await;
    let cp = cut_checkpoint(&pool, &chain, &key, policy, false).await.unwrap().unwrap();
    assert_eq!((cp.index, cp.tree_size), (1, 10));
    assert!(cut_checkpoint(&pool, &chain, &key, policy, false).await.unwrap().is_none());
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpoint_is_cut_after_t_seconds(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    let chain = Chain::Tenant(tenant("acme"));
    let policy = CheckpointPolicy { every_events: 1000, every_secs: 1 };
    append_one(&pool, &event("acme", 1)).await;
    assert!(cut_checkpoint(&pool, &chain, &key, policy, false).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cp = cut_checkpoint(&pool, &chain, &key, policy, false).await.unwrap().unwrap();
    assert_eq!((cp.index, cp.tree_size), (1, 1));
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpoints_across_a_key_rotation_verify(pool: PgPool) {
    let k1 = SigningKey::generate("k1").unwrap();
    let k2 = SigningKey::generate("k2").unwrap();
    fill(&pool, "acme", 20, 10, &k1).await;
    for i in 21..=40 {
        append_one(&pool, &event("acme", i)).await;
        if i % 10 == 0 {
            cut_checkpoint(&pool, &Chain::Tenant(tenant("acme")), &k2, CheckpointPolicy::default(), true)
                .await
                .unwrap();
        }
    }
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    let keys: cella_audit::bundle::KeysFile = serde_json::from_slice(&b.files["keys.json"]).unwrap();
    assert_eq!(keys.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k1", "k2"]);
    assert!(keys.keys[0].retired_at.is_some() && keys.keys[1].retired_at.is_none());
    assert_eq!(
        verify_msg(&b, &[k1.public(), k2.public()]),
        "OK: 40 events, seq 1..40, 4 checkpoints, key(s) k1, k2"
    );
    assert_eq!(verify_msg(&b, &[k2.public()]), "checkpoint 1: key k1 is not trusted");
    // The retired key cannot sign again.
    append_one(&pool, &event("acme", 41)).await;
    let err = cut_checkpoint(&pool, &Chain::Tenant(tenant("acme")), &k1, CheckpointPolicy::default(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::KeyRetired { .. }), "{err}");
    // Nor can a different key reuse an id.
    let mut conn = pool.acquire().await.unwrap();
    let imposter = SigningKey::generate("k2").unwrap();
    assert!(matches!(
        register_key(&mut conn, &imposter.public()).await,
        Err(StoreError::KeyIdConflict { .. })
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn partial_export_verifies_from_its_start_state(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    fill(&pool, "acme", 60, 10, &key).await;
    let mut out = Vec::new();
    let req =
        ExportRequest { chain: Chain::Tenant(tenant("acme")), from: Some(21), to: Some(45), ocsf: false };
    export(&pool, &req, &mut out).await.unwrap();
    let b = cella_audit::bundle::Bundle::read(&out[..]).unwrap();
    // Checkpoints 2..4 (sizes 20, 30, 40), and 5 (size 50) with the tail proof from 45.
    assert_eq!(verify_msg(&b, &[key.public()]), "OK: 25 events, seq 21..45, 4 checkpoints, key(s) k1");
    let cps = checkpoints(&b).checkpoints;
    let sizes: Vec<u64> = cps.iter().map(|c| c.checkpoint.tree_size).collect();
    assert_eq!(sizes, [20, 30, 40, 50]);
    assert!(cps[..3].iter().all(|c| c.tail_proof.is_none()) && cps[3].tail_proof.is_some());
}

#[sqlx::test(migrations = "../migrations")]
async fn ocsf_export_has_one_api_activity_record_per_event(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    fill(&pool, "acme", 5, 5, &key).await;
    let mut out = Vec::new();
    let req = ExportRequest { chain: Chain::Tenant(tenant("acme")), from: None, to: None, ocsf: true };
    export(&pool, &req, &mut out).await.unwrap();
    let b = cella_audit::bundle::Bundle::read(&out[..]).unwrap();
    assert!(verify(&b, &[key.public()]).is_ok());
    let records: Vec<serde_json::Value> = b.files["ocsf.jsonl"]
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5);
    assert_eq!(records[0]["class_uid"], 6003);
    assert_eq!(records[0]["activity_id"], 1);
    assert_eq!(records[4]["metadata"]["sequence"], 5);
}

#[sqlx::test(migrations = "../migrations")]
async fn inclusion_proof_verifies_alone_and_fails_when_altered(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    fill(&pool, "acme", 60, 10, &key).await;
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    let proof = prove(&b, 37, None, &Options::pinned(vec![key.public()])).unwrap();
    let text = serde_json::to_string(&proof).unwrap();
    let proof: cella_audit::proof::InclusionProof = serde_json::from_str(&text).unwrap();
    assert_eq!(
        verify_proof(&proof, &pinned(&key)).unwrap().to_string(),
        "OK: event 37 of tenant:acme is included in checkpoint 6 (tree size 60), key(s) k1"
    );
    let mut altered = proof.clone();
    altered.event = altered.event.replace("hello", "hellp");
    assert_eq!(verify_proof(&altered, &pinned(&key)).unwrap_err().to_string(), "event 37: hash mismatch");
    let mut moved = proof.clone();
    moved.audit_path.swap(0, 1);
    assert_eq!(
        verify_proof(&moved, &pinned(&key)).unwrap_err().to_string(),
        "event 37 is not included in checkpoint 6 (the audit path does not lead to its root)"
    );
    let other = SigningKey::generate("k2").unwrap();
    assert_eq!(
        verify_proof(&proof, &pinned(&other)).unwrap_err().to_string(),
        "checkpoint 6: key k1 is not trusted"
    );
    // The key that came with the proof: checked, but not trusted.
    assert_eq!(
        verify_proof(&proof, &Trust::BundleKeys).unwrap().to_string(),
        "UNTRUSTED: event 37 of tenant:acme is included in checkpoint 6 (tree size 60), key(s) k1 from the proof itself"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn two_appends_in_one_transaction_chain_to_each_other(pool: PgPool) {
    let mut tx = pool.begin().await.unwrap();
    let first = append(&mut tx, &event("acme", 1)).await.unwrap();
    let second = append(&mut tx, &event("acme", 2)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    let key = SigningKey::generate("k1").unwrap();
    cut(&pool, "acme", &key).await;
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    assert_eq!(body_of(&lines(&b)[1])["prev_hash"], cella_audit::hash::to_hex(&first.hash));
    assert!(verify(&b, &[key.public()]).is_ok());
}

#[sqlx::test(migrations = "../migrations")]
async fn checkpointer_task_cuts_by_count_and_signs_the_rest_at_shutdown(pool: PgPool) {
    let key = SigningKey::generate("k1").unwrap();
    let public = key.public();
    let policy = CheckpointPolicy { every_events: 5, every_secs: 3600 };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_checkpointer(pool.clone(), key, policy, Duration::from_millis(20), async {
        let _ = stopped.await;
    }));
    for i in 1..=12 {
        append_one(&pool, &event("acme", i)).await;
        if i == 5 || i == 10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let b = export_bundle(&pool, Chain::Tenant(tenant("acme"))).await;
    let sizes: Vec<u64> = checkpoints(&b).checkpoints.iter().map(|c| c.checkpoint.tree_size).collect();
    assert_eq!(sizes, [5, 10, 12]);
    assert_eq!(verify_msg(&b, &[public]), "OK: 12 events, seq 1..12, 3 checkpoints, key(s) k1");
}

#[sqlx::test(migrations = "../migrations")]
async fn time_range_maps_to_the_seq_range_of_its_events(pool: PgPool) {
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    for i in 1..=5 {
        append_one(&pool, &event("acme", i)).await;
    }
    let after = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let chain = Chain::Tenant(tenant("acme"));
    assert_eq!(seq_range_for_times(&pool, &chain, before, after).await.unwrap(), Some((1, 5)));
    assert_eq!(seq_range_for_times(&pool, &chain, after, after).await.unwrap(), None);
}

/// 60 events of `acme` with a checkpoint every 10, then 5 more no checkpoint covers yet.
async fn signed_60_then_5_unsigned(pool: &PgPool) -> SigningKey {
    let key = SigningKey::generate("k1").unwrap();
    fill(pool, "acme", 60, 10, &key).await;
    for i in 61..=65 {
        append_one(pool, &event("acme", i)).await;
    }
    key
}

fn request(from: Option<u64>, to: Option<u64>) -> ExportRequest {
    ExportRequest { chain: Chain::Tenant(tenant("acme")), from, to, ocsf: false }
}

#[sqlx::test(migrations = "../migrations")]
async fn export_without_to_stops_at_the_newest_checkpoint_and_says_what_it_left_out(pool: PgPool) {
    let key = signed_60_then_5_unsigned(&pool).await;
    let export = Export::begin(&pool, &request(None, None)).await.unwrap();
    assert_eq!(export.clamped(), Some(Clamped { head: 65, covered: 60 }));
    assert_eq!((export.range().from, export.range().to, export.event_count()), (1, 60, 60));
    let mut out = Vec::new();
    export.write_to(&mut out).await.unwrap();
    let b = cella_audit::bundle::Bundle::read(&out[..]).unwrap();
    assert_eq!(verify_msg(&b, &[key.public()]), "OK: 60 events, seq 1..60, 6 checkpoints, key(s) k1");
    // Nothing left out: nothing to say.
    let export = Export::begin(&pool, &request(Some(5), Some(60))).await.unwrap();
    assert_eq!(export.clamped(), None);
}

#[sqlx::test(migrations = "../migrations")]
async fn export_refuses_events_no_checkpoint_covers_yet(pool: PgPool) {
    signed_60_then_5_unsigned(&pool).await;
    let refused = |from, to| {
        let pool = pool.clone();
        async move { Export::begin(&pool, &request(from, to)).await.unwrap_err().to_string() }
    };
    let not_covered = |seq: u64| {
        format!(
            "event {seq} of tenant:acme is not yet covered by a signed checkpoint (the newest covers 1..60); \
             export up to 60, or cut a checkpoint first"
        )
    };
    assert_eq!(refused(None, Some(63)).await, not_covered(63));
    // A `to` beyond the head means the head, which no checkpoint covers either.
    assert_eq!(refused(None, Some(100)).await, not_covered(65));
    assert_eq!(refused(Some(62), None).await, not_covered(62));
    assert_eq!(refused(Some(70), None).await, "seq range 70..65 is empty (tenant:acme has events 1..65)");
}

#[sqlx::test(migrations = "../migrations")]
async fn export_of_a_chain_without_any_checkpoint_is_refused(pool: PgPool) {
    for i in 1..=3 {
        append_one(&pool, &event("acme", i)).await;
    }
    assert_eq!(
        Export::begin(&pool, &request(None, None)).await.unwrap_err().to_string(),
        "tenant:acme has events 1..3 but no signed checkpoint yet, and a bundle holds only events a \
         checkpoint covers; cut a checkpoint first"
    );
}
