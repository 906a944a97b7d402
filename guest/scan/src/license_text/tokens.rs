//! Normalised words, in the spirit of the SPDX License List matching guidelines: case,
//! punctuation, quotes, dashes, bullets, comment markers and line breaks do not count; a few
//! spellings count as one (`licence`/`license`, `https`/`http`); a copyright line is left out
//! whole. A word is a run of letters and digits of the Latin, Greek or Cyrillic scripts,
//! case-folded (`ß` as `ss`); a letter of another script is a word of its own (scripts that do
//! not space their words still give words); punctuation and symbols are separators.

use alloc::vec::Vec;

/// One word of a text: its hash and where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub hash: u64,
    pub start: u32,
    pub end: u32,
}

/// Spellings that mean the same word; the first is hashed as the second.
const EQUIVALENT: [(&[u8], &[u8]); 22] = [
    (b"licence", b"license"),
    (b"licences", b"licenses"),
    (b"licenced", b"licensed"),
    (b"licencing", b"licensing"),
    (b"licencee", b"licensee"),
    (b"licencees", b"licensees"),
    (b"licencor", b"licensor"),
    (b"https", b"http"),
    (b"organisation", b"organization"),
    (b"organisations", b"organizations"),
    (b"authorise", b"authorize"),
    (b"authorised", b"authorized"),
    (b"recognised", b"recognized"),
    (b"acknowledgement", b"acknowledgment"),
    (b"acknowledgements", b"acknowledgments"),
    (b"analyse", b"analyze"),
    (b"behaviour", b"behavior"),
    (b"favour", b"favor"),
    (b"offence", b"offense"),
    (b"practise", b"practice"),
    (b"utilise", b"utilize"),
    (b"whilst", b"while"),
];

/// The longest word looked up in [`EQUIVALENT`].
const LONGEST_EQUIVALENT: usize = 16;

/// FNV-1a, 64-bit, over the word's lowercase bytes.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b.to_ascii_lowercase() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether code point `c` (outside ASCII) is punctuation or a symbol: Latin-1's
/// punctuation and signs, general punctuation, letter-like symbols, arrows, mathematical and
/// technical symbols, box drawing, dingbats, CJK punctuation, and the full-width forms of
/// ASCII punctuation.
fn is_separator(c: u32) -> bool {
    matches!(c,
        0x80..=0xbf | 0xd7 | 0xf7 | 0x2000..=0x2bff | 0x3000..=0x303f | 0xfe30..=0xfe4f
        | 0xff00..=0xff0f | 0xff1a..=0xff20 | 0xff3b..=0xff40 | 0xff5b..=0xff65)
}

/// Decodes the UTF-8 sequence `bytes` (well-formed or not: a stray byte is its own value).
fn code_point(bytes: &[u8]) -> u32 {
    let Some((&first, rest)) = bytes.split_first() else { return 0 };
    let lead = match rest.len() {
        0 => return first as u32,
        1 => first & 0x1f,
        2 => first & 0x0f,
        _ => first & 0x07,
    };
    rest.iter().fold(lead as u32, |c, &b| (c << 6) | (b & 0x3f) as u32)
}

/// `copyright`, hashed: a copyright notice's line is left out.
fn copyright() -> u64 {
    fnv(b"copyright")
}

/// Whether the rest of a line that starts with `copyright` makes it a notice (a year, `(c)`,
/// `©`, or a placeholder such as `<year>`), not licence text wrapped there (`copyright notice
/// and this permission notice…`).
fn is_notice(rest: &[u8]) -> bool {
    // Where a notice says so: at once (`Copyright (C) 1994-1995 …`, `(c) 2024 …`).
    let head = &rest[..rest.len().min(NOTICE_HEAD)];
    let year = head.windows(4).enumerate().any(|(i, w)| {
        w.iter().all(u8::is_ascii_digit)
            && (w[0] == b'1' || w[0] == b'2')
            && !head.get(i + 4).is_some_and(u8::is_ascii_digit)
            && (i == 0 || !head[i - 1].is_ascii_digit())
    });
    let placeholder = head.trim_ascii_start().first().is_some_and(|b| b"<[".contains(b));
    year || placeholder
        || memchr::memmem::find(head, "\u{a9}".as_bytes()).is_some()
        || head.windows(3).any(|w| w[0] == b'(' && w[1].eq_ignore_ascii_case(&b'c') && w[2] == b')')
}

/// How far into a line [`is_notice`] looks, in bytes.
const NOTICE_HEAD: usize = 32;

/// The most words of a copyright notice left out: its year and holder (`Copyright (c)
/// 1994-1995 The Regents of the University of California`), not licence text a long line
/// goes on with (`…Glenn Randers-Pehrson, and are distributed according to…`).
const NOTICE_WORDS: usize = 10;

/// The lowercase of letter `c` (outside ASCII) in the Latin, Greek and Cyrillic blocks, so
/// an upper-cased text gives the same words.
fn fold(c: u32) -> u32 {
    match c {
        0xc0..=0xde if c != 0xd7 => c + 0x20,
        0x100..=0x137 | 0x14a..=0x177 => c | 1,
        0x139..=0x148 | 0x179..=0x17e if c % 2 == 1 => c + 1,
        0x178 => 0xff,
        0x391..=0x3a9 => c + 0x20,
        0x400..=0x40f => c + 0x50,
        0x410..=0x42f => c + 0x20,
        _ => c,
    }
}

/// Appends the words of `text` to `out`, their positions offset by `base`.
pub(crate) fn tokenize(text: &[u8], base: usize, out: &mut Vec<Token>) {
    let copyright = copyright();
    let n = text.len();
    let mut i = 0;
    let mut line_start = true; // no word yet on this line
    let mut notice = 0; // words of a copyright notice still to leave out on this line
    while i < n {
        let (c, len) = decode(&text[i..]);
        if c == u32::from(b'\n') {
            line_start = true;
            notice = 0;
            i += 1;
        } else if is_word_char(c) {
            let s = i;
            let mut word = Word::default();
            while i < n {
                let b = text[i];
                if b < 0x80 {
                    // ASCII, the common case, byte by byte.
                    if !b.is_ascii_alphanumeric() {
                        break;
                    }
                    word.chars += 1;
                    word.byte(b.to_ascii_lowercase());
                    i += 1;
                    continue;
                }
                let (c, len) = decode(&text[i..]);
                if !is_word_char(c) {
                    break;
                }
                word.push(c);
                i += len;
            }
            if word.chars == 1 && c < 0x80 && text[s].is_ascii_alphabetic() {
                // `(c) 2024 …` opens a copyright line; other single letters are bullets
                // (`a.`, `(b)`) or articles, and left out alike. (A list's item `(c) the
                // licenses granted…` is text.)
                if line_start && text[s].eq_ignore_ascii_case(&b'c') && s > 0 && text[s - 1] == b'(' {
                    let end = skip_line(text, i);
                    if is_notice(&text[i..end]) {
                        notice = NOTICE_WORDS;
                        line_start = false;
                    }
                }
                continue;
            }
            if notice > 0 {
                notice -= 1;
                continue;
            }
            let hash = word.hash();
            let placeholder = s > 0 && b"<[".contains(&text[s - 1]); // `<copyright holder>`
            if line_start && hash == copyright && !placeholder {
                let end = skip_line(text, i);
                if is_notice(&text[i..end]) {
                    notice = NOTICE_WORDS;
                    line_start = false;
                    continue;
                }
            }
            line_start = false;
            out.push(Token { hash, start: (base + s) as u32, end: (base + i) as u32 });
        } else if c < 0x80 || is_separator(c) {
            i += len;
            if c == 0xa9 && line_start && is_notice(&text[i..skip_line(text, i)]) {
                notice = NOTICE_WORDS; // `© 2024 …`
                line_start = false;
            }
        } else {
            // A letter of a script that does not space its words: a word of its own.
            line_start = false;
            let mut word = Word::default();
            word.push(c);
            out.push(Token { hash: word.hash(), start: (base + i) as u32, end: (base + i + len) as u32 });
            i += len;
        }
    }
}

/// The code point at the start of `bytes` and its length in bytes (a byte that does not
/// start well-formed UTF-8 is a code point of its own, its value the byte's).
fn decode(bytes: &[u8]) -> (u32, usize) {
    let first = bytes[0];
    let len = match first {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return (u32::from(first), 1),
    };
    match bytes.get(1..len) {
        Some(rest) if rest.iter().all(|&b| b & 0xc0 == 0x80) => (code_point(&bytes[..len]), len),
        _ => (u32::from(first), 1),
    }
}

/// Whether `c` is part of a spaced word: ASCII letters and digits, and the letters of the
/// Latin, Greek and Cyrillic blocks.
fn is_word_char(c: u32) -> bool {
    match c {
        0..=0x7f => (c as u8).is_ascii_alphanumeric(),
        0xd7 | 0xf7 => false,
        0xc0..=0x24f | 0x370..=0x3ff | 0x400..=0x52f => true,
        _ => false,
    }
}

/// A word being read: its hash so far (FNV-1a over its case-folded UTF-8, `ß` as `ss`), its
/// length in characters, and its lowercase bytes while it is short ASCII (for
/// [`EQUIVALENT`]).
struct Word {
    hash: u64,
    chars: usize,
    ascii: [u8; LONGEST_EQUIVALENT],
    ascii_len: Option<usize>,
}

impl Default for Word {
    fn default() -> Self {
        Word { hash: 0xcbf2_9ce4_8422_2325, chars: 0, ascii: [0; LONGEST_EQUIVALENT], ascii_len: Some(0) }
    }
}

impl Word {
    fn push(&mut self, c: u32) {
        self.chars += 1;
        let folded = if c < 0x80 { u32::from((c as u8).to_ascii_lowercase()) } else { fold(c) };
        let mut utf8 = [0u8; 4];
        let bytes: &[u8] = match folded {
            0xdf => b"ss",
            _ => char::from_u32(folded).map_or(&[][..], |ch| ch.encode_utf8(&mut utf8).as_bytes()),
        };
        for &b in bytes {
            self.byte(b);
        }
    }

    /// One byte of the folded word.
    #[inline]
    fn byte(&mut self, b: u8) {
        self.hash ^= u64::from(b);
        self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        self.ascii_len = match self.ascii_len {
            Some(n) if b < 0x80 && n < LONGEST_EQUIVALENT => {
                self.ascii[n] = b;
                Some(n + 1)
            }
            _ => None,
        };
    }

    /// The word's hash, after [`EQUIVALENT`].
    fn hash(&self) -> u64 {
        if let Some(n) = self.ascii_len {
            if let Some((_, to)) = EQUIVALENT.iter().find(|(from, _)| *from == &self.ascii[..n]) {
                return fnv(to);
            }
        }
        self.hash
    }
}

/// The position of the line break ending the line `at` is on (or the end of `text`).
fn skip_line(text: &[u8], at: usize) -> usize {
    memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |p| at + p)
}

/// The hash of three words in a row (a shingle).
fn shingle(a: u64, b: u64, c: u64) -> u64 {
    let mut h = a ^ b.rotate_left(21) ^ c.rotate_left(42);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shingles of `tokens`, in order (none for fewer than three words).
pub(crate) fn shingles(tokens: &[Token], out: &mut Vec<u64>) {
    out.clear();
    out.extend(tokens.windows(3).map(|w| shingle(w[0].hash, w[1].hash, w[2].hash)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        tokenize(text.as_bytes(), 0, &mut out);
        out.iter().map(|t| t.hash).collect()
    }

    #[test]
    fn case_punctuation_bullets_and_comment_markers_do_not_count() {
        let plain = words("Redistributions of source code must retain the above notice");
        assert_eq!(
            words("// 1. REDISTRIBUTIONS of source-code\n//    must retain the “above” notice;"),
            {
                let mut with_number = words("1");
                with_number.extend(&plain);
                with_number
            }
        );
        assert_eq!(words("* (a) redistributions, of source code must retain the above notice."), plain);
    }

    #[test]
    fn spellings_and_copyright_lines() {
        assert_eq!(words("the Licence, see https://x"), words("the license see http x"));
        assert_eq!(words("Copyright (c) 2024 Acme Ltd\nPermission granted"), words("permission granted"));
        assert_eq!(words("(c) 1999 Someone\n© 2001 Other\nPermission granted"), words("permission granted"));
        // `copyright` inside a line counts.
        assert_eq!(words("the copyright holders").len(), 3);
        // So does a line wrapped at `copyright` in the licence's own text.
        assert_eq!(words("copyright notice and this\npermission").len(), 5);
        assert_eq!(words("Copyright <year> <holder>\nx1"), words("x1"));
        assert_eq!(words("<copyright holder> or <related entities>").len(), 5);
        // A list's third item is text.
        assert_eq!(words("(c) the licenses granted\nx1").len(), 4);
    }

    #[test]
    fn other_scripts_are_words_case_folded_and_symbols_separate() {
        assert_eq!(words("政府資料").len(), 4);
        assert_eq!(words("Lizenz — für"), words("Lizenz für"));
        assert_eq!(words("Lizenz — für").len(), 2);
        assert_eq!(words("LIZENZ FÜR ΑΛΦΑ ЖУК"), words("lizenz für αλφα жук"));
        assert_eq!(words("Straße"), words("STRASSE"));
        assert_eq!(words("a\u{2022}b\u{00a0}cd"), words("cd"));
    }
}
