//! Finding licence texts in a region of a file: the region's shingles are looked up among the
//! anchors ([`super::catalog`]). Wherever a group's anchors gather (at least two of them, or
//! one for a text too short to have two, no further apart than its text is long), that part
//! of the region is compared with the group's text: the stretch of it densest in the text's
//! shingles (at most half again as long as the text) is the match, and its score the share of
//! shingles the two have in common, of the larger of the two sets. Matches are taken best
//! first (most shingles in common, less those either side has alone, those only the text has
//! twice: of the BSD 2- and 3-clause texts, the 3-clause one is the better match for a
//! 3-clause file, whose third clause the 2-clause match would have to hold as extra words, and
//! the 2-clause one for a 2-clause file), without overlaps; a file of many texts gives each its
//! own match.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

use super::catalog::{catalog, texts};
use super::key_index::KeyIndex;
use super::tokens::{shingles, tokenize, Token};

/// The least score (per cent) a match is reported with.
pub const MIN_SCORE: u8 = 80;
/// Shingles compared, at most, per shingle of a region, beyond [`WORK_FREE`]: candidates are
/// compared best first (the largest share of their anchors there, then the longest texts)
/// until this is spent. A notices file of many texts compares each with a few dozen
/// look-alikes; a hostile file holding every licence's anchors cannot make it compare more.
const WORK_PER_SHINGLE: usize = 128;
/// Shingles any region may compare (a source file's header with a short licence compares it
/// with all its look-alikes).
const WORK_FREE: usize = 1 << 20;
/// The least share of a text's anchors (per cent) a candidate holds: a text that matches by
/// [`MIN_SCORE`] has most of its anchors (they are spread over it), a look-alike that shares
/// its opening has few.
const MIN_ANCHOR_SHARE: usize = 40;
/// Shingle sets kept between regions (a scan meets the same few licences again and again).
const CACHED: usize = 64;

/// A licence text found: where, which group of texts, how alike (per cent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LicenseMatch {
    pub start: usize,
    pub end: usize,
    pub group: u16,
    pub score: u8,
}

/// A group's text as shingles: each distinct one with where it occurs in the text (if only
/// once), sorted, and how many the text has in a row.
struct Known {
    group: u16,
    distinct: Vec<(u64, Option<u32>)>,
    /// Where each shingle is in `distinct`.
    index: KeyIndex,
    len: usize,
}

impl Known {
    fn new(group: u16, distinct: Vec<(u64, Option<u32>)>, len: usize) -> Known {
        let index = KeyIndex::new(&distinct.iter().map(|d| d.0).collect::<Vec<u64>>());
        Known { group, distinct, index, len }
    }

    /// Whether the text has shingle `s`: its index in `distinct`, and where it is in the text
    /// if only once.
    #[inline]
    fn lookup(&self, s: u64) -> Option<(usize, Option<u32>)> {
        let i = self.index.find(s, |i| self.distinct[i].0)?;
        Some((i, self.distinct[i].1))
    }
}

/// How far back in the text (in shingles) a shingle found may lie before the text is taken to
/// start again (a second copy follows), once [`RESTART_CONFIRMED`] shingles in a row say so.
const RESTART: u32 = 64;
const RESTART_CONFIRMED: usize = 4;

/// Where a group's anchors gather in a region: a candidate occurrence of its text.
#[derive(Clone, Copy)]
struct Candidate {
    group: u16,
    /// Shingle positions of its first and last anchor there.
    from: usize,
    to: usize,
    /// Distinct anchors there, per mille of the group's.
    share: usize,
    /// The length of the group's text, in shingles.
    len: usize,
}

/// A candidate compared: `first..=last` are shingle positions in the region.
struct Compared {
    key: i64,
    score: u8,
    first: usize,
    last: usize,
    group: u16,
}

/// Finds licence texts; holds its buffers and a cache of compared texts.
#[derive(Default)]
pub(crate) struct Matcher {
    tokens: Vec<Token>,
    shingles: Vec<u64>,
    /// Anchors found: (group, shingle position, anchor).
    hits: Vec<(u16, u32, u64)>,
    candidates: Vec<Candidate>,
    /// Running sums, a queue of stretch starts and where the text restarts, for
    /// [`Matcher::compare`].
    sums: Vec<i64>,
    starts: Vec<usize>,
    restarts: Vec<usize>,
    /// Per shingle of the compared range: its index among the text's, or `u32::MAX`.
    found: Vec<u32>,
    /// Which of the text's shingles a match holds.
    seen: Vec<u64>,
    window: Vec<u64>,
    compared: Vec<Compared>,
    known: Vec<Known>,
    /// Steps the last [`Matcher::find`] took: shingles compared and intervals looked at (a test
    /// holds it linear in the region, whatever the region holds).
    work: usize,
}

/// How many earlier exact matches (by where they start) a candidate is checked against.
const EXACT_LOOKBACK: usize = 8;

/// The candidate that anchor hits `copy` (group `id`'s, in text order) make, if they hold
/// enough of the group's anchors (`anchors`: scratch space).
fn candidate(
    id: u16,
    group: &super::catalog::Group,
    copy: &[(u16, u32, u64)],
    anchors: &mut Vec<u64>,
) -> Option<Candidate> {
    anchors.clear();
    anchors.extend(copy.iter().map(|h| h.2));
    anchors.sort_unstable();
    anchors.dedup();
    let group_anchors = group.anchors as usize;
    let enough =
        anchors.len() >= group_anchors.min(2) && anchors.len() * 100 >= group_anchors * MIN_ANCHOR_SHARE;
    enough.then(|| Candidate {
        group: id,
        from: copy[0].1 as usize,
        to: copy[copy.len() - 1].1 as usize,
        share: anchors.len() * 1000 / group_anchors.max(1),
        len: group.len as usize,
    })
}

/// How far apart (in shingles) the parts of a text of `len` shingles may lie in a region.
fn reach(len: usize) -> usize {
    len + len / 2 + 16
}

impl Matcher {
    /// Appends the licence texts in `text[region]` to `out`, in text order.
    pub fn find(&mut self, text: &[u8], region: Range<usize>, out: &mut Vec<LicenseMatch>) {
        self.tokens.clear();
        tokenize(&text[region.clone()], region.start, &mut self.tokens);
        if self.tokens.len() < 3 {
            return;
        }
        shingles(&self.tokens, &mut self.shingles);
        self.find_candidates();
        let mut budget = WORK_FREE + WORK_PER_SHINGLE * self.shingles.len();
        self.work = 0;
        self.compared.clear();
        // Exact matches so far: (first, last) → text length. A text no longer than one of them,
        // whose anchors lie within it, cannot be the better match there. Only the few starting
        // last before the candidate are looked at (a skipped skip costs a compare, which the
        // budget bounds).
        let mut exact: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for i in 0..self.candidates.len() {
            let c = self.candidates[i];
            self.work += EXACT_LOOKBACK;
            let mut before = exact.range(..=(c.from, usize::MAX)).rev().take(EXACT_LOOKBACK);
            if before.any(|(&(_, l), &len)| c.to <= l && c.len <= len) {
                continue;
            }
            let Some(k) = self.known(c.group) else { continue };
            // A text holding anchors at `from` and `to` (its first anchors may be the words a
            // copy changed) starts no earlier than `to` less its length, and ends no later than
            // `from` plus it.
            let reach = reach(self.known[k].len);
            let range = c.to.saturating_sub(reach).min(c.from)
                ..(c.from + reach).max(c.to + 1).min(self.shingles.len());
            if range.len() > budget {
                break;
            }
            budget -= range.len();
            self.work += range.len();
            if let Some(compared) = self.compare(k, range) {
                if compared.score == 100 {
                    exact.insert((compared.first, compared.last), c.len);
                }
                self.compared.push(compared);
            }
        }
        self.compared.sort_unstable_by(|a, b| {
            b.key.cmp(&a.key).then(a.group.cmp(&b.group)).then(a.first.cmp(&b.first))
        });
        let first_new = out.len();
        // Matches taken, first → last; they do not overlap, so the one starting last at or
        // before a match's end is the only one it could overlap.
        let mut taken: BTreeMap<usize, usize> = BTreeMap::new();
        for c in &self.compared {
            self.work += 1;
            let overlaps = taken.range(..=c.last).next_back().is_some_and(|(_, &l)| c.first <= l);
            if c.score < MIN_SCORE || overlaps {
                continue;
            }
            taken.insert(c.first, c.last);
            out.push(LicenseMatch {
                start: self.tokens[c.first].start as usize,
                end: self.tokens[c.last + 2].end as usize,
                group: c.group,
                score: c.score,
            });
        }
        out[first_new..].sort_unstable_by_key(|m| (m.start, m.end));
    }

    /// The region's candidates: for each group, each stretch where its anchors lie no further
    /// apart than its text is long and hold at least two of them (one, for a text too short to
    /// have two); best first (see [`WORK_PER_SHINGLE`]).
    fn find_candidates(&mut self) {
        let catalog = catalog();
        self.hits.clear();
        for (i, &s) in self.shingles.iter().enumerate() {
            self.hits.extend(catalog.anchored(s).iter().map(|&(h, g)| (g, i as u32, h)));
        }
        self.hits.sort_unstable();
        self.candidates.clear();
        let mut anchors: Vec<u64> = Vec::new();
        // The anchors of the copy being read, each with where it was last seen.
        let mut seen: Vec<(u64, u32)> = Vec::new();
        for run in self.hits.chunk_by(|a, b| a.0 == b.0) {
            let (id, group) = (run[0].0, &catalog.groups[run[0].0 as usize]);
            let (len, reach) = (group.len as usize, reach(group.len as usize));
            for piece in run.chunk_by(|a, b| (b.1 - a.1) as usize <= reach) {
                // Copies of a text one after another: an anchor seen again half a text or more
                // after it was last seen starts the next copy (each is a candidate).
                let mut from = 0;
                seen.clear();
                for (j, &(_, at, anchor)) in piece.iter().enumerate() {
                    match seen.iter_mut().find(|s| s.0 == anchor) {
                        Some(last) if (at - last.1) as usize * 2 >= len => {
                            self.candidates.extend(candidate(id, group, &piece[from..j], &mut anchors));
                            from = j;
                            seen.clear();
                            seen.push((anchor, at));
                        }
                        Some(last) => last.1 = at,
                        None => seen.push((anchor, at)),
                    }
                }
                self.candidates.extend(candidate(id, group, &piece[from..], &mut anchors));
            }
        }
        self.candidates.sort_unstable_by(|a, b| {
            (b.share, b.len).cmp(&(a.share, a.len)).then(a.group.cmp(&b.group)).then(a.from.cmp(&b.from))
        });
    }

    /// The score of group `group` in `text` as one region.
    pub fn compare_whole(&mut self, text: &[u8], group: u16) -> Option<u8> {
        self.tokens.clear();
        tokenize(text, 0, &mut self.tokens);
        shingles(&self.tokens, &mut self.shingles);
        let k = self.known(group)?;
        self.compare(k, 0..self.shingles.len()).map(|c| c.score)
    }

    /// Compares the text of `self.known[k]` with the region's shingles at `range`: the
    /// densest stretch of them that the text has, at most [`reach`] long, is the match.
    fn compare(&mut self, k: usize, range: Range<usize>) -> Option<Compared> {
        let known = &self.known[k];
        let start = range.start;
        // Running sums of +2 for a shingle the text has, -1 for one it has not (what each adds
        // to a match's key): the match is the stretch of the highest sum, at most `reach` long,
        // that does not cross a point where the text starts again (so it neither runs on into
        // a neighbouring text nor joins two copies of this one).
        self.sums.clear();
        self.sums.push(0);
        self.restarts.clear();
        // The text position reached (by a shingle that follows the one before it in the text),
        // and a restart seen but not yet confirmed: (where, shingles in a row that agree).
        let (mut sum, mut reached, mut prev) = (0i64, 0u32, None::<u32>);
        let mut pending = None::<(usize, usize)>;
        self.found.clear();
        for (i, &s) in self.shingles[range].iter().enumerate() {
            let Some((index, at)) = known.lookup(s) else {
                sum -= 1;
                self.sums.push(sum);
                self.found.push(u32::MAX);
                continue;
            };
            sum += 2;
            self.sums.push(sum);
            self.found.push(index as u32);
            let Some(p) = at else { continue }; // a shingle the text repeats says nothing
            let follows = prev.is_some_and(|q| p > q && p - q <= RESTART);
            prev = Some(p);
            pending = match pending {
                Some((from, n)) if p + RESTART < reached && follows => {
                    if n + 1 >= RESTART_CONFIRMED {
                        self.restarts.push(from);
                        reached = p;
                        None
                    } else {
                        Some((from, n + 1))
                    }
                }
                _ if p + RESTART < reached => Some((i, 1)),
                _ => {
                    if follows {
                        reached = reached.max(p);
                    }
                    None
                }
            };
        }
        self.restarts.push(usize::MAX);
        // A region holding fewer of the text's shingles than a match needs is no match.
        let found = self.found.iter().filter(|&&f| f != u32::MAX).count();
        if found * 100 < known.distinct.len() * MIN_SCORE as usize {
            return None;
        }
        let reach = reach(known.len);
        // Candidate starts by increasing running sum (a monotonic queue of their indexes).
        self.starts.clear();
        let (mut head, mut best, mut next_restart) = (0usize, (0i64, 0usize, 0usize), 0usize);
        for end in 1..self.sums.len() {
            let a = end - 1;
            if a == self.restarts[next_restart] {
                // No stretch starts before a restart and ends after it.
                head = self.starts.len();
                next_restart += 1;
            }
            while self.starts.len() > head && self.sums[self.starts[self.starts.len() - 1]] >= self.sums[a] {
                self.starts.pop();
            }
            self.starts.push(a);
            while end - self.starts[head] > reach {
                head += 1;
            }
            let gain = self.sums[end] - self.sums[self.starts[head]];
            if gain > best.0 {
                best = (gain, self.starts[head], end);
            }
        }
        if best.0 <= 0 {
            return None;
        }
        let (first, last) = (start + best.1, start + best.2 - 1);
        // Distinct shingles of the match: those the text has, counted on a bitmap of the
        // text's; the others (few, in a match) sorted.
        let m = known.distinct.len();
        self.seen.clear();
        self.seen.resize(m.div_ceil(64), 0);
        self.window.clear();
        let mut common = 0;
        for (j, &f) in self.found[best.1..best.2].iter().enumerate() {
            if f == u32::MAX {
                self.window.push(self.shingles[first + j]);
            } else if self.seen[f as usize / 64] & (1 << (f % 64)) == 0 {
                self.seen[f as usize / 64] |= 1 << (f % 64);
                common += 1;
            }
        }
        self.window.sort_unstable();
        self.window.dedup();
        let w = common + self.window.len();
        Some(Compared {
            // Shingles in common, less those only the region has, less twice those only the
            // text has (of two texts a copy matches alike, the one that does not claim a clause
            // the copy lacks: BSD-3-Clause, not its variant with a clause more).
            key: 4 * common as i64 - w as i64 - 2 * m as i64,
            score: (common * 100 / w.max(m)) as u8,
            first,
            last,
            group: known.group,
        })
    }

    /// The index in `self.known` of group `group`'s shingles, computed if not there.
    fn known(&mut self, group: u16) -> Option<usize> {
        if let Some(i) = self.known.iter().position(|k| k.group == group) {
            return Some(i);
        }
        let text = texts().get(catalog().entry(group))?;
        let mut tokens = Vec::new();
        tokenize(&text, 0, &mut tokens);
        let mut seq = Vec::new();
        shingles(&tokens, &mut seq);
        let len = seq.len();
        let mut sorted: Vec<(u64, u32)> = seq.iter().enumerate().map(|(i, &s)| (s, i as u32)).collect();
        sorted.sort_unstable();
        let distinct: Vec<(u64, Option<u32>)> = sorted
            .chunk_by(|a, b| a.0 == b.0)
            .map(|run| (run[0].0, (run.len() == 1).then_some(run[0].1)))
            .collect();
        if self.known.len() == CACHED {
            self.known.remove(0);
        }
        self.known.push(Known::new(group, distinct, len));
        Some(self.known.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file built against the matcher: every group's anchors as the phrases they are in its
    /// text, and the hundred shortest texts whole (each an exact match), round after round, a
    /// trigger word on every line so that it is all one window. Every group is a candidate in
    /// every round, and thousands of exact matches pile up; the work stays linear in the
    /// region, bounded by the compare budget.
    #[test]
    fn a_file_holding_every_texts_anchors_many_times_over_costs_work_linear_in_its_size() {
        let (catalog, texts) = (catalog(), texts());
        let mut round = Vec::new();
        let mut short: Vec<Vec<u8>> = Vec::new();
        for g in 0..catalog.groups.len() as u16 {
            let text = texts.get(catalog.entry(g)).unwrap();
            let mut tokens = Vec::new();
            tokenize(&text, 0, &mut tokens);
            let mut seq = Vec::new();
            shingles(&tokens, &mut seq);
            round.extend_from_slice(b"license:");
            for (i, &s) in seq.iter().enumerate() {
                if catalog.anchored(s).iter().any(|&(_, group)| group == g) {
                    round.push(b' ');
                    round.extend_from_slice(&text[tokens[i].start as usize..tokens[i + 2].end as usize]);
                }
            }
            round.push(b'\n');
            short.push(text);
        }
        short.sort_by_key(Vec::len);
        for text in &short[..100] {
            round.extend_from_slice(b"license:\n");
            round.extend_from_slice(text);
            round.push(b'\n');
        }
        let rounds = 3;
        let file = round.repeat(rounds);
        let mut matcher = Matcher::default();
        let mut out = Vec::new();
        matcher.find(&file, 0..file.len(), &mut out);
        let n = matcher.shingles.len();
        let groups = catalog.groups.len();
        assert!(matcher.candidates.len() >= groups * rounds, "{} candidates", matcher.candidates.len());
        assert!(out.len() >= 90 * rounds, "{} matches", out.len());
        assert!(out.iter().all(|m| m.score >= MIN_SCORE));
        let bound = WORK_FREE + (WORK_PER_SHINGLE + 2 * EXACT_LOOKBACK) * n;
        assert!(matcher.work <= bound, "work {} over {bound} for {n} shingles", matcher.work);
    }
}
