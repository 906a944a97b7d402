//! The printable strings of a binary file: runs of at least [`MIN_RUN`] printable ASCII bytes
//! (space to `~`, tab, CR, LF), and runs of as many such characters in UTF-16LE (each followed
//! by a zero byte), decoded to ASCII. The engine scans them, one run per line, with the secret
//! rules, and maps what it finds back to byte offsets in the file.
//!
//! Everything works on one chunk of the file at a time, into buffers the engine keeps from
//! file to file: no allocation per byte or per run once they have grown.

use alloc::vec::Vec;

/// Shortest run taken, in characters.
pub const MIN_RUN: usize = 8;

/// Bytes that belong to a run.
const fn text_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b <= 0x7e {
        t[b] = true;
        b += 1;
    }
    t[b'\t' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t
}

static TEXT: [bool; 256] = text_table();

/// One run: `len` characters at `raw` in the chunk (2 bytes each if `wide`), copied to
/// `text` in the strings buffer (1 byte each) and followed there by a `\n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub text: usize,
    pub raw: usize,
    pub len: usize,
    pub wide: bool,
}

impl Run {
    fn stride(&self) -> usize {
        if self.wide {
            2
        } else {
            1
        }
    }
}

/// Where a chunk of `buf` (more of the file follows) may end so that no run crosses the cut:
/// just after the last byte in its second half that ends both kinds of run (neither printable
/// nor zero, or a second zero in a row). `buf.len()` if there is none (a run longer than half
/// a chunk is cut there).
pub(crate) fn cut(buf: &[u8]) -> usize {
    let half = buf.len() / 2;
    for p in (half.max(1)..buf.len()).rev() {
        let b = buf[p];
        if (!TEXT[usize::from(b)] && b != 0) || (b == 0 && buf[p - 1] == 0) {
            return p + 1;
        }
    }
    buf.len()
}

/// Takes the runs of `raw` (sorted by position) into `runs` and their characters into
/// `strings`, each run followed by `\n`. Both are cleared first.
pub(crate) fn extract(raw: &[u8], strings: &mut Vec<u8>, runs: &mut Vec<Run>) {
    runs.clear();
    strings.clear();
    let mut start: Option<usize> = None;
    for (i, &b) in raw.iter().enumerate() {
        if TEXT[usize::from(b)] {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            if i - s >= MIN_RUN {
                runs.push(Run { text: 0, raw: s, len: i - s, wide: false });
            }
        }
    }
    if let Some(s) = start {
        if raw.len() - s >= MIN_RUN {
            runs.push(Run { text: 0, raw: s, len: raw.len() - s, wide: false });
        }
    }
    let ascii_runs = runs.len();
    for align in 0..2 {
        let mut start: Option<usize> = None;
        let mut j = align;
        while j + 1 < raw.len() {
            if TEXT[usize::from(raw[j])] && raw[j + 1] == 0 {
                start.get_or_insert(j);
            } else if let Some(s) = start.take() {
                if (j - s) / 2 >= MIN_RUN {
                    runs.push(Run { text: 0, raw: s, len: (j - s) / 2, wide: true });
                }
            }
            j += 2;
        }
        if let Some(s) = start {
            if (j - s) / 2 >= MIN_RUN {
                runs.push(Run { text: 0, raw: s, len: (j - s) / 2, wide: true });
            }
        }
    }
    if runs.len() > ascii_runs {
        runs.sort_unstable_by_key(|r| r.raw);
    }
    for r in runs.iter_mut() {
        r.text = strings.len();
        if r.wide {
            strings.extend(raw[r.raw..r.raw + 2 * r.len].iter().step_by(2));
        } else {
            strings.extend_from_slice(&raw[r.raw..r.raw + r.len]);
        }
        strings.push(b'\n');
    }
}

/// The chunk offset of the character at `pos` of the strings buffer (a run's `\n` maps to
/// just after the run).
pub(crate) fn raw_offset(runs: &[Run], pos: usize) -> usize {
    let i = runs.partition_point(|r| r.text <= pos).saturating_sub(1);
    match runs.get(i) {
        Some(r) => r.raw + (pos.saturating_sub(r.text)).min(r.len) * r.stride(),
        None => 0,
    }
}

/// The chunk byte range of the characters `start..end` of the strings buffer.
pub(crate) fn raw_range(runs: &[Run], start: usize, end: usize) -> (usize, usize) {
    let s = raw_offset(runs, start);
    let last = end.saturating_sub(1).max(start);
    let i = runs.partition_point(|r| r.text <= last).saturating_sub(1);
    let e = raw_offset(runs, last) + runs.get(i).map_or(1, Run::stride);
    (s, e.max(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn utf16(s: &str) -> Vec<u8> {
        s.bytes().flat_map(|b| [b, 0]).collect()
    }

    #[test]
    fn takes_ascii_and_utf16_runs_of_eight_or_more_in_file_order() {
        let mut raw = vec![0u8, 1, 2];
        raw.extend_from_slice(b"short\x00");
        raw.extend_from_slice(b"token=abcdef12\xff");
        raw.extend(utf16("wide-string!"));
        raw.extend_from_slice(&[0, 0, 0x90]);
        raw.extend_from_slice(b"tail1234");
        let (mut strings, mut runs) = (Vec::new(), Vec::new());
        extract(&raw, &mut strings, &mut runs);
        assert_eq!(strings, b"token=abcdef12\nwide-string!\ntail1234\n");
        assert_eq!(
            runs,
            vec![
                Run { text: 0, raw: 9, len: 14, wide: false },
                Run { text: 15, raw: 24, len: 12, wide: true },
                Run { text: 28, raw: 51, len: 8, wide: false },
            ]
        );
        // Character 3 of the wide run is at byte 24 + 2*3; `e..e+4` of `token=abcdef12` is 4 bytes.
        assert_eq!(raw_offset(&runs, 18), 30);
        assert_eq!(raw_range(&runs, 15, 19), (24, 32));
        assert_eq!(raw_range(&runs, 6, 14), (15, 23));
    }

    #[test]
    fn the_buffers_are_reused() {
        let (mut strings, mut runs) = (Vec::with_capacity(64), Vec::with_capacity(4));
        extract(b"\x00aaaaaaaaaa\x00", &mut strings, &mut runs);
        let cap = strings.capacity();
        extract(b"\x00bbbbbbbbbb\x00", &mut strings, &mut runs);
        assert_eq!(strings, b"bbbbbbbbbb\n");
        assert_eq!(strings.capacity(), cap);
    }

    #[test]
    fn a_cut_never_splits_a_run() {
        let mut buf = vec![b'x'; 100];
        buf[70] = 0xff;
        assert_eq!(cut(&buf), 71);
        let mut wide = utf16("abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz");
        // A single zero is part of a UTF-16 run; two in a row end it.
        let n = wide.len();
        wide[n - 10] = 0;
        wide[n - 11] = 0;
        assert_eq!(cut(&wide), n - 8);
        assert_eq!(cut(&[b'a'; 64]), 64);
    }
}
