//! Scanning a file version rebuilt from a delta by scanning only what its base does not
//! already show: most versions of a file differ from the one they are stored against by a few
//! lines, and the findings of the lines they share are the base's, moved.
//!
//! A line of the new version is *clean* when it was copied whole from one whole line of the
//! base. Rules look at one line, except multi-line rules, which look at a window of lines
//! around a keyword's line ([`crate::window`]); overlapping windows form a *cluster* (where
//! one rule run ends decides where the next begins). A cluster may be carried over
//! when its lines are clean, follow each other in the base as they do here, and the base has
//! exactly that cluster. Lines that are not clean and clusters that may not be carried over
//! are kept; the rest are blanked (each left as an empty line, so line numbers stand) and the
//! base's findings that lie wholly on blanked lines are carried over to where those lines are
//! now. A scan of the kept lines adds the rest. The result is what a scan of the whole version
//! gives; a test checks that on histories made to stress it.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};

use super::delta::Piece;
use crate::finding::Finding;
use crate::rule::Policy;

/// The keywords of a policy's multi-line rules (ASCII case-insensitive); `None` when one
/// of them has none (it runs over all text: nothing is carried over).
#[derive(Clone)]
pub(super) struct MultilineKeywords(Option<AhoCorasick>, usize);

/// Where multi-line keywords occur in a version: (start, end) byte ranges, sorted.
pub(super) type Occurrences = Vec<(usize, usize)>;

impl MultilineKeywords {
    pub(super) fn new(policy: &Policy) -> Self {
        let multiline = || policy.rules.iter().filter(|r| r.multiline);
        if multiline().any(|r| r.keywords.is_empty()) {
            return MultilineKeywords(None, 0);
        }
        let words: Vec<&str> = multiline().flat_map(|r| r.keywords.iter().map(String::as_str)).collect();
        // One lookup a byte: the multi-line rules' keywords are few and short.
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(&words);
        let longest = words.iter().map(|w| w.len()).max().unwrap_or(0);
        MultilineKeywords(ac.ok(), longest)
    }

    /// Every occurrence in `text`, found by searching it all (`None`: see the type).
    pub(super) fn occurrences(&self, text: &[u8]) -> Option<Occurrences> {
        let ac = self.0.as_ref()?;
        Some(ac.find_iter(text).map(|m| (m.start(), m.end())).collect())
    }

    /// The occurrences in `text`, rebuilt from a base by `pieces`, given the base's: those
    /// inside a copied run are the base's, moved; only around inserted bytes and the ends of
    /// copied runs is `text` searched (where an occurrence may be new, or may have been hidden
    /// in the base behind an overlapping one).
    fn occurrences_after(
        &self,
        ac: &AhoCorasick,
        text: &[u8],
        base: &[(usize, usize)],
        pieces: &[Piece],
    ) -> Occurrences {
        let reach = self.1.max(1);
        let mut out: Occurrences = Vec::new();
        let mut regions: Vec<(usize, usize)> = Vec::new();
        for piece in pieces {
            match *piece {
                Piece::Copy { dst, src, len } => {
                    let at = base.partition_point(|o| o.0 < src);
                    for &(s, e) in base[at..].iter().take_while(|o| o.0 < src + len) {
                        if e <= src + len {
                            out.push((dst + (s - src), dst + (e - src)));
                        }
                    }
                    regions.push((dst.saturating_sub(reach), dst + 2 * reach));
                    regions.push(((dst + len).saturating_sub(2 * reach), dst + len + reach));
                }
                Piece::Insert { dst, len } => regions.push((dst.saturating_sub(reach), dst + len + reach)),
            }
        }
        regions.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (a, b) in regions {
            let (a, b) = (a.min(text.len()), b.min(text.len()));
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (a, b) in merged {
            out.extend(ac.find_iter(&text[a..b]).map(|m| (a + m.start(), a + m.end())));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The line ranges (inclusive, 0-based) that multi-line rules may look at together in
    /// `text`, whose keywords occur at `occurrences`: their windows ([`crate::window`]), overlapping
    /// ones joined (a rule run over one window decides where the next begins).
    pub(super) fn clusters(text: &[u8], occurrences: &[(usize, usize)]) -> Vec<(usize, usize)> {
        Self::clusters_in(text, &line_starts(text), occurrences)
    }

    /// The keyword windows of [`crate::window`], in lines (`starts`: each line's start).
    fn clusters_in(text: &[u8], starts: &[usize], occurrences: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let line_of = |pos: usize| starts.partition_point(|&s| s <= pos) - 1;
        crate::window::windows(text, occurrences.iter().map(|&(start, _)| start))
            .into_iter()
            .map(|w| (line_of(w.bytes.start), line_of(w.bytes.end - 1)))
            .collect()
    }
}

/// What to scan of a version, and the findings carried over from its base.
pub(super) struct Plan {
    /// The version with its blanked lines emptied.
    pub text: Vec<u8>,
    /// The base's findings on blanked lines, at their lines here.
    pub carried: Vec<Finding>,
    /// The version's multi-line keywords and clusters (for the versions rebuilt from it).
    pub occurrences: Occurrences,
    pub clusters: Vec<(usize, usize)>,
}

/// The start of each line of `text` (a line ends after its `\n`).
fn line_starts(text: &[u8]) -> Vec<usize> {
    let mut starts = vec![0];
    starts.extend(memchr::memchr_iter(b'\n', text).map(|i| i + 1).filter(|&i| i < text.len()));
    starts
}

/// What is known of a version already scanned: its content, all its findings (at its path)
/// and its multi-line clusters.
pub(super) struct Base<'a> {
    pub content: &'a [u8],
    pub findings: &'a [Finding],
    pub occurrences: &'a [(usize, usize)],
    pub clusters: &'a [(usize, usize)],
}

/// Plans the scan of `text`, rebuilt from `base` by `pieces`. `None` when nothing can be
/// carried over (a multi-line rule without keywords), so the whole version is scanned.
pub(super) fn plan(
    base: &Base<'_>,
    text: &[u8],
    pieces: &[Piece],
    multiline: &MultilineKeywords,
) -> Option<Plan> {
    let keywords = multiline.0.as_ref()?;
    if text.is_empty() {
        return Some(Plan {
            text: Vec::new(),
            carried: Vec::new(),
            occurrences: Vec::new(),
            clusters: Vec::new(),
        });
    }
    let (base_findings, base_clusters, base_occurrences) = (base.findings, base.clusters, base.occurrences);
    let base = base.content;
    let starts = line_starts(text);
    let base_starts = line_starts(base);
    let lines = starts.len();
    let line_end = |i: usize| starts.get(i + 1).copied().unwrap_or(text.len());

    // The base line each clean line is a copy of.
    let mut source: Vec<Option<usize>> = vec![None; lines];
    let mut p = 0usize;
    for (i, slot) in source.iter_mut().enumerate() {
        let (ls, le) = (starts[i], line_end(i));
        while p < pieces.len() && pieces[p].end() <= ls {
            p += 1;
        }
        let Some(&Piece::Copy { dst, src, len }) = pieces.get(p) else { continue };
        if ls < dst || le > dst + len {
            continue;
        }
        let from = src + (ls - dst);
        let to = from + (le - ls);
        let starts_line = from == 0 || base[from - 1] == b'\n';
        let ends_line = text[le - 1] == b'\n' || to == base.len() || base[to] == b'\n';
        if starts_line && ends_line {
            *slot = Some(base_starts.partition_point(|&s| s <= from) - 1);
        }
    }
    let mut kept: Vec<bool> = source.iter().map(Option::is_none).collect();

    // Multi-line clusters: carried over only if the base has the very same cluster.
    let occurrences = multiline.occurrences_after(keywords, text, base_occurrences, pieces);
    let clusters = MultilineKeywords::clusters_in(text, &starts, &occurrences);
    let base_last = base_starts.len() - 1;
    for &(a, b) in &clusters {
        let same = source[a].is_some_and(|pa| {
            let follows = (a..=b).all(|i| source[i] == Some(pa + (i - a)));
            let at = base_clusters.partition_point(|c| c.1 < pa);
            let alike = base_clusters.get(at) == Some(&(pa, pa + (b - a)));
            // A cluster cut by the end of this version must be cut there in the base too.
            let cut_alike = b + 1 < lines || source[b] == Some(base_last);
            follows && alike && cut_alike
        });
        if !same {
            kept[a..=b].iter_mut().for_each(|k| *k = true);
        }
    }

    // The base's findings on blanked lines, moved.
    let mut copies: Vec<(usize, usize)> =
        source.iter().enumerate().filter_map(|(i, s)| s.map(|s| (s, i))).collect();
    copies.sort_unstable();
    let mut carried = Vec::new();
    for f in base_findings {
        if f.bytes.is_some() || f.line == 0 || f.end_line < f.line {
            continue;
        }
        let (first, span) = ((f.line - 1) as usize, (f.end_line - f.line) as usize);
        let at = copies.partition_point(|c| c.0 < first);
        for &(_, here) in copies[at..].iter().take_while(|c| c.0 == first) {
            let whole = (0..=span)
                .all(|k| here + k < lines && !kept[here + k] && source[here + k] == Some(first + k));
            if whole {
                let mut moved = f.clone();
                moved.line = here as u64 + 1;
                moved.end_line = moved.line + span as u64;
                carried.push(moved);
            }
        }
    }

    let mut out = Vec::with_capacity(text.len());
    for (i, keep) in kept.iter().enumerate() {
        let (ls, le) = (starts[i], line_end(i));
        if *keep {
            out.extend_from_slice(&text[ls..le]);
        } else if text[le - 1] == b'\n' {
            out.push(b'\n');
        }
    }
    Some(Plan { text: out, carried, occurrences, clusters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::Finding;
    use crate::rule::{Confidence, Severity};

    fn finding(line: u64, end_line: u64) -> Finding {
        Finding {
            rule_index: 0,
            rule_id: "r".into(),
            path: "f".into(),
            line,
            column: 3,
            end_line,
            end_column: 9,
            bytes: None,
            redacted: "x".into(),
            fingerprint: "00".repeat(32),
            location_fingerprint: String::new(),
            line_hash: "0000000000000000:1".into(),
            suppression: None,
            confidence: Confidence::High,
            severity: Severity::Error,
            license_verdict: None,
            license_score: None,
            history: None,
            image: None,
        }
    }

    fn keywords(words: &[&str]) -> MultilineKeywords {
        let longest = words.iter().map(|w| w.len()).max().unwrap_or(0);
        MultilineKeywords(AhoCorasickBuilder::new().ascii_case_insensitive(true).build(words).ok(), longest)
    }

    #[test]
    fn findings_on_copied_lines_move_and_changed_lines_are_kept() {
        let base = b"one\ntwo secret\nthree\nfour\n";
        // New first line, then the base whole, then a changed last line.
        let text = b"zero\none\ntwo secret\nthree\nfour\nfive\n";
        let pieces = [
            Piece::Insert { dst: 0, len: 5 },
            Piece::Copy { dst: 5, src: 0, len: base.len() },
            Piece::Insert { dst: 5 + base.len(), len: 5 },
        ];
        let occurrences = keywords(&["begin key"]).occurrences(base).unwrap();
        let clusters = MultilineKeywords::clusters(base, &occurrences);
        let findings = [finding(2, 2)];
        let b = Base { content: base, findings: &findings, occurrences: &occurrences, clusters: &clusters };
        let plan = plan(&b, text, &pieces, &keywords(&["begin key"])).unwrap();
        assert_eq!(plan.text, b"zero\n\n\n\n\nfive\n");
        assert_eq!(plan.carried.len(), 1);
        assert_eq!((plan.carried[0].line, plan.carried[0].end_line), (3, 3));
    }

    #[test]
    fn a_multiline_window_over_a_change_is_kept_whole() {
        let base = b"a\nb\nc\nd\ne\nbegin key\nbody1\nbody2\nend\nz\n";
        let text = b"a\nb\nc\nd\ne\nbegin key\nbody1\nBODY2\nend\nz\n";
        let pieces = [
            Piece::Copy { dst: 0, src: 0, len: 26 },
            Piece::Insert { dst: 26, len: 6 },
            Piece::Copy { dst: 32, src: 32, len: 6 },
        ];
        let kw = keywords(&["begin key"]);
        let occurrences = kw.occurrences(base).unwrap();
        let clusters = MultilineKeywords::clusters(base, &occurrences);
        let findings = [finding(6, 9), finding(1, 1)];
        let b = Base { content: base, findings: &findings, occurrences: &occurrences, clusters: &clusters };
        let plan = plan(&b, text, &pieces, &kw).unwrap();
        // The cluster runs from four lines before the keyword's line (a licence text's window
        // looks back as far) to the end (8 KiB): all of it kept; line 1 is carried.
        assert_eq!(plan.text, b"\nb\nc\nd\ne\nbegin key\nbody1\nBODY2\nend\nz\n");
        assert_eq!(plan.carried.iter().map(|f| f.line).collect::<Vec<_>>(), [1]);
    }
}
