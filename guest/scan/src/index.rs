//! An artifact held in memory for a session: every file as `(path, bytes)`, read once through
//! the archive readers ([`crate::extract_artifact`], so with the same limits and refusals as a
//! scan), then scanned, searched and read as often as asked without touching the disk again.
//!
//! What makes the queries fast is that every file is one contiguous buffer: a scan is
//! [`Engine::scan_file`] per file (no archive decoding, no decompression), and a grep is one
//! regex search per file (regex-automata's meta regex: literal prefilter, lazy DFA), not one
//! per line; line numbers are counted incrementally between matches. Binary files (a NUL byte
//! in the first [`BINARY_SNIFF_LEN`] bytes, the engine's own rule) are flagged once at load.

use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use regex_automata::meta::{self, Regex};
use regex_automata::util::syntax;
use regex_automata::Input;

use crate::archive::{extract_artifact, Limits};
use crate::engine::{Engine, BINARY_SNIFF_LEN};
use crate::error::ArtifactError;
use crate::finding::Report;
use crate::rule::Category;
use crate::source::Source;

/// One file of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedFile {
    /// The path a scan reports for it (`dir/file`, `outer.tar!/inner/file`).
    pub path: String,
    pub bytes: Vec<u8>,
    /// A NUL byte in the first [`BINARY_SNIFF_LEN`] bytes: scans take only its printable
    /// strings, grep skips it.
    pub binary: bool,
}

/// The files of an artifact and of everything added since.
#[derive(Debug, Default)]
pub struct Index {
    files: Vec<IndexedFile>,
    /// Path → position in `files` (the last file of that path, as extracting would leave it).
    by_path: BTreeMap<String, usize>,
    bytes: u64,
    binary_files: u64,
}

/// What one load or add put into the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Added {
    pub files: u64,
    pub bytes: u64,
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Reads every file of the artifact in `source` (named `name`; its entries' paths are
    /// prefixed with `prefix`) into the index. All or nothing: a refused artifact leaves the
    /// index as it was. At most `max_bytes` of content are taken.
    pub fn add_artifact<S: Source + ?Sized>(
        &mut self,
        source: &mut S,
        name: &str,
        prefix: &str,
        limits: &Limits,
        max_bytes: u64,
    ) -> Result<Added, ArtifactError> {
        let mut staged: Vec<IndexedFile> = Vec::new();
        extract_artifact(source, name, prefix, limits, max_bytes, |path: &str, bytes: Vec<u8>| {
            let sniff = &bytes[..bytes.len().min(BINARY_SNIFF_LEN)];
            let binary = memchr::memchr(0, sniff).is_some();
            staged.push(IndexedFile { path: String::from(path), bytes, binary });
            Ok(())
        })?;
        let mut added = Added::default();
        for file in staged {
            added.files += 1;
            added.bytes += file.bytes.len() as u64;
            self.binary_files += u64::from(file.binary);
            self.by_path.insert(file.path.clone(), self.files.len());
            self.files.push(file);
        }
        self.bytes += added.bytes;
        Ok(added)
    }

    /// Every file, in the order they were read.
    pub fn files(&self) -> &[IndexedFile] {
        &self.files
    }

    /// The file with this exact path.
    pub fn get(&self, path: &str) -> Option<&IndexedFile> {
        self.by_path.get(path).map(|&i| &self.files[i])
    }

    /// Bytes of content held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Files flagged binary.
    pub fn binary_files(&self) -> u64 {
        self.binary_files
    }

    /// Scans every file with `engine`, as [`crate::scan_artifact`] would scan the artifact
    /// (same paths, same order, same findings and counts), leaving out what the engine's
    /// excludes name (an excluded archive counts once, as a scan counts it).
    pub fn scan(
        &self,
        engine: &mut Engine,
        limits: &Limits,
        report: &mut Report,
    ) -> Result<(), ArtifactError> {
        let mut last_excluded: Option<&str> = None;
        for file in &self.files {
            if let Some(end) = engine.excluded_prefix(&file.path) {
                let excluded = &file.path[..end];
                if last_excluded != Some(excluded) {
                    report.files_excluded += 1;
                    last_excluded = Some(excluded);
                }
                continue;
            }
            engine.scan_file(&file.path, &file.bytes, report, limits)?;
        }
        Ok(())
    }

    /// Matching lines of the text files whose path starts with `path_prefix`: at most
    /// `max_matches`, one per line, at most `max_line` bytes of each line's text. With a
    /// `view`, the files are searched as the view shows them (see [`MaskedView`]); it must
    /// cover every file (a file it does not cover is not searched).
    pub fn grep(
        &self,
        grep: &mut Grep,
        view: Option<&MaskedView>,
        path_prefix: Option<&str>,
        max_matches: usize,
        max_line: usize,
    ) -> GrepOutcome {
        let mut out = GrepOutcome::default();
        let no_mask = FileMask::default();
        for (i, file) in self.files.iter().enumerate() {
            if file.binary || !path_prefix.is_none_or(|p| file.path.starts_with(p)) {
                continue;
            }
            let mask = match view {
                None => &no_mask,
                Some(view) => match view.files.get(i) {
                    Some(Some(mask)) => mask,
                    _ => continue,
                },
            };
            out.files_searched += 1;
            let text = mask.apply(&file.bytes);
            if !grep.file(&file.path, &text, mask, max_matches, max_line, &mut out) {
                out.truncated = true;
                break;
            }
        }
        out
    }
}

/// Where the secret and personal-data findings of `engine`'s policy lie in `text`: sorted,
/// merged byte ranges, and how many findings they hold. License findings are left out: they
/// identify a license, not data to protect. `None` for a binary file (the engine does not scan
/// those, so nothing can be located).
pub fn finding_mask(engine: &mut Engine, path: &str, text: &[u8]) -> Result<Option<FileMask>, ArtifactError> {
    let Some(spans) = engine.finding_spans(path, text)? else { return Ok(None) };
    let mut mask = FileMask::default();
    for span in spans {
        let rule = &engine.policy().rules[span.rule_index as usize];
        if rule.category == Category::License {
            continue;
        }
        mask.findings += 1;
        let (start, end) = (span.start.min(text.len()), span.end.min(text.len()));
        match mask.spans.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => mask.spans.push((start, end)),
        }
    }
    Ok(Some(mask))
}

/// Masks every secret and personal-data finding of `engine`'s policy in `text`: each byte of
/// each finding becomes `*` (the length is kept). Returns the masked bytes and how many
/// findings were masked, or `None` for a binary file (see [`finding_mask`]).
pub fn mask_findings(
    engine: &mut Engine,
    path: &str,
    text: &[u8],
) -> Result<Option<(Vec<u8>, u64)>, ArtifactError> {
    Ok(finding_mask(engine, path, text)?.map(|mask| (mask.apply(text).into_owned(), mask.findings)))
}

/// The masked byte ranges of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMask {
    /// Sorted, disjoint `start..end` byte ranges.
    pub spans: Vec<(usize, usize)>,
    /// Findings masked (several may share a range).
    pub findings: u64,
}

impl FileMask {
    /// `text` (the file, or the first bytes of it) with every masked byte replaced by `*`
    /// (borrowed when nothing in it is masked).
    pub fn apply<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        let len = text.len();
        if self.spans.first().is_none_or(|s| s.0 >= len) {
            return Cow::Borrowed(text);
        }
        let mut masked = Vec::from(text);
        for &(start, end) in self.spans.iter().take_while(|s| s.0 < len) {
            masked[start..end.min(len)].fill(MASK_BYTE);
        }
        Cow::Owned(masked)
    }

    /// The unmasked stretches of a text of `len` bytes, in order.
    fn clear_ranges(&self, len: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let starts = core::iter::once(0).chain(self.spans.iter().map(|s| s.1));
        let ends = self.spans.iter().map(|s| s.0).chain(core::iter::once(len));
        starts.zip(ends).filter(|(a, b)| a < b)
    }
}

/// What a masked byte reads as.
pub const MASK_BYTE: u8 = b'*';

/// The index as a read policy that is not `allow` lets it be seen: every text file with the
/// findings of one policy (the masking policy) masked. Answers computed from this view
/// (grep's lines, columns and text; reads) reveal nothing a masked read would not: a pattern
/// never matches inside or across a masked range, and positions are those of the masked text.
/// Only the ranges are kept; a masked copy of a file exists only while it is searched or read.
#[derive(Debug, Default)]
pub struct MaskedView {
    /// Per file of the index, in order: its mask, or `None` for a binary file (which cannot be
    /// masked, so it is never searched or read through this view).
    files: Vec<Option<FileMask>>,
}

impl MaskedView {
    /// An empty view (it covers no file yet).
    pub fn new() -> MaskedView {
        MaskedView::default()
    }

    /// Files of the index this view covers (the first ones).
    pub fn covered(&self) -> usize {
        self.files.len()
    }

    /// Masks the files of `index` this view does not cover yet (files added since).
    pub fn extend(&mut self, index: &Index, engine: &mut Engine) -> Result<(), ArtifactError> {
        for file in &index.files[self.files.len()..] {
            let mask = if file.binary { None } else { finding_mask(engine, &file.path, &file.bytes)? };
            self.files.push(mask);
        }
        Ok(())
    }

    /// The mask of the file with this path: `None` if there is no such file or it is binary.
    pub fn mask_of(&self, index: &Index, path: &str) -> Option<&FileMask> {
        let i = *index.by_path.get(path)?;
        self.files.get(i)?.as_ref()
    }
}

/// How an ad-hoc grep pattern is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrepLimits {
    /// Longest pattern, in bytes.
    pub max_pattern: usize,
    /// Heap the compiled NFA may take (regex-automata's `nfa_size_limit`); the one-pass and
    /// full DFAs get the same bound, so no part of the regex grows past it.
    pub max_compiled: usize,
    /// The lazy DFA's cache (it is cleared and reused when full; never grows past this).
    pub dfa_cache: usize,
    /// Nesting depth of the pattern (groups, repetitions) the parser accepts.
    pub max_nest: u32,
}

impl Default for GrepLimits {
    fn default() -> Self {
        GrepLimits { max_pattern: 1024, max_compiled: 1 << 20, dfa_cache: 2 << 20, max_nest: 64 }
    }
}

/// A grep pattern that was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrepError {
    TooLong {
        len: usize,
        limit: usize,
    },
    Empty,
    /// It does not compile, or compiles to more than [`GrepLimits::max_compiled`].
    Regex(String),
}

impl fmt::Display for GrepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrepError::TooLong { len, limit } => {
                write!(f, "the pattern is {len} bytes long; at most {limit} are allowed")
            }
            GrepError::Empty => write!(f, "the pattern is empty"),
            GrepError::Regex(m) => write!(f, "the pattern is refused: {m}"),
        }
    }
}

impl core::error::Error for GrepError {}

/// A compiled grep pattern with its search cache.
#[derive(Debug)]
pub struct Grep {
    re: Regex,
    cache: meta::Cache,
}

impl Grep {
    /// Compiles `pattern` with the engine's syntax (byte-oriented: ASCII classes, no UTF-8
    /// requirement, so arbitrary bytes never stop the search) within `limits`.
    pub fn new(pattern: &str, limits: &GrepLimits) -> Result<Grep, GrepError> {
        if pattern.len() > limits.max_pattern {
            return Err(GrepError::TooLong { len: pattern.len(), limit: limits.max_pattern });
        }
        if pattern.is_empty() {
            return Err(GrepError::Empty);
        }
        let re = Regex::builder()
            .syntax(syntax::Config::new().unicode(false).utf8(false).nest_limit(limits.max_nest))
            .configure(
                meta::Config::new()
                    .utf8_empty(false)
                    .nfa_size_limit(Some(limits.max_compiled))
                    .onepass_size_limit(Some(limits.max_compiled))
                    .dfa_size_limit(Some(limits.max_compiled))
                    .dfa_state_limit(Some(10_000))
                    .hybrid_cache_capacity(limits.dfa_cache),
            )
            .build(pattern)
            .map_err(|e| GrepError::Regex(format!("{e}")))?;
        let cache = re.create_cache();
        Ok(Grep { re, cache })
    }

    /// Adds the matching lines of the file `path` (its text as shown: `text`, masked by
    /// `mask`) to `out`; `false` once `max_matches` is reached and more lines match.
    ///
    /// Each unmasked stretch is searched as a haystack of its own, so no match includes a
    /// masked byte and no look-around (`\b`, `^`, `$`) sees one: what matches, and where,
    /// depends on the masked text only. Lines, columns and the line's text are those of `text`.
    fn file(
        &mut self,
        path: &str,
        text: &[u8],
        mask: &FileMask,
        max_matches: usize,
        max_line: usize,
        out: &mut GrepOutcome,
    ) -> bool {
        let (mut counted_to, mut line) = (0usize, 1u64);
        // Where the next hit may start: one hit per line.
        let mut from = 0usize;
        for (a, b) in mask.clear_ranges(text.len()) {
            if from >= b {
                continue;
            }
            let mut input = Input::new(&text[a..b]);
            input.set_start(from.saturating_sub(a));
            while let Some(m) = self.re.search_with(&mut self.cache, &input) {
                if out.matches.len() >= max_matches {
                    return false;
                }
                let start = a + m.start();
                let ls = memchr::memrchr(b'\n', &text[..start]).map_or(0, |i| i + 1);
                let le = memchr::memchr(b'\n', &text[start..]).map_or(text.len(), |i| start + i);
                line += memchr::memchr_iter(b'\n', &text[counted_to..ls]).count() as u64;
                counted_to = ls;
                let full = text[ls..le].strip_suffix(b"\r").unwrap_or(&text[ls..le]);
                let shown = &full[..full.len().min(max_line)];
                out.matches.push(GrepHit {
                    path: String::from(path),
                    line,
                    column: code_points(&text[ls..start]) + 1,
                    text: String::from_utf8_lossy(shown).into_owned(),
                    truncated: shown.len() < full.len(),
                });
                from = le + 1;
                if le >= text.len() {
                    return true;
                }
                if from >= b {
                    break;
                }
                input.set_start(from - a);
            }
        }
        true
    }
}

/// One matching line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrepHit {
    pub path: String,
    /// 1-based line of the match's start.
    pub line: u64,
    /// 1-based column, in code points.
    pub column: u64,
    /// The line (lossy UTF-8), cut to the caller's `max_line` bytes.
    pub text: String,
    /// The line was cut.
    pub truncated: bool,
}

/// What a grep found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrepOutcome {
    pub matches: Vec<GrepHit>,
    /// More lines match than `max_matches`.
    pub truncated: bool,
    pub files_searched: u64,
}

/// UTF-8 code points in `b` (bytes that are not continuation bytes).
fn code_points(b: &[u8]) -> u64 {
    b.iter().filter(|&&x| (x as i8) >= -0x40).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SliceSource;

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in entries {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn index_of(entries: &[(&str, &[u8])]) -> Index {
        let mut index = Index::new();
        let bytes = tar(entries);
        index.add_artifact(&mut SliceSource(&bytes), "a.tar", "", &Limits::default(), u64::MAX).unwrap();
        index
    }

    #[test]
    fn holds_every_file_of_a_tar_by_path() {
        let index = index_of(&[("src/a.txt", b"one\ntwo\n"), ("bin/x", b"\x7fELF\0\0"), ("b", b"")]);
        assert_eq!(index.files().len(), 3);
        assert_eq!(index.bytes(), 14);
        assert_eq!(index.binary_files(), 1);
        assert_eq!(index.get("src/a.txt").unwrap().bytes, b"one\ntwo\n");
        assert!(index.get("a.txt").is_none());
    }

    #[test]
    fn a_refused_add_names_the_entry_and_leaves_the_index_as_it_was() {
        let mut index = index_of(&[("a", b"x")]);
        let evil = tar(&[("ok", b"fine"), ("../escape", b"boo")]);
        let e = index.add_artifact(&mut SliceSource(&evil), "more", "more/", &Limits::default(), u64::MAX);
        assert_eq!(e, Err(ArtifactError::PathEscapesRoot { entry: String::from("more/../escape") }));
        assert_eq!(index.files().len(), 1);
        let good = tar(&[("ok", b"fine")]);
        index.add_artifact(&mut SliceSource(&good), "more", "more/", &Limits::default(), u64::MAX).unwrap();
        assert_eq!(index.get("more/ok").unwrap().bytes, b"fine");
        let e = index.add_artifact(
            &mut SliceSource(b"plain text"),
            "notes.txt",
            "notes.txt/",
            &Limits::default(),
            4,
        );
        assert!(matches!(e, Err(ArtifactError::EntryTooLarge { size: 10, limit: 4, .. })), "{e:?}");
    }

    #[test]
    fn grep_reports_lines_columns_and_cuts_long_lines() {
        let long = [b'x'; 300];
        let mut text = Vec::from(&b"alpha\nbeta gamma\n\xc3\xa9t\xc3\xa9 gamma gamma\n"[..]);
        text.extend_from_slice(&long);
        text.extend_from_slice(b"gamma");
        let index = index_of(&[("t.txt", &text), ("z.bin", b"gamma\0")]);
        let mut g = Grep::new("gam+a", &GrepLimits::default()).unwrap();
        let out = index.grep(&mut g, None, None, 100, 200);
        let found: Vec<(u64, u64, bool)> =
            out.matches.iter().map(|m| (m.line, m.column, m.truncated)).collect();
        assert_eq!(found, [(2, 6, false), (3, 5, false), (4, 301, true)]);
        assert_eq!(out.matches[0].text, "beta gamma");
        assert_eq!(out.matches[2].text.len(), 200);
        assert_eq!(out.files_searched, 1, "binary files are not searched");
        let out = index.grep(&mut g, None, None, 2, 200);
        assert!(out.truncated && out.matches.len() == 2);
        assert!(index.grep(&mut g, None, Some("nope/"), 10, 200).matches.is_empty());
    }

    #[test]
    fn grep_refuses_long_and_explosive_patterns() {
        let limits = GrepLimits::default();
        assert!(matches!(Grep::new(&"a".repeat(2000), &limits), Err(GrepError::TooLong { len: 2000, .. })));
        let e = Grep::new("(?:[a-z]{1000}){1000}", &limits).unwrap_err();
        assert!(format!("{e}").contains("refused"), "{e}");
        assert!(Grep::new("(", &limits).is_err());
        assert!(Grep::new("", &limits).is_err());
    }
}
