//! Building an export bundle from the database: the library function behind
//! `cella audit export` and, later, `GET /v1/audit/export`.

use std::io::Write;

use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use crate::bundle::{self, AssembleInput, BundleContents, KeyJson, Manifest};
use crate::checkpoint::Checkpoint;
use crate::event::{self, Chain};
use crate::hash::Hash;
use crate::store::{self, StoreError};

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// The chain (a tenant's, or the operator chain).
    pub chain: Chain,
    /// First seq (default 1).
    pub from: Option<u64>,
    /// Last seq (default: the chain's head).
    pub to: Option<u64>,
    /// Also write `ocsf.jsonl`.
    pub ocsf: bool,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0} has no audit events")]
    NoEvents(String),
    #[error("seq range {from}..{to} is empty ({chain} has events 1..{head})")]
    EmptyRange { chain: String, from: u64, to: u64, head: u64 },
    #[error("database error")]
    Store(#[from] StoreError),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("cannot write the bundle")]
    Write(#[from] std::io::Error),
}

fn to_hash(bytes: &[u8]) -> Hash {
    let mut h = [0; 32];
    if bytes.len() == 32 {
        h.copy_from_slice(bytes);
    }
    h
}

/// Reads everything a bundle needs from one consistent snapshot of the database.
pub async fn export_contents(pool: &PgPool, request: &ExportRequest) -> Result<BundleContents, ExportError> {
    let chain = request.chain.key();
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let head: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit_heads WHERE chain = $1")
        .bind(&chain)
        .fetch_optional(&mut *tx)
        .await?;
    let head = u64::try_from(head.unwrap_or(0)).unwrap_or(0);
    if head == 0 {
        return Err(ExportError::NoEvents(chain));
    }
    let from = request.from.unwrap_or(1).max(1);
    let to = request.to.unwrap_or(head).min(head);
    if from > to {
        return Err(ExportError::EmptyRange { chain, from, to, head });
    }
    let rows = sqlx::query(
        "SELECT seq, hash, CASE WHEN seq >= $2 THEN body END AS body
         FROM audit_events WHERE chain = $1 AND seq <= $3 ORDER BY seq",
    )
    .bind(&chain)
    .bind(i64::try_from(from).unwrap_or(i64::MAX))
    .bind(i64::try_from(to).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?;
    let mut hashes = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let hash = to_hash(row.try_get::<&[u8], _>("hash")?);
        hashes.push(hash);
        if let Some(body) = row.try_get::<Option<String>, _>("body")? {
            events.push((body, hash));
        }
    }
    let cp_rows = sqlx::query(
        "SELECT idx, tree_size, root_hash, signed_at, key_id, signature FROM audit_checkpoints
         WHERE chain = $1 ORDER BY idx",
    )
    .bind(&chain)
    .fetch_all(&mut *tx)
    .await?;
    let mut checkpoints = Vec::with_capacity(cp_rows.len());
    for r in &cp_rows {
        checkpoints.push(Checkpoint {
            chain: chain.clone(),
            index: u64::try_from(r.try_get::<i64, _>("idx")?).unwrap_or(0),
            tree_size: u64::try_from(r.try_get::<i64, _>("tree_size")?).unwrap_or(0),
            root: to_hash(r.try_get::<&[u8], _>("root_hash")?),
            time: r.try_get("signed_at")?,
            key_id: r.try_get("key_id")?,
            signature: r.try_get("signature")?,
        });
    }
    let keys = store::keys(&mut tx)
        .await?
        .iter()
        .map(|k| {
            KeyJson::new(
                &k.key,
                Some(event::format_time(k.activated_at)),
                k.retired_at.map(event::format_time),
            )
        })
        .collect();
    tx.commit().await?;
    Ok(bundle::assemble(AssembleInput {
        chain: &chain,
        tenant: request.chain.tenant().map(|t| t.as_str()),
        hashes: &hashes,
        from,
        to,
        events: &events,
        checkpoints: &checkpoints,
        keys,
        ocsf: request.ocsf,
        exported_at: event::format_time(OffsetDateTime::now_utc()),
    }))
}

/// Exports `request` as a tar bundle to `out`; returns its manifest.
pub async fn export<W: Write>(
    pool: &PgPool,
    request: &ExportRequest,
    out: W,
) -> Result<Manifest, ExportError> {
    let contents = export_contents(pool, request).await?;
    Ok(bundle::write_bundle(&contents, out)?)
}

/// The seq range of `chain`'s events whose time lies in `from..=to` (for time-based export
/// requests such as `?from=…&to=…`); `None` if there are none.
pub async fn seq_range_for_times(
    pool: &PgPool,
    chain: &Chain,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Option<(u64, u64)>, ExportError> {
    let row = sqlx::query(
        "SELECT min(seq) AS lo, max(seq) AS hi FROM audit_events
         WHERE chain = $1 AND event_time >= $2 AND event_time <= $3",
    )
    .bind(chain.key())
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await?;
    let lo: Option<i64> = row.try_get("lo")?;
    let hi: Option<i64> = row.try_get("hi")?;
    Ok(lo.zip(hi).map(|(lo, hi)| (u64::try_from(lo).unwrap_or(0), u64::try_from(hi).unwrap_or(0))))
}
