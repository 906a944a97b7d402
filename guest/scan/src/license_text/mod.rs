//! Licence texts of the SPDX License List, found by normalised matching: words compared, not
//! bytes ([`tokens`]), so a text reflowed, re-cased, re-punctuated, put in comments or given
//! another copyright line is still found, with a score saying how much of it matches.
//!
//! A rule with `license_texts = true` (category `license`, `multiline`) runs this matcher
//! instead of a regex. Its keywords are trigger words: the matcher looks at the windows they
//! open ([`windows`]), which are the history scan's multi-line clusters, so its carrying over
//! of unchanged clusters holds for licence texts too.

pub mod anchors;
pub(crate) mod catalog;
mod key_index;
mod matcher;
pub(crate) mod tokens;

use alloc::vec::Vec;
use core::ops::Range;

pub use matcher::MIN_SCORE;
pub(crate) use matcher::{LicenseMatch, Matcher};

/// The windows that trigger words at `occurrences` (positions, sorted) open in `text`: the
/// keyword windows of [`crate::window`] (the history scan's multi-line clusters, so carrying
/// clusters over holds for licence texts), each searched only up to [`WINDOW_TAIL`] past its
/// last trigger line.
pub(crate) fn windows(text: &[u8], occurrences: impl Iterator<Item = usize>) -> Vec<Range<usize>> {
    crate::window::windows(text, occurrences)
        .into_iter()
        .map(|w| {
            let last = w.last_keyword_line_end;
            let cut = w.bytes.end.min(last + WINDOW_TAIL);
            w.bytes.start..crate::window::line_end(text, cut.saturating_sub(1).max(last - 1)).min(w.bytes.end)
        })
        .collect()
}

/// How far past its last trigger line a window is searched: the windows join as multi-line
/// rules' do ([`MULTILINE_WINDOW`] on from each trigger), but no text on the list runs on
/// more than 1.7 KB past its last trigger word, so a source file's licence header is not
/// followed by 8 KiB of code.
const WINDOW_TAIL: usize = 2048;

/// The licence-text identifier reported for `group`.
pub(crate) fn reported(group: u16) -> &'static str {
    catalog::catalog().reported(group)
}

/// Builds the catalog and reads the texts' directory now (for a runner snapshotted after
/// start-up: jobs restored from it find them ready).
pub(crate) fn warm() {
    catalog::catalog();
    catalog::texts();
}

/// Every licence text shipped, `(entry, text)`, and the identifiers a text is reported under
/// (its group's; an entry `Apache-2.0~terms` is a text of `Apache-2.0`): for tests that check
/// each is found as itself.
pub fn shipped() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let catalog = catalog::catalog();
    let texts = catalog::texts();
    let mut out = Vec::new();
    for g in &catalog.groups {
        let mut ids: Vec<&'static str> = g.ids.iter().map(|id| catalog::license_id(id)).collect();
        ids.dedup();
        for &entry in &g.ids {
            if let Some(t) = texts.get(entry) {
                out.push((entry, t, ids.clone()));
            }
        }
    }
    out
}

/// The shipped licence texts (`policies/spdx/texts.zip`), for [`anchors::generate`].
pub const TEXTS_ZIP: &[u8] = catalog::TEXTS_ZIP;

/// The normalised-text licence matches of `text` as a whole (one window), `(identifier,
/// score, byte range)`: for tests and tools.
pub fn find_all(text: &[u8]) -> Vec<(&'static str, u8, Range<usize>)> {
    let mut m = Matcher::default();
    let mut out = Vec::new();
    m.find(text, 0..text.len(), &mut out);
    out.into_iter().map(|x| (reported(x.group), x.score, x.start..x.end)).collect()
}

/// How alike `text` (as one window) is to licence `id`'s text, per cent: the score a match of
/// it would have, `None` if `id` is not a shipped text.
pub fn score_against(text: &[u8], id: &str) -> Option<u8> {
    let catalog = catalog::catalog();
    let group =
        catalog.groups.iter().position(|g| g.ids.iter().any(|e| *e == id || catalog::license_id(e) == id))?
            as u16;
    Matcher::default().compare_whole(text, group)
}
