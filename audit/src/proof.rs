//! Inclusion proofs for single events, checkable on their own.
//!
//! A proof file is JSON: the event's export line, its leaf index, the RFC 6962 audit path, the
//! signed checkpoint it leads to, and that checkpoint's public key. As with bundles, the key that
//! comes with the proof proves nothing about who made it: [`verify_proof`] against pinned keys
//! says `OK`, against the proof's own key only `UNTRUSTED`.

use serde::{Deserialize, Serialize};

use crate::bundle::{self, Bundle, CheckpointsFile, KeyJson, KeysFile, StartFile};
use crate::checkpoint::CheckpointJson;
use crate::event::{split_line, EventHead};
use crate::hash::{self, Hash};
use crate::keys::PublicKey;
use crate::merkle::{leaf_hash, verify_inclusion, MerkleTree};
use crate::verify::{self, Failure, Options, Trust};

/// Proof format name.
pub const FORMAT: &str = "cella-audit-proof/1";

/// An inclusion proof for one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub format: String,
    /// The event's line from `events.jsonl`, verbatim.
    pub event: String,
    /// `seq - 1`.
    pub leaf_index: u64,
    /// Audit path from the event's leaf to the checkpoint's root, hex.
    pub audit_path: Vec<String>,
    /// The checkpoint.
    pub checkpoint: CheckpointJson,
    /// The checkpoint's key.
    pub key: KeyJson,
}

/// Why a proof could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error("the bundle does not verify")]
    Invalid(#[from] Failure),
    #[error("the bundle starts at seq {first}; proofs need a bundle exported from seq 1")]
    PartialBundle { first: u64 },
    #[error("event {seq} is not covered by any checkpoint in the bundle (last covers up to {covered}); export again after the next checkpoint")]
    NotCovered { seq: u64, covered: u64 },
    #[error("the bundle has no event {seq} (it holds {first}..{last})")]
    NoSuchEvent { seq: u64, first: u64, last: u64 },
    #[error("the bundle has no checkpoint {0}")]
    NoSuchCheckpoint(u64),
    #[error("event {seq} is covered only by checkpoint {checkpoint}, which lies beyond the bundle's last event {last} (the bundle holds its tail proof, not the events an audit path needs); prove against a bundle that ends at a checkpoint (export it without --to)")]
    OnlyTailCovered { seq: u64, checkpoint: u64, last: u64 },
}

/// What a verified proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofReport {
    pub chain: String,
    pub seq: u64,
    pub checkpoint: u64,
    pub tree_size: u64,
    pub key_id: String,
    pub pinned: bool,
}

impl std::fmt::Display for ProofReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (verdict, whose) = if self.pinned { ("OK", "") } else { ("UNTRUSTED", " from the proof itself") };
        write!(
            f,
            "{verdict}: event {} of {} is included in checkpoint {} (tree size {}), key(s) {}{whose}",
            self.seq, self.chain, self.checkpoint, self.tree_size, self.key_id
        )
    }
}

/// Makes the inclusion proof of event `seq` against checkpoint `checkpoint` (default: the
/// newest one covering it), after verifying the whole bundle.
pub fn prove(
    bundle: &Bundle,
    seq: u64,
    checkpoint: Option<u64>,
    options: &Options,
) -> Result<InclusionProof, ProveError> {
    let report = verify::verify_bundle(bundle, options)?;
    let start: StartFile =
        serde_json::from_slice(&bundle.files[bundle::START]).map_err(|e| Failure::Bundle(e.to_string()))?;
    if start.seq_before != 0 {
        return Err(ProveError::PartialBundle { first: start.seq_before + 1 });
    }
    if seq < report.first_seq || seq > report.last_seq {
        return Err(ProveError::NoSuchEvent { seq, first: report.first_seq, last: report.last_seq });
    }
    let cps: CheckpointsFile = serde_json::from_slice(&bundle.files[bundle::CHECKPOINTS])
        .map_err(|e| Failure::Bundle(e.to_string()))?;
    let keys: KeysFile =
        serde_json::from_slice(&bundle.files[bundle::KEYS]).map_err(|e| Failure::Bundle(e.to_string()))?;
    let last = report.last_seq;
    let cp = match checkpoint {
        Some(index) => cps
            .checkpoints
            .iter()
            .find(|c| c.checkpoint.index == index)
            .ok_or(ProveError::NoSuchCheckpoint(index))?,
        // The newest checkpoint covering the event, among those whose events the bundle holds.
        None => cps
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.checkpoint.tree_size >= seq && c.checkpoint.tree_size <= last)
            .or_else(|| cps.checkpoints.last())
            .ok_or(ProveError::NotCovered { seq, covered: 0 })?,
    };
    let cp = cp.checkpoint.clone();
    if cp.tree_size < seq {
        return Err(ProveError::NotCovered { seq, covered: cp.tree_size });
    }
    if cp.tree_size > last {
        return Err(ProveError::OnlyTailCovered { seq, checkpoint: cp.index, last });
    }
    let lines: Vec<&[u8]> =
        bundle.files[bundle::EVENTS].split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    let leaves: Vec<Hash> = lines
        .iter()
        .take(cp.tree_size as usize)
        .filter_map(|l| split_line(l))
        .map(|(_, h)| leaf_hash(&h))
        .collect();
    let tree = MerkleTree::new(leaves);
    let path = tree.inclusion_proof(seq - 1, cp.tree_size);
    let key = match &options.trust {
        Trust::BundleKeys => keys.keys.iter().find(|k| k.id == cp.key_id).cloned(),
        Trust::Pinned(pinned) => {
            pinned.iter().find(|k| k.id == cp.key_id).map(|k| KeyJson::new(k, None, None))
        }
    };
    let key = key.ok_or_else(|| Failure::UnknownKey { index: cp.index, key_id: cp.key_id.clone() })?;
    Ok(InclusionProof {
        format: FORMAT.to_owned(),
        event: String::from_utf8_lossy(lines[(seq - 1) as usize]).into_owned(),
        leaf_index: seq - 1,
        audit_path: path.iter().map(|h| hash::to_hex(h)).collect(),
        checkpoint: cp,
        key,
    })
}

/// Verifies a proof on its own. With pinned keys, the checkpoint's key must be one of them, and
/// the key the proof carries must not be another key under a pinned id; with
/// [`Trust::BundleKeys`] the proof's own key is used (and the report says `UNTRUSTED`).
pub fn verify_proof(proof: &InclusionProof, trust: &Trust) -> Result<ProofReport, Failure> {
    if proof.format != FORMAT {
        return Err(Failure::Bundle(format!("unknown proof format `{}`", proof.format)));
    }
    let malformed = |problem: &str| Failure::Malformed { line: 1, problem: problem.to_owned() };
    let (body, stated) = split_line(proof.event.as_bytes())
        .ok_or_else(|| malformed("the proof's event is not an export line"))?;
    let head: EventHead<'_> = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    let hash = hash::sha256(body);
    if hash != stated {
        return Err(Failure::HashMismatch { seq: head.seq });
    }
    let cp = proof
        .checkpoint
        .decode()
        .ok_or_else(|| Failure::Bundle("the proof's checkpoint is not valid hex".to_owned()))?;
    let key = match trust {
        Trust::Pinned(pinned) => {
            let carried: Option<PublicKey> = proof.key.decode();
            if pinned.iter().any(|p| p.id == proof.key.id && carried.as_ref() != Some(p)) {
                return Err(Failure::KeyMismatch { file: "proof", key_id: proof.key.id.clone() });
            }
            pinned
                .iter()
                .find(|k| k.id == cp.key_id)
                .cloned()
                .ok_or_else(|| Failure::UntrustedKey { index: cp.index, key_id: cp.key_id.clone() })?
        }
        Trust::BundleKeys => proof
            .key
            .decode()
            .filter(|k| k.id == cp.key_id)
            .ok_or_else(|| Failure::UnknownKey { index: cp.index, key_id: cp.key_id.clone() })?,
    };
    if !key.verify(cp.signed_body().as_bytes(), &cp.signature) {
        return Err(Failure::BadSignature { index: cp.index, key_id: cp.key_id.clone() });
    }
    if cp.chain != head.chain {
        return Err(Failure::CheckpointChain {
            index: cp.index,
            found: cp.chain.clone(),
            expected: head.chain.into_owned(),
        });
    }
    let path: Option<Vec<Hash>> = proof.audit_path.iter().map(hash::hash_from_hex).collect();
    let path = path.ok_or_else(|| Failure::Bundle("the audit path is not hex".to_owned()))?;
    if proof.leaf_index + 1 != head.seq
        || !verify_inclusion(proof.leaf_index, cp.tree_size, &leaf_hash(&hash), &path, &cp.root)
    {
        return Err(Failure::NotIncluded { seq: head.seq, index: cp.index });
    }
    Ok(ProofReport {
        chain: cp.chain.clone(),
        seq: head.seq,
        checkpoint: cp.index,
        tree_size: cp.tree_size,
        key_id: cp.key_id.clone(),
        pinned: matches!(trust, Trust::Pinned(_)),
    })
}
