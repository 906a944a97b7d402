//! The scan engine. Text is scanned in fixed-size chunks with an overlap, so memory stays fixed
//! and line numbers exact. In each chunk:
//!
//! 1. Two sources find candidate lines: a forward lazy DFA over a multi-pattern *line filter*
//!    (the keyword-less (PII) regexes and the first [`FILTER_REGEXES`] single-line rules'
//!    regexes), and an Aho–Corasick DFA of the other rules' keywords (the multiline rules' and
//!    those of single-line rules past the first ones). A line is looked at further only if
//!    some rule could match on it or one of those keywords occurs in it, so ordinary text
//!    costs two automaton transitions per byte and nothing else.
//! 2. On a candidate line, an Aho–Corasick automaton finds the keywords (gitleaks semantics:
//!    a keyword rule only runs where one of its keywords occurs) and runs those rules' regexes
//!    on the line (or, for multiline rules, on a window starting at it); keyword-less rules
//!    run on the line if their own combined filter matches it.
//! 3. Each match then passes the secret-group extraction, entropy threshold, validator and
//!    allowlists (and is not filler like `ghp_xxxx…`, nor for a generic rule a placeholder: see
//!    `placeholder.rs`) before it becomes a finding (redacted, fingerprinted, with line and column).
//! 4. Where a generic rule ([`Rule::generic`]) and a specific one find overlapping secrets,
//!    the specific finding stays; where rules of the same kind find the same secret, the
//!    first in policy order does. A finding with an inline marker ([`INLINE_MARKERS`]) on its
//!    line, or whose `cellaLocation/v1` fingerprint is in the baseline, is kept but suppressed.
//!
//! A binary file (a NUL byte in its first [`BINARY_SNIFF_LEN`] bytes) is scanned by its
//! printable strings (see `binary.rs`) with the secret rules only, each finding located by its
//! byte offset. Files the job excludes ([`Engine::set_excludes`]) are not read at all; a rule's
//! path allowlist (where a pack's `exclude` globs go) turns that rule off for matching files.
//!
//! Rule regexes compile lazily on first use ([`Engine::new_lazy`]), so a VM pays only for the
//! rules its artifact exercises; [`Engine::new`] compiles (and so validates) everything.
//!
//! The automata of step 1 cost more to build than a small artifact costs to scan without them. Until [`LINE_FILTER_AFTER`] bytes of text have been seen,
//! every line is a candidate instead. The findings are the same either way: the filters only
//! skip lines on which none of the first rules' regexes and no keyword-less rule can match and
//! none of the other rules' keywords occurs, and steps 2 and 3 find nothing on such lines.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex_automata::hybrid;
use regex_automata::meta::{self, Regex};
use regex_automata::nfa::thompson;
use regex_automata::util::captures::Captures;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input};

use alloc::collections::BTreeMap;

use crate::archive::Limits;
use crate::binary::{self, Run};
use crate::error::{ArtifactError, EngineError};
use crate::finding::{
    in_test_fixture, line_hash, location_fingerprint, redact, secret_mac, to_hex, ByteRange, Finding,
    FingerprintKey, FingerprintSet, Report, Suppression, INLINE_MARKERS,
};
use crate::glob::glob_to_regex;
use crate::rule::{Category, Confidence, Policy, Rule, Severity, MULTILINE_WINDOW, POLICY_FORMAT_VERSION};
use crate::source::{read_full, ByteRead, SliceRead};
use crate::validate::{check, contains_ascii_ci, shannon_entropy};

/// How many bytes at the start of a file decide whether it is binary: a file is **binary if a
/// NUL byte occurs in its first 8 KiB** (the rule git and ripgrep use); its printable strings
/// (ASCII and UTF-16LE) are then scanned with the secret rules only. Text in UTF-16 is
/// therefore scanned that way too.
pub const BINARY_SNIFF_LEN: usize = 8 * 1024;

/// Bytes of new text read per chunk.
pub const CHUNK_LEN: usize = 1024 * 1024;

/// Bytes carried from one chunk into the next, so a match straddling a chunk boundary is seen
/// whole. Matches longer than this (or single lines longer than this containing a match at a
/// boundary) may be missed; rules keep their repetitions bounded well below it.
pub const OVERLAP_LEN: usize = 2 * MULTILINE_WINDOW;

/// Lazy-DFA cache of each line filter (the hot path: one transition per byte of text).
/// The default (2 MiB) thrashes on digit-heavy text with the combined filter.
const LAZY_DFA_CACHE: usize = 8 << 20;

/// Lazy-DFA cache of each rule regex. They only run on candidate lines, so a small cache is
/// enough; it also bounds memory when hostile text makes many DFA states (71 rules × 256 KiB
/// plus two filters × 8 MiB at most).
const RULE_DFA_CACHE: usize = 256 << 10;

/// Bytes of text an engine scans line by line (every line a candidate, keywords found by the
/// Aho–Corasick automaton) before it builds the line filter. Building the filter takes a few
/// milliseconds and much memory, which only pays off on larger artifacts.
pub const LINE_FILTER_AFTER: u64 = 256 << 10;

/// How many single-line keyword rules contribute their full regex to the line filter, in policy
/// order: the built-in packs' (53 such rules; they come first) and the first of a tenant's;
/// the rest contribute their keywords, like multiline rules. A regex is the
/// more selective filter (a line is a candidate only if the rule could match on it), but each
/// one multiplies the states the lazy DFA must determinize and keep: with 10 tenant packs of 50
/// rules after the built-in ones, every regex in the filter made a scan 3.8 times slower, the
/// first 128 of them 1.44 times, the first 72 (and the keywords reduced to those that hold no
/// other) 1.26 times, the first 53 1.33 times, findings the same (`cella_policies::rules::bench_packs`, 100 MiB). A
/// keyword rule runs only where its keyword occurs, so findings never depend on this.
pub const FILTER_REGEXES: usize = 72;

/// The most keyword bytes the keyword source of candidate lines (step 1) is built as a DFA for:
/// at most one state per byte, each a row of its byte classes (4 bytes a class: about 1 MiB for
/// 64 classes, 16 MiB at the very most).
/// The built-in packs' filter keywords are about 6 KiB; beyond this limit (many tenant packs of
/// long keywords) a contiguous NFA is built instead.
const KEYWORD_DFA_BYTES: usize = 16 << 10;

/// For each of `keywords` (distinct, lowercase), the others that occur inside it: one pass of
/// an overlapping Aho–Corasick search over each keyword (comparing every pair, as this once
/// did, took most of an engine's 9 ms build with the built-in packs' 790 keywords).
fn keywords_inside(keywords: &[Vec<u8>]) -> Result<Vec<Vec<usize>>, EngineError> {
    if keywords.is_empty() {
        return Ok(Vec::new());
    }
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::Standard)
        .kind(Some(AhoCorasickKind::NoncontiguousNFA))
        .prefilter(false)
        // Sparse states only: it searches a few bytes per keyword once, and dense tables near
        // the root would only cost the VM fresh pages while the engine is built.
        .dense_depth(0)
        .build(keywords)
        .map_err(|e| EngineError::Keywords(alloc::format!("{e}")))?;
    Ok(keywords
        .iter()
        .enumerate()
        .map(|(b, kb)| {
            let mut inner: Vec<usize> =
                ac.find_overlapping_iter(kb).map(|m| m.pattern().as_usize()).filter(|&a| a != b).collect();
            inner.sort_unstable();
            inner.dedup();
            inner
        })
        .collect())
}

/// Regex syntax for every rule: byte-oriented, ASCII classes, no UTF-8 requirement, so that
/// arbitrary bytes never make the lazy DFA give up.
fn build_regexes(patterns: &[&str]) -> Result<Regex, String> {
    Regex::builder()
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        // Rule regexes only run on candidate lines that already hold a keyword: a literal
        // prefilter would re-find it at a setup cost larger than scanning the line.
        .configure(
            meta::Config::new().utf8_empty(false).hybrid_cache_capacity(RULE_DFA_CACHE).auto_prefilter(false),
        )
        .build_many(patterns)
        .map_err(|e| alloc::format!("{e}"))
}

struct Compiled {
    re: Regex,
    cache: meta::Cache,
    caps: Captures,
}

impl Compiled {
    fn new(rule: &Rule, pattern: &str, what: &'static str) -> Result<Self, EngineError> {
        let re = build_regexes(&[pattern]).map_err(|message| EngineError::Regex {
            rule: rule.id.clone(),
            what,
            message,
        })?;
        let cache = re.create_cache();
        let caps = re.create_captures();
        Ok(Compiled { re, cache, caps })
    }

    fn is_match(&mut self, hay: &[u8]) -> bool {
        self.re.search_with(&mut self.cache, &Input::new(hay)).is_some()
    }
}

/// The same compiled regex (shared), with caches of its own.
impl Clone for Compiled {
    fn clone(&self) -> Self {
        Compiled { re: self.re.clone(), cache: self.re.create_cache(), caps: self.re.create_captures() }
    }
}

/// A forward-only lazy DFA over several patterns, answering "where does the earliest match
/// end". Cheaper to build than a full regex (no reverse automaton, no capture engines), which
/// matters because it is built when the first file is scanned.
struct LineFilter {
    dfa: hybrid::dfa::DFA,
    cache: hybrid::dfa::Cache,
}

impl LineFilter {
    fn new(patterns: &[&str]) -> Result<Self, String> {
        let dfa = hybrid::dfa::DFA::builder()
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().which_captures(thompson::WhichCaptures::None))
            .configure(hybrid::dfa::DFA::config().cache_capacity(LAZY_DFA_CACHE))
            .build(&alternation(patterns))
            .map_err(|e| alloc::format!("{e}"))?;
        let cache = dfa.create_cache();
        Ok(LineFilter { dfa, cache })
    }

    /// The same DFA (its NFA shared), with a cache of its own.
    fn fork(&self) -> Self {
        LineFilter { dfa: self.dfa.clone(), cache: self.dfa.create_cache() }
    }

    /// End of the earliest match in `input` (searched with `earliest`). If the lazy DFA cannot
    /// answer, reports a candidate at the input's start so the caller falls back to checking
    /// that line with the full rules: slower, never wrong.
    fn find_end(&mut self, input: &Input<'_>) -> Option<usize> {
        match self.dfa.try_search_fwd(&mut self.cache, input) {
            Ok(m) => m.map(|m| m.offset()),
            Err(_) => Some((input.start() + 1).min(input.end())),
        }
    }
}

/// `(?:p1)|(?:p2)|…`: one pattern, so the DFA's match states need not tell patterns apart
/// (fewer states than a multi-pattern DFA; only "some rule may match here" is asked).
fn alternation(patterns: &[&str]) -> String {
    let mut s = String::new();
    for (i, p) in patterns.iter().enumerate() {
        if i > 0 {
            s.push('|');
        }
        s.push_str("(?:");
        s.push_str(p);
        s.push(')');
    }
    s
}

/// Several path regexes matched as one (a job's excludes, or the path allowlist that rules
/// share), against a path and the archives it lies in.
struct PathMatcher {
    re: Regex,
    cache: meta::Cache,
}

impl PathMatcher {
    fn new(patterns: &[&str]) -> Result<Self, String> {
        let re = build_regexes(patterns)?;
        let cache = re.create_cache();
        Ok(PathMatcher { re, cache })
    }

    /// The same regex (shared), with a cache of its own.
    fn fork(&self) -> Self {
        PathMatcher { re: self.re.clone(), cache: self.re.create_cache() }
    }

    fn is_match(&mut self, path: &[u8]) -> bool {
        self.re.search_with(&mut self.cache, &Input::new(path).earliest(true)).is_some()
    }

    /// The length of the shortest of `path`'s archive prefixes (`a.zip` of `a.zip!/b/c`) or
    /// `path` itself that matches: an archive that matches covers everything in it.
    fn matching_prefix(&mut self, path: &str) -> Option<usize> {
        let bytes = path.as_bytes();
        let mut from = 0;
        while let Some(i) = memchr::memmem::find(&bytes[from..], b"!/") {
            let end = from + i;
            if self.is_match(&bytes[..end]) {
                return Some(end);
            }
            from = end + 2;
        }
        self.is_match(bytes).then_some(bytes.len())
    }
}

/// The rules that share one path allowlist (a pack's `exclude` globs give all its rules the
/// same one): matched once per file for all of them.
struct PathSet {
    patterns: Vec<String>,
    rules: Vec<u32>,
    matcher: Option<PathMatcher>,
}

#[derive(Default)]
struct RuleState {
    /// Boxed: most rules never compile theirs, and a `Compiled` (its caches) is ~1 KiB.
    regex: Option<alloc::boxed::Box<Compiled>>,
    allow: Option<Vec<Compiled>>,
    /// Lowercased allowlist stopwords.
    stopwords: Vec<Vec<u8>>,
    /// Per file: disabled by a path allowlist (or, in a binary file, not a secret rule).
    disabled: bool,
    /// Per chunk: end of the last region this rule's regex ran over.
    covered_until: usize,
    /// Per chunk: end of the last match taken, so overlapping regions don't report twice.
    last_end: usize,
}

/// A candidate that passed all checks, in buffer coordinates.
#[derive(Clone, Copy, Debug)]
struct Hit {
    rule: u32,
    /// The secret (the reported location).
    secret: (usize, usize),
    /// The whole match: its first and last lines are where inline markers count.
    whole: (usize, usize),
    /// For a licence text: its group and match score ([`crate::license_text`]).
    license: Option<(u16, u8)>,
}

/// A `license_texts` rule ([`crate::license_text`]): its trigger words and its matcher.
struct LicenseTexts {
    rule: u32,
    /// The rule's keywords (ASCII case-insensitive).
    triggers: AhoCorasick,
    matcher: crate::license_text::Matcher,
    found: Vec<crate::license_text::LicenseMatch>,
    /// Per chunk: where its trigger words are, one per line that has one, as the keyword
    /// filter visits candidate lines (the trigger words are among its keywords).
    triggers_at: Vec<usize>,
}

impl LicenseTexts {
    fn new(rule: u32, keywords: &[String]) -> Result<Self, EngineError> {
        let triggers = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(keywords)
            .map_err(|e| EngineError::Keywords(alloc::format!("{e}")))?;
        Ok(LicenseTexts {
            rule,
            triggers,
            matcher: Default::default(),
            found: Vec::new(),
            triggers_at: Vec::new(),
        })
    }

    fn fork(&self) -> Self {
        LicenseTexts {
            rule: self.rule,
            triggers: self.triggers.clone(),
            matcher: Default::default(),
            found: Vec::new(),
            triggers_at: Vec::new(),
        }
    }
}

/// What the positions of a chunk's hits refer to.
#[derive(Clone, Copy)]
enum Raw<'a> {
    /// The text itself.
    Text,
    /// The printable strings of `raw`, a chunk of a binary file, laid out as `runs` say.
    Binary { raw: &'a [u8], runs: &'a [Run] },
}

/// A compiled policy, ready to scan. Not `Sync`: it owns its regex caches and buffers; create
/// one per thread.
pub struct Engine {
    policy: Policy,
    rules: Vec<RuleState>,
    keywords: Option<AhoCorasick>,
    /// For each keyword pattern: the rules that keyword triggers.
    keyword_rules: Vec<Vec<u32>>,
    /// Rules without keywords: run on the lines the combined filter selects.
    always: Vec<u32>,
    always_filter: Option<LineFilter>,
    /// Whether `always_filter` was built (it stays `None` if no rule is keyword-less).
    always_built: bool,
    /// Single-line rule regexes (the first [`FILTER_REGEXES`]) and keyword-less regexes in one
    /// forward lazy DFA: picks candidate lines.
    lines_filter: Option<LineFilter>,
    /// The keywords of multiline rules and of the single-line rules past [`FILTER_REGEXES`]: the
    /// other source of candidate lines (a line holding one of them).
    keyword_scan: Option<AhoCorasick>,
    /// Whether the two above were built (either may be `None` for want of patterns).
    filter_built: bool,
    /// Text (committed chunk bytes) scanned so far, against `line_filter_after`.
    text_seen: u64,
    /// See [`LINE_FILTER_AFTER`].
    line_filter_after: u64,
    buf: Vec<u8>,
    hits: Vec<Hit>,
    /// While [`Engine::finding_spans`] runs: every accepted hit's secret, in file offsets.
    spans: Option<Vec<FindingSpan>>,
    /// Keys the findings' fingerprints (see [`Engine::set_fingerprint_key`]).
    fingerprint_key: FingerprintKey,
    /// Rule path allowlists, one per distinct list.
    path_sets: Vec<PathSet>,
    /// The job's excludes ([`Engine::set_excludes`]).
    excludes: Option<PathMatcher>,
    /// The job's license policy ([`Engine::set_license_policy`]).
    license_policy: crate::spdx::LicensePolicy,
    /// The job's baseline ([`Engine::set_baseline`]).
    baseline: FingerprintSet,
    /// Finds [`INLINE_MARKERS`] in a line.
    markers: AhoCorasick,
    /// Per file: findings so far per (rule, secret MAC), for `cellaLocation/v1`.
    occurrences: BTreeMap<(u32, [u8; 32]), u64>,
    /// Per file: findings so far per line hash, for `primaryLocationLineHash`.
    line_hashes: BTreeMap<[u8; 8], u64>,
    /// A binary file's printable strings and where they come from (kept between files).
    strings: Vec<u8>,
    runs: Vec<Run>,
    /// The `license_texts` rules.
    license_texts: Vec<LicenseTexts>,
    /// Whether the last chunk's trigger words were found by the keyword filter.
    triggers_by_filter: bool,
    /// Per `keyword_scan` pattern: a trigger word only ([`Engine::trigger_only_keywords`]).
    trigger_only: Vec<bool>,
}

/// Where one finding's secret lies in a file (byte offsets, `start..end`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FindingSpan {
    pub start: usize,
    pub end: usize,
    /// Index of the rule in the policy.
    pub rule_index: u32,
}

impl core::fmt::Debug for Engine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine").field("rules", &self.policy.rules.len()).finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds an engine and compiles every regex now: validates the whole policy. Use on the
    /// host, and wherever compile errors must surface before scanning.
    pub fn new(policy: Policy) -> Result<Self, EngineError> {
        let mut e = Self::new_lazy(policy)?;
        e.warm(true)?;
        Ok(e)
    }

    /// Builds an engine whose rule regexes compile on first use (when a rule's keyword first
    /// occurs, or when the first candidate for a keyword-less rule appears). Startup then costs
    /// only the keyword automaton; this is what the guest uses for a policy the host has
    /// already validated with [`Engine::new`].
    pub fn new_lazy(policy: Policy) -> Result<Self, EngineError> {
        if policy.format_version != POLICY_FORMAT_VERSION {
            return Err(EngineError::PolicyVersion {
                found: policy.format_version,
                expected: POLICY_FORMAT_VERSION,
            });
        }
        let mut keywords: Vec<Vec<u8>> = Vec::new();
        let mut keyword_index: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        let mut keyword_rules: Vec<Vec<u32>> = Vec::new();
        let mut always = Vec::new();
        let mut rules = Vec::with_capacity(policy.rules.len());
        let mut path_sets: Vec<PathSet> = Vec::new();
        let mut license_texts = Vec::new();
        for (i, rule) in policy.rules.iter().enumerate() {
            let i = i as u32;
            if rule.license_texts {
                // No regex: the licence matcher runs where its trigger words open windows.
                license_texts.push(LicenseTexts::new(i, &rule.keywords)?);
            } else if rule.keywords.is_empty() {
                always.push(i);
            }
            for kw in rule.keywords.iter().filter(|_| !rule.license_texts) {
                let kw = kw.as_bytes().to_ascii_lowercase();
                match keyword_index.get(&kw) {
                    Some(&p) => keyword_rules[p].push(i),
                    None => {
                        keyword_index.insert(kw.clone(), keywords.len());
                        keywords.push(kw);
                        keyword_rules.push(alloc::vec![i]);
                    }
                }
            }
            let stopwords =
                rule.allowlist.stopwords.iter().map(|s| s.as_bytes().to_ascii_lowercase()).collect();
            rules.push(RuleState { stopwords, ..RuleState::default() });
            if !rule.allowlist.paths.is_empty() {
                match path_sets.iter_mut().find(|s: &&mut PathSet| s.patterns == rule.allowlist.paths) {
                    Some(set) => set.rules.push(i),
                    None => path_sets.push(PathSet {
                        patterns: rule.allowlist.paths.clone(),
                        rules: alloc::vec![i],
                        matcher: None,
                    }),
                }
            }
        }
        // The prefilter reports one keyword per start position (the longest there, restarted one
        // byte after each hit). Where keyword A occurs inside keyword B, an occurrence of B is
        // also one of A: B triggers A's rules too.
        let snapshot = keyword_rules.clone();
        for (b, inner) in keywords_inside(&keywords)?.into_iter().enumerate() {
            for a in inner {
                for &r in &snapshot[a] {
                    if !keyword_rules[b].contains(&r) {
                        keyword_rules[b].push(r);
                    }
                }
            }
        }
        let keywords = if keywords.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    // Longest: at a position where a keyword and a longer one starting with it both
                    // occur (`acme`, `acme_live_`), the longer is reported, and triggers the
                    // shorter's rules as well (above); leftmost-first reported whichever came
                    // first in the policy and lost the other's rules.
                    .match_kind(MatchKind::LeftmostLongest)
                    // It only ever searches single candidate lines: a contiguous NFA builds several
                    // times faster than a DFA (this is on the VM's launch path) and a prefilter's
                    // setup costs more than it saves on haystacks that short.
                    .kind(Some(AhoCorasickKind::ContiguousNFA))
                    .prefilter(false)
                    .build(&keywords)
                    .map_err(|e| EngineError::Keywords(alloc::format!("{e}")))?,
            )
        };
        let markers = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(INLINE_MARKERS)
            .map_err(|e| EngineError::Keywords(alloc::format!("{e}")))?;
        Ok(Engine {
            policy,
            rules,
            keywords,
            keyword_rules,
            always,
            always_filter: None,
            always_built: false,
            lines_filter: None,
            keyword_scan: None,
            filter_built: false,
            text_seen: 0,
            line_filter_after: LINE_FILTER_AFTER,
            buf: Vec::new(),
            hits: Vec::new(),
            spans: None,
            fingerprint_key: FingerprintKey::new([0; 32]),
            path_sets,
            excludes: None,
            license_policy: Default::default(),
            baseline: FingerprintSet::default(),
            markers,
            occurrences: BTreeMap::new(),
            line_hashes: BTreeMap::new(),
            strings: Vec::new(),
            runs: Vec::new(),
            license_texts,
            triggers_by_filter: false,
            trigger_only: Vec::new(),
        })
    }

    /// Another engine for the same job, for another worker: the compiled rules, filters and
    /// automata shared (nothing is compiled again), the job's settings (fingerprint key,
    /// excludes, licence policy, baseline) the same, and caches and buffers of its own.
    pub fn fork(&self) -> Engine {
        let rules = self
            .rules
            .iter()
            .map(|r| RuleState {
                regex: r.regex.clone(),
                allow: r.allow.clone(),
                stopwords: r.stopwords.clone(),
                ..RuleState::default()
            })
            .collect();
        let path_sets = self
            .path_sets
            .iter()
            .map(|s| PathSet {
                patterns: s.patterns.clone(),
                rules: s.rules.clone(),
                matcher: s.matcher.as_ref().map(PathMatcher::fork),
            })
            .collect();
        Engine {
            policy: self.policy.clone(),
            rules,
            keywords: self.keywords.clone(),
            keyword_rules: self.keyword_rules.clone(),
            always: self.always.clone(),
            always_filter: self.always_filter.as_ref().map(LineFilter::fork),
            always_built: self.always_built,
            lines_filter: self.lines_filter.as_ref().map(LineFilter::fork),
            keyword_scan: self.keyword_scan.clone(),
            filter_built: self.filter_built,
            text_seen: self.text_seen,
            line_filter_after: self.line_filter_after,
            buf: Vec::new(),
            hits: Vec::new(),
            spans: None,
            fingerprint_key: self.fingerprint_key.clone(),
            path_sets,
            excludes: self.excludes.as_ref().map(PathMatcher::fork),
            license_policy: self.license_policy.clone(),
            baseline: self.baseline.clone(),
            markers: self.markers.clone(),
            occurrences: BTreeMap::new(),
            line_hashes: BTreeMap::new(),
            strings: Vec::new(),
            runs: Vec::new(),
            license_texts: self.license_texts.iter().map(LicenseTexts::fork).collect(),
            triggers_by_filter: false,
            trigger_only: self.trigger_only.clone(),
        }
    }

    /// Deserializes a policy (JSON, as produced by `cella-policies`) and builds a lazy engine.
    pub fn from_policy_json(bytes: &[u8]) -> Result<Self, EngineError> {
        let policy: Policy =
            serde_json::from_slice(bytes).map_err(|e| EngineError::PolicyFormat(alloc::format!("{e}")))?;
        Self::new_lazy(policy)
    }

    /// Does ahead of time what a lazy engine would do while scanning its first file: builds
    /// the line filters, and with `all_rules` compiles every rule regex too. For a runner that
    /// is snapshotted after start-up, so jobs restored from the snapshot start compiled.
    pub fn warm(&mut self, all_rules: bool) -> Result<(), EngineError> {
        if all_rules {
            // Rules first, so an error names the rule rather than the combined filter.
            for i in 0..self.rules.len() {
                self.ensure_compiled(i)?;
            }
        }
        if !self.license_texts.is_empty() {
            crate::license_text::warm();
        }
        self.ensure_filter()
    }

    /// Sets the key of the findings' fingerprints. Until this is called the key is all zeros,
    /// which hides nothing: every scan whose results leave the VM sets the tenant's key.
    pub fn set_fingerprint_key(&mut self, key: FingerprintKey) {
        self.fingerprint_key = key;
    }

    /// Sets the job's excludes: gitignore-like globs (see [`crate::glob_to_regex`]) of files
    /// that are not scanned at all, only counted ([`Report::files_excluded`]). An archive that
    /// matches is not opened. Replaces any earlier set; an empty list excludes nothing.
    pub fn set_excludes<S: AsRef<str>>(&mut self, globs: &[S]) -> Result<(), EngineError> {
        if globs.is_empty() {
            self.excludes = None;
            return Ok(());
        }
        let regexes = globs
            .iter()
            .map(|g| glob_to_regex(g.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(EngineError::Exclude)?;
        let patterns: Vec<&str> = regexes.iter().map(String::as_str).collect();
        let matcher = PathMatcher::new(&patterns).map_err(|message| EngineError::Regex {
            rule: String::from("(excludes)"),
            what: "exclude glob",
            message,
        })?;
        self.excludes = Some(matcher);
        Ok(())
    }

    /// Sets the job's license policy: a license finding whose license it denies is reported at
    /// `error`, one it flags at `warning` at least, each with the verdict
    /// ([`crate::spdx::LicensePolicy::verdict`]).
    pub fn set_license_policy(&mut self, policy: crate::spdx::LicensePolicy) {
        self.license_policy = policy;
    }

    /// Sets the job's baseline: findings whose `cellaLocation/v1` fingerprint is in it are
    /// suppressed ([`Suppression::Baseline`]). Fingerprints depend on the key, so the baseline
    /// must come from scans with the same [`FingerprintKey`].
    pub fn set_baseline(&mut self, baseline: FingerprintSet) {
        self.baseline = baseline;
    }

    /// Whether the job's excludes name `path` itself (an archive walk asks for each entry, and
    /// so for an archive before its contents).
    pub(crate) fn excludes_path(&mut self, path: &str) -> bool {
        self.excludes.as_mut().is_some_and(|m| m.is_match(path.as_bytes()))
    }

    /// Whether the job's excludes name `path` or an archive it lies in: the length of the
    /// shortest such prefix (for files held flat, as a session's index holds them).
    pub(crate) fn excluded_prefix(&mut self, path: &str) -> Option<usize> {
        self.excludes.as_mut().and_then(|m| m.matching_prefix(path))
    }

    /// The policy this engine runs.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sets how many bytes of text are scanned line by line before the line filter is built
    /// (default [`LINE_FILTER_AFTER`]; 0 builds it for the first chunk, `u64::MAX` never).
    /// Findings do not depend on it; tests and benchmarks compare the two ways.
    pub fn set_line_filter_after(&mut self, bytes: u64) {
        self.line_filter_after = bytes;
    }

    fn ensure_compiled(&mut self, i: usize) -> Result<(), EngineError> {
        let rule = &self.policy.rules[i];
        if rule.license_texts {
            return Ok(());
        }
        let st = &mut self.rules[i];
        if st.regex.is_none() {
            st.regex = Some(alloc::boxed::Box::new(Compiled::new(rule, &rule.regex, "regex")?));
        }
        if st.allow.is_none() {
            let v = rule.allowlist.regexes.iter().map(|p| Compiled::new(rule, p, "allowlist regex"));
            st.allow = Some(v.collect::<Result<_, _>>()?);
        }
        Ok(())
    }

    /// Starts a file: per-file fingerprint counts reset, and each rule on or off by its path
    /// allowlist (a list shared by several rules is matched once).
    /// Gives `findings` (one file's, at `path`, in file order) the per-file numbering a scan of
    /// the whole file gives them: each location fingerprint's occurrence index, each line
    /// hash's count, and the baseline's suppression. For a file whose findings were partly
    /// carried over from an earlier version and partly found by scanning what changed.
    pub(crate) fn renumber(&mut self, path: &str, findings: &mut [Finding]) {
        self.occurrences.clear();
        self.line_hashes.clear();
        for f in findings {
            let Some(mac) = crate::finding::parse_hex32_pub(&f.fingerprint) else { continue };
            let seen = self.occurrences.entry((f.rule_index, mac)).or_insert(0);
            let location = location_fingerprint(&self.fingerprint_key, &f.rule_id, path, &mac, *seen);
            *seen += 1;
            f.location_fingerprint = to_hex(&location);
            let hash = f.line_hash.split(':').next().unwrap_or_default();
            let mut lh = [0u8; 8];
            for (i, pair) in hash.as_bytes().chunks_exact(2).take(8).enumerate() {
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                lh[i] = (digit(pair[0]) << 4) | digit(pair[1]);
            }
            let n = self.line_hashes.entry(lh).or_insert(0);
            *n += 1;
            f.line_hash = alloc::format!("{hash}:{}", *n);
            if !matches!(f.suppression, Some(Suppression::Inline { .. })) {
                f.suppression = self.baseline.contains(&location).then_some(Suppression::Baseline);
            }
        }
        self.occurrences.clear();
        self.line_hashes.clear();
    }

    fn begin_file(&mut self, path: &str) -> Result<(), EngineError> {
        // A file abandoned part way (its nested archive turned out unreadable) leaves nothing.
        self.hits.clear();
        self.occurrences.clear();
        self.line_hashes.clear();
        for st in &mut self.rules {
            st.disabled = false;
        }
        for set in &mut self.path_sets {
            if set.matcher.is_none() {
                let patterns: Vec<&str> = set.patterns.iter().map(String::as_str).collect();
                let first = &self.policy.rules[set.rules[0] as usize];
                set.matcher = Some(PathMatcher::new(&patterns).map_err(|message| EngineError::Regex {
                    rule: first.id.clone(),
                    what: "allowlist path regex",
                    message,
                })?);
            }
            let matcher = set.matcher.as_mut().unwrap_or_else(|| unreachable!());
            if matcher.matching_prefix(path).is_some() {
                for &r in &set.rules {
                    self.rules[r as usize].disabled = true;
                }
            }
        }
        Ok(())
    }

    /// A binary file is scanned with the secret rules only.
    fn restrict_to_secrets(&mut self) {
        for (st, rule) in self.rules.iter_mut().zip(&self.policy.rules) {
            if rule.category != Category::Secret {
                st.disabled = true;
            }
        }
    }

    /// Builds the two line filters: `lines` (see the module docs) and `always` (the
    /// keyword-less regexes alone, to decide whether a candidate line needs the PII rules).
    fn ensure_filter(&mut self) -> Result<(), EngineError> {
        if self.filter_built {
            return Ok(());
        }
        self.ensure_always_filter()?;
        let mut patterns: Vec<&str> =
            self.always.iter().map(|&i| self.policy.rules[i as usize].regex.as_str()).collect();
        // Single-line keyword rules contribute their full regex (a line is a candidate only if
        // some rule could match on it), the first FILTER_REGEXES of them; the others and
        // multiline rules are found by their keywords, with an Aho–Corasick automaton of its
        // own: in the lazy DFA, hundreds of keywords (a trie) multiplied the states it had to
        // make with the regexes' (8-letter keywords that never occur cost 4 s on 457 MB).
        for r in self.single_line_keyword_rules().take(FILTER_REGEXES) {
            patterns.push(r.regex.as_str());
        }
        if !patterns.is_empty() {
            self.lines_filter = Some(LineFilter::new(&patterns).map_err(filter_error)?);
        }
        let keywords = self.filter_keywords();
        if !keywords.is_empty() {
            // A DFA scans fastest (one lookup per byte), but its size grows with the keywords'
            // bytes, which tenant packs choose: past KEYWORD_DFA_BYTES the contiguous NFA
            // (smaller, slower) serves instead, so no policy can make the VM's automaton huge.
            let bytes: usize = keywords.iter().map(Vec::len).sum();
            let kind = if bytes <= KEYWORD_DFA_BYTES {
                AhoCorasickKind::DFA
            } else {
                AhoCorasickKind::ContiguousNFA
            };
            let scan = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .kind(Some(kind))
                .build(&keywords)
                .map_err(|e| EngineError::Keywords(alloc::format!("{e}")))?;
            self.keyword_scan = Some(scan);
            self.trigger_only = self.trigger_only_keywords(&keywords);
        }
        self.filter_built = true;
        Ok(())
    }

    /// For each filter keyword: whether it is a licence-text trigger word that no rule keyword
    /// holds, so a line where only such keywords occur needs no rule run (only the licence
    /// matcher's window).
    fn trigger_only_keywords(&self, keywords: &[Vec<u8>]) -> Vec<bool> {
        let lower = |k: &String| k.as_bytes().to_ascii_lowercase();
        let rules = || self.policy.rules.iter();
        let triggers: Vec<Vec<u8>> =
            rules().filter(|r| r.license_texts).flat_map(|r| r.keywords.iter().map(lower)).collect();
        let rule_keywords: Vec<Vec<u8>> =
            rules().filter(|r| !r.license_texts).flat_map(|r| r.keywords.iter().map(lower)).collect();
        keywords
            .iter()
            .map(|k| {
                triggers.contains(k)
                    && !rule_keywords.iter().any(|r| r.windows(k.len().max(1)).any(|w| w == k.as_slice()))
            })
            .collect()
    }

    /// Builds the `always` filter alone (all a line-by-line scan needs).
    fn ensure_always_filter(&mut self) -> Result<(), EngineError> {
        if self.always_built {
            return Ok(());
        }
        let patterns: Vec<&str> =
            self.always.iter().map(|&i| self.policy.rules[i as usize].regex.as_str()).collect();
        if !patterns.is_empty() {
            self.always_filter = Some(LineFilter::new(&patterns).map_err(filter_error)?);
        }
        self.always_built = true;
        Ok(())
    }

    fn single_line_keyword_rules(&self) -> impl Iterator<Item = &Rule> {
        self.policy.rules.iter().filter(|r| !r.keywords.is_empty() && !r.multiline)
    }

    /// The keywords of the multiline rules (their regexes may span lines, so a line is a
    /// candidate where the keyword is) and of the single-line rules past [`FILTER_REGEXES`],
    /// lowercased, without those that hold another (where such a keyword occurs, so does the
    /// other, and the line is a candidate either way; the keyword automaton of step 2 still
    /// finds each rule's own).
    fn filter_keywords(&self) -> Vec<Vec<u8>> {
        let mut kws: Vec<Vec<u8>> = Vec::new();
        let beyond = self.single_line_keyword_rules().skip(FILTER_REGEXES);
        for r in self.policy.rules.iter().filter(|r| r.multiline).chain(beyond) {
            for k in &r.keywords {
                let k = k.as_bytes().to_ascii_lowercase();
                if !kws.contains(&k) {
                    kws.push(k);
                }
            }
        }
        // A keyword that holds another is left out (distinct keywords: only a shorter one can
        // be inside). If the automaton cannot be built, all of them serve, as candidates alike.
        match keywords_inside(&kws) {
            Ok(inside) => kws.into_iter().zip(inside).filter(|(_, i)| i.is_empty()).map(|(k, _)| k).collect(),
            Err(_) => kws,
        }
    }

    /// Scans one file, read from `reader`, and appends its findings to `report`. Returns
    /// `false` if the file was binary (only its printable strings were scanned).
    pub(crate) fn scan_stream<R: ByteRead + ?Sized>(
        &mut self,
        path: &str,
        reader: &mut R,
        report: &mut Report,
        limits: &Limits,
    ) -> Result<bool, ArtifactError> {
        let mut buf = core::mem::take(&mut self.buf);
        let r = self.scan_stream_inner(path, reader, report, limits, &mut buf);
        self.buf = buf;
        r
    }

    /// Scans one file held in memory, exactly as [`crate::scan_artifact`] scans a file it
    /// reaches (same findings, same counts; the job's excludes are the caller's to apply).
    /// Returns `false` if the file was binary.
    pub fn scan_file(
        &mut self,
        path: &str,
        text: &[u8],
        report: &mut Report,
        limits: &Limits,
    ) -> Result<bool, ArtifactError> {
        self.scan_stream(path, &mut SliceRead(text), report, limits)
    }

    /// The byte ranges of every finding this policy has in `text` (the secret itself, or the
    /// secret group), in file order; `None` if the file is binary (its findings are not
    /// located in its text). Every accepted match counts, including several rules finding the
    /// same bytes and suppressed findings; no findings cap applies.
    pub fn finding_spans(
        &mut self,
        path: &str,
        text: &[u8],
    ) -> Result<Option<Vec<FindingSpan>>, ArtifactError> {
        if memchr::memchr(0, &text[..text.len().min(BINARY_SNIFF_LEN)]).is_some() {
            return Ok(None);
        }
        self.spans = Some(Vec::new());
        let mut report = Report::default();
        // A cap of 0 keeps no `Finding`s (they are only counted); the spans are recorded first.
        let limits = Limits { max_findings: 0, ..Limits::default() };
        let scanned = self.scan_file(path, text, &mut report, &limits);
        let mut spans = self.spans.take().unwrap_or_default();
        spans.sort_unstable_by_key(|s| (s.start, s.end));
        scanned?;
        Ok(Some(spans))
    }

    fn scan_stream_inner<R: ByteRead + ?Sized>(
        &mut self,
        path: &str,
        reader: &mut R,
        report: &mut Report,
        limits: &Limits,
        buf: &mut Vec<u8>,
    ) -> Result<bool, ArtifactError> {
        if buf.len() != CHUNK_LEN + OVERLAP_LEN {
            // A zeroed allocation, not a fill: fresh zero pages stay untouched until text is
            // read into them (a small file touches a few pages of the megabyte).
            *buf = alloc::vec![0; CHUNK_LEN + OVERLAP_LEN];
        }
        self.begin_file(path)?;
        let mut len = read_full(reader, buf)?; // valid bytes in buf
        report.files_scanned += 1;
        if memchr::memchr(0, &buf[..len.min(BINARY_SNIFF_LEN)]).is_some() {
            report.files_binary += 1;
            self.restrict_to_secrets();
            let mut strings = core::mem::take(&mut self.strings);
            let mut runs = core::mem::take(&mut self.runs);
            let r = self.scan_binary(path, reader, report, limits, buf, len, (&mut strings, &mut runs));
            self.strings = strings;
            self.runs = runs;
            return r.map(|()| false);
        }
        let mut base = 0usize; // file offset of buf[0]
        let mut line = 1u64; // line number of buf[0]
        let mut col0 = 0u64; // code points between the start of buf[0]'s line and buf[0]
        loop {
            let eof = len < buf.len();
            // Everything before `commit` is reported in this round; the rest carries over.
            let commit = if eof {
                len
            } else {
                let limit = len - OVERLAP_LEN;
                match memchr::memrchr(b'\n', &buf[..limit]) {
                    Some(nl) if nl + 1 > limit / 2 => nl + 1,
                    _ => limit,
                }
            };
            self.scan_chunk(&buf[..len], commit)?;
            self.find_license_texts(&buf[..len], commit);
            self.emit(path, &buf[..len], Raw::Text, (base, line, col0), report, limits.max_findings);
            report.bytes_scanned += commit as u64;
            if eof {
                return Ok(true);
            }
            (line, col0) = advance(&buf[..commit], line, col0);
            buf.copy_within(commit..len, 0);
            len -= commit;
            base += commit;
            len += read_full(reader, &mut buf[len..])?;
        }
    }

    /// The rest of a binary file whose first `len` bytes are in `buf`: chunk by chunk (cut where
    /// no string crosses), its printable strings scanned with the secret rules, up to
    /// [`Limits::max_binary_bytes`]; the rest is read and not scanned.
    #[allow(clippy::too_many_arguments)]
    fn scan_binary<R: ByteRead + ?Sized>(
        &mut self,
        path: &str,
        reader: &mut R,
        report: &mut Report,
        limits: &Limits,
        buf: &mut [u8],
        mut len: usize,
        (strings, runs): (&mut Vec<u8>, &mut Vec<Run>),
    ) -> Result<(), ArtifactError> {
        let cap = usize::try_from(limits.max_binary_bytes).unwrap_or(usize::MAX);
        let (mut base, mut line, mut col0) = (0usize, 1u64, 0u64);
        loop {
            let eof = len < buf.len();
            let mut commit = if eof { len } else { binary::cut(&buf[..len]) };
            let room = cap.saturating_sub(base);
            let truncated = commit > room;
            if truncated {
                commit = room;
            }
            binary::extract(&buf[..commit], strings, runs);
            if !runs.is_empty() {
                self.scan_chunk(strings, strings.len())?;
                let raw = Raw::Binary { raw: &buf[..commit], runs };
                self.emit(path, strings, raw, (base, line, col0), report, limits.max_findings);
            }
            report.bytes_scanned += commit as u64;
            if truncated {
                report.files_binary_truncated += 1;
                while reader.read(buf)? != 0 {}
                return Ok(());
            }
            if eof {
                return Ok(());
            }
            (line, col0) = advance(&buf[..commit], line, col0);
            buf.copy_within(commit..len, 0);
            len -= commit;
            base += commit;
            len += read_full(reader, &mut buf[len..])?;
        }
    }

    /// Finds all hits in `buf` whose start is before `commit`, into `self.hits`.
    ///
    /// One forward lazy-DFA pass (earliest match, restarted at the next line) finds the
    /// candidate lines; only those are looked at further. The line holding the first match
    /// state is the one processed (rules match within a line, multiline rules from the line
    /// holding their keyword).
    fn scan_chunk(&mut self, buf: &[u8], commit: usize) -> Result<(), ArtifactError> {
        self.hits.clear();
        for lt in &mut self.license_texts {
            lt.triggers_at.clear();
        }
        for st in &mut self.rules {
            st.covered_until = 0;
            st.last_end = 0;
        }
        let by_line =
            !self.filter_built && self.text_seen.saturating_add(commit as u64) <= self.line_filter_after;
        self.text_seen = self.text_seen.saturating_add(commit as u64);
        if by_line {
            self.ensure_always_filter()?;
        } else {
            self.ensure_filter()?;
        }
        let mut lines = self.lines_filter.take();
        let keyword_scan = self.keyword_scan.take();
        let mut always = self.always_filter.take();
        let ac = self.keywords.take();
        self.triggers_by_filter = !by_line;
        let r = if by_line {
            self.every_line(always.as_mut(), ac.as_ref(), buf, commit)
        } else {
            let sources = (lines.as_mut(), keyword_scan.as_ref());
            self.candidate_lines(sources, always.as_mut(), ac.as_ref(), buf, commit)
        };
        self.keywords = ac;
        self.always_filter = always;
        self.keyword_scan = keyword_scan;
        self.lines_filter = lines;
        r
    }

    /// Every line starting before `commit` is a candidate (no line filter yet).
    fn every_line(
        &mut self,
        mut always: Option<&mut LineFilter>,
        ac: Option<&AhoCorasick>,
        buf: &[u8],
        commit: usize,
    ) -> Result<(), ArtifactError> {
        let mut ls = 0;
        while ls < commit {
            let le = line_end(buf, ls);
            self.candidate_line(always.as_deref_mut(), ac, buf, ls..le, commit)?;
            if le >= buf.len() {
                break;
            }
            ls = le + 1;
        }
        Ok(())
    }

    /// The candidate lines starting before `commit`, in order: each line that the line filter
    /// matches or that holds one of the filter keywords, once.
    fn candidate_lines(
        &mut self,
        (mut lines, keywords): (Option<&mut LineFilter>, Option<&AhoCorasick>),
        mut always: Option<&mut LineFilter>,
        ac: Option<&AhoCorasick>,
        buf: &[u8],
        commit: usize,
    ) -> Result<(), ArtifactError> {
        // Each source's next hit (a byte of a candidate line) at or after `from`, searched
        // again only once the scan has passed it; `usize::MAX` when it has none left.
        let mut from = 0;
        let (mut by_filter, mut by_keyword) = (None::<usize>, None::<usize>);
        loop {
            if by_filter.is_none_or(|at| at < from) {
                by_filter = Some(match lines.as_deref_mut() {
                    Some(f) => f
                        .find_end(&Input::new(buf).range(from..).earliest(true))
                        .map_or(usize::MAX, |end| end.saturating_sub(1).max(from)),
                    None => usize::MAX,
                });
            }
            if by_keyword.is_none_or(|at| at < from) {
                by_keyword = Some(match keywords {
                    Some(k) => {
                        k.find(aho_corasick::Input::new(buf).range(from..)).map_or(usize::MAX, |m| m.start())
                    }
                    None => usize::MAX,
                });
            }
            let at = by_filter.unwrap_or(usize::MAX).min(by_keyword.unwrap_or(usize::MAX));
            if at == usize::MAX {
                break;
            }
            let ls = crate::window::line_start(buf, at);
            if ls >= commit {
                break;
            }
            let le = line_end(buf, at);
            for lt in &mut self.license_texts {
                if let Some(m) = lt.triggers.find(aho_corasick::Input::new(buf).range(ls..le)) {
                    lt.triggers_at.push(m.start());
                }
            }
            // A line the filter did not pick, whose keywords are all licence-text trigger
            // words, has nothing for the rules.
            let picked = by_filter.is_some_and(|f| (ls..le).contains(&f));
            let trigger_only = !picked
                && self.trigger_only.iter().any(|t| *t)
                && keywords.is_some_and(|k| {
                    k.find_overlapping_iter(aho_corasick::Input::new(buf).range(ls..le))
                        .all(|m| self.trigger_only.get(m.pattern().as_usize()).is_some_and(|t| *t))
                });
            if !trigger_only {
                self.candidate_line(always.as_deref_mut(), ac, buf, ls..le, commit)?;
            }
            if le >= buf.len() {
                break;
            }
            from = le + 1;
        }
        Ok(())
    }

    /// The `license_texts` rules over a chunk: their matches in the windows their trigger
    /// words open, for windows starting before `commit`.
    fn find_license_texts(&mut self, buf: &[u8], commit: usize) {
        for lt in &mut self.license_texts {
            if self.rules[lt.rule as usize].disabled {
                continue;
            }
            // The keyword filter found them, or (a chunk scanned line by line) a search does.
            let windows = if self.triggers_by_filter {
                crate::license_text::windows(buf, lt.triggers_at.iter().copied())
            } else {
                crate::license_text::windows(buf, lt.triggers.find_iter(buf).map(|m| m.start()))
            };
            lt.found.clear();
            for w in windows.into_iter().take_while(|w| w.start < commit) {
                lt.matcher.find(buf, w, &mut lt.found);
            }
            for m in &lt.found {
                self.hits.push(Hit {
                    rule: lt.rule,
                    secret: (m.start, m.end),
                    whole: (m.start, m.end),
                    license: Some((m.group, m.score)),
                });
            }
        }
    }

    /// Steps 2 and 3 on one candidate line: keyword rules where their keywords occur,
    /// keyword-less rules if their filter matches the line.
    fn candidate_line(
        &mut self,
        always: Option<&mut LineFilter>,
        ac: Option<&AhoCorasick>,
        buf: &[u8],
        line: Range<usize>,
        commit: usize,
    ) -> Result<(), ArtifactError> {
        let (ls, le) = (line.start, line.end);
        if let Some(ac) = ac {
            self.keyword_line(ac, buf, ls..le, commit)?;
        }
        if let Some(f) = always {
            let line = Input::new(buf).range(ls..le).earliest(true);
            if f.find_end(&line).is_some() {
                for k in 0..self.always.len() {
                    let r = self.always[k] as usize;
                    if self.rules[r].disabled || ls < self.rules[r].covered_until {
                        continue;
                    }
                    self.run_rule(r, buf, ls..le, commit)?;
                }
            }
        }
        Ok(())
    }

    /// Keyword occurrences in one line: runs each triggered rule on the line (or, for
    /// `multiline` rules, on the window starting at the line).
    fn keyword_line(
        &mut self,
        ac: &AhoCorasick,
        buf: &[u8],
        line: Range<usize>,
        commit: usize,
    ) -> Result<(), ArtifactError> {
        let (ls, le) = (line.start, line.end);
        let mut input = aho_corasick::Input::new(buf).range(line);
        while let Some(m) = ac.find(input.clone()) {
            let pos = m.start();
            let pid = m.pattern().as_usize();
            for k in 0..self.keyword_rules[pid].len() {
                let r = self.keyword_rules[pid][k] as usize;
                let st = &self.rules[r];
                if st.disabled || pos < st.covered_until {
                    continue;
                }
                let end = if self.policy.rules[r].multiline {
                    le.max((ls + MULTILINE_WINDOW).min(buf.len()))
                } else {
                    le
                };
                self.run_rule(r, buf, ls..end, commit)?;
            }
            if pos + 1 >= le {
                break;
            }
            input.set_start(pos + 1);
        }
        Ok(())
    }

    /// Runs rule `r` over `region` of `buf`; pushes accepted hits starting before `commit`.
    fn run_rule(
        &mut self,
        r: usize,
        buf: &[u8],
        region: Range<usize>,
        commit: usize,
    ) -> Result<(), ArtifactError> {
        self.ensure_compiled(r)?;
        let rule = &self.policy.rules[r];
        let st = &mut self.rules[r];
        st.covered_until = region.end;
        let Some(c) = st.regex.as_mut() else { return Ok(()) };
        let mut input = Input::new(buf).range(region.clone());
        while let Some(m) = c.re.search_with(&mut c.cache, &input) {
            let next = if m.is_empty() { m.end() + 1 } else { m.end() };
            if m.start() >= commit {
                break;
            }
            let accept = m.start() >= st.last_end;
            let secret = if !accept {
                None
            } else if rule.secret_group == 0 {
                Some((m.start(), m.end()))
            } else {
                let cin = Input::new(buf).span(m.range()).anchored(Anchored::Yes);
                c.re.search_captures_with(&mut c.cache, &cin, &mut c.caps);
                c.caps.get_group(rule.secret_group as usize).map(|s| (s.start, s.end))
            };
            if let Some((s, e)) = secret.filter(|&(s, e)| e > s) {
                let secret_bytes = &buf[s..e];
                let after = &buf[e..];
                let ok = rule.entropy.is_none_or(|min| shannon_entropy(secret_bytes) >= min)
                    && rule.validator.is_none_or(|v| check(v, secret_bytes, &buf[..s], after))
                    && !st.stopwords.iter().any(|w| contains_ascii_ci(secret_bytes, w))
                    && !(rule.generic
                        && rule.category == Category::Secret
                        && (crate::placeholder::is_placeholder(secret_bytes)
                            || crate::placeholder::at_documentation_host(after)))
                    && !(rule.category == Category::Secret && crate::placeholder::is_filler(secret_bytes))
                    && !st.allow.as_mut().is_some_and(|a| a.iter_mut().any(|a| a.is_match(secret_bytes)));
                if ok {
                    st.last_end = m.end();
                    let whole = (m.start(), m.end());
                    self.hits.push(Hit { rule: r as u32, secret: (s, e), whole, license: None });
                }
            }
            if next > region.end {
                break;
            }
            input.set_start(next);
        }
        Ok(())
    }

    /// Turns `self.hits` into findings: specific rules over generic ones, one finding per
    /// secret, each with its lines and columns (and in a binary file its bytes), fingerprints
    /// and suppression. `text` is what the hits' positions index; `(base, line0, col0)` say
    /// where the chunk starts in the file.
    fn emit(
        &mut self,
        path: &str,
        text: &[u8],
        raw: Raw<'_>,
        (base, line0, col0): (usize, u64, u64),
        report: &mut Report,
        max_findings: usize,
    ) {
        if self.hits.is_empty() {
            return;
        }
        if let (Some(spans), Raw::Text) = (self.spans.as_mut(), raw) {
            for h in &self.hits {
                let (start, end) = (base + h.secret.0, base + h.secret.1);
                spans.push(FindingSpan { start, end, rule_index: h.rule });
            }
        }
        self.hits.sort_unstable_by_key(|h| (h.secret.0, h.secret.1, h.rule));
        self.prefer_whole_texts();
        self.prefer_specific();
        // The same secret found by several rules of one kind is reported once, by the first
        // in policy order.
        self.hits.dedup_by(|later, first| later.secret == first.secret);
        let hits = core::mem::take(&mut self.hits);
        let bytes = match raw {
            Raw::Text => text,
            Raw::Binary { raw, .. } => raw,
        };
        let mut cursor = (0usize, line0); // a position in `bytes` and its line
        let mut markers = MarkerCache::default();
        for h in &hits {
            let (rs, re) = match raw {
                Raw::Text => h.secret,
                Raw::Binary { runs, .. } => binary::raw_range(runs, h.secret.0, h.secret.1),
            };
            let line = if rs >= cursor.0 {
                cursor.1 + memchr::memchr_iter(b'\n', &bytes[cursor.0..rs]).count() as u64
            } else {
                line0 + memchr::memchr_iter(b'\n', &bytes[..rs]).count() as u64
            };
            cursor = (rs, line);
            let column = column_at(bytes, rs, col0);
            let inside = memchr::memchr_iter(b'\n', &bytes[rs..re]).count() as u64;
            let end_column =
                if inside == 0 { column + code_points(&bytes[rs..re]) } else { column_at(bytes, re, 0) };
            let rule = &self.policy.rules[h.rule as usize];
            let secret = &text[h.secret.0..h.secret.1];
            let key = &self.fingerprint_key;
            let mac = secret_mac(key, &rule.id, secret);
            let seen = self.occurrences.entry((h.rule, mac)).or_insert(0);
            let location = location_fingerprint(key, &rule.id, path, &mac, *seen);
            *seen += 1;
            let first = line_range(text, h.whole.0);
            let last = line_range(text, h.whole.1.saturating_sub(1).max(h.whole.0));
            let hashed = first.start.max(h.whole.0.saturating_sub(LINE_HASH_REACH))
                ..first.end.min(h.whole.0.saturating_add(LINE_HASH_REACH));
            let lh = line_hash(key, &rule.id, &text[hashed]);
            let n = self.line_hashes.entry(lh).or_insert(0);
            *n += 1;
            let marker = markers
                .find(&self.markers, text, first.clone())
                .or_else(|| (last != first).then(|| markers.find(&self.markers, text, last)).flatten());
            let suppression = match marker {
                Some(marker) => Some(Suppression::Inline { marker }),
                None if self.baseline.contains(&location) => Some(Suppression::Baseline),
                None => None,
            };
            let redacted = match (&rule.category, &rule.spdx) {
                _ if h.license.is_some() => {
                    String::from(crate::license_text::reported(h.license.map_or(0, |l| l.0)))
                }
                (Category::License, Some(id)) => id.clone(),
                (Category::License, None) => String::from_utf8_lossy(secret).into_owned(),
                _ => redact(secret),
            };
            // A license the job's policy denies or flags raises the finding's level.
            let license_verdict = (rule.category == Category::License && !self.license_policy.is_empty())
                .then(|| self.license_policy.verdict(redacted.as_bytes()));
            let severity = match license_verdict {
                Some(crate::spdx::Verdict::Denied) => Severity::Error,
                Some(crate::spdx::Verdict::Flagged) => rule.severity.at_least(Severity::Warning),
                _ => rule.severity,
            };
            let finding = Finding {
                rule_index: h.rule,
                severity,
                license_verdict,
                license_score: h.license.map(|l| l.1),
                history: None,
                image: None,
                rule_id: rule.id.clone(),
                path: String::from(path),
                line,
                column,
                end_line: line + inside,
                end_column,
                bytes: match raw {
                    Raw::Text => None,
                    Raw::Binary { .. } => {
                        Some(ByteRange { offset: (base + rs) as u64, length: (re - rs) as u64 })
                    }
                },
                redacted,
                fingerprint: to_hex(&mac),
                location_fingerprint: to_hex(&location),
                line_hash: alloc::format!("{}:{}", to_hex(&lh), *n),
                suppression,
                confidence: match rule.confidence() {
                    c if in_test_fixture(path) => c.lowered(),
                    _ if rule.generic
                        && rule.category == Category::Secret
                        && crate::placeholder::is_uuid(secret) =>
                    {
                        Confidence::Low
                    }
                    c => c,
                },
            };
            report.add(finding, max_findings);
        }
        self.hits = hits;
        self.hits.clear();
    }

    /// Drops the hits of generic licence rules (a text's opening lines, a notice) that name a
    /// licence whose whole text the chunk holds: the whole text is the finding, even where its
    /// match leaves out the title lines the opening-lines rule found.
    fn prefer_whole_texts(&mut self) {
        let whole: Vec<&str> =
            self.hits.iter().filter_map(|h| h.license.map(|l| crate::license_text::reported(l.0))).collect();
        if whole.is_empty() {
            return;
        }
        let rules = &self.policy.rules;
        self.hits.retain(|h| {
            let rule = &rules[h.rule as usize];
            let named = rule.spdx.as_deref().is_some_and(|id| whole.contains(&id));
            !(rule.generic && rule.category == Category::License && named)
        });
    }

    /// Drops every hit of a generic rule whose secret overlaps a specific rule's (hits sorted
    /// by secret start).
    fn prefer_specific(&mut self) {
        let rules = &self.policy.rules;
        let generic = |h: &Hit| rules[h.rule as usize].generic;
        if !self.hits.iter().any(generic) || self.hits.iter().all(generic) {
            return;
        }
        // Licenses apart from secrets and personal data (a license text spans a file's whole
        // header; a generic secret in it still stands): specific findings by start, each with
        // the furthest end of those up to it.
        for license in [false, true] {
            let of = |h: &Hit| (rules[h.rule as usize].category == Category::License) == license;
            let mut reach: Vec<(usize, usize)> = Vec::new();
            for h in self.hits.iter().filter(|h| of(h) && !generic(h)) {
                let end = reach.last().map_or(h.secret.1, |&(_, e)| e.max(h.secret.1));
                reach.push((h.secret.0, end));
            }
            if reach.is_empty() {
                continue;
            }
            self.hits.retain(|h| {
                if !generic(h) || !of(h) {
                    return true;
                }
                let before = reach.partition_point(|&(start, _)| start < h.secret.1);
                before == 0 || reach[before - 1].1 <= h.secret.0
            });
        }
    }
}

/// Bytes of a finding's line, either side of the match's start, that its line hash covers
/// (minified files have lines of megabytes).
const LINE_HASH_REACH: usize = 256;

/// The last line searched for an inline marker, and the answer.
#[derive(Default)]
struct MarkerCache {
    line: Option<(Range<usize>, Option<&'static str>)>,
}

impl MarkerCache {
    fn find(&mut self, markers: &AhoCorasick, text: &[u8], line: Range<usize>) -> Option<&'static str> {
        if let Some((cached, found)) = &self.line {
            if *cached == line {
                return *found;
            }
        }
        let found = markers.find(&text[line.clone()]).map(|m| INLINE_MARKERS[m.pattern().as_usize()]);
        self.line = Some((line, found));
        found
    }
}

/// The line (without its `\n`) holding `pos`.
fn line_range(buf: &[u8], pos: usize) -> Range<usize> {
    let pos = pos.min(buf.len());
    crate::window::line_start(buf, pos)..line_end(buf, pos)
}

/// The 1-based column of `pos`; `col0` is the column of `buf[0]` minus one.
fn column_at(buf: &[u8], pos: usize, col0: u64) -> u64 {
    match memchr::memrchr(b'\n', &buf[..pos]) {
        Some(nl) => code_points(&buf[nl + 1..pos]) + 1,
        None => col0 + code_points(&buf[..pos]) + 1,
    }
}

/// The line and `col0` of the byte after `consumed`, given those of its first byte.
fn advance(consumed: &[u8], line: u64, col0: u64) -> (u64, u64) {
    let newlines = memchr::memchr_iter(b'\n', consumed).count() as u64;
    let col0 = match memchr::memrchr(b'\n', consumed) {
        Some(nl) => code_points(&consumed[nl + 1..]),
        None => col0 + code_points(consumed),
    };
    (line + newlines, col0)
}

fn filter_error(message: String) -> EngineError {
    EngineError::Regex { rule: String::from("(line filter)"), what: "regex", message }
}

fn line_end(buf: &[u8], pos: usize) -> usize {
    memchr::memchr(b'\n', &buf[pos..]).map_or(buf.len(), |i| pos + i)
}

/// UTF-8 code points in `b` (bytes that are not continuation bytes).
fn code_points(b: &[u8]) -> u64 {
    b.iter().filter(|&&x| (x as i8) >= -0x40).count() as u64
}

/// Checks one rule the way the engine will use it: every regex compiles, the secret group
/// exists, the rule regex cannot match the empty string, and fields agree with the category.
/// Returns a description of the first problem.
pub fn check_rule(rule: &Rule) -> Result<(), String> {
    if rule.license_texts {
        check_license_texts_rule(rule)?;
    } else {
        check_regex(rule)?;
    }
    for p in &rule.allowlist.regexes {
        build_regexes(&[p.as_str()])
            .map_err(|m| alloc::format!("allowlist regex `{p}` does not compile: {m}"))?;
    }
    for p in &rule.allowlist.paths {
        build_regexes(&[p.as_str()])
            .map_err(|m| alloc::format!("allowlist path regex `{p}` does not compile: {m}"))?;
    }
    for k in &rule.keywords {
        if k.len() < 2 {
            return Err(alloc::format!("keyword `{k}` is shorter than 2 bytes"));
        }
        // A license_texts rule's trigger words may be in any script (`ライセンス`).
        if !k.is_ascii() && !rule.license_texts {
            return Err(alloc::format!("keyword `{k}` is not ASCII"));
        }
        if k.bytes().any(|b| b.is_ascii_control()) {
            return Err(alloc::format!(
                "keyword `{}` holds a control character (a keyword is found within a line)",
                k.escape_debug()
            ));
        }
    }
    for w in &rule.allowlist.stopwords {
        if w.is_empty() {
            return Err(String::from("an allowlist stopword is empty"));
        }
    }
    if let Some(e) = rule.entropy {
        if !(e > 0.0 && e <= 8.0) {
            return Err(alloc::format!("entropy {e} is outside (0, 8] bits per byte"));
        }
    }
    if rule.spdx.is_some() && rule.category != Category::License {
        return Err(String::from("spdx is only meaningful for category = \"license\""));
    }
    if rule.id.is_empty()
        || !rule.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(String::from("id must be non-empty lowercase ASCII letters, digits, `-`, `_` or `.`"));
    }
    if rule.description.trim().is_empty() {
        return Err(String::from("description is empty"));
    }
    if rule.help.trim().is_empty() {
        return Err(String::from("help is empty"));
    }
    Ok(())
}

/// A regex rule's regex: compiles, has its secret group, does not match the empty string.
fn check_regex(rule: &Rule) -> Result<(), String> {
    let re =
        build_regexes(&[rule.regex.as_str()]).map_err(|m| alloc::format!("regex does not compile: {m}"))?;
    let groups = re.group_info().group_len(regex_automata::PatternID::ZERO);
    if rule.secret_group as usize >= groups {
        return Err(alloc::format!(
            "secret_group {} does not exist (the regex has {} capture group(s))",
            rule.secret_group,
            groups - 1
        ));
    }
    if re.is_match(Input::new(b"")) {
        return Err(String::from("regex matches the empty string"));
    }
    Ok(())
}

/// A `license_texts` rule: a multi-line license rule with trigger words, and nothing that only
/// a regex rule uses.
fn check_license_texts_rule(rule: &Rule) -> Result<(), String> {
    let problem = if rule.category != Category::License {
        "license_texts is only meaningful for category = \"license\""
    } else if !rule.regex.is_empty() {
        "a license_texts rule has no regex (it matches the SPDX License List's texts)"
    } else if !rule.multiline {
        "a license_texts rule must be multiline (its trigger words open windows, as a multi-line rule's keywords do)"
    } else if rule.keywords.is_empty() {
        "a license_texts rule needs keywords: the trigger words that open the windows it searches"
    } else if rule.secret_group != 0
        || rule.entropy.is_some()
        || rule.validator.is_some()
        || rule.spdx.is_some()
    {
        "a license_texts rule takes no secret_group, entropy, validator or spdx (it reports each text's own identifier)"
    } else if !rule.allowlist.regexes.is_empty() || !rule.allowlist.stopwords.is_empty() {
        "a license_texts rule takes allowlist paths only"
    } else {
        return Ok(());
    };
    Err(String::from(problem))
}

#[cfg(test)]
mod tests {
    use super::keywords_inside;

    #[test]
    fn keywords_inside_finds_every_keyword_held_by_another_and_no_other() {
        let kws: alloc::vec::Vec<alloc::vec::Vec<u8>> =
            ["acme_live_", "acme", "live", "e_l", "me_", "zz", "acme_live_test"]
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect();
        let inside = keywords_inside(&kws).unwrap();
        assert_eq!(inside[0], [1, 2, 3, 4]); // prefix, infix, overlapping ones
        assert!(inside[1].is_empty() && inside[2].is_empty() && inside[5].is_empty());
        assert_eq!(inside[6], [0, 1, 2, 3, 4]);
        assert!(keywords_inside(&[]).unwrap().is_empty());
    }
}
