//! The export bundle: one tar file holding
//!
//! | file | contents |
//! |---|---|
//! | `manifest.json` | format, chain, tenant, seq range, counts, and the SHA-256 and size of every other file |
//! | `events.jsonl` | one event per line, `{"event":E,"hash":"<hex>"}`, `E` being the exact hashed bytes |
//! | `checkpoints.json` | the signed tree heads whose size falls in `from-1..=to`, each with the consistency proof from the one before it, and, when `to` falls between two checkpoints, the next one after `to` with a tail proof |
//! | `keys.json` | every public key the log has used (the rotation history) |
//! | `start.json` | the chain state just before the first event: its seq, hash and Merkle compact range (empty for seq 1) |
//! | `ocsf.jsonl` | optional: the same events as OCSF API Activity records, for SIEMs (not hashed, not verified) |
//!
//! Exports are streamed ([`crate::export`]): `events.jsonl` first, `manifest.json` last (it holds
//! the SHA-256 of the files before it). Readers take the members in any order.
//!
//! Every exported event is covered by a signed checkpoint: either one at or after it inside the
//! range, or the checkpoint right after the range, which then carries a *tail proof* (the RFC 6962
//! consistency proof from the tree of events `1..=to` to that checkpoint's tree), so the verifier
//! checks the root it computes over the bundle's events against a signed root. Checkpoint
//! indices in a bundle are consecutive: an export holds every checkpoint in its range.
//!
//! Format `cella-audit-bundle/2` added the tail proof; `/1` bundles (no tail proofs) are read the
//! same way.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointJson};
use crate::event::{export_line, Event};
use crate::hash::{self, Hash};
use crate::keys::PublicKey;
use crate::merkle::{CompactRange, MerkleTree};

/// Bundle format name in `manifest.json`.
pub const FORMAT: &str = "cella-audit-bundle/2";
/// The format before tail proofs, still read.
pub const FORMAT_V1: &str = "cella-audit-bundle/1";
pub const MANIFEST: &str = "manifest.json";
pub const EVENTS: &str = "events.jsonl";
pub const CHECKPOINTS: &str = "checkpoints.json";
pub const KEYS: &str = "keys.json";
pub const START: &str = "start.json";
pub const OCSF: &str = "ocsf.jsonl";

/// Largest member a bundle may hold (events.jsonl of a very long chain included).
const MAX_MEMBER: u64 = 16 << 30;

/// What went wrong reading a bundle file as a tar archive.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read the bundle")]
    Io(#[from] io::Error),
    #[error("bundle member `{0}` appears twice")]
    Duplicate(String),
    #[error("bundle member `{name}` is larger than {MAX_MEMBER} bytes")]
    TooLarge { name: String },
    #[error("bundle member `{name}` is cut short")]
    CutShort { name: String },
    #[error("bundle member `{name}` is not valid")]
    Invalid { name: String, source: serde_json::Error },
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub chain: String,
    pub tenant: Option<String>,
    pub range: SeqRange,
    pub counts: Counts,
    pub exported_at: String,
    pub files: Vec<FileEntry>,
}

/// First and last seq in `events.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqRange {
    pub from: u64,
    pub to: u64,
}

/// How many of each thing the bundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub events: u64,
    pub checkpoints: u64,
    pub keys: u64,
}

/// One file of the bundle as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// One public key in `keys.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyJson {
    pub id: String,
    pub algorithm: String,
    pub public_key: String,
    pub activated_at: Option<String>,
    pub retired_at: Option<String>,
}

impl KeyJson {
    /// The JSON form of `key`.
    pub fn new(key: &PublicKey, activated_at: Option<String>, retired_at: Option<String>) -> Self {
        Self {
            id: key.id.clone(),
            algorithm: "ed25519".to_owned(),
            public_key: hash::to_hex(&key.key),
            activated_at,
            retired_at,
        }
    }

    /// The key, if it is a well-formed Ed25519 key.
    pub fn decode(&self) -> Option<PublicKey> {
        (self.algorithm == "ed25519")
            .then(|| hash::hash_from_hex(&self.public_key))
            .flatten()
            .map(|key| PublicKey { id: self.id.clone(), key })
    }
}

/// `keys.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    pub keys: Vec<KeyJson>,
}

/// One checkpoint in `checkpoints.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleCheckpoint {
    pub checkpoint: CheckpointJson,
    /// RFC 6962 consistency proof from the previous checkpoint in the file (empty for the first).
    pub consistency_proof: Vec<String>,
    /// Only on the last checkpoint, when it lies beyond the bundle's last event `to`: the RFC 6962
    /// consistency proof from the tree of events `1..=to` to this checkpoint's tree, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_proof: Option<Vec<String>>,
}

/// `checkpoints.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointsFile {
    pub checkpoints: Vec<BundleCheckpoint>,
}

/// `start.json`: where the exported range picks up the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFile {
    /// Seq of the event before the first exported one (0 from the start of the chain).
    pub seq_before: u64,
    /// Its hash (all zeros from the start).
    pub hash_before: String,
    /// Merkle compact range over events `1..=seq_before`, largest subtree first.
    pub peaks: Vec<String>,
}

/// Everything that goes into a bundle, before it is written.
#[derive(Debug, Clone)]
pub struct BundleContents {
    pub chain: String,
    pub tenant: Option<String>,
    pub range: SeqRange,
    pub event_count: u64,
    pub events: Vec<u8>,
    pub checkpoints: CheckpointsFile,
    pub keys: KeysFile,
    pub start: StartFile,
    pub ocsf: Option<Vec<u8>>,
    pub exported_at: String,
}

/// Inputs for [`assemble`].
#[derive(Debug)]
pub struct AssembleInput<'a> {
    /// The chain's name.
    pub chain: &'a str,
    /// The tenant (for tenant chains).
    pub tenant: Option<&'a str>,
    /// Hashes of events `1..=to` and beyond, in order, as stored (the Merkle tree and proofs use
    /// these): up to the first checkpoint after `to` if `to` falls between checkpoints.
    pub hashes: &'a [Hash],
    /// First exported seq.
    pub from: u64,
    /// Last exported seq.
    pub to: u64,
    /// Hashed bytes and stated hash of events `from..=to`, in order.
    pub events: &'a [(String, Hash)],
    /// The chain's checkpoints, in index order; those whose size is outside `from-1..=to` are left
    /// out, but for the first one after `to` when none ends at `to` (it gets a tail proof).
    pub checkpoints: &'a [Checkpoint],
    /// Every public key, oldest first.
    pub keys: Vec<KeyJson>,
    /// Also write `ocsf.jsonl`.
    pub ocsf: bool,
    /// Export time.
    pub exported_at: String,
}

/// A tenant's whole chain built without a database (benchmarks and tests): every event hashed
/// and chained, checkpoints signed where the caller asked.
#[derive(Debug)]
pub struct OfflineChain {
    chain: String,
    tenant: String,
    key: PublicKey,
    hashes: Vec<Hash>,
    lines: Vec<(String, Hash)>,
    checkpoints: Vec<Checkpoint>,
}

impl OfflineChain {
    /// Chains `events` of tenant `tenant` (seq 1, 2, …, each with its time), signing a checkpoint
    /// with `key` after each seq for which `checkpoint_after` says so.
    pub fn build(
        tenant: &crate::TenantId,
        key: &crate::SigningKey,
        events: impl IntoIterator<Item = (crate::NewEvent, time::OffsetDateTime)>,
        checkpoint_after: impl Fn(u64) -> bool,
    ) -> Self {
        let chain = crate::Chain::Tenant(tenant.clone()).key();
        let (mut prev, mut range) = (hash::GENESIS, CompactRange::new());
        let (mut hashes, mut lines, mut checkpoints) = (Vec::new(), Vec::new(), Vec::new());
        let mut seq = 0;
        for (event, at) in events {
            seq += 1;
            let body = event.encode(seq, at, &prev);
            prev = hash::sha256(&body);
            range.push(crate::merkle::leaf_hash(&prev));
            hashes.push(prev);
            lines.push((String::from_utf8_lossy(&body).into_owned(), prev));
            if checkpoint_after(seq) {
                let index = checkpoints.len() as u64 + 1;
                let time = crate::event::format_time(at);
                checkpoints.push(Checkpoint::sign(&chain, index, seq, range.root(), time, key));
            }
        }
        Self { chain, tenant: tenant.as_str().to_owned(), key: key.public(), hashes, lines, checkpoints }
    }

    /// Number of events.
    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The bundle of events `from..=to`, as an export of that range makes it.
    pub fn bundle(
        &self,
        from: u64,
        to: u64,
        ocsf: bool,
        exported_at: time::OffsetDateTime,
    ) -> BundleContents {
        let to = to.min(self.len());
        let from = from.max(1);
        assemble(AssembleInput {
            chain: &self.chain,
            tenant: Some(&self.tenant),
            hashes: &self.hashes,
            from,
            to,
            events: self.lines.get((from - 1) as usize..to as usize).unwrap_or_default(),
            checkpoints: &self.checkpoints,
            keys: vec![KeyJson::new(&self.key, None, None)],
            ocsf,
            exported_at: crate::event::format_time(exported_at),
        })
    }
}

/// Builds, without a database, the bundle of tenant `tenant`'s whole chain made of `events`
/// (see [`OfflineChain::build`]). For benchmarks and tests.
pub fn offline_chain(
    tenant: &crate::TenantId,
    key: &crate::SigningKey,
    events: impl IntoIterator<Item = (crate::NewEvent, time::OffsetDateTime)>,
    checkpoint_after: impl Fn(u64) -> bool,
    ocsf: bool,
    exported_at: time::OffsetDateTime,
) -> BundleContents {
    let chain = OfflineChain::build(tenant, key, events, checkpoint_after);
    chain.bundle(1, chain.len(), ocsf, exported_at)
}

/// The checkpoints an export of `from..=to` holds, out of all of a chain's (in index order), the
/// tree having `size` leaves: those whose size lies in `from-1..=to` (one at `from - 1` vouches
/// for `start.json`), then, if none ends at `to`, the first one after `to` (the tail checkpoint).
pub fn checkpoints_for_range(checkpoints: &[Checkpoint], from: u64, to: u64, size: u64) -> Vec<&Checkpoint> {
    let mut chosen: Vec<&Checkpoint> =
        checkpoints.iter().filter(|c| c.tree_size + 1 >= from && c.tree_size <= to.min(size)).collect();
    if chosen.last().map(|c| c.tree_size) != Some(to) {
        chosen.extend(checkpoints.iter().find(|c| c.tree_size > to && c.tree_size <= size));
    }
    chosen
}

/// Builds a bundle's contents: the event lines, `start.json` and the consistency proofs.
pub fn assemble(input: AssembleInput<'_>) -> BundleContents {
    let to = input.to;
    let from = input.from.max(1);
    let leaves: Vec<Hash> = input.hashes.iter().map(|h| crate::merkle::leaf_hash(h)).collect();
    let tree = MerkleTree::new(leaves);
    let mut start_range = CompactRange::new();
    for h in input.hashes.iter().take((from - 1) as usize) {
        start_range.push(crate::merkle::leaf_hash(h));
    }
    let start = StartFile {
        seq_before: from - 1,
        hash_before: hash::to_hex(
            (from > 1).then(|| input.hashes.get((from - 2) as usize)).flatten().unwrap_or(&hash::GENESIS),
        ),
        peaks: start_range.peaks().iter().map(|p| hash::to_hex(p)).collect(),
    };
    let mut events = Vec::with_capacity(input.events.iter().map(|b| b.0.len() + 80).sum());
    let mut ocsf = input.ocsf.then(Vec::new);
    for (body, h) in input.events {
        export_line(body.as_bytes(), h, &mut events);
        events.push(b'\n');
        if let Some(out) = ocsf.as_mut() {
            if let Ok(event) = serde_json::from_str::<Event>(body) {
                let _ = serde_json::to_writer(&mut *out, &crate::ocsf::api_activity(&event, h));
                out.push(b'\n');
            }
        }
    }
    let hex = |proof: Vec<Hash>| proof.iter().map(|h| hash::to_hex(h)).collect::<Vec<_>>();
    let mut checkpoints = Vec::new();
    let mut prev_size = None;
    for cp in checkpoints_for_range(input.checkpoints, from, to, tree.size()) {
        let proof = match prev_size {
            Some(old) => hex(tree.consistency_proof(old, cp.tree_size)),
            None => Vec::new(),
        };
        prev_size = Some(cp.tree_size);
        let tail_proof = (cp.tree_size > to).then(|| hex(tree.consistency_proof(to, cp.tree_size)));
        checkpoints.push(BundleCheckpoint { checkpoint: cp.to_json(), consistency_proof: proof, tail_proof });
    }
    BundleContents {
        chain: input.chain.to_owned(),
        tenant: input.tenant.map(str::to_owned),
        range: SeqRange { from, to },
        event_count: input.events.len() as u64,
        events,
        checkpoints: CheckpointsFile { checkpoints },
        keys: KeysFile { keys: input.keys },
        start,
        ocsf,
        exported_at: input.exported_at,
    }
}

pub(crate) fn json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(value).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Size of a tar block: every header is one, and each member's data is padded to a whole number.
pub const TAR_BLOCK: u64 = 512;

fn member_tar_header(name: &str, size: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(header)
}

/// The tar header of a member of `size` bytes, for writers that stream the data after it.
pub fn member_header(name: &str, size: u64) -> io::Result<[u8; TAR_BLOCK as usize]> {
    Ok(*member_tar_header(name, size)?.as_bytes())
}

/// Zero bytes that follow a member of `size` bytes.
pub fn member_padding(size: u64) -> usize {
    ((TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK) as usize
}

fn append_member<W: Write>(tar: &mut tar::Builder<W>, name: &str, data: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
}

/// Writes `contents` (built in memory: benchmarks and tools) as a tar bundle, manifest last as
/// streamed exports write it, and returns the manifest.
pub fn write_bundle<W: Write>(contents: &BundleContents, out: W) -> io::Result<Manifest> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (CHECKPOINTS, json_bytes(&contents.checkpoints)),
        (KEYS, json_bytes(&contents.keys)),
        (START, json_bytes(&contents.start)),
    ];
    let entry = |name: &str, data: &[u8]| FileEntry {
        name: name.to_owned(),
        bytes: data.len() as u64,
        sha256: hash::to_hex(&hash::sha256(data)),
    };
    let mut entries = vec![entry(EVENTS, &contents.events)];
    entries.extend(files.iter().map(|(n, d)| entry(n, d)));
    if let Some(ocsf) = &contents.ocsf {
        entries.push(entry(OCSF, ocsf));
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        chain: contents.chain.clone(),
        tenant: contents.tenant.clone(),
        range: contents.range,
        counts: Counts {
            events: contents.event_count,
            checkpoints: contents.checkpoints.checkpoints.len() as u64,
            keys: contents.keys.keys.len() as u64,
        },
        exported_at: contents.exported_at.clone(),
        files: entries,
    };
    let mut tar = tar::Builder::new(out);
    append_member(&mut tar, EVENTS, &contents.events)?;
    if let Some(ocsf) = &contents.ocsf {
        append_member(&mut tar, OCSF, ocsf)?;
    }
    for (name, data) in files.drain(..) {
        append_member(&mut tar, name, &data)?;
    }
    append_member(&mut tar, MANIFEST, &json_bytes(&manifest))?;
    tar.into_inner()?.flush()?;
    Ok(manifest)
}

/// A bundle read into memory: member name → bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Reads a tar bundle.
    pub fn read<R: Read>(reader: R) -> Result<Self, BundleError> {
        let mut archive = tar::Archive::new(reader);
        let mut files = BTreeMap::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let size = entry.header().size()?;
            if size > MAX_MEMBER {
                return Err(BundleError::TooLarge { name });
            }
            // The header's size is only a hint until the data is read: cap what is reserved.
            let mut data = Vec::with_capacity(size.min(1 << 30) as usize);
            entry.read_to_end(&mut data)?;
            if files.insert(name.clone(), data).is_some() {
                return Err(BundleError::Duplicate(name));
            }
        }
        Ok(Self { files })
    }

    /// Writes the members back as a tar file, in the order bundles are written (tests and tools
    /// that edit bundles use this).
    pub fn write<W: Write>(&self, out: W) -> io::Result<()> {
        let order = [EVENTS, OCSF, CHECKPOINTS, KEYS, START, MANIFEST];
        let mut tar = tar::Builder::new(out);
        for name in order {
            if let Some(data) = self.files.get(name) {
                append_member(&mut tar, name, data)?;
            }
        }
        for (name, data) in &self.files {
            if !order.contains(&name.as_str()) {
                append_member(&mut tar, name, data)?;
            }
        }
        tar.into_inner()?.flush()
    }

    /// Recomputes the manifest's file sizes and hashes after an edit, as someone forging a
    /// bundle would (the manifest is not signed; the checks that matter do not rely on it).
    pub fn refresh_manifest(&mut self) {
        let Some(Ok(mut manifest)) = self.files.get(MANIFEST).map(|m| serde_json::from_slice::<Manifest>(m))
        else {
            return;
        };
        for entry in &mut manifest.files {
            if let Some(data) = self.files.get(&entry.name) {
                entry.bytes = data.len() as u64;
                entry.sha256 = hash::to_hex(&hash::sha256(data));
            }
        }
        self.files.insert(MANIFEST.to_owned(), json_bytes(&manifest));
    }
}

/// Where a member's data lies in a tar file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

/// The members of a tar bundle, found from its headers alone (seeking over the data), so that a
/// bundle can be verified without holding it in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarIndex {
    pub members: BTreeMap<String, Span>,
}

impl TarIndex {
    /// Reads the headers of a tar bundle; the same members as [`Bundle::read`] keeps, with the
    /// same errors.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self, BundleError> {
        let file_len = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let mut archive = tar::Archive::new(reader);
        let mut members = BTreeMap::new();
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let span = Span { offset: entry.raw_file_position(), len: entry.size() };
            if span.len > MAX_MEMBER {
                return Err(BundleError::TooLarge { name });
            }
            // The member's data and the padding to its last 512-byte block: a tar cut short
            // anywhere in a member is cut short, as reading it through does not hide.
            if span.offset.saturating_add(span.len.div_ceil(512) * 512) > file_len {
                return Err(BundleError::CutShort { name });
            }
            if members.insert(name.clone(), span).is_some() {
                return Err(BundleError::Duplicate(name));
            }
        }
        Ok(Self { members })
    }

    /// Reads member `name` whole (meant for the small JSON members); `None` if there is none.
    pub fn read_member<R: Read + Seek>(
        &self,
        reader: &mut R,
        name: &str,
    ) -> Result<Option<Vec<u8>>, BundleError> {
        let Some(span) = self.members.get(name) else { return Ok(None) };
        reader.seek(SeekFrom::Start(span.offset))?;
        let mut data = Vec::with_capacity(span.len.min(1 << 30) as usize);
        reader.take(span.len).read_to_end(&mut data)?;
        if (data.len() as u64) < span.len {
            return Err(BundleError::CutShort { name: name.to_owned() });
        }
        Ok(Some(data))
    }
}

/// The ids of the keys that signed a tar bundle's checkpoints, in order of first use (which
/// public keys a reviewer needs), read from its `checkpoints.json` alone. Nothing is verified.
/// The last event of the bundle for which `wanted` is true, read line by line from
/// `events.jsonl` (memory bounded by one line). Only what it says: verify the bundle first.
pub fn find_event<R: Read + Seek>(
    reader: &mut R,
    mut wanted: impl FnMut(&crate::event::Event) -> bool,
) -> Result<Option<crate::event::Event>, BundleError> {
    use std::io::BufRead;
    let index = TarIndex::read(reader)?;
    let Some(span) = index.members.get(EVENTS).copied() else { return Ok(None) };
    reader.seek(SeekFrom::Start(span.offset))?;
    let mut lines = io::BufReader::new(reader.take(span.len));
    let mut line = Vec::new();
    let mut found = None;
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let Some((body, _)) = crate::event::split_line(text) else { continue };
        let Ok(event) = serde_json::from_slice::<crate::event::Event>(body) else { continue };
        if wanted(&event) {
            found = Some(event);
        }
    }
    Ok(found)
}

pub fn signing_key_ids<R: Read + Seek>(reader: &mut R) -> Result<Vec<String>, BundleError> {
    let index = TarIndex::read(reader)?;
    let data = index.read_member(reader, CHECKPOINTS)?.unwrap_or_default();
    let file: CheckpointsFile = serde_json::from_slice(&data)
        .map_err(|source| BundleError::Invalid { name: CHECKPOINTS.to_owned(), source })?;
    let mut ids: Vec<String> = Vec::new();
    for entry in file.checkpoints {
        if !ids.contains(&entry.checkpoint.key_id) {
            ids.push(entry.checkpoint.key_id);
        }
    }
    Ok(ids)
}
