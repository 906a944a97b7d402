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
    /// Hex HMAC-SHA256, under the scan's [`FingerprintKey`], of `rule id`, a NUL byte and the
    /// secret: equal secrets found by the same rule share it wherever they are found with the
    /// same key (the service keeps one per tenant), so findings deduplicate across files and
    /// runs; without the key, a low-entropy secret cannot be found from it by trying values.
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

/// The secret key of finding fingerprints (HMAC-SHA256). Whoever sees fingerprints without the
/// key learns only which findings are equal; the service keeps one key per tenant and hands it
/// to each scan of that tenant.
#[derive(Clone, PartialEq, Eq)]
pub struct FingerprintKey([u8; 32]);

impl FingerprintKey {
    /// Length of a key in bytes.
    pub const LEN: usize = 32;

    pub const fn new(bytes: [u8; 32]) -> Self {
        FingerprintKey(bytes)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 2 * Self::LEN {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut key = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            key[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(FingerprintKey(key))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl core::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Hex HMAC-SHA256 under `key` of `rule_id`, NUL, `secret`.
pub fn fingerprint(key: &FingerprintKey, rule_id: &str, secret: &[u8]) -> String {
    hex(&hmac_sha256(&key.0, &[rule_id.as_bytes(), &[0u8], secret]))
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
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
    /// Masks every secret and personal-data finding's snippet whole (no prefix or suffix of the
    /// value), for answers that must not show more than a masked view of the text; license
    /// findings keep their identifier.
    pub fn mask_snippets(&mut self, policy: &Policy) {
        for f in &mut self.findings {
            let license =
                policy.rules.get(f.rule_index as usize).is_some_and(|r| r.category == Category::License);
            if !license {
                f.redacted = String::from("****");
            }
        }
    }

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
    fn fingerprint_is_stable_rule_scoped_and_keyed() {
        let k = FingerprintKey::new([7; 32]);
        let other = FingerprintKey::new([8; 32]);
        assert_eq!(fingerprint(&k, "r", b"x"), fingerprint(&k, "r", b"x"));
        assert_ne!(fingerprint(&k, "r", b"x"), fingerprint(&k, "s", b"x"));
        assert_ne!(fingerprint(&k, "r", b"x"), fingerprint(&other, "r", b"x"));
        assert_eq!(fingerprint(&k, "r", b"x").len(), 64);
        // Not the unkeyed SHA-256 of the same input.
        let plain: [u8; 32] = Sha256::digest(b"r\0x").into();
        assert_ne!(fingerprint(&k, "r", b"x"), hex(&plain));
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_with_a_32_byte_key() {
        // RFC 4231 test case 2 uses a 4-byte key ("Jefe"); a key shorter than the block is
        // zero-padded by HMAC, so the same key padded to 32 bytes gives the same MAC.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn keys_round_trip_through_hex_and_refuse_anything_else() {
        let k = FingerprintKey::new([0xab; 32]);
        assert_eq!(FingerprintKey::from_hex(&k.to_hex()), Some(k.clone()));
        assert_eq!(FingerprintKey::from_hex("ab"), None);
        assert_eq!(FingerprintKey::from_hex(&"zz".repeat(32)), None);
        assert_eq!(alloc::format!("{k:?}"), "FingerprintKey(..)");
    }
}
