//! SPDX license expressions (the SPDX specification's annex D: `MIT`, `GPL-2.0-or-later WITH
//! Classpath-exception-2.0`, `(MIT OR Apache-2.0) AND BSD-3-Clause`, `LicenseRef-ours`), read
//! and checked against the SPDX License List shipped in `policies/spdx/` (its data is CC0).
//! Identifiers match whatever their case, as the specification asks; the operators are
//! `AND`, `OR` and `WITH`, in upper or lower case.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// The SPDX License List's licenses: identifier, flags, name; `#` lines are comments.
const LICENSES: &str = include_str!("../../../policies/spdx/licenses.tsv");
/// The SPDX License List's license exceptions, in the same form.
const EXCEPTIONS: &str = include_str!("../../../policies/spdx/exceptions.tsv");

/// The most tokens an expression may have (a tag is one line; this bounds the recursion).
const MAX_TOKENS: usize = 64;

/// What a license expression is, against the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Well-formed, and every license and exception is on the list (or the user's own
    /// `LicenseRef-`, `DocumentRef-…:LicenseRef-` or `AdditionRef-`).
    Listed,
    /// Well-formed, but these identifiers are not on the list.
    Unlisted(Vec<String>),
    /// Not an SPDX license expression.
    Malformed,
}

/// Reads `text` as a license expression and checks its identifiers against the list.
pub fn check_expression(text: &[u8]) -> Checked {
    let Ok(text) = core::str::from_utf8(text) else { return Checked::Malformed };
    let Some(tokens) = tokens(text) else { return Checked::Malformed };
    let mut parser = Parser { tokens: &tokens, at: 0, unlisted: Vec::new(), policy: None };
    if parser.or_expression(0).is_none() || parser.at != tokens.len() {
        return Checked::Malformed;
    }
    match parser.unlisted.is_empty() {
        true => Checked::Listed,
        false => Checked::Unlisted(parser.unlisted),
    }
}

/// What a license policy makes of a license: ordered, `Denied` the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Flagged,
    Denied,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Flagged => "flagged",
            Verdict::Denied => "denied",
        }
    }
}

/// The most entries a license policy's lists hold together.
pub const MAX_POLICY_ENTRIES: usize = 256;

/// A job's license policy: licenses it denies and licenses it flags, each entry a license
/// identifier (`AGPL-3.0`, which also covers `AGPL-3.0-only`, `AGPL-3.0-or-later` and
/// `AGPL-3.0+`), a `LicenseRef-`, or a prefix ending in `*` (`GPL-*`); any case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LicensePolicy {
    deny: Vec<String>,
    flag: Vec<String>,
}

impl LicensePolicy {
    /// The policy of `deny` and `flag`, or why an entry is not one.
    pub fn new(deny: &[String], flag: &[String]) -> Result<Self, String> {
        if deny.len() + flag.len() > MAX_POLICY_ENTRIES {
            return Err(alloc::format!("a license policy holds at most {MAX_POLICY_ENTRIES} entries"));
        }
        for entry in deny.iter().chain(flag) {
            let id = entry.strip_suffix('*').unwrap_or(entry);
            if entry.len() > 100
                || !(id.bytes().all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b)))
                || entry.is_empty()
                || entry == "*"
            {
                return Err(alloc::format!(
                    "`{entry}` is not a license identifier or a prefix ending in `*` (letters, digits, `.`, `-`, `+`)"
                ));
            }
        }
        Ok(LicensePolicy { deny: deny.to_vec(), flag: flag.to_vec() })
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.flag.is_empty()
    }

    /// What the policy makes of the license expression `text`: a license the user may choose
    /// (`OR`) is enough, every license that applies together (`AND`) counts. A text that is not
    /// an expression is judged by its words as if joined by `AND`.
    pub fn verdict(&self, text: &[u8]) -> Verdict {
        if self.is_empty() {
            return Verdict::Allowed;
        }
        let text = core::str::from_utf8(text).unwrap_or("");
        if let Some(tokens) = tokens(text) {
            let mut parser = Parser { tokens: &tokens, at: 0, unlisted: Vec::new(), policy: Some(self) };
            if let Some(verdict) = parser.or_expression(0).filter(|_| parser.at == tokens.len()) {
                return verdict;
            }
        }
        text.split(|c: char| !(c.is_ascii_alphanumeric() || ".-+:".contains(c)))
            .filter(|w| !w.is_empty())
            .map(|w| self.of_license(w))
            .max()
            .unwrap_or(Verdict::Allowed)
    }

    /// The verdict on one license identifier.
    fn of_license(&self, id: &str) -> Verdict {
        let matches = |entry: &String| entry_matches(entry, id);
        if self.deny.iter().any(matches) {
            Verdict::Denied
        } else if self.flag.iter().any(matches) {
            Verdict::Flagged
        } else {
            Verdict::Allowed
        }
    }
}

/// Whether the policy entry `entry` covers the license `id` (any case): the same identifier, or
/// it with `-only`, `-or-later` or `+` after it, or, for an entry ending in `*`, any identifier
/// starting with what precedes the `*`.
fn entry_matches(entry: &str, id: &str) -> bool {
    if let Some(prefix) = entry.strip_suffix('*') {
        return after(id, prefix).is_some();
    }
    let entry = entry.strip_suffix('+').unwrap_or(entry);
    [id, id.trim_end_matches('+')].iter().any(|id| {
        after(id, entry).is_some_and(|rest| {
            rest.is_empty() || rest.eq_ignore_ascii_case(b"-only") || rest.eq_ignore_ascii_case(b"-or-later")
        })
    })
}

/// What follows `prefix` in `s`, if `s` starts with it in any case.
fn after<'a>(s: &'a str, prefix: &str) -> Option<&'a [u8]> {
    let (s, p) = (s.as_bytes(), prefix.as_bytes());
    (s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)).then(|| &s[p.len()..])
}

/// Whether `id` is a license identifier on the list (any case).
pub fn is_listed_license(id: &str) -> bool {
    listed(LICENSES, id)
}

/// Whether `id` is a license exception identifier on the list (any case).
pub fn is_listed_exception(id: &str) -> bool {
    listed(EXCEPTIONS, id)
}

fn listed(list: &str, id: &str) -> bool {
    list.lines()
        .filter(|line| !line.starts_with('#'))
        .any(|line| line.split('\t').next().is_some_and(|listed| listed.eq_ignore_ascii_case(id)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Open,
    Close,
    And,
    Or,
    With,
    Word(&'a str),
}

/// The expression's tokens, or `None` for a character no expression holds or too many tokens.
fn tokens(text: &str) -> Option<Vec<Token<'_>>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b' ' || b == b'\t' {
            i += 1;
            continue;
        }
        let token = match b {
            b'(' => {
                i += 1;
                Token::Open
            }
            b')' => {
                i += 1;
                Token::Close
            }
            _ => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || b".-+:".contains(&bytes[i])) {
                    i += 1;
                }
                if i == start {
                    return None;
                }
                match &text[start..i] {
                    "AND" | "and" => Token::And,
                    "OR" | "or" => Token::Or,
                    "WITH" | "with" => Token::With,
                    word => Token::Word(word),
                }
            }
        };
        out.push(token);
        if out.len() > MAX_TOKENS {
            return None;
        }
    }
    Some(out)
}

struct Parser<'t, 'a> {
    tokens: &'t [Token<'a>],
    at: usize,
    unlisted: Vec<String>,
    /// Judges each license when given (every verdict is `Allowed` without one).
    policy: Option<&'t LicensePolicy>,
}

impl Parser<'_, '_> {
    fn next_is(&self, token: Token<'_>) -> bool {
        self.tokens.get(self.at) == Some(&token)
    }

    /// `and-expression ( OR and-expression )*`: the mildest verdict of the choices.
    fn or_expression(&mut self, depth: usize) -> Option<Verdict> {
        let mut verdict = self.and_expression(depth)?;
        while self.next_is(Token::Or) {
            self.at += 1;
            verdict = verdict.min(self.and_expression(depth)?);
        }
        Some(verdict)
    }

    /// `term ( AND term )*`: the worst verdict of the parts.
    fn and_expression(&mut self, depth: usize) -> Option<Verdict> {
        let mut verdict = self.term(depth)?;
        while self.next_is(Token::And) {
            self.at += 1;
            verdict = verdict.max(self.term(depth)?);
        }
        Some(verdict)
    }

    /// `( expression )` or `license [WITH exception]` (the license's verdict).
    fn term(&mut self, depth: usize) -> Option<Verdict> {
        match self.tokens.get(self.at)? {
            Token::Open if depth < MAX_TOKENS => {
                self.at += 1;
                let verdict = self.or_expression(depth + 1)?;
                self.next_is(Token::Close).then(|| self.at += 1)?;
                Some(verdict)
            }
            Token::Word(word) => {
                self.at += 1;
                self.license(word)?;
                if self.next_is(Token::With) {
                    self.at += 1;
                    let Some(Token::Word(exception)) = self.tokens.get(self.at) else { return None };
                    self.at += 1;
                    self.exception(exception)?;
                }
                Some(self.policy.map_or(Verdict::Allowed, |p| p.of_license(word)))
            }
            _ => None,
        }
    }

    /// A license: a listed identifier (or a deprecated one's `+`), or the user's own reference.
    fn license(&mut self, word: &str) -> Option<()> {
        if let Some(reference) = user_reference(word, "LicenseRef-") {
            return reference;
        }
        let id = match word.strip_suffix('+') {
            Some(id) if !id.is_empty() && !id.ends_with('+') => id,
            Some(_) => return None,
            None => word,
        };
        if id.contains(':') || !idstring(id) {
            return None;
        }
        if !is_listed_license(id) && !is_listed_license(word) {
            self.unlisted.push(word.to_string());
        }
        Some(())
    }

    fn exception(&mut self, word: &str) -> Option<()> {
        if let Some(reference) = user_reference(word, "AdditionRef-") {
            return reference;
        }
        if word.contains([':', '+']) || !idstring(word) {
            return None;
        }
        if !is_listed_exception(word) {
            self.unlisted.push(word.to_string());
        }
        Some(())
    }
}

/// `Some(Some(()))` for a well-formed `<kind>idstring` (optionally after
/// `DocumentRef-idstring:`), `Some(None)` for one that starts so but is not well-formed, `None`
/// for a word that is not a reference of that kind.
fn user_reference(word: &str, kind: &str) -> Option<Option<()>> {
    let (document, rest) = match word.split_once(':') {
        Some((document, rest)) => (Some(document), rest),
        None => (None, word),
    };
    let is_reference = |s: &str| s.len() >= kind.len() && s[..kind.len()].eq_ignore_ascii_case(kind);
    if !is_reference(rest) {
        return (document.is_some() && word.starts_with("DocumentRef-")).then_some(None);
    }
    let document_ok = document.is_none_or(|d| {
        d.len() > "DocumentRef-".len()
            && d[.."DocumentRef-".len()].eq_ignore_ascii_case("DocumentRef-")
            && idstring(&d["DocumentRef-".len()..])
    });
    Some((document_ok && idstring(&rest[kind.len()..])).then_some(()))
}

/// Letters, digits, `.` and `-`.
fn idstring(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn check(text: &str) -> Checked {
        check_expression(text.as_bytes())
    }

    #[test]
    fn listed_expressions_in_any_case_with_exceptions_and_parentheses() {
        for text in [
            "MIT",
            "mit",
            "Apache-2.0 OR MIT",
            "(MIT OR Apache-2.0) AND BSD-3-Clause",
            "GPL-2.0-only WITH Linux-syscall-note",
            "gpl-2.0-or-later with classpath-exception-2.0",
            "((MIT))",
            "GPL-2.0+",
            "LGPL-2.1+",
            "LicenseRef-Proprietary",
            "DocumentRef-spdx-tool-1.2:LicenseRef-MIT-Style-2",
            "GPL-3.0-or-later WITH AdditionRef-our-exception",
            "MIT-Modern-Variant AND 0BSD",
        ] {
            assert_eq!(check(text), Checked::Listed, "{text}");
        }
    }

    #[test]
    fn identifiers_not_on_the_list_are_named() {
        assert_eq!(check("MITT"), Checked::Unlisted(vec!["MITT".into()]));
        assert_eq!(
            check("Apache-2 OR GPL-2.0-only WITH Nonexistent-exception"),
            Checked::Unlisted(vec!["Apache-2".into(), "Nonexistent-exception".into()])
        );
        assert_eq!(check("BSD"), Checked::Unlisted(vec!["BSD".into()]));
    }

    #[test]
    fn what_is_not_an_expression_is_malformed() {
        for text in [
            "",
            "MIT OR",
            "AND MIT",
            "(MIT OR Apache-2.0",
            "MIT)",
            "MIT Apache-2.0",
            "MIT WITH",
            "MIT WITH (Classpath-exception-2.0)",
            "MIT++",
            "+",
            "MIT/X11",
            "LicenseRef-",
            "DocumentRef-x:MIT",
            "Mit OR Apache-2.0 And 0BSD",
            "GPL-2.0-only WITH Classpath-exception-2.0+",
        ] {
            assert_eq!(check(text), Checked::Malformed, "{text:?}");
        }
        let deep = alloc::format!("{}MIT{}", "(".repeat(100), ")".repeat(100));
        assert_eq!(check(&deep), Checked::Malformed);
        assert_eq!(check_expression(b"MIT\xff"), Checked::Malformed);
    }

    fn policy(deny: &[&str], flag: &[&str]) -> LicensePolicy {
        let owned = |v: &[&str]| v.iter().map(|s| String::from(*s)).collect::<Vec<_>>();
        LicensePolicy::new(&owned(deny), &owned(flag)).unwrap()
    }

    #[test]
    fn a_license_policy_judges_choices_by_the_mildest_and_conjunctions_by_the_worst() {
        let p = policy(&["AGPL-3.0", "SSPL-1.0"], &["GPL-*", "LGPL-2.1+"]);
        let verdict = |text: &str| p.verdict(text.as_bytes());
        assert_eq!(verdict("MIT"), Verdict::Allowed);
        // An entry covers its -only, -or-later and + forms, in any case.
        for denied in ["AGPL-3.0", "agpl-3.0-only", "AGPL-3.0-or-later", "AGPL-3.0+"] {
            assert_eq!(verdict(denied), Verdict::Denied, "{denied}");
        }
        assert_eq!(verdict("AGPL-3.0-linking"), Verdict::Allowed, "not a form of AGPL-3.0");
        assert_eq!(verdict("GPL-2.0-only WITH Classpath-exception-2.0"), Verdict::Flagged);
        assert_eq!(verdict("LGPL-2.1-or-later"), Verdict::Flagged);
        // OR: the user may choose the milder; AND: all apply.
        assert_eq!(verdict("MIT OR AGPL-3.0-only"), Verdict::Allowed);
        assert_eq!(verdict("MIT AND AGPL-3.0-only"), Verdict::Denied);
        assert_eq!(verdict("(GPL-3.0-only OR SSPL-1.0) AND MIT"), Verdict::Flagged);
        assert_eq!(verdict("SSPL-1.0 OR AGPL-3.0-only"), Verdict::Denied);
        // A text rule's identifier, and what is not an expression: judged word by word.
        assert_eq!(verdict("AGPL-3.0 )"), Verdict::Denied);
        assert_eq!(LicensePolicy::default().verdict(b"AGPL-3.0"), Verdict::Allowed);
    }

    #[test]
    fn a_license_policy_entry_is_an_identifier_or_a_prefix() {
        let new = |e: &str| LicensePolicy::new(&[String::from(e)], &[]);
        for good in ["MIT", "GPL-*", "LicenseRef-ours", "GPL-2.0+"] {
            assert!(new(good).is_ok(), "{good}");
        }
        for bad in ["", "*", "MIT OR GPL", "GPL/*", "a*b*"] {
            assert!(new(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_POLICY_ENTRIES).map(|i| alloc::format!("L-{i}")).collect();
        assert!(LicensePolicy::new(&many, &[]).is_err());
    }

    #[test]
    fn the_shipped_lists_read_whole() {
        let ids = |list: &str| list.lines().filter(|l| !l.starts_with('#')).count();
        assert!(ids(LICENSES) >= 700, "{}", ids(LICENSES));
        assert!(ids(EXCEPTIONS) >= 80, "{}", ids(EXCEPTIONS));
        for line in LICENSES.lines().chain(EXCEPTIONS.lines()).filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 3, "{line}");
            assert!(fields[1] == "-" || fields[1].bytes().all(|b| b"dof".contains(&b)), "{line}");
            assert!(!fields[2].is_empty(), "{line}");
        }
        // Every listed identifier reads as a listed expression by itself.
        for id in LICENSES.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split('\t').next()) {
            assert_eq!(check(id), Checked::Listed, "{id}");
        }
        assert!(is_listed_exception("LLVM-exception") && !is_listed_license("LLVM-exception"));
    }
}
