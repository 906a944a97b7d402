//! Compliance rule packs: the built-in packs in `policies/rules/*.toml` (compiled into the
//! binary) and tenant-supplied pack files, loaded, validated with errors that name the pack, the
//! rule and the problem, and turned into the [`CompiledPolicy`] the host sends into the VM.
//! Packs a tenant uploads to the service (Cella's format, or gitleaks' converted) are validated
//! with line numbers by [`tenant`].
//!
//! ```
//! let compiled = cella_policies::rules::load_packs(&["secrets", "pii", "licenses"])?;
//! let bytes: &[u8] = compiled.as_bytes(); // sent to the guest
//! let engine = cella_scan::Engine::from_policy_json(bytes)?;
//! # assert!(engine.policy().rules.len() > 40);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod bench_packs;
pub mod examples;
mod gitleaks;
pub mod lines;
mod pack;
pub mod tenant;

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
    /// A glob of the pack's `exclude` list was refused.
    #[error("rule pack `{pack}` has an `exclude` glob it cannot use")]
    InvalidExclude {
        pack: String,
        #[source]
        source: cella_scan::GlobError,
    },
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
    /// Each rule's examples (`examples`, `negative_examples`), in the order of `rules`. They stay
    /// on the host: the policy sent into a VM carries the rules only.
    pub examples: Vec<Examples>,
}

/// What a rule must find and must not find, as its pack states it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Examples {
    pub positive: Vec<String>,
    pub negative: Vec<String>,
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

/// What identifies a pack in a job's evidence: its name, version and the SHA-256 of its text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackIdentity {
    pub name: String,
    pub version: String,
    /// Hex SHA-256 of the pack's TOML text.
    pub sha256: String,
}

/// The identity of built-in pack `name`: the built-in packs are versioned with Cella.
pub fn builtin_pack_identity(name: &str) -> Result<PackIdentity, PolicyError> {
    use sha2::Digest;
    let text = builtin_text(name)?;
    let digest = sha2::Sha256::digest(text.as_bytes());
    Ok(PackIdentity {
        name: name.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Loads a built-in pack by name, validating it in full (every regex compiled).
pub fn builtin_pack(name: &str) -> Result<Pack, PolicyError> {
    parse_pack(name, builtin_text(name)?)
}

fn builtin_text(name: &str) -> Result<&'static str, PolicyError> {
    BUILTIN_PACKS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
        .ok_or_else(|| PolicyError::UnknownPack { name: name.to_owned() })
}

/// Loads a built-in pack by name without compiling its regexes: the built-in packs never change
/// at run time, and the tests validate every one of them in full.
fn trusted_builtin_pack(name: &str) -> Result<Pack, PolicyError> {
    pack::parse(name, builtin_text(name)?, pack::Check::ShapeOnly)
}

/// Loads a tenant-supplied pack file (same format as the built-in packs).
pub fn load_pack_file(path: &Path) -> Result<Pack, PolicyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PolicyError::Io { path: path.to_owned(), source })?;
    parse_pack(&path.display().to_string(), &text)
}

/// Loads built-in packs by name and combines them into one policy. The built-in packs are
/// trusted: their regexes are not compiled here (that takes longer than the rest of a small
/// scan's launch); `rules::tests` compiles every built-in pack and their combination instead.
pub fn load_packs(names: &[&str]) -> Result<CompiledPolicy, PolicyError> {
    let packs = names.iter().map(|n| trusted_builtin_pack(n)).collect::<Result<Vec<_>, _>>()?;
    let (policy, owner) = combine(&packs)?;
    serialize(policy, &owner)
}

/// Combines packs into one policy: rejects duplicate ids, compiles every regex once (so errors
/// surface here, on the host, not in the VM), and serializes the result. For policies that
/// include a pack from outside (a tenant's `--policy-file`).
pub fn compile(packs: &[Pack]) -> Result<CompiledPolicy, PolicyError> {
    let (policy, owner) = combine(packs)?;
    // Builds the keyword automaton and the combined keyword-less filter as the guest will.
    cella_scan::Engine::new(policy.clone())
        .map_err(|e| PolicyError::Malformed { pack: owner.join("+"), message: e.to_string() })?;
    serialize(policy, &owner)
}

/// The packs' rules in order as one policy, and the pack that owns each rule.
fn combine(packs: &[Pack]) -> Result<(Policy, Vec<&str>), PolicyError> {
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
    Ok((Policy { format_version: POLICY_FORMAT_VERSION, rules }, owner))
}

fn serialize(policy: Policy, owner: &[&str]) -> Result<CompiledPolicy, PolicyError> {
    let bytes = serde_json::to_vec(&policy)
        .map_err(|e| PolicyError::Malformed { pack: owner.join("+"), message: e.to_string() })?;
    Ok(CompiledPolicy { policy, bytes })
}

#[cfg(test)]
mod tests;
