//! Compliance rule packs: the built-in packs in `policies/rules/*.toml` (compiled into the
//! binary) and tenant-supplied pack files, loaded, validated with errors that name the pack, the
//! rule and the problem, and turned into the [`CompiledPolicy`] the host sends into the VM.
//!
//! ```
//! let compiled = cella_policies::rules::load_packs(&["secrets", "pii", "licenses"])?;
//! let bytes: &[u8] = compiled.as_bytes(); // sent to the guest
//! let engine = cella_scan::Engine::from_policy_json(bytes)?;
//! # assert!(engine.policy().rules.len() > 40);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
mod pack;

use std::io;
use std::path::{Path, PathBuf};

use cella_scan::{Policy, Rule, POLICY_FORMAT_VERSION};

pub use pack::parse_pack;

/// The built-in packs, by name, as shipped in `policies/rules/`.
pub const BUILTIN_PACKS: &[(&str, &str)] = &[
    ("secrets", include_str!("../rules/secrets.toml")),
    ("pii", include_str!("../rules/pii.toml")),
    ("licenses", include_str!("../rules/licenses.toml")),
];

/// The packs a scan uses when the caller names none.
pub const DEFAULT_PACKS: &[&str] = &["secrets", "pii", "licenses"];

/// A rule pack could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// No built-in pack has this name.
    #[error("unknown rule pack `{name}` (built-in packs: secrets, pii, licenses)")]
    UnknownPack { name: String },
    /// The pack file is not valid TOML, or not shaped like a rule pack.
    #[error("rule pack `{pack}` is malformed: {message}")]
    Malformed { pack: String, message: String },
    /// One rule is invalid.
    #[error("rule pack `{pack}`, rule `{rule}`: {problem}")]
    InvalidRule { pack: String, rule: String, problem: String },
    /// Two rules share an id.
    #[error("rule `{rule}` is defined in both `{first}` and `{second}`")]
    DuplicateRule { rule: String, first: String, second: String },
    /// The selection has no rules at all.
    #[error("the selected rule packs contain no rules")]
    Empty,
    /// A pack file could not be read.
    #[error("cannot read rule pack file `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A loaded, validated pack.
#[derive(Debug, Clone, PartialEq)]
pub struct Pack {
    /// The pack's name (`[pack] name`).
    pub name: String,
    /// Its rules, with pack defaults applied.
    pub rules: Vec<Rule>,
}

/// A validated policy and its serialized form for the guest.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    policy: Policy,
    bytes: Vec<u8>,
}

impl CompiledPolicy {
    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The serialized policy (JSON) that `cella_scan::Engine::from_policy_json` reads.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Consumes the compiled policy, returning the serialized bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Loads a built-in pack by name.
pub fn builtin_pack(name: &str) -> Result<Pack, PolicyError> {
    let (_, text) = BUILTIN_PACKS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| PolicyError::UnknownPack { name: name.to_owned() })?;
    parse_pack(name, text)
}

/// Loads a tenant-supplied pack file (same format as the built-in packs).
pub fn load_pack_file(path: &Path) -> Result<Pack, PolicyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PolicyError::Io { path: path.to_owned(), source })?;
    parse_pack(&path.display().to_string(), &text)
}

/// Loads built-in packs by name and compiles them into one policy.
pub fn load_packs(names: &[&str]) -> Result<CompiledPolicy, PolicyError> {
    let packs = names.iter().map(|n| builtin_pack(n)).collect::<Result<Vec<_>, _>>()?;
    compile(&packs)
}

/// Combines packs into one policy: rejects duplicate ids, compiles every regex once (so errors
/// surface here, on the host, not in the VM), and serializes the result.
pub fn compile(packs: &[Pack]) -> Result<CompiledPolicy, PolicyError> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut owner: Vec<&str> = Vec::new();
    for pack in packs {
        for rule in &pack.rules {
            if let Some(i) = rules.iter().position(|r| r.id == rule.id) {
                return Err(PolicyError::DuplicateRule {
                    rule: rule.id.clone(),
                    first: owner[i].to_owned(),
                    second: pack.name.clone(),
                });
            }
            rules.push(rule.clone());
            owner.push(&pack.name);
        }
    }
    if rules.is_empty() {
        return Err(PolicyError::Empty);
    }
    let policy = Policy { format_version: POLICY_FORMAT_VERSION, rules };
    // Builds the keyword automaton and the combined keyword-less filter as the guest will.
    cella_scan::Engine::new(policy.clone())
        .map_err(|e| PolicyError::Malformed { pack: owner.join("+"), message: e.to_string() })?;
    let bytes = serde_json::to_vec(&policy)
        .map_err(|e| PolicyError::Malformed { pack: owner.join("+"), message: e.to_string() })?;
    Ok(CompiledPolicy { policy, bytes })
}

#[cfg(test)]
mod tests;
