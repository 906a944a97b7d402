//! The offline verifier: everything a reviewer needs is in the bundle (plus, ideally, the
//! public keys they already trust).
//!
//! Checks, in this order, stopping at the first failure:
//! 1. every checkpoint's key is known (and trusted, when keys are pinned), its signature is
//!    valid, and checkpoints are in order;
//! 2. events, in file order: well-formed, `SHA-256(E)` equals the stated hash, seqs consecutive,
//!    each `prev_hash` is the previous event's hash, and at each checkpoint's size the Merkle
//!    root computed from the events equals the signed one. A checkpoint that does not match
//!    while a later one does is reported as not extended by that later one (a forked history);
//! 3. no checkpoint covers more events than the bundle holds (truncation);
//! 4. the consistency proofs between consecutive checkpoints hold;
//! 5. the manifest matches (chain, range, counts, each file's size and SHA-256).

use std::collections::HashMap;

use crate::bundle::{self, Bundle, CheckpointsFile, KeysFile, Manifest, StartFile};
use crate::checkpoint::Checkpoint;
use crate::event::{scan_line, split_line, EventHead, EVENT_VERSION};
use crate::hash::{self, Hash};
use crate::keys::PublicKey;
use crate::merkle::{leaf_hash, verify_consistency, CompactRange};

/// The first thing found wrong with a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("events.jsonl line {line}: not a Cella audit event ({problem})")]
    Malformed { line: u64, problem: String },
    #[error("event {seq}: hash mismatch")]
    HashMismatch { seq: u64 },
    #[error("event {seq}: belongs to {found}, not {expected}")]
    WrongChain { seq: u64, found: String, expected: String },
    #[error("gap after {after}")]
    Gap { after: u64 },
    #[error("event {seq}: out of order after {after}")]
    OutOfOrder { seq: u64, after: u64 },
    #[error("event {seq}: duplicate seq")]
    Duplicate { seq: u64 },
    #[error("event {seq}: prev_hash does not match the hash of event {prev}")]
    BrokenLink { seq: u64, prev: u64 },
    #[error("checkpoint {index}: key {key_id} is not in the bundle")]
    UnknownKey { index: u64, key_id: String },
    #[error("checkpoint {index}: key {key_id} is not trusted")]
    UntrustedKey { index: u64, key_id: String },
    #[error("checkpoint {index} signature invalid for key {key_id}")]
    BadSignature { index: u64, key_id: String },
    #[error("checkpoint {index} is for {found}, not {expected}")]
    CheckpointChain { index: u64, found: String, expected: String },
    #[error("checkpoint {index} is out of order after checkpoint {after}")]
    CheckpointOrder { index: u64, after: u64 },
    #[error("checkpoint {index} is not extended by checkpoint {next}")]
    NotExtended { index: u64, next: u64 },
    #[error("checkpoint {index}: consistency proof from checkpoint {from} is invalid")]
    BadConsistencyProof { index: u64, from: u64 },
    #[error("checkpoint {index}: root hash does not match events 1..{size}")]
    RootMismatch { index: u64, size: u64 },
    #[error("checkpoint {index} covers 1..{size}, which ends before this bundle's first event")]
    BeforeRange { index: u64, size: u64 },
    #[error("truncated after {last}: checkpoint {index} covers events up to {size}")]
    Truncated { last: u64, index: u64, size: u64 },
    #[error("manifest: {0}")]
    Manifest(String),
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The chain.
    pub chain: String,
    /// Number of events.
    pub events: u64,
    /// First and last seq.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Number of checkpoints verified.
    pub checkpoints: u64,
    /// Ids of the keys that signed them, in order of first use.
    pub keys: Vec<String>,
    /// Whether the keys were pinned with trusted keys (otherwise the bundle's own keys were used).
    pub pinned: bool,
    /// Events after the last checkpoint: chained, but not yet covered by a signature.
    pub unsigned_tail: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = if self.keys.is_empty() { "none".to_owned() } else { self.keys.join(", ") };
        write!(
            f,
            "OK: {} events, seq {}..{}, {} checkpoints, key(s) {}",
            self.events, self.first_seq, self.last_seq, self.checkpoints, keys
        )
    }
}

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keys the reviewer trusts. Empty: trust the bundle's own `keys.json` (tamper-evident
    /// against anyone without a signing key, but not against whoever produced the bundle).
    pub trusted: Vec<PublicKey>,
    /// Threads for hashing events (0: one per core).
    pub threads: usize,
}

fn parse_json<'a, T: serde::Deserialize<'a>>(bundle: &'a Bundle, name: &str) -> Result<T, Failure> {
    let data = bundle.files.get(name).ok_or_else(|| Failure::Bundle(format!("no {name}")))?;
    serde_json::from_slice(data).map_err(|e| Failure::Bundle(format!("{name} is not valid: {e}")))
}

/// One event after the parallel stage.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    seq: u64,
    hash: Hash,
    prev: Hash,
    leaf: Hash,
}

/// Events parsed so far, and the first failure with its position.
type ParseResult = (Vec<Parsed>, Option<(usize, Failure)>);

/// Parses and hashes the lines of one chunk; stops at the first bad line (its index in the
/// chunk and the failure, with a line number relative to the chunk).
fn parse_chunk(chunk: &[u8], chain: &str, tenant: Option<&str>) -> ParseResult {
    let mut out = Vec::with_capacity(chunk.len() / 300 + 1);
    let mut pos = 0;
    let mut i = 0;
    loop {
        let rest = &chunk[pos..];
        let (body, stated, head, len) = match scan_line(rest) {
            Some(fast) => fast,
            None => {
                let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                return (out, Some((i, slow_path_failure(&rest[..end], i as u64 + 1))));
            }
        };
        if head.v != EVENT_VERSION {
            let f = Failure::Malformed {
                line: i as u64 + 1,
                problem: format!("unknown event version {}", head.v),
            };
            return (out, Some((i, f)));
        }
        if head.chain != chain {
            let f = Failure::WrongChain {
                seq: head.seq,
                found: head.chain.to_owned(),
                expected: chain.to_owned(),
            };
            return (out, Some((i, f)));
        }
        if let Some(t) = tenant {
            if head.tenant != Some(t) {
                let found = format!("tenant {}", head.tenant.unwrap_or("(none)"));
                let f = Failure::WrongChain { seq: head.seq, found, expected: format!("tenant {t}") };
                return (out, Some((i, f)));
            }
        }
        let hash = hash::sha256(body);
        if hash != stated {
            return (out, Some((i, Failure::HashMismatch { seq: head.seq })));
        }
        let Some(prev) = head.prev_hash else {
            let f = Failure::Malformed {
                line: i as u64 + 1,
                problem: "prev_hash is not 64 hex digits".to_owned(),
            };
            return (out, Some((i, f)));
        };
        out.push(Parsed { seq: head.seq, hash, prev, leaf: leaf_hash(&hash) });
        i += 1;
        pos += len;
        if pos >= chunk.len() {
            return (out, None);
        }
        pos += 1; // the newline
    }
}

/// Why a line that is not in the canonical layout is rejected, as precisely as serde can say.
fn slow_path_failure(line: &[u8], line_no: u64) -> Failure {
    let problem = match split_line(line) {
        None if line.is_empty() => "empty line".to_owned(),
        None => "expected {\"event\":…,\"hash\":\"…\"}".to_owned(),
        Some((body, _)) => match serde_json::from_slice::<EventHead<'_>>(body) {
            Ok(h) => format!("event {} is not in canonical form", h.seq),
            Err(e) => e.to_string(),
        },
    };
    Failure::Malformed { line: line_no, problem }
}

/// Splits `data` into about `n` pieces at line boundaries (each piece without its final `\n`).
fn split_chunks(data: &[u8], n: usize) -> Vec<&[u8]> {
    let data = data.strip_suffix(b"\n").unwrap_or(data);
    let mut chunks = Vec::with_capacity(n);
    let mut rest = data;
    for k in (1..n).rev() {
        let target = rest.len() / (k + 1);
        match rest[target..].iter().position(|b| *b == b'\n') {
            Some(p) if target > 0 => {
                chunks.push(&rest[..target + p]);
                rest = &rest[target + p + 1..];
            }
            _ => {}
        }
    }
    chunks.push(rest);
    chunks
}

/// Parses all events on up to `threads` threads; returns them in file order (one vector per
/// chunk) and the first failure with its position (number of events before it).
fn parse_events(
    data: &[u8],
    threads: usize,
    chain: &str,
    tenant: Option<&str>,
) -> (Vec<Vec<Parsed>>, Option<(usize, Failure)>) {
    if data.is_empty() {
        return (Vec::new(), None);
    }
    let chunks = split_chunks(data, threads.max(1));
    let results: Vec<ParseResult> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks.iter().map(|c| s.spawn(move || parse_chunk(c, chain, tenant))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| (Vec::new(), None))).collect()
    });
    let mut all = Vec::with_capacity(results.len());
    let mut count = 0;
    let mut lines_before = 0u64;
    for (parsed, failure) in results {
        count += parsed.len();
        // Every line of a chunk before its first bad one is an event.
        let lines = parsed.len() as u64;
        all.push(parsed);
        if let Some((_, mut f)) = failure {
            if let Failure::Malformed { line, .. } = &mut f {
                *line += lines_before;
            }
            return (all, Some((count, f)));
        }
        lines_before += lines;
    }
    (all, None)
}

type CheckpointIter<'c> = std::iter::Peekable<std::slice::Iter<'c, (Checkpoint, Vec<Hash>)>>;

/// Compares the checkpoints of size `size` with the root computed from the events.
fn check_roots<'c>(
    size: u64,
    root: Hash,
    next_cp: &mut CheckpointIter<'c>,
    mismatch: &mut Option<&'c Checkpoint>,
) -> Result<(), Failure> {
    while let Some((cp, _)) = next_cp.peek() {
        if cp.tree_size != size {
            break;
        }
        if root != cp.root {
            mismatch.get_or_insert(cp);
        } else if let Some(bad) = mismatch {
            return Err(Failure::NotExtended { index: bad.index, next: cp.index });
        }
        next_cp.next();
    }
    Ok(())
}

/// Verifies a bundle. `Err` is the first failure.
pub fn verify_bundle(bundle: &Bundle, options: &Options) -> Result<Report, Failure> {
    let manifest: Manifest = parse_json(bundle, bundle::MANIFEST)?;
    if manifest.format != bundle::FORMAT {
        return Err(Failure::Bundle(format!(
            "unknown format `{}` (this verifier reads {})",
            manifest.format,
            bundle::FORMAT
        )));
    }
    let chain = manifest.chain.as_str();
    let tenant_of_chain = chain.strip_prefix("tenant:");
    let keys_file: KeysFile = parse_json(bundle, bundle::KEYS)?;
    let cps_file: CheckpointsFile = parse_json(bundle, bundle::CHECKPOINTS)?;
    let start: StartFile = parse_json(bundle, bundle::START)?;
    let events =
        bundle.files.get(bundle::EVENTS).ok_or_else(|| Failure::Bundle("no events.jsonl".to_owned()))?;

    // 1. Keys, signatures and the order of checkpoints.
    let pinned = !options.trusted.is_empty();
    let mut bundle_keys: HashMap<&str, PublicKey> = HashMap::new();
    for k in &keys_file.keys {
        let key = k
            .decode()
            .ok_or_else(|| Failure::Bundle(format!("keys.json: key {} is not an Ed25519 key", k.id)))?;
        bundle_keys.insert(k.id.as_str(), key);
    }
    let mut checkpoints: Vec<(Checkpoint, Vec<Hash>)> = Vec::with_capacity(cps_file.checkpoints.len());
    let mut used_keys: Vec<String> = Vec::new();
    for entry in &cps_file.checkpoints {
        let j = &entry.checkpoint;
        let cp = j.decode().ok_or_else(|| {
            Failure::Bundle(format!("checkpoint {}: root or signature is not hex", j.index))
        })?;
        let key = if pinned {
            options
                .trusted
                .iter()
                .find(|k| k.id == cp.key_id)
                .cloned()
                .ok_or_else(|| Failure::UntrustedKey { index: cp.index, key_id: cp.key_id.clone() })?
        } else {
            bundle_keys
                .get(cp.key_id.as_str())
                .cloned()
                .ok_or_else(|| Failure::UnknownKey { index: cp.index, key_id: cp.key_id.clone() })?
        };
        if !key.verify(cp.signed_body().as_bytes(), &cp.signature) {
            return Err(Failure::BadSignature { index: cp.index, key_id: cp.key_id.clone() });
        }
        if cp.chain != chain {
            return Err(Failure::CheckpointChain {
                index: cp.index,
                found: cp.chain.clone(),
                expected: chain.to_owned(),
            });
        }
        if !used_keys.contains(&cp.key_id) {
            used_keys.push(cp.key_id.clone());
        }
        let proof: Option<Vec<Hash>> = entry.consistency_proof.iter().map(hash::hash_from_hex).collect();
        let proof = proof.ok_or_else(|| {
            Failure::Bundle(format!("checkpoint {}: consistency proof is not hex", cp.index))
        })?;
        checkpoints.push((cp, proof));
    }

    // 2. Events.
    let bad_start = || Failure::Bundle("start.json is not valid".to_owned());
    let hash_before = hash::hash_from_hex(&start.hash_before)
        .filter(|h| start.seq_before > 0 || *h == hash::GENESIS)
        .ok_or_else(bad_start)?;
    let peaks: Option<Vec<Hash>> = start.peaks.iter().map(hash::hash_from_hex).collect();
    let mut range =
        CompactRange::from_parts(start.seq_before, peaks.ok_or_else(bad_start)?).ok_or_else(bad_start)?;
    for pair in checkpoints.windows(2) {
        let ((old, _), (new, _)) = (&pair[0], &pair[1]);
        if new.index <= old.index || new.tree_size <= old.tree_size {
            return Err(Failure::CheckpointOrder { index: new.index, after: old.index });
        }
    }
    if let Some((cp, _)) = checkpoints.iter().find(|(cp, _)| cp.tree_size < start.seq_before) {
        return Err(Failure::BeforeRange { index: cp.index, size: cp.tree_size });
    }
    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.threads
    };
    // The manifest's SHA-256 of events.jsonl is computed alongside, on its own thread.
    let (events_sha256, (parsed, parse_failure)) = std::thread::scope(|s| {
        let whole = s.spawn(|| hash::sha256(events));
        let parsed = parse_events(events, threads, chain, tenant_of_chain);
        (whole.join().ok(), parsed)
    });
    let mut last_seq = start.seq_before;
    let mut last_hash = hash_before;
    let mut next_cp = checkpoints.iter().peekable();
    // The first checkpoint whose root did not match the events. If a later checkpoint does
    // match, that earlier one was signed over a different history: a fork the newer checkpoint
    // does not extend. Otherwise it is the events that were changed.
    let mut mismatch: Option<&Checkpoint> = None;
    check_roots(start.seq_before, range.root(), &mut next_cp, &mut mismatch)?;
    let mut failure = None;
    let mut count = 0u64;
    for (i, p) in parsed.iter().flatten().enumerate() {
        let expected = last_seq + 1;
        if p.seq != expected {
            failure = Some(if p.seq == last_seq && i > 0 {
                Failure::Duplicate { seq: p.seq }
            } else if p.seq > expected && !parsed.iter().flatten().skip(i).any(|q| q.seq == expected) {
                Failure::Gap { after: last_seq }
            } else {
                Failure::OutOfOrder { seq: p.seq, after: last_seq }
            });
            break;
        }
        if p.prev != last_hash {
            failure = Some(Failure::BrokenLink { seq: p.seq, prev: last_seq });
            break;
        }
        range.push(p.leaf);
        count += 1;
        last_seq = p.seq;
        last_hash = p.hash;
        if next_cp.peek().is_some_and(|(cp, _)| cp.tree_size == last_seq) {
            check_roots(last_seq, range.root(), &mut next_cp, &mut mismatch)?;
        }
    }
    let failure = failure.or(parse_failure.map(|(_, f)| f));
    if let Some(bad) = mismatch {
        return Err(Failure::RootMismatch { index: bad.index, size: bad.tree_size });
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    if count == 0 {
        return Err(Failure::Bundle("events.jsonl holds no events".to_owned()));
    }

    // 3. Truncation.
    if let Some((cp, _)) = next_cp.next() {
        return Err(Failure::Truncated { last: last_seq, index: cp.index, size: cp.tree_size });
    }

    // 4. The consistency proofs the bundle carries must hold too (they let a reviewer relate these
    // checkpoints to ones saved from earlier exports).
    for pair in checkpoints.windows(2) {
        let ((old, _), (new, proof)) = (&pair[0], &pair[1]);
        if !verify_consistency(old.tree_size, new.tree_size, &old.root, &new.root, proof) {
            return Err(Failure::BadConsistencyProof { index: new.index, from: old.index });
        }
    }

    // 5. The manifest.
    let first_seq = start.seq_before + 1;
    if manifest.range.from != first_seq || manifest.range.to != last_seq {
        return Err(Failure::Manifest(format!(
            "range {}..{} does not match the events ({first_seq}..{last_seq})",
            manifest.range.from, manifest.range.to
        )));
    }
    if manifest.counts.events != count
        || manifest.counts.checkpoints != checkpoints.len() as u64
        || manifest.counts.keys != keys_file.keys.len() as u64
    {
        return Err(Failure::Manifest("counts do not match the bundle's contents".to_owned()));
    }
    if manifest.tenant.as_deref() != tenant_of_chain && tenant_of_chain.is_some() {
        return Err(Failure::Manifest(format!("tenant does not match chain {chain}")));
    }
    for name in bundle.files.keys().filter(|n| n.as_str() != bundle::MANIFEST) {
        let entry = manifest
            .files
            .iter()
            .find(|e| &e.name == name)
            .ok_or_else(|| Failure::Manifest(format!("{name} is not listed")))?;
        let data = &bundle.files[name];
        let sha256 = match events_sha256 {
            Some(h) if name == bundle::EVENTS => h,
            _ => hash::sha256(data),
        };
        if entry.bytes != data.len() as u64 || entry.sha256 != hash::to_hex(&sha256) {
            return Err(Failure::Manifest(format!("sha256 of {name} does not match")));
        }
    }
    if let Some(missing) = manifest.files.iter().find(|e| !bundle.files.contains_key(&e.name)) {
        return Err(Failure::Manifest(format!("{} is listed but missing", missing.name)));
    }

    Ok(Report {
        chain: chain.to_owned(),
        events: count,
        first_seq,
        last_seq,
        checkpoints: checkpoints.len() as u64,
        keys: used_keys,
        pinned,
        unsigned_tail: last_seq - checkpoints.last().map_or(start.seq_before, |(cp, _)| cp.tree_size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_chunks_at_line_boundaries() {
        let data = b"aaa\nbb\nc\ndddd\ne\n";
        let chunks = split_chunks(data, 3);
        let joined: Vec<u8> = chunks.join(&b'\n');
        assert_eq!(joined, b"aaa\nbb\nc\ndddd\ne");
        assert!(chunks.iter().all(|c| !c.starts_with(b"\n") && !c.ends_with(b"\n")));
    }
}
