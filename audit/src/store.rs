//! PostgreSQL storage: appending inside the caller's transaction, registering signing keys, and
//! cutting checkpoints.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;

use crate::checkpoint::{Checkpoint, CheckpointPolicy};
use crate::event::{self, Chain, EventError, EventHead, NewEvent};
use crate::hash::{self, Hash, GENESIS};
use crate::keys::{PublicKey, SigningKey};
use crate::merkle::{leaf_hash, CompactRange};

/// What went wrong reading or writing the log in the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid audit event")]
    Event(#[from] EventError),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error(
        "key id `{key_id}` is already registered with a different public key; give the new key a new id"
    )]
    KeyIdConflict { key_id: String },
    #[error("key `{key_id}` was retired by a rotation; sign with the current key or rotate to a new key id")]
    KeyRetired { key_id: String },
    #[error("chain {chain} is corrupt at seq {seq}: {problem}; refusing to sign a checkpoint over it")]
    Corrupt { chain: String, seq: u64, problem: String },
}

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence number in its chain.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
    /// Its timestamp.
    pub time: OffsetDateTime,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_hash(bytes: &[u8]) -> Hash {
    let mut h = [0; 32];
    if bytes.len() == 32 {
        h.copy_from_slice(bytes);
    }
    h
}

/// Appends `event` to its chain inside the caller's transaction.
///
/// Call it on the transaction that makes the state change the event records
/// (`append(&mut tx, &event)`), so both commit or neither does. The chain's head row stays
/// locked until that transaction ends: concurrent appends to one chain wait for each other and
/// get consecutive sequence numbers; appends to different chains do not wait. (It takes a
/// `Transaction`, not a bare connection, because claiming the head and inserting the event must
/// be one unit.) A transaction that appends to several chains should take them in one fixed
/// order — the tenant's chain before the operator chain — so two such transactions cannot
/// deadlock.
pub async fn append(tx: &mut Transaction<'_, Postgres>, event: &NewEvent) -> Result<Appended, StoreError> {
    event.validate()?;
    let conn: &mut PgConnection = tx;
    let chain = event.chain.key();
    // Take (or create) the head and claim the next seq in one statement; RETURNING gives the new
    // seq and the previous event's hash (GENESIS for a new chain).
    let row = sqlx::query(
        "INSERT INTO audit_heads (chain, seq, hash) VALUES ($1, 1, $2)
         ON CONFLICT (chain) DO UPDATE SET seq = audit_heads.seq + 1, updated_at = now()
         RETURNING seq, hash",
    )
    .bind(&chain)
    .bind(&GENESIS[..])
    .fetch_one(&mut *conn)
    .await?;
    let seq = to_u64(row.try_get::<i64, _>("seq")?);
    let prev = to_hash(row.try_get::<&[u8], _>("hash")?);
    // The time is taken under the lock, so it never goes backwards along a chain on one host.
    let time = event::truncate_to_micros(OffsetDateTime::now_utc());
    let body = event.encode(seq, time, &prev);
    let hash = hash::sha256(&body);
    let body = String::from_utf8(body).unwrap_or_default();
    sqlx::query(
        "WITH ins AS (
             INSERT INTO audit_events (chain, seq, tenant, event_time, action, body, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
         )
         UPDATE audit_heads SET hash = $7 WHERE chain = $1",
    )
    .bind(&chain)
    .bind(to_i64(seq))
    .bind(event.tenant.as_ref().map(|t| t.as_str()))
    .bind(time)
    .bind(&event.action)
    .bind(&body)
    .bind(&hash[..])
    .execute(&mut *conn)
    .await?;
    Ok(Appended { seq, hash, time })
}

/// Records `key` as the active checkpoint key. A new key id retires every other key (a
/// rotation); the public keys stay, so old checkpoints still verify.
pub async fn register_key(conn: &mut PgConnection, key: &PublicKey) -> Result<(), StoreError> {
    let existing =
        sqlx::query("SELECT public_key, retired_at IS NOT NULL AS retired FROM audit_keys WHERE key_id = $1")
            .bind(&key.id)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(row) = existing {
        if row.try_get::<&[u8], _>("public_key")? != key.key {
            return Err(StoreError::KeyIdConflict { key_id: key.id.clone() });
        }
        if row.try_get::<bool, _>("retired")? {
            return Err(StoreError::KeyRetired { key_id: key.id.clone() });
        }
        return Ok(());
    }
    sqlx::query("UPDATE audit_keys SET retired_at = now() WHERE retired_at IS NULL")
        .execute(&mut *conn)
        .await?;
    // Two checkpointers registering the same new key at once: the second waits, then does nothing.
    sqlx::query(
        "INSERT INTO audit_keys (key_id, public_key) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING",
    )
    .bind(&key.id)
    .bind(&key.key[..])
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A key as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public key.
    pub key: PublicKey,
    /// When it became the active key.
    pub activated_at: OffsetDateTime,
    /// When a rotation retired it.
    pub retired_at: Option<OffsetDateTime>,
}

/// Every key ever registered, oldest first.
pub async fn keys(conn: &mut PgConnection) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT key_id, public_key, activated_at, retired_at FROM audit_keys ORDER BY activated_at, key_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(KeyRecord {
                key: PublicKey {
                    id: r.try_get("key_id")?,
                    key: to_hash(r.try_get::<&[u8], _>("public_key")?),
                },
                activated_at: r.try_get("activated_at")?,
                retired_at: r.try_get("retired_at")?,
            })
        })
        .collect()
}

/// Every chain that has events.
pub async fn chains(conn: &mut PgConnection) -> Result<Vec<Chain>, StoreError> {
    let rows = sqlx::query("SELECT chain FROM audit_heads WHERE seq > 0 ORDER BY chain")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| Ok(Chain::parse(r.try_get::<&str, _>("chain")?)?)).collect()
}

/// The tree size of `chain`'s newest checkpoint: events `1..=` it are covered by a signature
/// (0 without any checkpoint).
pub async fn covered(conn: &mut PgConnection, chain: &Chain) -> Result<u64, StoreError> {
    let size: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(tree_size), 0)::int8 FROM audit_checkpoints WHERE chain = $1",
    )
    .bind(chain.key())
    .fetch_one(&mut *conn)
    .await?;
    Ok(to_u64(size))
}

/// The last checkpoint of a chain as stored, with what is needed to extend it.
struct LastCheckpoint {
    index: u64,
    tree_size: u64,
    last_hash: Hash,
    range: CompactRange,
}

async fn last_checkpoint(conn: &mut PgConnection, chain: &str) -> Result<Option<LastCheckpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT idx, tree_size, last_hash, peaks FROM audit_checkpoints WHERE chain = $1 ORDER BY idx DESC LIMIT 1",
    )
    .bind(chain)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let tree_size = to_u64(row.try_get("tree_size")?);
    let peaks: Vec<Hash> = row.try_get::<&[u8], _>("peaks")?.chunks_exact(32).map(to_hash).collect();
    let range = CompactRange::from_parts(tree_size, peaks).ok_or_else(|| StoreError::Corrupt {
        chain: chain.to_owned(),
        seq: tree_size,
        problem: "the last checkpoint's stored compact range does not fit its tree size".to_owned(),
    })?;
    Ok(Some(LastCheckpoint {
        index: to_u64(row.try_get("idx")?),
        tree_size,
        last_hash: to_hash(row.try_get::<&[u8], _>("last_hash")?),
        range,
    }))
}

/// Cuts a checkpoint for `chain` if `policy` says one is due (or always, with `force`, when
/// there are uncovered events). Checks every newly covered event's hash and link before signing.
pub async fn cut_checkpoint(
    pool: &PgPool,
    chain: &Chain,
    key: &SigningKey,
    policy: CheckpointPolicy,
    force: bool,
) -> Result<Option<Checkpoint>, StoreError> {
    let chain_key = chain.key();
    let mut tx = pool.begin().await?;
    // One checkpointer per chain at a time; appenders are not blocked.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('cella-audit-checkpoint:' || $1, 0))")
        .bind(&chain_key)
        .execute(&mut *tx)
        .await?;
    register_key(&mut tx, &key.public()).await?;
    let head: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit_heads WHERE chain = $1")
        .bind(&chain_key)
        .fetch_optional(&mut *tx)
        .await?;
    let head = to_u64(head.unwrap_or(0));
    let last = last_checkpoint(&mut tx, &chain_key).await?;
    let covered = last.as_ref().map_or(0, |l| l.tree_size);
    if head <= covered {
        return Ok(None);
    }
    if !force && head - covered < policy.every_events {
        let oldest: OffsetDateTime =
            sqlx::query_scalar("SELECT event_time FROM audit_events WHERE chain = $1 AND seq = $2")
                .bind(&chain_key)
                .bind(to_i64(covered + 1))
                .fetch_one(&mut *tx)
                .await?;
        let age = OffsetDateTime::now_utc() - oldest;
        if age < time::Duration::seconds(i64::try_from(policy.every_secs).unwrap_or(i64::MAX)) {
            return Ok(None);
        }
    }
    let rows = sqlx::query(
        "SELECT seq, body, hash FROM audit_events WHERE chain = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
    )
    .bind(&chain_key)
    .bind(to_i64(covered))
    .bind(to_i64(head))
    .fetch_all(&mut *tx)
    .await?;
    let (mut range, mut prev) = match last {
        Some(ref l) => (l.range.clone(), l.last_hash),
        None => (CompactRange::new(), GENESIS),
    };
    let corrupt = |seq: u64, problem: &str| StoreError::Corrupt {
        chain: chain_key.clone(),
        seq,
        problem: problem.to_owned(),
    };
    for (i, row) in rows.iter().enumerate() {
        let want_seq = covered + 1 + i as u64;
        let seq = to_u64(row.try_get("seq")?);
        if seq != want_seq {
            return Err(corrupt(want_seq, "missing"));
        }
        let body: &str = row.try_get("body")?;
        let stored = to_hash(row.try_get::<&[u8], _>("hash")?);
        if hash::sha256(body.as_bytes()) != stored {
            return Err(corrupt(seq, "hash mismatch"));
        }
        let head: EventHead<'_> =
            serde_json::from_str(body).map_err(|_| corrupt(seq, "body is not an audit event"))?;
        if head.seq != seq
            || head.chain != chain_key
            || hash::hash_from_hex(head.prev_hash.as_bytes()) != Some(prev)
        {
            return Err(corrupt(seq, "does not link to the event before it"));
        }
        range.push(leaf_hash(&stored));
        prev = stored;
    }
    if range.size() != head {
        return Err(corrupt(range.size() + 1, "missing"));
    }
    let index = last.as_ref().map_or(1, |l| l.index + 1);
    let time = event::format_time(event::truncate_to_micros(OffsetDateTime::now_utc()));
    let cp = Checkpoint::sign(&chain_key, index, head, range.root(), time, key);
    let peaks: Vec<u8> = range.peaks().concat();
    sqlx::query(
        "INSERT INTO audit_checkpoints (chain, idx, tree_size, root_hash, last_hash, peaks, signed_at, key_id, signature)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&chain_key)
    .bind(to_i64(cp.index))
    .bind(to_i64(cp.tree_size))
    .bind(&cp.root[..])
    .bind(&prev[..])
    .bind(&peaks)
    .bind(&cp.time)
    .bind(&cp.key_id)
    .bind(&cp.signature)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(cp))
}

/// Cuts every checkpoint that is due, over all chains.
pub async fn cut_due_checkpoints(
    pool: &PgPool,
    key: &SigningKey,
    policy: CheckpointPolicy,
    force: bool,
) -> Result<Vec<Checkpoint>, StoreError> {
    let all = chains(&mut *pool.acquire().await?).await?;
    let mut cut = Vec::new();
    for chain in all {
        if let Some(cp) = cut_checkpoint(pool, &chain, key, policy, force).await? {
            cut.push(cp);
        }
    }
    Ok(cut)
}

/// Runs the checkpointer until `shutdown` resolves: every `poll` it cuts what is due. The
/// service runs this as a background task; a failed round is retried on the next tick.
pub async fn run_checkpointer(
    pool: PgPool,
    key: SigningKey,
    policy: CheckpointPolicy,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StoreError> {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                // A failed round (database briefly away) is simply tried again next tick.
                let _ = cut_due_checkpoints(&pool, &key, policy, false).await;
            }
        }
    }
    // A final round so nothing appended before shutdown is left unsigned.
    cut_due_checkpoints(&pool, &key, policy, true).await.map(|_| ())
}
