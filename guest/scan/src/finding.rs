//! Findings, redaction and fingerprints, and the per-artifact [`Report`].

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::rule::{Category, Policy};

/// One finding. Never holds the secret itself: only [`Finding::redacted`] and a fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Index of the rule in the policy (SARIF `ruleIndex`).
    pub rule_index: u32,
    /// The rule's id.
    pub rule_id: String,
    /// Path of the file inside the artifact (`outer.zip!/inner/file` for nested archives).
    pub path: String,
    /// 1-based line.
    pub line: u64,
    /// 1-based column, in Unicode code points (SARIF `columnKind: unicodeCodePoints`).
    pub column: u64,
    /// Short prefix and suffix of the secret with the middle masked; for license rules, the
    /// SPDX identifier.
    pub redacted: String,
    /// Hex SHA-256 of `rule id`, a NUL byte and the secret: equal secrets found by the same rule
    /// anywhere share it, so findings deduplicate across files and runs.
    pub fingerprint: String,
}

/// Masks all of `secret` except a short prefix and suffix: at most 4 bytes each, and together
/// never more than a third of the secret. The mask has a fixed width so the length is not shown.
pub fn redact(secret: &[u8]) -> String {
    let keep = (secret.len() / 6).min(4);
    let mut s = String::with_capacity(2 * keep + 4);
    push_printable(&mut s, &secret[..keep]);
    s.push_str("****");
    push_printable(&mut s, &secret[secret.len() - keep..]);
    s
}

fn push_printable(s: &mut String, bytes: &[u8]) {
    for &b in bytes {
        s.push(if b.is_ascii_graphic() { b as char } else { '?' });
    }
}

/// Hex SHA-256 of `rule_id`, NUL, `secret`.
pub fn fingerprint(rule_id: &str, secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(rule_id.as_bytes());
    h.update([0u8]);
    h.update(secret);
    let digest = h.finalize();
    let mut s = String::with_capacity(64);
    for b in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Everything one artifact scan produced, apart from the duration (the caller measures it).
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Findings in scan order (by file, then by position).
    pub findings: Vec<Finding>,
    /// Files whose text was scanned.
    pub files_scanned: u64,
    /// Files skipped as binary (see [`crate::BINARY_SNIFF_LEN`]).
    pub files_skipped_binary: u64,
    /// Bytes of text scanned (decompressed).
    pub bytes_scanned: u64,
    /// Findings not kept because [`crate::Limits::max_findings`] was reached.
    pub findings_dropped: u64,
}

/// Counts and totals of one scan, serialized as the job summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Files whose text was scanned.
    pub files_scanned: u64,
    /// Files skipped as binary.
    pub files_skipped_binary: u64,
    /// Bytes of text scanned.
    pub bytes_scanned: u64,
    /// All findings, including dropped ones.
    pub findings: u64,
    /// Findings not kept in the report because of the findings cap.
    pub findings_dropped: u64,
    /// Findings per rule id (kept findings only).
    pub by_rule: BTreeMap<String, u64>,
    /// Findings per category (kept findings only).
    pub by_category: BTreeMap<String, u64>,
    /// Wall time of the scan as measured by the caller, in milliseconds.
    pub duration_ms: u64,
}

impl Report {
    /// Counts by rule and category. `duration_ms` is measured by the caller (the guest has no
    /// clock of its own that this crate may assume).
    pub fn summary(&self, policy: &Policy, duration_ms: u64) -> Summary {
        let mut by_rule = BTreeMap::new();
        let mut by_category = BTreeMap::new();
        for c in [Category::Secret, Category::Pii, Category::License] {
            by_category.insert(String::from(c.as_str()), 0);
        }
        for f in &self.findings {
            *by_rule.entry(f.rule_id.clone()).or_insert(0) += 1;
            if let Some(rule) = policy.rules.get(f.rule_index as usize) {
                *by_category.entry(String::from(rule.category.as_str())).or_insert(0) += 1;
            }
        }
        Summary {
            files_scanned: self.files_scanned,
            files_skipped_binary: self.files_skipped_binary,
            bytes_scanned: self.bytes_scanned,
            findings: self.findings.len() as u64 + self.findings_dropped,
            findings_dropped: self.findings_dropped,
            by_rule,
            by_category,
            duration_ms,
        }
    }

    /// The summary as JSON.
    pub fn summary_json(&self, policy: &Policy, duration_ms: u64) -> String {
        // Serializing plain structs and maps of strings cannot fail.
        serde_json::to_string_pretty(&self.summary(policy, duration_ms)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_short_prefix_and_suffix_only() {
        assert_eq!(redact(b"AKIAZ7Q3R5T2V4X6Y8B1"), "AKI****8B1");
        assert_eq!(redact(b"ghp_0123456789abcdefghijklmnopqrstuvwxyz"), "ghp_****wxyz");
        assert_eq!(redact(b"short"), "****");
    }

    #[test]
    fn fingerprint_is_stable_and_rule_scoped() {
        assert_eq!(fingerprint("r", b"x"), fingerprint("r", b"x"));
        assert_ne!(fingerprint("r", b"x"), fingerprint("s", b"x"));
        assert_eq!(fingerprint("r", b"x").len(), 64);
    }
}
