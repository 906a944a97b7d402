//! Which files of a folder `cella scan DIR` sends: everything but what git would not track
//! (`.gitignore` files at every level, `.git/info/exclude`) and what `.cellaignore` files name
//! (same syntax), and never `.git/` itself (history scanning is its own feature). Patterns are
//! gitignore's: `#` comments, `!` re-includes, a trailing `/` matches folders only, a `/` at the
//! start or in the middle anchors a pattern to its file's folder, `*`, `?`, `[...]`, `**`. As in
//! git, a file inside an ignored folder cannot be re-included (the folder is not entered).

use std::path::{Path, PathBuf};

use regex_automata::meta::Regex;

/// One pattern of an ignore file.
#[derive(Debug)]
struct Rule {
    negate: bool,
    re: Regex,
}

/// The rules of one ignore file, for the paths under its folder (`base`: relative, `""` or
/// `dir/`).
#[derive(Debug)]
struct RuleSet {
    base: String,
    rules: Vec<Rule>,
}

/// What to leave out of a folder, and what was left out.
#[derive(Debug, Default)]
pub struct Walk {
    /// Files (and symbolic links) to send: (path on disk, path in the archive).
    pub files: Vec<(PathBuf, String)>,
    /// Folders to send (their entries, so empty folders and modes survive).
    pub dirs: Vec<(PathBuf, String)>,
    /// What was left out: (path in the archive, why).
    pub skipped: Vec<(String, &'static str)>,
    /// Ignore-file lines that could not be read as patterns: (file, line, why).
    pub bad_patterns: Vec<(String, usize, String)>,
}

/// Why a path the ignore files name was left out.
pub const IGNORED: &str = "ignored";

/// The ignore files read in each folder, in this order (later ones win on the same path).
const IGNORE_FILES: [&str; 2] = [".gitignore", ".cellaignore"];

/// Walks `root`, leaving out `.git/` and, unless `no_ignore`, what the ignore files name.
pub fn walk(root: &Path, no_ignore: bool) -> std::io::Result<Walk> {
    let mut out = Walk::default();
    let mut sets: Vec<RuleSet> = Vec::new();
    if !no_ignore {
        let exclude = root.join(".git/info/exclude");
        if let Ok(text) = std::fs::read_to_string(&exclude) {
            sets.push(parse(&text, "", ".git/info/exclude", &mut out.bad_patterns));
        }
    }
    descend(root, "", no_ignore, &mut sets, &mut out)?;
    out.files.sort_by(|a, b| a.1.cmp(&b.1));
    out.dirs.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

fn descend(
    dir: &Path,
    rel: &str,
    no_ignore: bool,
    sets: &mut Vec<RuleSet>,
    out: &mut Walk,
) -> std::io::Result<()> {
    let pushed_before = sets.len();
    if !no_ignore {
        for name in IGNORE_FILES {
            if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
                sets.push(parse(&text, rel, &format!("{rel}{name}"), &mut out.bad_patterns));
            }
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let child = format!("{rel}{name}");
        let kind = entry.file_type()?;
        if name == ".git" {
            out.skipped.push((child, "git's own data (history is not scanned as files)"));
            continue;
        }
        if kind.is_dir() {
            if ignored(sets, &format!("{child}/")) {
                out.skipped.push((format!("{child}/"), IGNORED));
                continue;
            }
            out.dirs.push((path.clone(), child.clone()));
            descend(&path, &format!("{child}/"), no_ignore, sets, out)?;
        } else if kind.is_file() || kind.is_symlink() {
            if ignored(sets, &child) {
                out.skipped.push((child, IGNORED));
                continue;
            }
            out.files.push((path, child));
        } else {
            out.skipped.push((child, "not a file, folder or link (a socket, a FIFO or a device)"));
        }
    }
    sets.truncate(pushed_before);
    Ok(())
}

/// Whether `path` (relative; a folder's ends with `/`) is ignored: the last pattern that
/// matches it decides, a `!` one re-including it.
fn ignored(sets: &[RuleSet], path: &str) -> bool {
    let mut verdict = false;
    for set in sets {
        let Some(rel) = path.strip_prefix(set.base.as_str()) else { continue };
        for rule in &set.rules {
            if rule.re.is_match(rel) {
                verdict = !rule.negate;
            }
        }
    }
    verdict
}

/// The patterns of one ignore file; lines that are not patterns Cella reads are reported.
fn parse(text: &str, base: &str, file: &str, bad: &mut Vec<(String, usize, String)>) -> RuleSet {
    let mut rules = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = trim_trailing_spaces(raw);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, pattern) = match line.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        // `\#` and `\!` at the start stand for themselves.
        let pattern = pattern.strip_prefix('\\').filter(|p| p.starts_with(['#', '!'])).unwrap_or(pattern);
        let compiled = cella_scan::glob_to_regex(pattern)
            .map_err(|e| e.to_string())
            .and_then(|re| Regex::new(&re).map_err(|e| e.to_string()));
        match compiled {
            Ok(re) => rules.push(Rule { negate, re }),
            Err(why) => bad.push((file.to_owned(), n + 1, why)),
        }
    }
    RuleSet { base: base.to_owned(), rules }
}

/// Trailing spaces are not part of a pattern unless escaped with `\`.
fn trim_trailing_spaces(line: &str) -> &str {
    let mut end = line.len();
    while end > 0 && line.as_bytes()[end - 1] == b' ' {
        if end >= 2 && line.as_bytes()[end - 2] == b'\\' {
            break;
        }
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("cella-ignore-{}", crate::ids::new_id("t")));
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    fn sent(root: &Path, no_ignore: bool) -> Vec<String> {
        walk(root, no_ignore).unwrap().files.into_iter().map(|(_, rel)| rel).collect()
    }

    #[test]
    fn gitignore_cellaignore_and_info_exclude_are_honoured_with_negation_and_nesting() {
        let root = tree(&[
            (".gitignore", "# build output\ntarget/\n*.log\n!keep.log\n/only-at-root.txt\n"),
            (".git/HEAD", "ref: refs/heads/main\n"),
            (".git/info/exclude", "secret-notes.md\n"),
            (".cellaignore", "fixtures/big/\n"),
            ("src/main.rs", "fn main() {}\n"),
            ("src/debug.log", "x"),
            ("src/keep.log", "kept by !keep.log"),
            ("src/only-at-root.txt", "not at the root: sent"),
            ("only-at-root.txt", "ignored"),
            ("target/debug/app", "binary"),
            ("secret-notes.md", "local"),
            ("fixtures/big/blob.bin", "x"),
            ("fixtures/small.txt", "y"),
            ("lib/.gitignore", "generated.rs\n!important.log\n"),
            ("lib/generated.rs", "ignored by lib/.gitignore"),
            ("lib/important.log", "re-included below"),
            ("lib/a.rs", "kept"),
        ]);
        assert_eq!(
            sent(&root, false),
            [
                ".cellaignore",
                ".gitignore",
                "fixtures/small.txt",
                "lib/.gitignore",
                "lib/a.rs",
                "lib/important.log",
                "src/keep.log",
                "src/main.rs",
                "src/only-at-root.txt",
            ]
        );
        let w = walk(&root, false).unwrap();
        let skipped: Vec<&str> = w.skipped.iter().map(|(p, _)| p.as_str()).collect();
        assert!(
            skipped.contains(&".git") && skipped.contains(&"target/") && skipped.contains(&"secret-notes.md")
        );
        // --no-ignore sends everything but .git/.
        let all = sent(&root, true);
        assert!(all.contains(&"target/debug/app".to_owned()) && !all.iter().any(|p| p.starts_with(".git/")));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_file_in_an_ignored_folder_cannot_be_re_included_and_bad_lines_are_reported() {
        let root = tree(&[
            (".gitignore", "build/\n!build/keep.txt\n[unclosed\n"),
            ("build/keep.txt", "x"),
            ("a", "y"),
        ]);
        let w = walk(&root, false).unwrap();
        assert_eq!(w.files.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>(), [".gitignore", "a"]);
        assert_eq!(w.bad_patterns.len(), 1);
        assert_eq!((w.bad_patterns[0].0.as_str(), w.bad_patterns[0].1), (".gitignore", 3));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn trailing_spaces_are_trimmed_unless_escaped() {
        assert_eq!(trim_trailing_spaces("a.txt   "), "a.txt");
        assert_eq!(trim_trailing_spaces("a\\ "), "a\\ ");
    }
}
