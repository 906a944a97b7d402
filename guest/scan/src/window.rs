//! The one definition of a keyword's multi-line window, shared by what must agree on it: the
//! licence-text matcher searches these windows ([`crate::license_text`]), and the history
//! scan carries a version's findings over cluster by cluster, a cluster being exactly such a
//! window in lines ([`crate::history`]). Were the two computed apart, the carrying over would
//! stay exact only while they happened to agree.

use alloc::vec::Vec;
use core::ops::Range;

use crate::rule::{MULTILINE_WINDOW, WINDOW_LOOKBACK_LINES};

/// Keywords' windows joined where they overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    /// Whole lines: from [`WINDOW_LOOKBACK_LINES`] lines before a keyword's line to
    /// [`MULTILINE_WINDOW`] bytes after that line's start (at least that line), through the end
    /// of the line that reaches.
    pub bytes: Range<usize>,
    /// The end of the last keyword line in it (after its `\n`).
    pub last_keyword_line_end: usize,
}

/// The windows keywords at `occurrences` (positions in `text`, ascending) open, in order;
/// windows that share a byte are one.
pub(crate) fn windows(text: &[u8], occurrences: impl Iterator<Item = usize>) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    for pos in occurrences {
        let (ls, le) = (line_start(text, pos), line_end(text, pos));
        let start = (0..WINDOW_LOOKBACK_LINES).fold(ls, |s, _| line_start(text, s.saturating_sub(1)));
        let reach = le.max((ls + MULTILINE_WINDOW).min(text.len()));
        let end = line_end(text, reach.saturating_sub(1).max(ls));
        match out.last_mut() {
            Some(w) if start < w.bytes.end => {
                w.bytes.end = w.bytes.end.max(end);
                w.last_keyword_line_end = w.last_keyword_line_end.max(le);
            }
            _ => out.push(Window { bytes: start..end, last_keyword_line_end: le }),
        }
    }
    out
}

/// The start of the line `pos` is on.
pub(crate) fn line_start(text: &[u8], pos: usize) -> usize {
    memchr::memrchr(b'\n', &text[..pos]).map_or(0, |p| p + 1)
}

/// The end of the line `pos` is on (after its `\n`, or the end of `text`).
pub(crate) fn line_end(text: &[u8], pos: usize) -> usize {
    memchr::memchr(b'\n', &text[pos..]).map_or(text.len(), |p| pos + p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn a_window_starts_four_lines_back_and_overlapping_ones_join() {
        let text = b"a\nb\nc\nd\ne\nkey\nf\n";
        let key = 10;
        let w = windows(text, [key].into_iter());
        assert_eq!(w, vec![Window { bytes: 2..text.len(), last_keyword_line_end: 14 }]);
        // Keywords 20 KB apart open two windows; 1 KB apart, one.
        let lines: Vec<u8> = (0..300).flat_map(|_| [b'x'; 99].into_iter().chain([b'\n'])).collect();
        assert_eq!(windows(&lines, [0, 20_000].into_iter()).len(), 2);
        assert_eq!(windows(&lines, [0, 1000].into_iter()).len(), 1);
        // The first window reaches 8 KiB past its line's start, through the line it ends in.
        assert_eq!(windows(&lines, [0].into_iter())[0].bytes, 0..8200);
    }
}
