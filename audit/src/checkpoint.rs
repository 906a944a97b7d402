//! Signed tree heads ("checkpoints") over a chain.
//!
//! The signed message is text laid out like a C2SP checkpoint body (origin, tree size, root
//! hash, then extension lines), with the root in hex:
//!
//! ```text
//! cella-audit/tenant:acme
//! 700
//! <root hash, 64 hex digits>
//! index 7
//! time 2026-11-28T13:23:04.123456Z
//! key k2
//! ```
//!
//! Every line ends with `\n`; the Ed25519 signature covers exactly these bytes.

use serde::{Deserialize, Serialize};

use crate::hash::{self, Hash};
use crate::keys::SigningKey;

/// One signed tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The chain's name (`tenant:acme`, `operator`).
    pub chain: String,
    /// 1 for a chain's first checkpoint, then 2, 3, …
    pub index: u64,
    /// Number of events covered: seq `1..=tree_size`.
    pub tree_size: u64,
    /// RFC 6962 root over those events.
    pub root: Hash,
    /// When it was signed, as [`crate::event::format_time`] writes it.
    pub time: String,
    /// The signing key's id.
    pub key_id: String,
    /// Ed25519 signature over [`Checkpoint::signed_body`].
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The bytes the signature covers.
    pub fn signed_body(&self) -> String {
        format!(
            "cella-audit/{}\n{}\n{}\nindex {}\ntime {}\nkey {}\n",
            self.chain,
            self.tree_size,
            hash::to_hex(&self.root),
            self.index,
            self.time,
            self.key_id
        )
    }

    /// Builds and signs a checkpoint.
    pub fn sign(chain: &str, index: u64, tree_size: u64, root: Hash, time: String, key: &SigningKey) -> Self {
        let mut cp = Checkpoint {
            chain: chain.to_owned(),
            index,
            tree_size,
            root,
            time,
            key_id: key.id().to_owned(),
            signature: Vec::new(),
        };
        cp.signature = key.sign(cp.signed_body().as_bytes());
        cp
    }

    /// The JSON form used in bundles and proofs.
    pub fn to_json(&self) -> CheckpointJson {
        CheckpointJson {
            chain: self.chain.clone(),
            index: self.index,
            tree_size: self.tree_size,
            root: hash::to_hex(&self.root),
            time: self.time.clone(),
            key_id: self.key_id.clone(),
            signature: hash::to_hex(&self.signature),
        }
    }
}

/// A checkpoint as it appears in `checkpoints.json` and in proofs (hex for the binary fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointJson {
    pub chain: String,
    pub index: u64,
    pub tree_size: u64,
    pub root: String,
    pub time: String,
    pub key_id: String,
    pub signature: String,
}

impl CheckpointJson {
    /// Decodes the hex fields; `None` if either is not hex of the right length.
    pub fn decode(&self) -> Option<Checkpoint> {
        let signature = hash::from_hex(&self.signature)?;
        Some(Checkpoint {
            chain: self.chain.clone(),
            index: self.index,
            tree_size: self.tree_size,
            root: hash::hash_from_hex(&self.root)?,
            time: self.time.clone(),
            key_id: self.key_id.clone(),
            signature,
        })
    }
}

/// When to cut checkpoints: after `every_events` new events or once the oldest unsigned event
/// is `every_secs` old, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPolicy {
    /// Cut once this many events are not yet covered.
    pub every_events: u64,
    /// Cut once the oldest uncovered event is this many seconds old.
    pub every_secs: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self { every_events: 1000, every_secs: 60 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_every_field() {
        let key = SigningKey::generate("k1").unwrap();
        let cp = Checkpoint::sign("tenant:a", 3, 10, [7; 32], "2026-01-01T00:00:00.000000Z".into(), &key);
        assert!(key.public().verify(cp.signed_body().as_bytes(), &cp.signature));
        let mut moved = cp.clone();
        moved.tree_size = 11;
        assert!(!key.public().verify(moved.signed_body().as_bytes(), &cp.signature));
        assert_eq!(cp.to_json().decode(), Some(cp));
    }
}
