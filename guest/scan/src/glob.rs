//! Path globs, gitignore-like, turned into the regexes the engine matches paths with. One
//! function serves a job's excludes (`cella-vmm scan --exclude`) and a rule pack's `exclude`
//! list (compiled into its rules' path allowlist), so both read globs the same way.
//!
//! Paths are the ones findings are reported under: `/`-separated, relative to the artifact's
//! root (`src/app.rs`; an entry of a nested archive is `lib.zip!/inner/file`, and its archive
//! `lib.zip` is matched first, see [`crate::Engine::set_excludes`]). A glob:
//!
//! - `*` matches any bytes but `/`, `?` one byte but `/`, `[abc]`, `[a-z]`, `[!abc]` (or
//!   `[^abc]`) one byte of (not of) a set, never `/`; `\x` is `x` itself;
//! - `**` as a whole component matches any number of folders: `**/test` (anywhere),
//!   `docs/**` (everything in `docs`), `a/**/b`;
//! - with no `/` but a trailing one it matches at any depth (`*.min.js`, `node_modules/`); a
//!   leading `/` or a `/` in the middle anchors it at the root (`/build`, `docs/*.md`);
//! - a glob that names a folder covers everything in it (`vendor` matches `vendor/x/y.c`); a
//!   trailing `/` matches folders only (`build/` matches `build/a.o` but not a file `build`);
//! - negation (`!pattern`) is not supported: list only what to exclude.

use alloc::string::String;
use core::fmt;

/// Why a glob was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GlobError {
    /// Nothing to match (empty, or only `/`).
    Empty,
    /// A leading `!`: gitignore's negation, which excludes cannot express.
    Negation { glob: String },
    /// A `[` without its `]`.
    UnclosedClass { glob: String },
    /// A `\` at the very end, escaping nothing.
    TrailingBackslash { glob: String },
    /// A byte set (`[...]`) holding a non-ASCII character: sets match single bytes.
    NonAsciiClass { glob: String },
}

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobError::Empty => write!(f, "an exclude glob is empty: give a path pattern such as `vendor/` or `*.min.js`"),
            GlobError::Negation { glob } => write!(
                f,
                "exclude glob `{glob}` starts with `!`: negation is not supported, list only what to exclude (write `\\!` for a literal `!`)"
            ),
            GlobError::UnclosedClass { glob } => {
                write!(f, "exclude glob `{glob}` opens a `[` set it never closes: add the `]` (or write `\\[`)")
            }
            GlobError::TrailingBackslash { glob } => {
                write!(f, "exclude glob `{glob}` ends with a `\\` that escapes nothing: remove it")
            }
            GlobError::NonAsciiClass { glob } => write!(
                f,
                "exclude glob `{glob}` has a non-ASCII character in a `[...]` set, which matches single bytes: use `?` or spell the name out"
            ),
        }
    }
}

impl core::error::Error for GlobError {}

/// The regex (regex-automata syntax, matched over the path's bytes with Unicode off, as the
/// engine's path allowlists are) that matches exactly the paths `glob` covers.
pub fn glob_to_regex(glob: &str) -> Result<String, GlobError> {
    if glob.starts_with('!') {
        return Err(GlobError::Negation { glob: String::from(glob) });
    }
    // Trailing slashes: folders only. Leading slash: anchored at the root.
    let trimmed_end = glob.trim_end_matches('/');
    let folder_only = trimmed_end.len() != glob.len();
    let body = trimmed_end.trim_start_matches('/');
    let leading_slash = body.len() != trimmed_end.len();
    let components: alloc::vec::Vec<&str> = body.split('/').filter(|c| !c.is_empty()).collect();
    if components.is_empty() {
        return Err(GlobError::Empty);
    }
    let anchored = leading_slash || components.len() > 1;
    let mut re = String::from("(?s)^");
    if !anchored {
        re.push_str("(?:.*/)?");
    }
    let n = components.len();
    for (i, c) in components.iter().enumerate() {
        if *c == "**" {
            re.push_str(match (i == 0, i == n - 1) {
                (true, true) => ".*",
                (true, false) => "(?:.*/)?",
                (false, true) => "/.*",
                (false, false) => "/(?:.*/)?",
            });
            continue;
        }
        if i > 0 && components[i - 1] != "**" {
            re.push('/');
        }
        component(c, glob, &mut re)?;
    }
    re.push_str(if folder_only { "/.*$" } else { "(?:/.*)?$" });
    Ok(re)
}

/// Appends one path component's regex (no `/` in it).
fn component(c: &str, glob: &str, re: &mut String) -> Result<(), GlobError> {
    let b = c.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'*' => {
                while i + 1 < b.len() && b[i + 1] == b'*' {
                    i += 1;
                }
                re.push_str("[^/]*");
            }
            b'?' => re.push_str("[^/]"),
            b'[' => i = class(b, i, glob, re)?,
            b'\\' => {
                i += 1;
                if i >= b.len() {
                    return Err(GlobError::TrailingBackslash { glob: String::from(glob) });
                }
                literal(b[i], re);
            }
            other => literal(other, re),
        }
        i += 1;
    }
    Ok(())
}

/// Appends the byte set opening at `b[open]` (`[`); returns the index of its closing `]`.
fn class(b: &[u8], open: usize, glob: &str, re: &mut String) -> Result<usize, GlobError> {
    let unclosed = || GlobError::UnclosedClass { glob: String::from(glob) };
    let mut i = open + 1;
    let negated = matches!(b.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    re.push('[');
    if negated {
        // A negated set still never matches the separator.
        re.push_str("^/");
    }
    let mut first = true;
    loop {
        let Some(&c) = b.get(i) else { return Err(unclosed()) };
        if c == b']' && !first {
            re.push(']');
            return Ok(i);
        }
        first = false;
        let c = if c == b'\\' {
            i += 1;
            *b.get(i).ok_or_else(unclosed)?
        } else {
            c
        };
        if !c.is_ascii() {
            return Err(GlobError::NonAsciiClass { glob: String::from(glob) });
        }
        class_byte(c, re);
        // A range `c-d` (a `-` before the closing `]` is itself).
        if b.get(i + 1) == Some(&b'-') && b.get(i + 2).is_some_and(|&d| d != b']') {
            let mut d = b[i + 2];
            i += 2;
            if d == b'\\' {
                i += 1;
                d = *b.get(i).ok_or_else(unclosed)?;
            }
            if !d.is_ascii() {
                return Err(GlobError::NonAsciiClass { glob: String::from(glob) });
            }
            re.push('-');
            class_byte(d, re);
        }
        i += 1;
    }
}

/// A byte matched as itself: letters and digits as they are, anything else as `\xHH` (which
/// with Unicode off is that byte, so non-ASCII names match their UTF-8 bytes).
fn literal(byte: u8, re: &mut String) {
    if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'/' {
        re.push(byte as char);
    } else {
        hex_escape(byte, re);
    }
}

fn class_byte(byte: u8, re: &mut String) {
    if byte.is_ascii_alphanumeric() {
        re.push(byte as char);
    } else {
        hex_escape(byte, re);
    }
}

fn hex_escape(byte: u8, re: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    re.push_str("\\x");
    re.push(HEX[usize::from(byte >> 4)] as char);
    re.push(HEX[usize::from(byte & 15)] as char);
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex_automata::meta::Regex;
    use regex_automata::util::syntax;

    fn matcher(glob: &str) -> Regex {
        let re = glob_to_regex(glob).unwrap();
        Regex::builder()
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .build(&re)
            .unwrap_or_else(|e| panic!("{glob} -> {re}: {e}"))
    }

    #[track_caller]
    fn check(glob: &str, yes: &[&str], no: &[&str]) {
        let m = matcher(glob);
        for p in yes {
            assert!(m.is_match(p.as_bytes()), "`{glob}` should match `{p}`");
        }
        for p in no {
            assert!(!m.is_match(p.as_bytes()), "`{glob}` should not match `{p}`");
        }
    }

    #[test]
    fn a_name_without_slash_matches_at_any_depth_and_covers_a_folder() {
        check("*.min.js", &["a.min.js", "x/y/a.min.js"], &["a.min.jsx", "a/min.js", "amin.js"]);
        check("vendor", &["vendor", "vendor/x/y.c", "src/vendor/z"], &["vendors/x", "my-vendor"]);
    }

    #[test]
    fn a_leading_or_middle_slash_anchors_at_the_root() {
        check("/build", &["build", "build/out.o"], &["src/build", "src/build/x", "builds"]);
        check("docs/*.md", &["docs/a.md", "docs/a.md/x"], &["x/docs/a.md", "docs/sub/a.md", "docs/a.mdx"]);
        check("/test/", &["test/x", "test/a/b"], &["test", "src/test/x"]);
    }

    #[test]
    fn a_trailing_slash_matches_folders_only() {
        check("build/", &["build/x", "src/build/x/y"], &["build", "src/build", "buildx/y"]);
        check("node_modules/", &["node_modules/a/b.js", "web/node_modules/a"], &["node_modules"]);
    }

    #[test]
    fn double_star_spans_folders() {
        check("**/test/**", &["test/a", "a/b/test/c/d"], &["test", "a/test", "atest/x"]);
        check("a/**/b", &["a/b", "a/x/b", "a/x/y/b", "a/x/b/c"], &["ab", "x/a/b", "a/xb"]);
        check("docs/**", &["docs/a", "docs/a/b"], &["docs", "x/docs/a"]);
        check("**", &["a", "a/b"], &[]);
        check("**/*.pem", &["k.pem", "a/b/k.pem"], &["k.pem.txt"]);
    }

    #[test]
    fn question_mark_and_sets_match_one_byte_never_a_slash() {
        check("file?.txt", &["file1.txt", "d/fileA.txt"], &["file.txt", "file12.txt", "file/.txt"]);
        check("[abc].txt", &["a.txt", "c.txt"], &["d.txt", "ab.txt"]);
        check("[!abc].txt", &["d.txt"], &["a.txt", "/.txt"]);
        check("[^abc].txt", &["d.txt"], &["b.txt"]);
        check("v[0-9].*", &["v1.zip", "v9.x"], &["va.zip", "v10.x"]);
        check("[]x].c", &["].c", "x.c"], &["y.c"]);
        check("a[-z]", &["a-", "az"], &["ab"]);
    }

    #[test]
    fn escapes_and_special_bytes_are_literal() {
        check("\\*.txt", &["*.txt", "d/*.txt"], &["a.txt"]);
        check("\\!important", &["!important"], &["important"]);
        check("a+b (1).c", &["a+b (1).c"], &["aab (1).c", "a+b 1.c"]);
        check("ünï.txt", &["ünï.txt", "d/ünï.txt"], &["uni.txt"]);
        check("a.b$c^d|e", &["a.b$c^d|e"], &["axb$c^d|e"]);
    }

    #[test]
    fn refuses_what_it_cannot_mean() {
        assert_eq!(glob_to_regex(""), Err(GlobError::Empty));
        assert_eq!(glob_to_regex("/"), Err(GlobError::Empty));
        assert_eq!(glob_to_regex("//"), Err(GlobError::Empty));
        assert_eq!(glob_to_regex("!keep.txt"), Err(GlobError::Negation { glob: "!keep.txt".into() }));
        assert_eq!(glob_to_regex("a[bc"), Err(GlobError::UnclosedClass { glob: "a[bc".into() }));
        assert_eq!(glob_to_regex("a\\"), Err(GlobError::TrailingBackslash { glob: "a\\".into() }));
        assert_eq!(glob_to_regex("[é]"), Err(GlobError::NonAsciiClass { glob: "[é]".into() }));
        let message = alloc::format!("{}", GlobError::Negation { glob: "!x".into() });
        assert!(message.contains("negation is not supported"), "{message}");
    }
}
