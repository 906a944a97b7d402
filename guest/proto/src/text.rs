//! Text that crossed from the guest (or from an artifact, through the guest) on its way into a
//! message: error reasons, entry names, paths. The host escapes it before it stores, logs,
//! answers or prints it, whatever the guest did, so an archive entry named `\x1b[2J` cannot
//! clear an operator's terminal or hide a line of a log.

use alloc::borrow::Cow;
use alloc::string::String;
use core::fmt::Write;

/// Whether `c` must not reach a terminal or a log raw: C0 and C1 control characters, DEL, and
/// the Unicode bidirectional overrides and isolates (they reorder what a terminal shows).
fn must_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped: `\r`, `\n`, `\t` as themselves, other ASCII ones
/// as `\xNN` (ESC is `\x1b`), the rest as `\u{NNNN}`. Backslashes are left alone, so text that
/// was escaped already (by the guest) comes out unchanged: escaping twice is escaping once.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(must_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if must_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if must_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain `a/b.txt` – ü"), "plain `a/b.txt` – ü");
        assert!(matches!(escape_controls("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("\x1b[2J\x07x\ry\n\t\x7f"), "\\x1b[2J\\x07x\\ry\\n\\t\\x7f");
        assert_eq!(escape_controls("a\u{9b}31m\u{202e}b"), "a\\u{9b}31m\\u{202e}b");
    }

    #[test]
    fn escaping_twice_is_escaping_once() {
        let once = escape_controls("entry `\x1b]0;owned\x07`").into_owned();
        assert_eq!(once, "entry `\\x1b]0;owned\\x07`");
        assert_eq!(escape_controls(&once), once);
    }
}
