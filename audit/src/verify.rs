//! The offline verifier: everything a reviewer needs is in the bundle, plus the public keys they
//! trust, which must come from elsewhere ([`Trust::Pinned`]): a bundle's own `keys.json` is
//! whatever its maker put there, so checking against it ([`Trust::BundleKeys`]) shows only that
//! the bundle is self-consistent, and the [`Report`] says `UNTRUSTED`, never `OK`.
//!
//! Checks, in this order, stopping at the first failure:
//! 1. with pinned keys, no key in `keys.json` has a pinned key's id but other bytes; every
//!    checkpoint's key is trusted (pinned, or in the bundle with [`Trust::BundleKeys`]), its
//!    signature is valid; checkpoints are in order with consecutive indices (an export holds
//!    every checkpoint of its range, so a gap is a checkpoint removed), and only the last one may
//!    carry a tail proof;
//! 2. events, in file order: well-formed, `SHA-256(E)` equals the stated hash, seqs consecutive,
//!    each `prev_hash` is the previous event's hash, and at each checkpoint's size the Merkle
//!    root computed from the events equals the signed one. A checkpoint that does not match
//!    while a later one does is reported as not extended by that later one (a forked history);
//! 3. every event is covered by a signed checkpoint: the last checkpoint ends at the last event,
//!    or lies beyond it with a tail proof from the root over events `1..=last` to its signed
//!    root. A checkpoint beyond the last event without one means events were cut off
//!    (truncation);
//! 4. the consistency proofs between consecutive checkpoints hold;
//! 5. the manifest matches (chain, range, counts, each file's size and SHA-256).
//!
//! [`verify_tar`] verifies a bundle file without holding it in memory: it reads the small
//! members first (exports write `events.jsonl` first, so it seeks), then streams `events.jsonl`
//! in blocks through worker threads. [`verify_bundle`] runs the same checks on a [`Bundle`]
//! held in memory.

mod blocks;
mod members;
mod pipeline;

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::ops::ControlFlow;

use crate::bundle::{self, Bundle, BundleError, CheckpointsFile, KeysFile, Manifest, StartFile, TarIndex};
use crate::checkpoint::Checkpoint;
use crate::event::{scan_line, split_line, EventHead, EVENT_VERSION};
use crate::hash::{self, Hash};
use crate::keys::PublicKey;
use crate::merkle::{leaf_hash, verify_consistency, CompactRange};
use blocks::BLOCK_SIZE;
use members::{InMemory, Members, TarMembers};
use pipeline::StreamDigest;

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
    #[error("{file}: key {key_id} is not the trusted key {key_id}")]
    KeyMismatch { file: &'static str, key_id: String },
    #[error("checkpoint {index} signature invalid for key {key_id}")]
    BadSignature { index: u64, key_id: String },
    #[error("checkpoint {index} is for {found}, not {expected}")]
    CheckpointChain { index: u64, found: String, expected: String },
    #[error("checkpoint {index} is out of order after checkpoint {after}")]
    CheckpointOrder { index: u64, after: u64 },
    #[error("checkpoint {index} is missing between checkpoints {after} and {before}")]
    MissingCheckpoint { index: u64, after: u64, before: u64 },
    #[error("checkpoint {index} is missing before checkpoint {before}")]
    MissingFirstCheckpoint { index: u64, before: u64 },
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
    #[error("event {seq} is not included in checkpoint {index} (the audit path does not lead to its root)")]
    NotIncluded { seq: u64, index: u64 },
    #[error("checkpoint {index}: tail proof from events 1..{last} is invalid")]
    BadTailProof { index: u64, last: u64 },
    #[error("event {seq}: not covered by a signed checkpoint ({})", coverage(.covered))]
    NotCovered { seq: u64, covered: u64 },
    #[error("manifest: {0}")]
    Manifest(String),
}

/// What the checkpoints of a bundle cover, for [`Failure::NotCovered`].
fn coverage(covered: &u64) -> String {
    match covered {
        0 => "the bundle holds no checkpoint".to_owned(),
        n => format!("checkpoints cover 1..{n}"),
    }
}

/// Why verifying a bundle file stopped: it could not be read as a bundle, or it failed a check.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Read(#[from] BundleError),
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// What a verification that found nothing wrong established. Against pinned keys, that trusted
/// keys signed checkpoints covering every event (`OK`); against the bundle's own keys, only that
/// the bundle is consistent with itself (`UNTRUSTED`).
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
    /// Whether the keys were pinned with trusted keys (otherwise the bundle's own keys were used,
    /// and the report says `UNTRUSTED`).
    pub pinned: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = if self.keys.is_empty() { "none".to_owned() } else { self.keys.join(", ") };
        let (verdict, whose) =
            if self.pinned { ("OK", "") } else { ("UNTRUSTED", " from the bundle itself") };
        write!(
            f,
            "{verdict}: {} events, seq {}..{}, {} checkpoints, key(s) {keys}{whose}",
            self.events, self.first_seq, self.last_seq, self.checkpoints
        )
    }
}

/// Whose public keys checkpoint signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Keys the reviewer obtained apart from the bundle (several across key rotations). A key in
    /// the bundle's `keys.json` with one of their ids must be the same key.
    Pinned(Vec<PublicKey>),
    /// The bundle's own `keys.json`. Every check runs, but whoever made the bundle could have
    /// made those keys too: a pass proves nothing about who made it (the report says so).
    BundleKeys,
}

/// How to verify.
#[derive(Debug, Clone)]
pub struct Options {
    /// Whose keys to check signatures against.
    pub trust: Trust,
    /// Threads for hashing events (0: one per core).
    pub threads: usize,
}

impl Options {
    /// Against `keys`, one hashing thread per core.
    pub fn pinned(keys: Vec<PublicKey>) -> Self {
        Self { trust: Trust::Pinned(keys), threads: 0 }
    }

    /// Against the bundle's own keys (proves nothing about who made it), one thread per core.
    pub fn bundle_keys() -> Self {
        Self { trust: Trust::BundleKeys, threads: 0 }
    }

    /// The same, with `threads` hashing threads.
    pub fn with_threads(self, threads: usize) -> Self {
        Self { threads, ..self }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    members: &mut dyn Members,
    name: &str,
) -> Result<T, VerifyError> {
    let data = members.contents(name)?.ok_or_else(|| Failure::Bundle(format!("no {name}")))?;
    Ok(serde_json::from_slice(&data).map_err(|e| Failure::Bundle(format!("{name} is not valid: {e}")))?)
}

/// One event after the parallel stage.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    seq: u64,
    hash: Hash,
    prev: Hash,
    leaf: Hash,
}

/// The events of one block, up to its first bad line.
#[derive(Debug)]
struct ParsedBlock {
    events: Vec<Parsed>,
    /// The first bad line, numbered from 1 within the block.
    failure: Option<Failure>,
}

/// Parses and hashes the lines of one block (each line ends with `\n` but perhaps the file's
/// last); stops at the first bad line.
fn parse_block(block: &[u8], chain: &str, tenant: Option<&str>) -> ParsedBlock {
    let lines = block.strip_suffix(b"\n").unwrap_or(block);
    let mut events = Vec::with_capacity(lines.len() / 300 + 1);
    let mut pos = 0;
    loop {
        let line_no = events.len() as u64 + 1;
        match parse_line(&lines[pos..], line_no, chain, tenant) {
            Ok((parsed, len)) => {
                events.push(parsed);
                pos += len;
            }
            Err(failure) => return ParsedBlock { events, failure: Some(failure) },
        }
        if pos >= lines.len() {
            return ParsedBlock { events, failure: None };
        }
        pos += 1; // the newline
    }
}

/// Parses and hashes the line that starts `rest`; returns it and its length.
fn parse_line(
    rest: &[u8],
    line_no: u64,
    chain: &str,
    tenant: Option<&str>,
) -> Result<(Parsed, usize), Failure> {
    let Some((body, stated, head, len)) = scan_line(rest) else {
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        return Err(slow_path_failure(&rest[..end], line_no));
    };
    if head.v != EVENT_VERSION {
        return Err(Failure::Malformed {
            line: line_no,
            problem: format!("unknown event version {}", head.v),
        });
    }
    if head.chain != chain {
        return Err(Failure::WrongChain {
            seq: head.seq,
            found: head.chain.to_owned(),
            expected: chain.to_owned(),
        });
    }
    if let Some(t) = tenant {
        if head.tenant != Some(t) {
            let found = format!("tenant {}", head.tenant.unwrap_or("(none)"));
            return Err(Failure::WrongChain { seq: head.seq, found, expected: format!("tenant {t}") });
        }
    }
    let hash = hash::sha256(body);
    if hash != stated {
        return Err(Failure::HashMismatch { seq: head.seq });
    }
    let Some(prev) = head.prev_hash else {
        return Err(Failure::Malformed {
            line: line_no,
            problem: "prev_hash is not 64 hex digits".to_owned(),
        });
    };
    Ok((Parsed { seq: head.seq, hash, prev, leaf: leaf_hash(&hash) }, len))
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

/// A checkpoint whose signature checked out, with the proofs the bundle gave for it.
#[derive(Debug)]
struct SignedCheckpoint {
    cp: Checkpoint,
    /// Consistency proof from the checkpoint before it in the file.
    consistency: Vec<Hash>,
    /// Consistency proof from the tree of the bundle's events to this checkpoint's tree.
    tail: Option<Vec<Hash>>,
}

type CheckpointIter<'c> = std::iter::Peekable<std::slice::Iter<'c, SignedCheckpoint>>;

/// Compares the checkpoints of size `size` with the root computed from the events.
fn check_roots<'c>(
    size: u64,
    root: Hash,
    next_cp: &mut CheckpointIter<'c>,
    mismatch: &mut Option<&'c Checkpoint>,
) -> Result<(), Failure> {
    while let Some(SignedCheckpoint { cp, .. }) = next_cp.peek() {
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

/// Where the sequential checks stand.
#[derive(Debug)]
enum SequenceState {
    /// Every event so far passed.
    Checking,
    /// Event `seq` came where `expected` was due: out of order if `expected` comes later,
    /// otherwise a gap after `after`.
    Awaiting { expected: u64, seq: u64, after: u64 },
    /// Stopped at this failure.
    Failed(Failure),
}

/// The checks made in file order as parsed blocks come back: consecutive seqs, each
/// `prev_hash` the hash of the event before, and the signed roots at each checkpoint's size.
struct Sequence<'c> {
    last_seq: u64,
    last_hash: Hash,
    range: CompactRange,
    count: u64,
    /// Lines of the blocks taken whole (every one of them an event).
    lines: u64,
    next_cp: CheckpointIter<'c>,
    /// The first checkpoint whose root did not match the events. If a later checkpoint does
    /// match, that earlier one was signed over a different history: a fork the newer checkpoint
    /// does not extend. Otherwise it is the events that were changed.
    mismatch: Option<&'c Checkpoint>,
    state: SequenceState,
    /// The first bad line, which ends the events.
    bad_line: Option<Failure>,
    /// A failure reported before any other (a checkpoint not extended by a later one).
    fatal: Option<Failure>,
}

/// What the events established.
struct Tally {
    count: u64,
    last_seq: u64,
    /// The Merkle root over events `1..=last_seq`.
    root: Hash,
}

impl<'c> Sequence<'c> {
    /// Starts after `seq_before` (hash `hash_before`, Merkle range `range`).
    fn new(
        seq_before: u64,
        hash_before: Hash,
        range: CompactRange,
        checkpoints: &'c [SignedCheckpoint],
    ) -> Result<Self, Failure> {
        let mut next_cp = checkpoints.iter().peekable();
        let mut mismatch = None;
        check_roots(seq_before, range.root(), &mut next_cp, &mut mismatch)?;
        Ok(Self {
            last_seq: seq_before,
            last_hash: hash_before,
            range,
            count: 0,
            lines: 0,
            next_cp,
            mismatch,
            state: SequenceState::Checking,
            bad_line: None,
            fatal: None,
        })
    }

    /// Takes the next parsed block; breaks once the outcome is known.
    fn take_block(&mut self, block: ParsedBlock) -> ControlFlow<()> {
        for event in &block.events {
            match self.take_event(event) {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => return ControlFlow::Break(()),
                Err(fatal) => {
                    self.fatal = Some(fatal);
                    return ControlFlow::Break(());
                }
            }
        }
        if let Some(mut failure) = block.failure {
            if let Failure::Malformed { line, .. } = &mut failure {
                *line += self.lines;
            }
            self.bad_line = Some(failure);
            return ControlFlow::Break(());
        }
        self.lines += block.events.len() as u64;
        ControlFlow::Continue(())
    }

    fn take_event(&mut self, p: &Parsed) -> Result<ControlFlow<()>, Failure> {
        match self.state {
            SequenceState::Checking => {}
            SequenceState::Awaiting { expected, seq, after } => {
                if p.seq == expected {
                    return Ok(self.fail(Failure::OutOfOrder { seq, after }));
                }
                return Ok(ControlFlow::Continue(()));
            }
            SequenceState::Failed(_) => return Ok(ControlFlow::Break(())),
        }
        let expected = self.last_seq + 1;
        if p.seq != expected {
            if p.seq == self.last_seq && self.count > 0 {
                return Ok(self.fail(Failure::Duplicate { seq: p.seq }));
            }
            if p.seq < expected {
                return Ok(self.fail(Failure::OutOfOrder { seq: p.seq, after: self.last_seq }));
            }
            self.state = SequenceState::Awaiting { expected, seq: p.seq, after: self.last_seq };
            return Ok(ControlFlow::Continue(()));
        }
        if p.prev != self.last_hash {
            return Ok(self.fail(Failure::BrokenLink { seq: p.seq, prev: self.last_seq }));
        }
        self.range.push(p.leaf);
        self.count += 1;
        self.last_seq = p.seq;
        self.last_hash = p.hash;
        if self.next_cp.peek().is_some_and(|c| c.cp.tree_size == self.last_seq) {
            check_roots(self.last_seq, self.range.root(), &mut self.next_cp, &mut self.mismatch)?;
        }
        Ok(ControlFlow::Continue(()))
    }

    fn fail(&mut self, failure: Failure) -> ControlFlow<()> {
        self.state = SequenceState::Failed(failure);
        ControlFlow::Break(())
    }

    /// The outcome once no more blocks come: the first failure by precedence, or the tally.
    fn finish(self) -> Result<Tally, Failure> {
        if let Some(fatal) = self.fatal {
            return Err(fatal);
        }
        let failure = match self.state {
            SequenceState::Checking => None,
            SequenceState::Awaiting { after, .. } => Some(Failure::Gap { after }),
            SequenceState::Failed(failure) => Some(failure),
        };
        if let Some(bad) = self.mismatch {
            return Err(Failure::RootMismatch { index: bad.index, size: bad.tree_size });
        }
        if let Some(failure) = failure.or(self.bad_line) {
            return Err(failure);
        }
        if self.count == 0 {
            return Err(Failure::Bundle("events.jsonl holds no events".to_owned()));
        }
        Ok(Tally { count: self.count, last_seq: self.last_seq, root: self.range.root() })
    }
}

/// Checkpoints whose keys and signatures check out, in file order.
struct Signed {
    checkpoints: Vec<SignedCheckpoint>,
    /// Ids of the keys that signed them, in order of first use.
    used_keys: Vec<String>,
}

fn hex_proof(proof: &[String], index: u64, what: &str) -> Result<Vec<Hash>, Failure> {
    let proof: Option<Vec<Hash>> = proof.iter().map(hash::hash_from_hex).collect();
    proof.ok_or_else(|| Failure::Bundle(format!("checkpoint {index}: {what} is not hex")))
}

/// The keys signatures are checked against: the pinned ones (after checking that `keys.json`
/// does not hold another key under one of their ids), or the bundle's own.
fn signature_keys(keys_file: &KeysFile, trust: &Trust) -> Result<HashMap<String, PublicKey>, Failure> {
    let mut bundle_keys: HashMap<String, PublicKey> = HashMap::new();
    for k in &keys_file.keys {
        let key = k
            .decode()
            .ok_or_else(|| Failure::Bundle(format!("keys.json: key {} is not an Ed25519 key", k.id)))?;
        if bundle_keys.insert(k.id.clone(), key).is_some() {
            return Err(Failure::Bundle(format!("keys.json: key {} is listed twice", k.id)));
        }
    }
    match trust {
        Trust::BundleKeys => Ok(bundle_keys),
        Trust::Pinned(pinned) => {
            for k in &keys_file.keys {
                let differs = |p: &&PublicKey| p.id == k.id && bundle_keys.get(&k.id) != Some(*p);
                if pinned.iter().any(|p| differs(&p)) {
                    return Err(Failure::KeyMismatch { file: bundle::KEYS, key_id: k.id.clone() });
                }
            }
            Ok(pinned.iter().map(|k| (k.id.clone(), k.clone())).collect())
        }
    }
}

/// Step 1: every checkpoint's key is trusted, its signature valid, its chain `chain`.
fn check_signatures(
    keys_file: &KeysFile,
    cps_file: &CheckpointsFile,
    chain: &str,
    trust: &Trust,
) -> Result<Signed, Failure> {
    let keys = signature_keys(keys_file, trust)?;
    let mut checkpoints: Vec<SignedCheckpoint> = Vec::with_capacity(cps_file.checkpoints.len());
    let mut used_keys: Vec<String> = Vec::new();
    for entry in &cps_file.checkpoints {
        let j = &entry.checkpoint;
        let cp = j.decode().ok_or_else(|| {
            Failure::Bundle(format!("checkpoint {}: root or signature is not hex", j.index))
        })?;
        let key = keys.get(&cp.key_id).ok_or_else(|| match trust {
            Trust::BundleKeys => Failure::UnknownKey { index: cp.index, key_id: cp.key_id.clone() },
            Trust::Pinned(_) => Failure::UntrustedKey { index: cp.index, key_id: cp.key_id.clone() },
        })?;
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
        let consistency = hex_proof(&entry.consistency_proof, cp.index, "consistency proof")?;
        let tail = entry.tail_proof.as_deref().map(|p| hex_proof(p, cp.index, "tail proof")).transpose()?;
        checkpoints.push(SignedCheckpoint { cp, consistency, tail });
    }
    Ok(Signed { checkpoints, used_keys })
}

/// The chain state `start.json` describes: the hash before the first event and the Merkle range
/// over the events before it.
fn start_state(start: &StartFile) -> Result<(Hash, CompactRange), Failure> {
    let bad_start = || Failure::Bundle("start.json is not valid".to_owned());
    let hash_before = hash::hash_from_hex(&start.hash_before)
        .filter(|h| start.seq_before > 0 || *h == hash::GENESIS)
        .ok_or_else(bad_start)?;
    let peaks: Option<Vec<Hash>> = start.peaks.iter().map(hash::hash_from_hex).collect();
    let range =
        CompactRange::from_parts(start.seq_before, peaks.ok_or_else(bad_start)?).ok_or_else(bad_start)?;
    Ok((hash_before, range))
}

/// Checkpoints grow in size with consecutive indices (an export holds every checkpoint of its
/// range), the first being checkpoint 1 in a bundle from seq 1; none ends before the bundle's
/// first event; only the last may carry a tail proof (and only in format 2).
fn check_checkpoint_order(
    checkpoints: &[SignedCheckpoint],
    seq_before: u64,
    tail_proofs: bool,
) -> Result<(), Failure> {
    for pair in checkpoints.windows(2) {
        let (old, new) = (&pair[0].cp, &pair[1].cp);
        if new.index <= old.index || new.tree_size <= old.tree_size {
            return Err(Failure::CheckpointOrder { index: new.index, after: old.index });
        }
        if new.index != old.index + 1 {
            return Err(Failure::MissingCheckpoint {
                index: old.index + 1,
                after: old.index,
                before: new.index,
            });
        }
    }
    if let Some(first) = checkpoints.first().map(|c| &c.cp) {
        // Every checkpoint's size is at least 1, so a bundle from seq 1 holds all of them.
        if seq_before == 0 && first.index != 1 {
            return Err(Failure::MissingFirstCheckpoint { index: 1, before: first.index });
        }
    }
    if let Some(c) = checkpoints.iter().find(|c| c.cp.tree_size < seq_before) {
        return Err(Failure::BeforeRange { index: c.cp.index, size: c.cp.tree_size });
    }
    let with_tail = checkpoints.iter().position(|c| c.tail.is_some());
    if let Some(at) = with_tail {
        let index = checkpoints[at].cp.index;
        if !tail_proofs {
            return Err(Failure::Bundle(format!(
                "checkpoint {index} carries a tail proof, which format {} bundles do not have",
                bundle::FORMAT_V1
            )));
        }
        if at + 1 != checkpoints.len() {
            return Err(Failure::Bundle(format!(
                "checkpoint {index} carries a tail proof but is not the last checkpoint"
            )));
        }
    }
    Ok(())
}

/// Step 2: the events, streamed through the workers into `sequence`; returns the tally and the
/// size and SHA-256 of `events.jsonl`.
fn verify_events(
    members: &mut dyn Members,
    workers: usize,
    chain: &str,
    tenant: Option<&str>,
    mut sequence: Sequence<'_>,
) -> Result<(Tally, Option<StreamDigest>), VerifyError> {
    let mut blocks = members.events(workers)?.ok_or_else(|| Failure::Bundle("no events.jsonl".to_owned()))?;
    let parse = |block: &[u8]| parse_block(block, chain, tenant);
    let digest = pipeline::run(&mut *blocks, workers, &parse, &mut |block| sequence.take_block(block))
        .map_err(|e| members::read_error(bundle::EVENTS, e))?;
    Ok((sequence.finish()?, digest))
}

/// Step 3: every event is covered by a signed checkpoint. Either the last checkpoint ends at the
/// last event, or it lies beyond it with a tail proof from `root` (over events `1..=last_seq`)
/// to its signed root; a checkpoint beyond the last event without one, or a second one beyond
/// it, means events were cut off.
fn check_coverage(
    checkpoints: &[SignedCheckpoint],
    seq_before: u64,
    last_seq: u64,
    root: &Hash,
) -> Result<(), Failure> {
    let mut beyond = checkpoints.iter().filter(|c| c.cp.tree_size > last_seq);
    let Some(first) = beyond.next() else {
        let covered = checkpoints.last().map_or(0, |c| c.cp.tree_size);
        if covered < last_seq {
            return Err(Failure::NotCovered { seq: covered.max(seq_before) + 1, covered });
        }
        if let Some(c) = checkpoints.last().filter(|c| c.tail.is_some()) {
            return Err(Failure::Bundle(format!(
                "checkpoint {} carries a tail proof but ends at the bundle's last event {last_seq}",
                c.cp.index
            )));
        }
        return Ok(());
    };
    let truncated =
        |c: &SignedCheckpoint| Failure::Truncated { last: last_seq, index: c.cp.index, size: c.cp.tree_size };
    let Some(proof) = &first.tail else { return Err(truncated(first)) };
    if let Some(second) = beyond.next() {
        return Err(truncated(second));
    }
    if !verify_consistency(last_seq, first.cp.tree_size, root, &first.cp.root, proof) {
        return Err(Failure::BadTailProof { index: first.cp.index, last: last_seq });
    }
    Ok(())
}

/// Step 4: the consistency proofs between consecutive checkpoints hold.
fn check_consistency(checkpoints: &[SignedCheckpoint]) -> Result<(), Failure> {
    for pair in checkpoints.windows(2) {
        let (old, new) = (&pair[0].cp, &pair[1].cp);
        let proof = &pair[1].consistency;
        if !verify_consistency(old.tree_size, new.tree_size, &old.root, &new.root, proof) {
            return Err(Failure::BadConsistencyProof { index: new.index, from: old.index });
        }
    }
    Ok(())
}

/// Step 5: every member but the manifest is listed with its size and SHA-256, and every listed
/// one is there (`events` is `events.jsonl`'s, computed while it was streamed).
fn check_manifest_files(
    manifest: &Manifest,
    members: &mut dyn Members,
    events: Option<StreamDigest>,
) -> Result<(), VerifyError> {
    let names = members.names();
    for name in names.iter().filter(|n| n.as_str() != bundle::MANIFEST) {
        let entry = manifest
            .files
            .iter()
            .find(|e| &e.name == name)
            .ok_or_else(|| Failure::Manifest(format!("{name} is not listed")))?;
        let digest = match events {
            Some(digest) if name == bundle::EVENTS => Some(digest),
            _ => members.digest(name)?,
        };
        let matches =
            digest.is_some_and(|d| entry.bytes == d.bytes && entry.sha256 == hash::to_hex(&d.sha256));
        if !matches {
            return Err(Failure::Manifest(format!("sha256 of {name} does not match")).into());
        }
    }
    if let Some(missing) = manifest.files.iter().find(|e| !names.contains(&e.name)) {
        return Err(Failure::Manifest(format!("{} is listed but missing", missing.name)).into());
    }
    Ok(())
}

/// Verifies a bundle held in memory. `Err` is the first failure.
pub fn verify_bundle(bundle: &Bundle, options: &Options) -> Result<Report, Failure> {
    verify_members(&mut InMemory::new(bundle, BLOCK_SIZE), options).map_err(|e| match e {
        VerifyError::Failed(failure) => failure,
        // Reading from memory does not fail; should it, it is still a bundle that did not verify.
        VerifyError::Read(e) => Failure::Bundle(e.to_string()),
    })
}

/// Verifies a tar bundle read from `reader` (a file), in memory bounded by the block size
/// rather than by the bundle: small members are read first, `events.jsonl` is streamed.
pub fn verify_tar<R: Read + Seek + Send>(mut reader: R, options: &Options) -> Result<Report, VerifyError> {
    let index = TarIndex::read(&mut reader)?;
    verify_members(&mut TarMembers::new(reader, index, BLOCK_SIZE), options)
}

/// The verifier. `Err` is the first failure (or what stopped reading the bundle).
fn verify_members(members: &mut dyn Members, options: &Options) -> Result<Report, VerifyError> {
    let manifest: Manifest = parse_json(members, bundle::MANIFEST)?;
    if manifest.format != bundle::FORMAT && manifest.format != bundle::FORMAT_V1 {
        return Err(Failure::Bundle(format!(
            "unknown format `{}` (this verifier reads {} and {})",
            manifest.format,
            bundle::FORMAT,
            bundle::FORMAT_V1
        ))
        .into());
    }
    let chain = manifest.chain.as_str();
    let tenant_of_chain = chain.strip_prefix("tenant:");
    let keys_file: KeysFile = parse_json(members, bundle::KEYS)?;
    let cps_file: CheckpointsFile = parse_json(members, bundle::CHECKPOINTS)?;
    let start: StartFile = parse_json(members, bundle::START)?;
    if !members.names().iter().any(|n| n == bundle::EVENTS) {
        return Err(Failure::Bundle("no events.jsonl".to_owned()).into());
    }

    // 1. Keys, signatures and the order of checkpoints.
    let Signed { checkpoints, used_keys } = check_signatures(&keys_file, &cps_file, chain, &options.trust)?;
    check_checkpoint_order(&checkpoints, start.seq_before, manifest.format == bundle::FORMAT)?;

    // 2. Events.
    let (hash_before, range) = start_state(&start)?;
    let workers = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.threads
    };
    let sequence = Sequence::new(start.seq_before, hash_before, range, &checkpoints)?;
    let (tally, events_digest) = verify_events(members, workers, chain, tenant_of_chain, sequence)?;
    let Tally { count, last_seq, root } = tally;

    // 3. Every event covered by a signed checkpoint, and none cut off.
    check_coverage(&checkpoints, start.seq_before, last_seq, &root)?;

    // 4. The consistency proofs the bundle carries must hold too (they let a reviewer relate these
    // checkpoints to ones saved from earlier exports).
    check_consistency(&checkpoints)?;

    // 5. The manifest.
    let first_seq = start.seq_before + 1;
    if manifest.range.from != first_seq || manifest.range.to != last_seq {
        return Err(Failure::Manifest(format!(
            "range {}..{} does not match the events ({first_seq}..{last_seq})",
            manifest.range.from, manifest.range.to
        ))
        .into());
    }
    if manifest.counts.events != count
        || manifest.counts.checkpoints != checkpoints.len() as u64
        || manifest.counts.keys != keys_file.keys.len() as u64
    {
        return Err(Failure::Manifest("counts do not match the bundle's contents".to_owned()).into());
    }
    if manifest.tenant.as_deref() != tenant_of_chain && tenant_of_chain.is_some() {
        return Err(Failure::Manifest(format!("tenant does not match chain {chain}")).into());
    }
    check_manifest_files(&manifest, members, events_digest)?;

    Ok(Report {
        chain: chain.to_owned(),
        events: count,
        first_seq,
        last_seq,
        checkpoints: checkpoints.len() as u64,
        keys: used_keys,
        pinned: matches!(options.trust, Trust::Pinned(_)),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use serde_json::json;
    use time::OffsetDateTime;

    use super::*;
    use crate::bundle::OfflineChain;
    use crate::keys::SigningKey;
    use crate::{Actor, NewEvent, Resource, TenantId};

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    /// Event `seq` of tenant `acme` (its details carry `note`).
    fn event(seq: u64, note: &str) -> NewEvent {
        let details = json!({"n": seq, "note": note, "pad": "x".repeat((seq % 17) as usize)});
        NewEvent::tenant(
            TenantId::new("acme").unwrap(),
            Actor::ApiKey("key_1".into()),
            "job.created",
            Resource::new("job", format!("job-{seq}")),
            details,
        )
    }

    /// `n` events of tenant `acme` signed by `key`, with a checkpoint every `every` events.
    fn chain_of(key: &SigningKey, n: u64, every: u64, note: &str) -> OfflineChain {
        let events = (1..=n).map(|seq| (event(seq, note), t0()));
        OfflineChain::build(&TenantId::new("acme").unwrap(), key, events, |seq| seq % every == 0)
    }

    fn read_back(contents: &bundle::BundleContents) -> Bundle {
        let mut tar = Vec::new();
        bundle::write_bundle(contents, &mut tar).unwrap();
        Bundle::read(&tar[..]).unwrap()
    }

    /// A valid bundle of `n` events of tenant `acme`, with a checkpoint every `every` events.
    fn bundle(n: u64, every: u64) -> Bundle {
        let key = SigningKey::generate("k1").unwrap();
        read_back(&chain_of(&key, n, every, "hello").bundle(1, n, true, t0()))
    }

    fn tar_of(b: &Bundle) -> Vec<u8> {
        let mut tar = Vec::new();
        b.write(&mut tar).unwrap();
        tar
    }

    fn failed(result: Result<Report, VerifyError>) -> Result<Report, Failure> {
        result.map_err(|e| match e {
            VerifyError::Failed(failure) => failure,
            VerifyError::Read(e) => panic!("cannot read the bundle: {e}"),
        })
    }

    /// Verifies `b` in memory and streamed from its tar file, `events.jsonl` in blocks of
    /// `block_size` bytes, and checks that both say the same.
    fn verify_both(b: &Bundle, block_size: usize) -> Result<Report, Failure> {
        verify_both_with(b, block_size, &Options::bundle_keys().with_threads(2))
    }

    fn verify_both_with(b: &Bundle, block_size: usize, options: &Options) -> Result<Report, Failure> {
        let in_memory = failed(verify_members(&mut InMemory::new(b, block_size), options));
        let mut reader = Cursor::new(tar_of(b));
        let index = TarIndex::read(&mut reader).unwrap();
        let streamed = failed(verify_members(&mut TarMembers::new(reader, index, block_size), options));
        assert_eq!(streamed, in_memory, "block size {block_size}");
        in_memory
    }

    fn lines(b: &Bundle) -> Vec<Vec<u8>> {
        b.files[bundle::EVENTS].split_inclusive(|c| *c == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn with_lines(b: &Bundle, lines: &[Vec<u8>]) -> Bundle {
        let mut b = b.clone();
        b.files.insert(bundle::EVENTS.to_owned(), lines.concat());
        b.refresh_manifest();
        b
    }

    /// Block sizes that put a boundary exactly after the newline ending line `line` (1-based),
    /// a few bytes into the next line, inside every line, and nowhere.
    fn block_sizes(b: &Bundle, line: usize) -> [usize; 4] {
        let end: usize = lines(b)[..line].iter().map(Vec::len).sum();
        [end, end + 7, 1, BLOCK_SIZE]
    }

    #[test]
    fn streamed_from_a_file_and_in_memory_reports_agree() {
        let b = bundle(50, 10);
        let tar = tar_of(&b);
        for threads in [0, 1, 2, 3] {
            let options = Options::bundle_keys().with_threads(threads);
            let in_memory = verify_bundle(&b, &options).unwrap();
            let streamed = verify_tar(Cursor::new(&tar), &options).unwrap();
            assert_eq!(streamed, in_memory);
            assert_eq!((streamed.events, streamed.checkpoints), (50, 5));
        }
    }

    #[test]
    fn block_boundaries_mid_line_and_right_after_a_newline_change_nothing() {
        let b = bundle(50, 10);
        let want = verify_bundle(&b, &Options::bundle_keys()).unwrap();
        for line in [1, 3, 10, 49] {
            for size in block_sizes(&b, line) {
                assert_eq!(
                    verify_both(&b, size),
                    Ok(want.clone()),
                    "boundary after line {line}, size {size}"
                );
            }
        }
    }

    #[test]
    fn tampered_events_in_a_later_block_are_reported_with_their_seq_and_line() {
        let b = bundle(50, 10);
        let original = lines(&b);

        let mut edited = original.clone();
        let text = String::from_utf8(edited[39].clone()).unwrap();
        edited[39] = text.replace("job-40", "job-41").into_bytes();
        let changed = with_lines(&b, &edited);

        let mut garbage = original.clone();
        garbage[44] = b"not an event\n".to_vec();
        let garbage = with_lines(&b, &garbage);

        let mut blank = original.clone();
        blank.insert(30, b"\n".to_vec());
        let blank = with_lines(&b, &blank);

        let mut missing = original.clone();
        missing.remove(19);
        let missing = with_lines(&b, &missing);

        let mut swapped = original.clone();
        swapped.swap(28, 32);
        let swapped = with_lines(&b, &swapped);

        for size in block_sizes(&b, 12) {
            let message = |b: &Bundle| verify_both(b, size).unwrap_err().to_string();
            assert_eq!(message(&changed), "event 40: hash mismatch");
            assert_eq!(
                message(&garbage),
                "events.jsonl line 45: not a Cella audit event (expected {\"event\":…,\"hash\":\"…\"})"
            );
            assert_eq!(message(&blank), "events.jsonl line 31: not a Cella audit event (empty line)");
            assert_eq!(message(&missing), "gap after 19");
            assert_eq!(message(&swapped), "event 33: out of order after 28");
        }
    }

    #[test]
    fn a_bundle_file_cut_short_is_a_read_error() {
        let tar = tar_of(&bundle(50, 10));
        let events = TarIndex::read(&mut Cursor::new(&tar)).unwrap().members[bundle::EVENTS];
        let cut = &tar[..(events.offset + events.len / 2) as usize];
        match verify_tar(Cursor::new(cut), &Options::bundle_keys()) {
            Err(VerifyError::Read(BundleError::CutShort { name })) => assert_eq!(name, bundle::EVENTS),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bundle_file_cut_short_in_its_last_members_padding_is_refused_both_ways() {
        // Found by the fuzzer: every byte of every member is there, the padding of the last one
        // is not. Streamed and in memory must both refuse it.
        let tar = tar_of(&bundle(5, 2));
        let index = TarIndex::read(&mut Cursor::new(&tar)).unwrap();
        let last = index.members.values().max_by_key(|span| span.offset).copied().unwrap();
        assert!(last.len % 512 != 0, "the last member needs padding for this test");
        let cut = &tar[..(last.offset + last.len + 1) as usize];
        assert!(matches!(
            verify_tar(Cursor::new(cut), &Options::bundle_keys()),
            Err(VerifyError::Read(BundleError::CutShort { .. }))
        ));
        assert!(Bundle::read(cut).is_err());
    }

    /// What verification prints first: the report or the failure.
    fn message(result: Result<Report, Failure>) -> String {
        match result {
            Ok(report) => report.to_string(),
            Err(failure) => failure.to_string(),
        }
    }

    /// The verdict against the pinned key `key`, and against the bundle's own keys (each in
    /// memory and streamed, which must agree).
    fn verdicts(b: &Bundle, key: &PublicKey) -> (String, String) {
        let pinned = Options::pinned(vec![key.clone()]).with_threads(2);
        let own = Options::bundle_keys().with_threads(2);
        (message(verify_both_with(b, BLOCK_SIZE, &pinned)), message(verify_both_with(b, BLOCK_SIZE, &own)))
    }

    fn checkpoints_of(b: &Bundle) -> CheckpointsFile {
        serde_json::from_slice(&b.files[bundle::CHECKPOINTS]).unwrap()
    }

    fn set_json<T: serde::Serialize>(b: &mut Bundle, name: &str, value: &T) {
        b.files.insert(name.to_owned(), bundle::json_bytes(value));
        b.refresh_manifest();
    }

    /// Rewrites the manifest's range and counts to match the files, as a forger would.
    fn rewrite_manifest(b: &mut Bundle) {
        let mut manifest: Manifest = serde_json::from_slice(&b.files[bundle::MANIFEST]).unwrap();
        let seqs: Vec<u64> = lines(b).iter().map(|l| body(l)["seq"].as_u64().unwrap()).collect();
        manifest.range = bundle::SeqRange { from: seqs[0], to: seqs[seqs.len() - 1] };
        manifest.counts.events = seqs.len() as u64;
        manifest.counts.checkpoints = checkpoints_of(b).checkpoints.len() as u64;
        set_json(b, bundle::MANIFEST, &manifest);
        b.refresh_manifest();
    }

    fn body(line: &[u8]) -> serde_json::Value {
        serde_json::from_slice(split_line(line.strip_suffix(b"\n").unwrap_or(line)).unwrap().0).unwrap()
    }

    /// The export line of `body`, with its hash.
    fn line_of(body: &serde_json::Value) -> (Vec<u8>, Hash) {
        let bytes = crate::canonical::to_vec(body);
        let h = hash::sha256(&bytes);
        let mut line = Vec::new();
        crate::event::export_line(&bytes, &h, &mut line);
        line.push(b'\n');
        (line, h)
    }

    /// Sets each line's `prev_hash` from line `from` (0-based) on to the hash of the line before,
    /// recomputing the hashes: the chain is flawless again.
    fn rechain(ls: &mut [Vec<u8>], from: usize) {
        let mut prev = split_line(ls[from - 1].strip_suffix(b"\n").unwrap()).unwrap().1;
        for line in ls.iter_mut().skip(from) {
            let mut b = body(line);
            b["prev_hash"] = hash::to_hex(&prev).into();
            let (new_line, h) = line_of(&b);
            *line = new_line;
            prev = h;
        }
    }

    #[test]
    fn a_good_bundle_is_ok_against_the_pinned_key_and_only_untrusted_against_its_own() {
        let key = SigningKey::generate("k1").unwrap();
        let b = read_back(&chain_of(&key, 50, 10, "hello").bundle(1, 50, false, t0()));
        assert_eq!(
            verdicts(&b, &key.public()),
            (
                "OK: 50 events, seq 1..50, 5 checkpoints, key(s) k1".to_owned(),
                "UNTRUSTED: 50 events, seq 1..50, 5 checkpoints, key(s) k1 from the bundle itself".to_owned()
            )
        );
        // Pinning no key at all trusts nothing.
        assert_eq!(
            message(verify_bundle(&b, &Options::pinned(vec![]))),
            "checkpoint 1: key k1 is not trusted"
        );
    }

    #[test]
    fn rewritten_bundle_with_its_checkpoints_stripped_is_not_covered() {
        let key = SigningKey::generate("k1").unwrap();
        let mut b = read_back(&chain_of(&key, 50, 10, "hello").bundle(1, 50, false, t0()));
        let mut ls = lines(&b);
        let mut edited = body(&ls[41]);
        edited["details"]["note"] = "forged".into();
        ls[41] = line_of(&edited).0;
        rechain(&mut ls, 42);
        b.files.insert(bundle::EVENTS.to_owned(), ls.concat());
        set_json(&mut b, bundle::CHECKPOINTS, &CheckpointsFile { checkpoints: vec![] });
        rewrite_manifest(&mut b);
        let want = "event 1: not covered by a signed checkpoint (the bundle holds no checkpoint)";
        assert_eq!(verdicts(&b, &key.public()), (want.to_owned(), want.to_owned()));
    }

    #[test]
    fn bundle_resigned_with_a_fresh_key_under_the_trusted_id_fails_against_the_pinned_key() {
        let real = SigningKey::generate("k1").unwrap();
        // The forger rebuilds the whole chain with events of their choosing and their own "k1".
        let forger = SigningKey::generate("k1").unwrap();
        let b = read_back(&chain_of(&forger, 50, 10, "forged").bundle(1, 50, false, t0()));
        let (pinned, own) = verdicts(&b, &real.public());
        assert_eq!(pinned, "keys.json: key k1 is not the trusted key k1");
        // Self-consistent against its own keys, which is all that shows: never OK.
        assert_eq!(own, "UNTRUSTED: 50 events, seq 1..50, 5 checkpoints, key(s) k1 from the bundle itself");
        // Without the forged key in keys.json the signatures themselves fail.
        let mut b = b;
        let keys = KeysFile { keys: vec![bundle::KeyJson::new(&real.public(), None, None)] };
        set_json(&mut b, bundle::KEYS, &keys);
        let want = "checkpoint 1 signature invalid for key k1";
        assert_eq!(verdicts(&b, &real.public()), (want.to_owned(), want.to_owned()));
    }

    #[test]
    fn unsigned_tail_chained_on_is_not_covered() {
        let key = SigningKey::generate("k1").unwrap();
        let mut b = read_back(&chain_of(&key, 50, 10, "hello").bundle(1, 50, false, t0()));
        let mut ls = lines(&b);
        for seq in 51..=53 {
            let mut next = body(&ls[ls.len() - 1]);
            next["seq"] = seq.into();
            next["resource"]["id"] = format!("job-{seq}").into();
            ls.push(line_of(&next).0);
        }
        rechain(&mut ls, 50);
        b.files.insert(bundle::EVENTS.to_owned(), ls.concat());
        rewrite_manifest(&mut b);
        let want = "event 51: not covered by a signed checkpoint (checkpoints cover 1..50)";
        assert_eq!(verdicts(&b, &key.public()), (want.to_owned(), want.to_owned()));
    }

    #[test]
    fn checkpoint_removed_from_the_middle_is_missing() {
        let key = SigningKey::generate("k1").unwrap();
        let chain = chain_of(&key, 50, 10, "hello");
        let mut b = read_back(&chain.bundle(1, 50, false, t0()));
        let mut cps = checkpoints_of(&b);
        cps.checkpoints.remove(2);
        // The forger mends the consistency proof into checkpoint 4: from checkpoint 2 now.
        let whole = read_back(&chain.bundle(1, 40, false, t0()));
        let tree = crate::merkle::MerkleTree::new(
            lines(&whole)
                .iter()
                .map(|l| leaf_hash(&split_line(l.strip_suffix(b"\n").unwrap()).unwrap().1))
                .collect(),
        );
        cps.checkpoints[2].consistency_proof =
            tree.consistency_proof(20, 40).iter().map(|h| hash::to_hex(h)).collect();
        set_json(&mut b, bundle::CHECKPOINTS, &cps);
        rewrite_manifest(&mut b);
        let want = "checkpoint 3 is missing between checkpoints 2 and 4";
        assert_eq!(verdicts(&b, &key.public()), (want.to_owned(), want.to_owned()));

        let mut b = read_back(&chain.bundle(1, 50, false, t0()));
        let mut cps = checkpoints_of(&b);
        cps.checkpoints.remove(0);
        cps.checkpoints[0].consistency_proof.clear();
        set_json(&mut b, bundle::CHECKPOINTS, &cps);
        rewrite_manifest(&mut b);
        let want = "checkpoint 1 is missing before checkpoint 2";
        assert_eq!(verdicts(&b, &key.public()), (want.to_owned(), want.to_owned()));
    }

    #[test]
    fn range_ending_between_checkpoints_verifies_with_its_tail_proof() {
        let key = SigningKey::generate("k1").unwrap();
        let chain = chain_of(&key, 50, 10, "hello");
        for (from, to, want) in [
            (21, 45, "OK: 25 events, seq 21..45, 4 checkpoints, key(s) k1"),
            (1, 45, "OK: 45 events, seq 1..45, 5 checkpoints, key(s) k1"),
            (1, 7, "OK: 7 events, seq 1..7, 1 checkpoints, key(s) k1"),
            (44, 44, "OK: 1 events, seq 44..44, 1 checkpoints, key(s) k1"),
            (41, 41, "OK: 1 events, seq 41..41, 2 checkpoints, key(s) k1"),
        ] {
            let b = read_back(&chain.bundle(from, to, false, t0()));
            let last = checkpoints_of(&b).checkpoints.pop().unwrap();
            assert!(last.checkpoint.tree_size > to && last.tail_proof.is_some(), "{from}..{to}");
            for block_size in [1, 100, BLOCK_SIZE] {
                let pinned = Options::pinned(vec![key.public()]).with_threads(2);
                assert_eq!(message(verify_both_with(&b, block_size, &pinned)), want, "{from}..{to}");
            }
        }
        // A range ending at a checkpoint needs no tail.
        let b = read_back(&chain.bundle(21, 40, false, t0()));
        assert!(checkpoints_of(&b).checkpoints.iter().all(|c| c.tail_proof.is_none()));
        assert_eq!(verdicts(&b, &key.public()).0, "OK: 20 events, seq 21..40, 3 checkpoints, key(s) k1");
    }

    #[test]
    fn forged_or_missing_tail_proof_fails() {
        let key = SigningKey::generate("k1").unwrap();
        let good = read_back(&chain_of(&key, 50, 10, "hello").bundle(21, 45, false, t0()));

        let mut forged = good.clone();
        let mut cps = checkpoints_of(&forged);
        let tail = cps.checkpoints[3].tail_proof.as_mut().unwrap();
        tail[0] = hash::to_hex(&hash::sha256(b"forged"));
        set_json(&mut forged, bundle::CHECKPOINTS, &cps);
        let want = "checkpoint 5: tail proof from events 1..45 is invalid";
        assert_eq!(verdicts(&forged, &key.public()), (want.to_owned(), want.to_owned()));

        // Events after the last checkpoint inside the range edited and rechained: only the tail
        // proof ties them to a signature, and it no longer leads to the signed root.
        let mut edited = good.clone();
        let mut ls = lines(&edited);
        let mut e = body(&ls[22]);
        e["details"]["note"] = "forged".into();
        ls[22] = line_of(&e).0;
        rechain(&mut ls, 23);
        edited.files.insert(bundle::EVENTS.to_owned(), ls.concat());
        edited.refresh_manifest();
        assert_eq!(verdicts(&edited, &key.public()), (want.to_owned(), want.to_owned()));

        let mut stripped = good.clone();
        let mut cps = checkpoints_of(&stripped);
        cps.checkpoints[3].tail_proof = None;
        set_json(&mut stripped, bundle::CHECKPOINTS, &cps);
        let want = "truncated after 45: checkpoint 5 covers events up to 50";
        assert_eq!(verdicts(&stripped, &key.public()), (want.to_owned(), want.to_owned()));

        // Only the last checkpoint may carry a tail proof.
        let mut misplaced = good.clone();
        let mut cps = checkpoints_of(&misplaced);
        cps.checkpoints[1].tail_proof = Some(vec![]);
        set_json(&mut misplaced, bundle::CHECKPOINTS, &cps);
        assert_eq!(
            verdicts(&misplaced, &key.public()).0,
            "bundle: checkpoint 3 carries a tail proof but is not the last checkpoint"
        );
    }

    #[test]
    fn format_1_bundles_still_verify_but_cannot_carry_tail_proofs() {
        let key = SigningKey::generate("k1").unwrap();
        let chain = chain_of(&key, 50, 10, "hello");
        let as_v1 = |mut b: Bundle| {
            let mut manifest: Manifest = serde_json::from_slice(&b.files[bundle::MANIFEST]).unwrap();
            manifest.format = bundle::FORMAT_V1.to_owned();
            set_json(&mut b, bundle::MANIFEST, &manifest);
            b
        };
        let old = as_v1(read_back(&chain.bundle(1, 50, false, t0())));
        assert_eq!(verdicts(&old, &key.public()).0, "OK: 50 events, seq 1..50, 5 checkpoints, key(s) k1");
        let with_tail = as_v1(read_back(&chain.bundle(1, 45, false, t0())));
        assert_eq!(
            verdicts(&with_tail, &key.public()).0,
            "bundle: checkpoint 5 carries a tail proof, which format cella-audit-bundle/1 bundles do not have"
        );
    }
}
