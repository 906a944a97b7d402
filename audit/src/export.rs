//! Exporting a chain from the database as a tar bundle, streamed: the library function behind
//! `cella audit export` and `GET /v1/audit/export`.
//!
//! [`Export::begin`] opens one `REPEATABLE READ, READ ONLY` transaction (one snapshot: events
//! appended meanwhile are not seen by any of the queries below), checks the range, measures
//! `events.jsonl` exactly (`sum(octet_length(body))` plus the fixed size of each line's
//! wrapping, over the rows the stream will read) and loads the checkpoints and keys, which are
//! small.
//!
//! Every exported event must be covered by a signed checkpoint (see [`crate::bundle`]), so the
//! range ends at or before the newest checkpoint of the snapshot: without an explicit `to` the
//! export stops there ([`Export::clamped`] says when events after it were left out); an explicit
//! `to` beyond it is refused ([`ExportError::NotCovered`]). When `to` falls between two
//! checkpoints, the next one goes into the bundle with a tail proof.
//!
//! [`Export::write_to`] then writes the tar members in this order:
//!
//! 1. `events.jsonl`: the header with the measured size, then the events read in seq order in
//!    batches of [`BATCH_ROWS`] (keyset pagination), hashed as they are written. The same pass
//!    pushes every event hash `1..=to` (and on to the tail checkpoint's size, without the
//!    bodies) into a [`SubtreeCollector`], which keeps only the Merkle subtrees the consistency
//!    and tail proofs need, and notes `start.json`'s compact range;
//! 2. `ocsf.jsonl` if asked for: its size is measured during the first pass, then a second pass
//!    over the same rows (same snapshot) writes it, so it is bounded the same way;
//! 3. `checkpoints.json`, `keys.json`, `start.json`;
//! 4. `manifest.json`, with the size and SHA-256 of each file above, and the tar trailer.
//!
//! Memory stays at one batch plus the checkpoints whatever the chain's length. If the data
//! written would not match the size announced in a header, the export fails rather than write a
//! wrong archive. A failure part-way leaves a bundle without its manifest, which neither the
//! tar reader nor the verifier accepts; the service also aborts the HTTP transfer.

use ring::digest;
use sqlx::{PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::bundle::{
    self, BundleCheckpoint, CheckpointsFile, Counts, FileEntry, KeyJson, KeysFile, Manifest, SeqRange,
    StartFile,
};
use crate::checkpoint::Checkpoint;
use crate::event::{self, export_line, export_line_len, Chain, Event};
use crate::hash::{self, Hash};
use crate::merkle::{consistency_ranges, leaf_hash, CompactRange, SubtreeCollector};
use crate::store::{self, StoreError};

/// Events read from the database per query while streaming.
pub const BATCH_ROWS: usize = 2048;

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// The chain (a tenant's, or the operator chain).
    pub chain: Chain,
    /// First seq (default 1).
    pub from: Option<u64>,
    /// Last seq (default: the newest one a signed checkpoint covers). Beyond the chain's head it
    /// means the head; beyond the newest checkpoint it is refused.
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
    #[error("{chain} has events 1..{head} but no signed checkpoint yet, and a bundle holds only events a checkpoint covers; cut a checkpoint first")]
    NoCheckpoint { chain: String, head: u64 },
    #[error("event {seq} of {chain} is not yet covered by a signed checkpoint (the newest covers 1..{covered}); export up to {covered}, or cut a checkpoint first")]
    NotCovered { chain: String, seq: u64, covered: u64 },
    #[error("database error")]
    Store(#[from] StoreError),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("cannot write the bundle")]
    Write(#[from] std::io::Error),
    #[error("{file} would be {written} bytes, not the {announced} its tar header announced; the export was abandoned")]
    SizeMismatch { file: &'static str, announced: u64, written: u64 },
    #[error("the chain's rows changed while they were read ({0}); the export was abandoned")]
    Inconsistent(String),
}

/// Events an export without an explicit `to` left out: `covered+1..=head` were appended after the
/// newest signed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clamped {
    /// The chain's last seq.
    pub head: u64,
    /// The newest checkpoint's tree size, where the export stops.
    pub covered: u64,
}

/// A finished export: its manifest and what it held in memory at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The manifest written as the bundle's last member.
    pub manifest: Manifest,
    /// Bundle size in bytes.
    pub bytes: u64,
    /// Most event rows held at once (at most [`BATCH_ROWS`]).
    pub peak_batch_rows: usize,
    /// Most bytes of event data held at once (one batch's rows plus its export lines).
    pub peak_batch_bytes: usize,
    /// Merkle subtree hashes kept for the consistency proofs.
    pub subtrees_kept: usize,
}

fn to_hash(bytes: &[u8]) -> Hash {
    let mut h = [0; 32];
    if bytes.len() == 32 {
        h.copy_from_slice(bytes);
    }
    h
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An export whose snapshot is open and whose range is checked, ready to stream.
#[derive(Debug)]
pub struct Export {
    tx: Transaction<'static, Postgres>,
    plan: Plan,
}

/// Everything known about an export before its events are read.
#[derive(Debug)]
struct Plan {
    chain: String,
    tenant: Option<String>,
    from: u64,
    to: u64,
    ocsf: bool,
    /// Rows with seq `from..=to`.
    events: u64,
    /// Leaves read: `to`, or the tail checkpoint's size.
    tree_end: u64,
    /// Events left out because no checkpoint covers them yet (no explicit `to`).
    clamped: Option<Clamped>,
    /// Exact size of `events.jsonl`.
    events_bytes: u64,
    /// The checkpoints that go into the bundle, in index order.
    checkpoints: Vec<Checkpoint>,
    keys: Vec<KeyJson>,
    exported_at: String,
}

impl Export {
    /// Opens the snapshot and checks the range: [`ExportError::NoEvents`] and
    /// [`ExportError::EmptyRange`] come from here, before anything is written.
    pub async fn begin(pool: &PgPool, request: &ExportRequest) -> Result<Self, ExportError> {
        let chain = request.chain.key();
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let head: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit_heads WHERE chain = $1")
            .bind(&chain)
            .fetch_optional(&mut *tx)
            .await?;
        let head = to_u64(head.unwrap_or(0));
        if head == 0 {
            return Err(ExportError::NoEvents(chain));
        }
        let cp_rows = sqlx::query(
            "SELECT idx, tree_size, root_hash, signed_at, key_id, signature FROM audit_checkpoints
             WHERE chain = $1 ORDER BY idx",
        )
        .bind(&chain)
        .fetch_all(&mut *tx)
        .await?;
        let mut all = Vec::with_capacity(cp_rows.len());
        for r in &cp_rows {
            all.push(Checkpoint {
                chain: chain.clone(),
                index: to_u64(r.try_get("idx")?),
                tree_size: to_u64(r.try_get("tree_size")?),
                root: to_hash(r.try_get::<&[u8], _>("root_hash")?),
                time: r.try_get("signed_at")?,
                key_id: r.try_get("key_id")?,
                signature: r.try_get("signature")?,
            });
        }
        let covered = all.iter().map(|c| c.tree_size).max().unwrap_or(0).min(head);
        if covered == 0 {
            return Err(ExportError::NoCheckpoint { chain, head });
        }
        let from = request.from.unwrap_or(1).max(1);
        let (to, clamped) = match request.to {
            Some(to) => {
                let to = to.min(head);
                if from > to {
                    return Err(ExportError::EmptyRange { chain, from, to, head });
                }
                if to > covered {
                    return Err(ExportError::NotCovered { chain, seq: to, covered });
                }
                (to, None)
            }
            None => {
                if from > head {
                    return Err(ExportError::EmptyRange { chain, from, to: head, head });
                }
                if from > covered {
                    return Err(ExportError::NotCovered { chain, seq: from, covered });
                }
                (covered, (head > covered).then_some(Clamped { head, covered }))
            }
        };
        // Same snapshot as the stream: these are exactly the rows it will read.
        let sizes = sqlx::query(
            "SELECT count(*) AS tree_rows,
                    count(*) FILTER (WHERE seq >= $2) AS events,
                    coalesce(sum(octet_length(body)) FILTER (WHERE seq >= $2), 0)::int8 AS body_bytes
             FROM audit_events WHERE chain = $1 AND seq <= $3",
        )
        .bind(&chain)
        .bind(to_i64(from))
        .bind(to_i64(to))
        .fetch_one(&mut *tx)
        .await?;
        let tree_rows = to_u64(sizes.try_get("tree_rows")?);
        let events = to_u64(sizes.try_get("events")?);
        let body_bytes = to_u64(sizes.try_get("body_bytes")?);
        // Each line is the body wrapped in `{"event":…,"hash":"…"}`, then a newline.
        let events_bytes = (export_line_len(0) + 1).saturating_mul(events).saturating_add(body_bytes);
        // Rows missing below `to` (a damaged chain): leaves are counted by row, so leave out the
        // checkpoints the rows no longer reach; the verifier names the damage.
        let reach = if tree_rows < to { tree_rows } else { covered };
        let checkpoints: Vec<Checkpoint> =
            bundle::checkpoints_for_range(&all, from, to, reach).into_iter().cloned().collect();
        let tree_end = checkpoints.last().map_or(to, |c| c.tree_size.max(to));
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
        let plan = Plan {
            chain,
            tenant: request.chain.tenant().map(|t| t.as_str().to_owned()),
            from,
            to,
            ocsf: request.ocsf,
            events,
            tree_end,
            clamped,
            events_bytes,
            checkpoints,
            keys,
            exported_at: event::format_time(OffsetDateTime::now_utc()),
        };
        Ok(Self { tx, plan })
    }

    /// The seq range the bundle will hold.
    pub fn range(&self) -> SeqRange {
        SeqRange { from: self.plan.from, to: self.plan.to }
    }

    /// Number of events the bundle will hold.
    pub fn event_count(&self) -> u64 {
        self.plan.events
    }

    /// Events left out because no signed checkpoint covers them yet (only without an explicit
    /// `to`).
    pub fn clamped(&self) -> Option<Clamped> {
        self.plan.clamped
    }

    /// Streams the bundle to `out` (see the module documentation), then ends the snapshot. On an
    /// error the transaction is rolled back before this returns; what was written stays written.
    pub async fn write_to<W: AsyncWrite + Unpin>(self, out: W) -> Result<Exported, ExportError> {
        let Export { mut tx, plan } = self;
        match plan.stream(&mut tx, out).await {
            Ok(done) => {
                tx.commit().await?;
                Ok(done)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }
}

/// Exports `request` as a tar bundle to `out`, streamed; returns the manifest and the figures.
pub async fn export<W: AsyncWrite + Unpin>(
    pool: &PgPool,
    request: &ExportRequest,
    out: W,
) -> Result<Exported, ExportError> {
    Export::begin(pool, request).await?.write_to(out).await
}

/// The tar writer: counts what it writes.
struct TarOut<W> {
    out: W,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> TarOut<W> {
    async fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(data).await?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    async fn header(&mut self, name: &str, size: u64) -> std::io::Result<()> {
        self.put(&bundle::member_header(name, size)?).await
    }

    async fn pad(&mut self, size: u64) -> std::io::Result<()> {
        self.put(&[0; bundle::TAR_BLOCK as usize][..bundle::member_padding(size)]).await
    }

    /// A small member written whole; returns its manifest entry.
    async fn member(&mut self, name: &str, data: &[u8]) -> std::io::Result<FileEntry> {
        self.header(name, data.len() as u64).await?;
        self.put(data).await?;
        self.pad(data.len() as u64).await?;
        Ok(FileEntry {
            name: name.to_owned(),
            bytes: data.len() as u64,
            sha256: hash::to_hex(&hash::sha256(data)),
        })
    }
}

/// Appends the OCSF line of one event (nothing for a body that is not an event).
fn ocsf_line(body: &str, h: &Hash, out: &mut Vec<u8>) {
    if let Ok(event) = serde_json::from_str::<Event>(body) {
        if serde_json::to_writer(&mut *out, &crate::ocsf::api_activity(&event, h)).is_ok() {
            out.push(b'\n');
        }
    }
}

/// One batch of rows with seq in `after+1..=end`, in seq order, with the bodies of those in
/// `bodies.0..=bodies.1`.
async fn batch(
    tx: &mut Transaction<'static, Postgres>,
    chain: &str,
    bodies: (u64, u64),
    after: i64,
    end: u64,
) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
    sqlx::query(
        "SELECT seq, hash, CASE WHEN seq >= $2 AND seq <= $3 THEN body END AS body
         FROM audit_events WHERE chain = $1 AND seq > $4 AND seq <= $5 ORDER BY seq LIMIT $6",
    )
    .bind(chain)
    .bind(to_i64(bodies.0))
    .bind(to_i64(bodies.1))
    .bind(after)
    .bind(to_i64(end))
    .bind(BATCH_ROWS as i64)
    .fetch_all(&mut **tx)
    .await
}

impl Plan {
    async fn stream<W: AsyncWrite + Unpin>(
        self,
        tx: &mut Transaction<'static, Postgres>,
        out: W,
    ) -> Result<Exported, ExportError> {
        let mut out = TarOut { out, bytes: 0 };
        let mut ranges = Vec::new();
        for pair in self.checkpoints.windows(2) {
            ranges.extend(consistency_ranges(pair[0].tree_size, pair[1].tree_size));
        }
        if let Some(tail) = self.checkpoints.last().filter(|c| c.tree_size > self.to) {
            ranges.extend(consistency_ranges(self.to, tail.tree_size));
        }
        let mut tree = SubtreeCollector::new(&ranges);
        let start_size = self.from - 1;
        let mut start: Option<CompactRange> = (start_size == 0).then(CompactRange::new);
        let mut hash_before = hash::GENESIS;
        let (mut peak_rows, mut peak_bytes) = (0, 0);
        let (mut events, mut written, mut ocsf_bytes) = (0u64, 0u64, 0u64);
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut lines = Vec::new();
        let mut scratch = Vec::new();
        let mut after = 0i64;

        out.header(bundle::EVENTS, self.events_bytes).await?;
        loop {
            let rows = batch(tx, &self.chain, (self.from, self.to), after, self.tree_end).await?;
            lines.clear();
            let mut row_bytes = 0;
            for row in &rows {
                let h = to_hash(row.try_get::<&[u8], _>("hash")?);
                // Leaves are counted by row, as the verifier counts events.
                if start_size >= 2 && tree.size() == start_size - 1 {
                    hash_before = h;
                }
                tree.push(leaf_hash(&h));
                if start.is_none() && tree.size() == start_size {
                    start = Some(tree.compact_range());
                }
                if let Some(body) = row.try_get::<Option<&str>, _>("body")? {
                    row_bytes += body.len() + 48;
                    export_line(body.as_bytes(), &h, &mut lines);
                    lines.push(b'\n');
                    events += 1;
                    if self.ocsf {
                        scratch.clear();
                        ocsf_line(body, &h, &mut scratch);
                        ocsf_bytes += scratch.len() as u64;
                    }
                }
                after = row.try_get("seq")?;
            }
            written += lines.len() as u64;
            if written > self.events_bytes {
                return Err(ExportError::SizeMismatch {
                    file: bundle::EVENTS,
                    announced: self.events_bytes,
                    written,
                });
            }
            sha.update(&lines);
            out.put(&lines).await?;
            peak_rows = peak_rows.max(rows.len());
            peak_bytes = peak_bytes.max(row_bytes + lines.len() + scratch.len());
            if rows.len() < BATCH_ROWS {
                break;
            }
        }
        if written != self.events_bytes || events != self.events {
            return Err(ExportError::SizeMismatch {
                file: bundle::EVENTS,
                announced: self.events_bytes,
                written,
            });
        }
        out.pad(written).await?;
        let mut files = vec![FileEntry {
            name: bundle::EVENTS.to_owned(),
            bytes: written,
            sha256: hash::to_hex(sha.finish().as_ref()),
        }];

        let ocsf_entry =
            if self.ocsf { Some(self.stream_ocsf(tx, &mut out, ocsf_bytes).await?) } else { None };

        let proof = |old: u64, new: u64| -> Result<Vec<String>, ExportError> {
            consistency_ranges(old, new)
                .into_iter()
                .map(|(a, b)| {
                    let root = tree.range_root(a, b).ok_or_else(|| {
                        ExportError::Inconsistent(format!("no Merkle subtree over leaves {a}..{b}"))
                    })?;
                    Ok(hash::to_hex(&root))
                })
                .collect()
        };
        let mut checkpoints = Vec::with_capacity(self.checkpoints.len());
        let mut prev: Option<u64> = None;
        for cp in &self.checkpoints {
            let consistency_proof = match prev {
                Some(old) => proof(old, cp.tree_size)?,
                None => Vec::new(),
            };
            prev = Some(cp.tree_size);
            let tail_proof = (cp.tree_size > self.to).then(|| proof(self.to, cp.tree_size)).transpose()?;
            checkpoints.push(BundleCheckpoint { checkpoint: cp.to_json(), consistency_proof, tail_proof });
        }
        let start = start.unwrap_or_else(|| tree.compact_range());
        let start = StartFile {
            seq_before: start_size,
            hash_before: hash::to_hex(&hash_before),
            peaks: start.peaks().iter().map(|p| hash::to_hex(p)).collect(),
        };
        let counts = Counts { events, checkpoints: checkpoints.len() as u64, keys: self.keys.len() as u64 };
        files.push(
            out.member(bundle::CHECKPOINTS, &bundle::json_bytes(&CheckpointsFile { checkpoints })).await?,
        );
        files.push(out.member(bundle::KEYS, &bundle::json_bytes(&KeysFile { keys: self.keys })).await?);
        files.push(out.member(bundle::START, &bundle::json_bytes(&start)).await?);
        files.extend(ocsf_entry);
        let manifest = Manifest {
            format: bundle::FORMAT.to_owned(),
            chain: self.chain,
            tenant: self.tenant,
            range: SeqRange { from: self.from, to: self.to },
            counts,
            exported_at: self.exported_at,
            files,
        };
        out.member(bundle::MANIFEST, &bundle::json_bytes(&manifest)).await?;
        out.put(&[0; 2 * bundle::TAR_BLOCK as usize]).await?;
        out.out.flush().await?;
        Ok(Exported {
            manifest,
            bytes: out.bytes,
            peak_batch_rows: peak_rows,
            peak_batch_bytes: peak_bytes,
            subtrees_kept: tree.kept(),
        })
    }

    /// Second pass over the same rows (same snapshot) for `ocsf.jsonl`, whose size the first
    /// pass measured.
    async fn stream_ocsf<W: AsyncWrite + Unpin>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        out: &mut TarOut<W>,
        announced: u64,
    ) -> Result<FileEntry, ExportError> {
        out.header(bundle::OCSF, announced).await?;
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut lines = Vec::new();
        let mut written = 0u64;
        let mut after = to_i64(self.from - 1);
        loop {
            let rows = batch(tx, &self.chain, (self.from, self.to), after, self.to).await?;
            lines.clear();
            for row in &rows {
                let h = to_hash(row.try_get::<&[u8], _>("hash")?);
                if let Some(body) = row.try_get::<Option<&str>, _>("body")? {
                    ocsf_line(body, &h, &mut lines);
                }
                after = row.try_get("seq")?;
            }
            written += lines.len() as u64;
            if written > announced {
                return Err(ExportError::SizeMismatch { file: bundle::OCSF, announced, written });
            }
            sha.update(&lines);
            out.put(&lines).await?;
            if rows.len() < BATCH_ROWS {
                break;
            }
        }
        if written != announced {
            return Err(ExportError::SizeMismatch { file: bundle::OCSF, announced, written });
        }
        out.pad(written).await?;
        Ok(FileEntry {
            name: bundle::OCSF.to_owned(),
            bytes: written,
            sha256: hash::to_hex(sha.finish().as_ref()),
        })
    }
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
    Ok(lo.zip(hi).map(|(lo, hi)| (to_u64(lo), to_u64(hi))))
}
