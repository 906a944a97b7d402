//! gitleaks regexes are Go `regexp` (RE2) syntax; Cella's are regex-automata's, matched over
//! bytes with ASCII classes. Most of the two agree (`(?i)`, `(?P<name>…)` and `(?<name>…)`,
//! `\A`, `\z`, `\b`, `\d\w\s` (ASCII in both), POSIX classes, lazy repetitions). What differs is
//! translated here, or refused by name:
//!
//! - `\Q…\E` (quoted literal text): the text, escaped.
//! - octal escapes (`\0`, `\012`, `\101`): `\x{..}`.
//! - an escaped punctuation character regex-automata gives a meaning to or refuses (`\<` and
//!   `\>` are word boundaries there, a literal `<`/`>` in RE2; `\'`, `\"`, `\/`, `\ `, …): the
//!   character itself.
//! - in a class, `[`, `&` and `~` are literal in RE2 but start a nested class or a set
//!   operation (`&&`, `~~`) in regex-automata: escaped.
//! - refused: `\C` (any byte), `\p{…}`/`\P{…}` (Unicode classes: Cella's classes are ASCII),
//!   escapes of a character above U+007F (a code point in RE2, one byte in Cella),
//!   backreferences (`\1`: RE2 refuses them too).

/// A construct Cella cannot honour, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// What it is, as the user wrote it (`\C`, `\p{Greek}`).
    pub construct: String,
    /// Why, and what to write instead.
    pub help: &'static str,
}

/// The regex-automata form of RE2 `pattern`.
pub fn translate(pattern: &str) -> Result<String, Unsupported> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    // Inside a class: where it started (to tell a leading `]` or `^` from the end).
    let mut class_start: Option<usize> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let in_class = class_start.is_some();
        match c {
            '\\' => {
                let Some(&next) = chars.get(i + 1) else {
                    out.push('\\'); // regex-automata says "incomplete escape"
                    break;
                };
                i += 2;
                match next {
                    'Q' => {
                        let end = find_end_quote(&chars, i);
                        for &q in &chars[i..end] {
                            push_literal(&mut out, q, in_class);
                        }
                        i = (end + 2).min(chars.len());
                    }
                    'C' => {
                        return Err(Unsupported {
                            construct: "\\C".into(),
                            help: "it matches any single byte; use `.` (with `(?s)` to take line breaks too)",
                        })
                    }
                    'p' | 'P' => {
                        let name = if chars.get(i) == Some(&'{') {
                            let close =
                                chars[i..].iter().position(|&c| c == '}').map_or(chars.len(), |p| i + p);
                            chars[i..=close.min(chars.len() - 1)].iter().collect::<String>()
                        } else {
                            chars.get(i).map(char::to_string).unwrap_or_default()
                        };
                        return Err(Unsupported {
                            construct: format!("\\{next}{name}"),
                            help:
                                "Unicode classes are not supported (Cella matches bytes with ASCII classes): \
                                   use an ASCII class such as [A-Za-z] or [[:alpha:]]",
                        });
                    }
                    '0'..='7' => {
                        // RE2: `\0` takes up to two more octal digits; `\1`-`\7` are octal only
                        // when another octal digit follows (else a backreference, refused).
                        let mut digits = String::from(next);
                        while digits.len() < 3 && chars.get(i).is_some_and(|d| ('0'..='7').contains(d)) {
                            digits.push(chars[i]);
                            i += 1;
                        }
                        if next != '0' && digits.len() == 1 {
                            return Err(Unsupported {
                                construct: format!("\\{next}"),
                                help: "backreferences are not supported (RE2 refuses them too)",
                            });
                        }
                        let value = u32::from_str_radix(&digits, 8).unwrap_or(0);
                        push_escape_value(&mut out, value, &format!("\\{digits}"))?;
                    }
                    '8' | '9' => {
                        return Err(Unsupported {
                            construct: format!("\\{next}"),
                            help: "backreferences are not supported (RE2 refuses them too)",
                        })
                    }
                    'x' => {
                        let (value, used) = hex_escape(&chars[i..]);
                        match value {
                            Some(v) => {
                                let written: String = chars[i - 2..i + used].iter().collect();
                                push_escape_value(&mut out, v, &written)?;
                                i += used;
                            }
                            // Malformed: regex-automata says what is wrong.
                            None => out.push_str("\\x"),
                        }
                    }
                    '<' | '>' => push_literal(&mut out, next, in_class),
                    c if c.is_ascii_punctuation() || c == ' ' => push_literal(&mut out, c, in_class),
                    c => {
                        out.push('\\');
                        out.push(c);
                    }
                }
                continue;
            }
            '[' if !in_class => {
                out.push('[');
                class_start = Some(i + 1);
                i += 1;
                // A leading `^`, then a leading `]`, are part of the class.
                if chars.get(i) == Some(&'^') {
                    out.push('^');
                    i += 1;
                    class_start = Some(i);
                }
                if chars.get(i) == Some(&']') {
                    out.push(']');
                    i += 1;
                }
                continue;
            }
            '[' if in_class => {
                // `[:alpha:]` and `[:^alpha:]` stay; any other `[` is a literal in RE2.
                if chars.get(i + 1) == Some(&':') {
                    if let Some(end) = find_posix_end(&chars, i + 2) {
                        out.extend(&chars[i..end]);
                        i = end;
                        continue;
                    }
                }
                out.push_str("\\[");
            }
            ']' if in_class => {
                out.push(']');
                class_start = None;
            }
            '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
        i += 1;
    }
    Ok(out)
}

/// Where the `\E` closing a `\Q` at `from` is (the end of the pattern if none).
fn find_end_quote(chars: &[char], from: usize) -> usize {
    (from..chars.len().saturating_sub(1))
        .find(|&j| chars[j] == '\\' && chars[j + 1] == 'E')
        .unwrap_or(chars.len())
}

/// The end (exclusive) of a POSIX class `[:name:]` whose name starts at `from`.
fn find_posix_end(chars: &[char], from: usize) -> Option<usize> {
    let mut j = from;
    while j + 1 < chars.len() {
        if chars[j] == ':' && chars[j + 1] == ']' {
            return Some(j + 2);
        }
        if !(chars[j].is_ascii_alphabetic() || chars[j] == '^') {
            return None;
        }
        j += 1;
    }
    None
}

/// `HH` or `{H…}` after `\x`: the value and how many characters it took.
fn hex_escape(rest: &[char]) -> (Option<u32>, usize) {
    if rest.first() == Some(&'{') {
        let Some(close) = rest.iter().position(|&c| c == '}') else { return (None, 0) };
        let digits: String = rest[1..close].iter().collect();
        (u32::from_str_radix(&digits, 16).ok().filter(|_| !digits.is_empty()), close + 1)
    } else if rest.len() >= 2 && rest[0].is_ascii_hexdigit() && rest[1].is_ascii_hexdigit() {
        let digits: String = rest[..2].iter().collect();
        (u32::from_str_radix(&digits, 16).ok(), 2)
    } else {
        (None, 0)
    }
}

/// An escaped character by value: ASCII only (RE2 means a code point, Cella a byte).
fn push_escape_value(out: &mut String, value: u32, written: &str) -> Result<(), Unsupported> {
    if value > 0x7f {
        return Err(Unsupported {
            construct: written.to_owned(),
            help: "escapes of characters above U+007F are not supported (a code point in RE2, one byte in \
                   Cella): write the character itself",
        });
    }
    out.push_str(&format!("\\x{{{value:02X}}}"));
    Ok(())
}

/// `c` as a literal, escaped as regex-automata needs it in or outside a class.
fn push_literal(out: &mut String, c: char, in_class: bool) {
    let meta = if in_class {
        matches!(c, '\\' | '[' | ']' | '^' | '-' | '&' | '~')
    } else {
        matches!(
            c,
            '\\' | '.'
                | '+'
                | '*'
                | '?'
                | '('
                | ')'
                | '|'
                | '['
                | ']'
                | '{'
                | '}'
                | '^'
                | '$'
                | '#'
                | '&'
                | '-'
                | '~'
        )
    };
    if meta {
        out.push('\\');
    }
    out.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(pattern: &str) -> String {
        translate(pattern).unwrap_or_else(|e| panic!("{pattern}: {e:?}"))
    }

    fn refused(pattern: &str) -> String {
        translate(pattern).expect_err(pattern).construct
    }

    #[test]
    fn what_both_syntaxes_share_is_left_alone() {
        for p in [
            r"(?i)\b(zq_[a-z0-9]{32})\b",
            r"(?P<tok>ab+)\z",
            r"(?<tok>ab+)\A",
            r"[[:alnum:]_-]{8,}",
            r"[^\s'\x22]+",
            r"[]a]",
            r"[^]a]",
            r"a.*?b|c+?",
        ] {
            let t = ok(p);
            assert_eq!(t, p.replace(r"\x22", r"\x{22}"), "{p}");
        }
    }

    #[test]
    fn quoted_text_and_octal_escapes_are_translated() {
        assert_eq!(ok(r"\Qa.b*c\E+"), r"a\.b\*c+");
        assert_eq!(ok(r"x\Q[^]"), r"x\[\^\]");
        assert_eq!(ok(r"[\Q&-]\E]"), r"[\&\-\]]");
        assert_eq!(ok(r"\101\0\012"), r"\x{41}\x{00}\x{0A}");
        assert_eq!(ok(r"\x41\x{7e}"), r"\x{41}\x{7E}");
    }

    #[test]
    fn escaped_punctuation_becomes_the_character() {
        assert_eq!(ok(r#"\<a\>\'\"\/\ \_\@"#), r#"<a>'"/ _@"#);
        assert_eq!(ok(r"\.\-\$"), r"\.\-\$");
        assert_eq!(ok(r"[\<]"), r"[<]");
    }

    #[test]
    fn class_characters_that_regex_automata_reads_differently_are_escaped() {
        assert_eq!(ok("[a&&b~~[c]"), r"[a\&\&b\~\~\[c]");
        assert_eq!(ok("[[:alpha:][:^digit:]]"), "[[:alpha:][:^digit:]]");
    }

    #[test]
    fn what_cella_cannot_honour_is_refused_by_name() {
        assert_eq!(refused(r"a\Cb"), r"\C");
        assert_eq!(refused(r"\p{Greek}+"), r"\p{Greek}");
        assert_eq!(refused(r"\PL"), r"\PL");
        assert_eq!(refused(r"\xE9"), r"\xE9");
        assert_eq!(refused(r"\x{263A}"), r"\x{263A}");
        assert_eq!(refused(r"\351"), r"\351");
        assert_eq!(refused(r"(a)\1"), r"\1");
    }

    #[test]
    fn translations_compile_in_regex_automata() {
        for p in [r"\Qa.b\E", r"\101", "[a&&b~~[c]", r"\<x\>", r"[\Q&-]\E]", r#"\'\"\/"#] {
            let t = ok(p);
            regex_automata::meta::Regex::builder()
                .syntax(regex_automata::util::syntax::Config::new().unicode(false).utf8(false))
                .build(&t)
                .unwrap_or_else(|e| panic!("{p} -> {t}: {e}"));
        }
    }
}
