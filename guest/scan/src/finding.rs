//! Findings, redaction and fingerprints, and the per-artifact [`Report`].

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::rule::{Category, Confidence, Policy, Severity};

/// One finding. Never holds the secret itself: only [`Finding::redacted`] and fingerprints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Index of the rule in the policy (SARIF `ruleIndex`).
    pub rule_index: u32,
    /// The rule's id.
    pub rule_id: String,
    /// Path of the file inside the artifact (`outer.zip!/inner/file` for nested archives).
    pub path: String,
    /// 1-based line of the secret's first byte.
    pub line: u64,
    /// 1-based column, in Unicode code points (SARIF `columnKind: unicodeCodePoints`).
    pub column: u64,
    /// Line of the position just after the secret (SARIF `endLine`).
    pub end_line: u64,
    /// Column of the position just after the secret (SARIF `endColumn`, exclusive).
    pub end_column: u64,
    /// In a binary file: where the secret's bytes are (a UTF-16 string's are twice its
    /// length). Lines and columns there count `\n` bytes and bytes.
    pub bytes: Option<ByteRange>,
    /// Short prefix and suffix of the secret with the middle masked; for license rules, the
    /// SPDX identifier.
    pub redacted: String,
    /// `secretHmac/v1`: hex HMAC-SHA256, under the scan's [`FingerprintKey`], of `rule id`, a
    /// NUL byte and the secret: equal secrets found by the same rule share it wherever they are
    /// found with the same key (the service keeps one per tenant), so findings deduplicate
    /// across files and runs; without the key, a low-entropy secret cannot be found from it by
    /// trying values.
    pub fingerprint: String,
    /// `cellaLocation/v1`: hex HMAC of the rule id, the path, the secret and its occurrence
    /// index among that rule's findings of that secret in that file: the same for the same
    /// finding in every run (whatever lines move around it), different for each of several equal
    /// secrets in one file. Baselines hold these.
    pub location_fingerprint: String,
    /// GitHub's `primaryLocationLineHash`: `<16 hex digits>:<n>`, a keyed hash of the rule id
    /// and the finding's first line with its whitespace removed, and the 1-based count of that
    /// hash so far in the file.
    pub line_hash: String,
    /// Why the finding does not count against the job, if it does not.
    pub suppression: Option<Suppression>,
    /// How sure it is: its rule's confidence, one step lower in a test fixture
    /// ([`in_test_fixture`]).
    pub confidence: Confidence,
    /// Its level: its rule's, or for a license the job's license policy denies (`error`) or
    /// flags (`warning` at least), raised.
    pub severity: Severity,
    /// What the job's license policy made of a license finding, if the job has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_verdict: Option<crate::spdx::Verdict>,
    /// For a licence text found by normalised matching: how much of it matched, per cent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_score: Option<u8>,
    /// The commit that introduced it, when the artifact held the repository's history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<alloc::boxed::Box<crate::history::Origin>>,
    /// The image layer it is in, when the artifact was a container image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<alloc::boxed::Box<crate::archive::image::ImageOrigin>>,
}

/// Folder names that hold test data, examples and fixtures.
const FIXTURE_FOLDERS: [&str; 17] = [
    "test",
    "tests",
    "testdata",
    "test-data",
    "test_data",
    "testing",
    "fixtures",
    "fixture",
    "__fixtures__",
    "__tests__",
    "__mocks__",
    "mocks",
    "examples",
    "example",
    "samples",
    "spec",
    "specs",
];

/// Whether `path` (an artifact path, archives joined by `!/`) lies in a test, example or
/// fixture folder, or names a test file (`x_test.go`, `x.test.ts`, `x_spec.rb`, `test_x.py`):
/// a secret there is more often a fake one, so its finding is one step less sure. It is still
/// reported: a real key committed to a fixture is still a leak.
pub fn in_test_fixture(path: &str) -> bool {
    let parts: Vec<&str> = path.split(['/', '\\']).filter(|p| !p.is_empty() && *p != "!").collect();
    let Some((file, folders)) = parts.split_last() else { return false };
    let folder = |p: &&str| {
        let p = p.trim_end_matches('!');
        FIXTURE_FOLDERS.iter().any(|f| p.eq_ignore_ascii_case(f))
    };
    if folders.iter().any(folder) {
        return true;
    }
    let lower = file.to_ascii_lowercase();
    let stem = lower.split('.').next().unwrap_or("");
    stem.ends_with("_test")
        || stem.ends_with("_spec")
        || stem.ends_with("_tests")
        || stem.starts_with("test_")
        || lower.contains(".test.")
        || lower.contains(".spec.")
}

/// A byte range of a file: `offset` and `length` (SARIF `byteOffset`, `byteLength`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// The markers that suppress a finding on their line (the first or last line of a multi-line
/// finding), matched ASCII case-insensitively anywhere on the line: Cella's own and those of
/// the scanners teams migrate from, so their annotations keep working.
pub const INLINE_MARKERS: &[&str] =
    &["cella:allow", "gitleaks:allow", "kingfisher:ignore", "pragma: allowlist secret"];

/// Why a finding is suppressed: it stays in the report and the SARIF log (with a SARIF
/// `suppressions` entry) and in the summary's counts, but no longer fails a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Suppression {
    /// An [`INLINE_MARKERS`] marker on the finding's line.
    Inline {
        /// The marker, as listed in [`INLINE_MARKERS`].
        marker: &'static str,
    },
    /// Its `cellaLocation/v1` fingerprint is in the job's baseline.
    Baseline,
}

impl Suppression {
    /// SARIF `suppression.kind`.
    pub fn sarif_kind(&self) -> &'static str {
        match self {
            Suppression::Inline { .. } => "inSource",
            Suppression::Baseline => "external",
        }
    }

    /// SARIF `suppression.justification`.
    pub fn justification(&self) -> String {
        match self {
            Suppression::Inline { marker } => alloc::format!("marked `{marker}` in the source"),
            Suppression::Baseline => String::from("in the baseline"),
        }
    }
}

/// The `cellaLocation/v1` fingerprints of known findings (a job's baseline), as 32-byte
/// values, sorted: membership is a binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FingerprintSet(Vec<[u8; 32]>);

impl FingerprintSet {
    /// Bytes of one fingerprint on the wire (see [`FingerprintSet::from_wire`]).
    pub const ENTRY_LEN: usize = 32;

    /// The set of these fingerprints.
    pub fn new(mut fingerprints: Vec<[u8; 32]>) -> Self {
        fingerprints.sort_unstable();
        fingerprints.dedup();
        FingerprintSet(fingerprints)
    }

    /// Parses the wire form: the fingerprints back to back, [`Self::ENTRY_LEN`] bytes each.
    /// `None` if the length is not a whole number of fingerprints.
    pub fn from_wire(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(Self::ENTRY_LEN) {
            return None;
        }
        let v = bytes
            .chunks_exact(Self::ENTRY_LEN)
            .map(|c| {
                let mut fp = [0u8; 32];
                fp.copy_from_slice(c);
                fp
            })
            .collect();
        Some(Self::new(v))
    }

    /// The wire form (sorted).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * Self::ENTRY_LEN);
        for fp in &self.0 {
            out.extend_from_slice(fp);
        }
        out
    }

    /// Parses one fingerprint written as 64 hex digits (either case).
    pub fn parse_hex(hex: &str) -> Option<[u8; 32]> {
        parse_hex32(hex)
    }

    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.0.binary_search(fingerprint).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fingerprints, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.0.iter()
    }
}

/// 64 hex digits as 32 bytes.
pub(crate) fn parse_hex32_pub(hex: &str) -> Option<[u8; 32]> {
    parse_hex32(hex)
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Masks all of `secret` except a short prefix and suffix: at most 4 bytes each, and together
/// never more than a third of the secret. The mask has a fixed width so the length is not shown.
pub fn redact(secret: &[u8]) -> String {
    // Whitespace in a secret (the line breaks of a PEM key's body) is neither shown nor counted:
    // a multi-line key shows the start and end of its content, not `????`.
    let content: Vec<u8> = secret.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    let keep = (content.len() / 6).min(4);
    let mut s = String::with_capacity(2 * keep + 4);
    push_printable(&mut s, &content[..keep]);
    s.push_str("****");
    push_printable(&mut s, &content[content.len() - keep..]);
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
        parse_hex32(hex).map(FingerprintKey)
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

/// HMAC-SHA256 (RFC 2104) under a 32-byte key, fed piece by piece.
#[derive(Clone)]
pub(crate) struct Hmac {
    inner: Sha256,
    opad: [u8; 64],
}

impl Hmac {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        const BLOCK: usize = 64;
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let mut inner = Sha256::new();
        inner.update(ipad);
        Hmac { inner, opad }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        let mut outer = Sha256::new();
        outer.update(self.opad);
        outer.update(self.inner.finalize());
        outer.finalize().into()
    }
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::new(key);
    for part in parts {
        mac.update(part);
    }
    mac.finish()
}

/// Hex HMAC-SHA256 under `key` of `rule_id`, NUL, `secret` (`secretHmac/v1`).
pub fn fingerprint(key: &FingerprintKey, rule_id: &str, secret: &[u8]) -> String {
    hex(&secret_mac(key, rule_id, secret))
}

pub(crate) fn secret_mac(key: &FingerprintKey, rule_id: &str, secret: &[u8]) -> [u8; 32] {
    hmac_sha256(&key.0, &[rule_id.as_bytes(), &[0u8], secret])
}

/// The `cellaLocation/v1` fingerprint: HMAC under `key` of the label, the rule id, the path,
/// the secret's `secretHmac/v1` value and its 0-based occurrence among that rule's findings of
/// that secret in that file (NUL-separated; the index as 8 little-endian bytes).
pub fn location_fingerprint(
    key: &FingerprintKey,
    rule_id: &str,
    path: &str,
    secret_mac: &[u8; 32],
    occurrence: u64,
) -> [u8; 32] {
    hmac_sha256(
        &key.0,
        &[
            b"cellaLocation/v1\0",
            rule_id.as_bytes(),
            &[0],
            path.as_bytes(),
            &[0],
            secret_mac,
            &occurrence.to_le_bytes(),
        ],
    )
}

/// The hash part of a `primaryLocationLineHash`: the first 8 bytes of an HMAC under `key` of
/// the label, the rule id and `line` without its ASCII whitespace (so re-indenting a line
/// keeps it).
pub fn line_hash(key: &FingerprintKey, rule_id: &str, line: &[u8]) -> [u8; 8] {
    let mut mac = Hmac::new(&key.0);
    mac.update(b"primaryLocationLineHash/v1\0");
    mac.update(rule_id.as_bytes());
    mac.update(&[0]);
    for word in line.split(|b| b.is_ascii_whitespace()) {
        mac.update(word);
    }
    let full = mac.finish();
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

/// Lowercase hex digits of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    hex(bytes)
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
    /// Findings in scan order (by file, then by position), suppressed ones included. When the
    /// cap ([`crate::Limits::max_findings`]) is reached, suppressed findings make room for
    /// unsuppressed ones, so those are the last to be left out.
    pub findings: Vec<Finding>,
    /// Files read and scanned (text files, and binary files' printable strings).
    pub files_scanned: u64,
    /// Of those, binary files (a NUL byte in the first [`crate::BINARY_SNIFF_LEN`] bytes): their
    /// printable strings were scanned with the secret rules.
    pub files_binary: u64,
    /// Binary files longer than [`crate::Limits::max_binary_bytes`]: only their start was
    /// scanned.
    pub files_binary_truncated: u64,
    /// Files not scanned because the job's excludes name them (an excluded archive counts once).
    pub files_excluded: u64,
    /// Entries left unread because Cella cannot read them (an encrypted zip entry, a nested
    /// archive that is corrupt or uses an unsupported feature): the first
    /// [`MAX_SKIPPED_LISTED`], each with its reason; `entries_skipped` counts them all.
    pub skipped: Vec<SkippedEntry>,
    pub entries_skipped: u64,
    /// Bytes scanned (decompressed; of a binary file, the bytes its strings were taken from).
    pub bytes_scanned: u64,
    /// Findings not kept because [`crate::Limits::max_findings`] was reached.
    pub findings_dropped: u64,
    /// Findings suppressed by an inline marker (kept or dropped).
    pub suppressed_inline: u64,
    /// Findings suppressed by the baseline (kept or dropped).
    pub suppressed_baseline: u64,
    /// Unsuppressed findings per rule index (kept or dropped): what gates count.
    pub unsuppressed_by_rule: Vec<u64>,
    /// Unsuppressed findings per confidence (low, medium, high) and level (a finding's own,
    /// which a license policy may raise above its rule's).
    pub unsuppressed_by_confidence_level: [ByLevel; 3],
    /// What the git histories in the artifact held, if it had any.
    pub history: Option<crate::history::HistorySummary>,
    /// History findings held back until the whole artifact is scanned (see
    /// `history::merge`).
    pub(crate) pending_history: Vec<Finding>,
    /// What the container images in the artifact held, if it was one.
    pub image: Option<crate::archive::image::ImageSummary>,
    /// What an image's attribution needs, gathered while walking (see `archive::image`).
    pub(crate) image_capture: Option<crate::archive::image::Capture>,
    /// Suppressed findings among `findings`.
    pub(crate) suppressed_kept: usize,
    /// The cap was reached and suppressed findings were given up for unsuppressed ones: no
    /// more suppressed findings are kept.
    pub(crate) suppressed_closed: bool,
}

/// Counts and totals of one scan, serialized as the job summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Files scanned (text and binary).
    pub files_scanned: u64,
    /// Binary files among them (printable strings scanned with the secret rules).
    pub files_binary: u64,
    /// Binary files only partly scanned (longer than the limit).
    pub files_binary_truncated: u64,
    /// Files the job's excludes left out.
    pub files_excluded: u64,
    /// Entries Cella could not read, counted; the first of them listed with the reason.
    pub entries_skipped: u64,
    pub skipped: Vec<SkippedEntry>,
    /// Bytes scanned.
    pub bytes_scanned: u64,
    /// All findings: suppressed and dropped ones included.
    pub findings: u64,
    /// Findings not kept in the report because of the findings cap.
    pub findings_dropped: u64,
    /// Suppressed findings, by how.
    pub suppressed: Suppressed,
    /// Unsuppressed findings by SARIF level.
    pub unsuppressed: ByLevel,
    /// Unsuppressed findings by confidence (`high`, `medium`, `low`) and SARIF level: what a gate
    /// (`--fail-on LEVEL`, `--min-confidence`) counts.
    pub by_confidence: BTreeMap<String, ByLevel>,
    /// Unsuppressed findings per rule id.
    pub by_rule: BTreeMap<String, u64>,
    /// Unsuppressed findings per category.
    pub by_category: BTreeMap<String, u64>,
    /// What the git histories in the artifact held, if it had any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::history::HistorySummary>,
    /// What the container images in the artifact held, if it was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::archive::image::ImageSummary>,
    /// Wall time of the scan as measured by the caller, in milliseconds.
    pub duration_ms: u64,
}

/// Suppressed findings of a scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Suppressed {
    pub inline: u64,
    pub baseline: u64,
    pub total: u64,
}

/// Findings per SARIF level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ByLevel {
    pub error: u64,
    pub warning: u64,
    pub note: u64,
}

impl ByLevel {
    /// Findings at `level` or above.
    pub fn at_or_above(&self, level: Severity) -> u64 {
        match level {
            Severity::Error => self.error,
            Severity::Warning => self.error + self.warning,
            Severity::Note => self.error + self.warning + self.note,
        }
    }

    /// Counts `n` findings at `level`.
    pub fn add(&mut self, level: Severity, n: u64) {
        match level {
            Severity::Error => self.error += n,
            Severity::Warning => self.warning += n,
            Severity::Note => self.note += n,
        }
    }
}

impl Summary {
    /// Unsuppressed findings at `level` or above whose confidence is `min` or more: what a
    /// gate counts.
    pub fn gate(&self, level: Severity, min: Confidence) -> u64 {
        gate(&self.by_confidence, level, min)
    }
}

/// What a gate counts from a summary's `by_confidence`: unsuppressed findings at `level` or
/// above whose confidence is `min` or more. The one place a `--fail-on` / `--min-confidence`
/// gate is computed from a summary (a host reading a guest's summary calls it too).
pub fn gate(by_confidence: &BTreeMap<String, ByLevel>, level: Severity, min: Confidence) -> u64 {
    [Confidence::High, Confidence::Medium, Confidence::Low]
        .iter()
        .filter(|c| **c >= min)
        .filter_map(|c| by_confidence.get(c.as_str()))
        .map(|l| l.at_or_above(level))
        .sum()
}

/// How many skipped entries a report lists (all are counted).
pub const MAX_SKIPPED_LISTED: usize = 100;

/// An archive entry the scan could not read, and why: it was not scanned, and the rest of the
/// artifact was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedEntry {
    pub path: String,
    pub reason: String,
}

impl Report {
    /// Records an entry that was not read (listed up to [`MAX_SKIPPED_LISTED`], counted always).
    pub fn skip(&mut self, path: &str, reason: String) {
        self.entries_skipped += 1;
        if self.skipped.len() < MAX_SKIPPED_LISTED {
            self.skipped.push(SkippedEntry { path: String::from(path), reason });
        }
    }

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

    /// All findings: kept (suppressed or not) and dropped.
    pub fn findings_total(&self) -> u64 {
        self.findings.len() as u64 + self.findings_dropped
    }

    /// Counts by rule, category and level (of unsuppressed findings) and of suppressed ones.
    /// `duration_ms` is measured by the caller (the guest has no clock of its own that this
    /// crate may assume).
    pub fn summary(&self, policy: &Policy, duration_ms: u64) -> Summary {
        let mut by_rule = BTreeMap::new();
        let mut by_category = BTreeMap::new();
        let mut unsuppressed = ByLevel::default();
        for c in [Category::Secret, Category::Pii, Category::License] {
            by_category.insert(String::from(c.as_str()), 0);
        }
        let mut by_confidence: BTreeMap<String, ByLevel> =
            [Confidence::High, Confidence::Medium, Confidence::Low]
                .iter()
                .map(|c| (String::from(c.as_str()), ByLevel::default()))
                .collect();
        for (c, levels) in [Confidence::Low, Confidence::Medium, Confidence::High]
            .iter()
            .zip(&self.unsuppressed_by_confidence_level)
        {
            by_confidence.insert(String::from(c.as_str()), *levels);
            unsuppressed.error += levels.error;
            unsuppressed.warning += levels.warning;
            unsuppressed.note += levels.note;
        }
        for (i, &n) in self.unsuppressed_by_rule.iter().enumerate() {
            let Some(rule) = policy.rules.get(i) else { continue };
            if n == 0 {
                continue;
            }
            *by_rule.entry(rule.id.clone()).or_insert(0) += n;
            *by_category.entry(String::from(rule.category.as_str())).or_insert(0) += n;
        }
        Summary {
            files_scanned: self.files_scanned,
            files_binary: self.files_binary,
            files_binary_truncated: self.files_binary_truncated,
            files_excluded: self.files_excluded,
            entries_skipped: self.entries_skipped,
            skipped: self.skipped.clone(),
            bytes_scanned: self.bytes_scanned,
            findings: self.findings_total(),
            findings_dropped: self.findings_dropped,
            suppressed: Suppressed {
                inline: self.suppressed_inline,
                baseline: self.suppressed_baseline,
                total: self.suppressed_inline + self.suppressed_baseline,
            },
            unsuppressed,
            by_confidence,
            by_rule,
            by_category,
            history: self.history.clone(),
            image: self.image.clone(),
            duration_ms,
        }
    }

    /// The summary as JSON.
    pub fn summary_json(&self, policy: &Policy, duration_ms: u64) -> String {
        // Serializing plain structs and maps of strings cannot fail.
        serde_json::to_string_pretty(&self.summary(policy, duration_ms)).unwrap_or_default()
    }

    /// Adds one finding, counting it, within the cap `max_findings`: past it, an unsuppressed
    /// finding takes the place of the suppressed ones kept so far (all of them are given up
    /// at once, and no suppressed finding is kept after that); anything else is dropped.
    pub(crate) fn add(&mut self, finding: Finding, max_findings: usize) {
        let rule = finding.rule_index as usize;
        match finding.suppression {
            Some(Suppression::Inline { .. }) => self.suppressed_inline += 1,
            Some(Suppression::Baseline) => self.suppressed_baseline += 1,
            None => {
                if self.unsuppressed_by_rule.len() <= rule {
                    self.unsuppressed_by_rule.resize(rule + 1, 0);
                }
                self.unsuppressed_by_rule[rule] += 1;
                self.unsuppressed_by_confidence_level[finding.confidence as usize].add(finding.severity, 1);
            }
        }
        let suppressed = finding.suppression.is_some();
        if suppressed && self.suppressed_closed {
            self.findings_dropped += 1;
            return;
        }
        if self.findings.len() >= max_findings {
            if suppressed || self.suppressed_kept == 0 {
                self.findings_dropped += 1;
                return;
            }
            let before = self.findings.len();
            self.findings.retain(|f| f.suppression.is_none());
            self.findings_dropped += (before - self.findings.len()) as u64;
            self.suppressed_kept = 0;
            self.suppressed_closed = true;
        }
        if suppressed {
            self.suppressed_kept += 1;
        }
        self.findings.push(finding);
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
    fn a_multi_line_secret_is_redacted_by_its_content_not_its_line_breaks() {
        let body = b"\nMIIEpAIBAAKCAQEAx7Kd9Zq2\nw8Jt4Lm0Vn3Bq5Rr1Tz6Yc==\n";
        assert_eq!(redact(body), "MIIE****Yc==");
        assert_eq!(redact(b"\r\n  \t\n"), "****");
        assert_eq!(redact(b"\x01\x02ab\ncdefghijkl"), "??****kl");
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
