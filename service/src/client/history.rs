//! The git history `cella scan DIR` sends with a work tree: a bundle made by `git` (the client
//! never parses it; the scanner reads it in the VM), packed first in the tar at
//! [`cella_scan::HISTORY_ENTRY`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use super::scan::tempfile_path::TempPath;
use super::ClientError;

/// Which history to send (`--history`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// The work tree only.
    None,
    /// Every branch and tag.
    All,
    /// The commits of every branch and tag that REV does not already hold (for CI: what is new).
    Since(String),
    /// One branch (or any revision) and its ancestors.
    Branch(String),
}

impl FromStr for History {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rev = |r: &str, what: &str| -> Result<String, String> {
            if r.is_empty() || r.starts_with('-') || r.contains(char::is_whitespace) {
                return Err(format!("{what} needs a revision (not empty, no spaces, not starting with `-`)"));
            }
            Ok(r.to_owned())
        };
        match s {
            "none" => Ok(History::None),
            "all" => Ok(History::All),
            _ => match s.split_once('=') {
                Some(("since", r)) => rev(r, "since=").map(History::Since),
                Some(("branch", r)) => rev(r, "branch=").map(History::Branch),
                _ => Err(format!("`{s}` is not one of none, all, since=REV, branch=NAME")),
            },
        }
    }
}

/// The exclude glob for exactly the tree path `path` (a folder's ends with `/`), anchored at
/// the root, its glob characters escaped; `None` if an exclude cannot name it (a comma).
pub fn anchored_glob(path: &str) -> Option<String> {
    if path.contains(',') {
        return None;
    }
    let mut glob = String::from("/");
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            glob.push('\\');
        }
        glob.push(c);
    }
    Some(glob)
}

/// A history bundle written to a temporary file (removed when dropped).
#[derive(Debug)]
pub struct Bundle {
    pub file: TempPath,
    pub commits: u64,
}

fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("git could not be run: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("git failed")
            .trim()
            .to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The root of the work tree `dir` is, if `dir` is one (not a folder inside one).
fn work_tree_root(dir: &Path) -> Option<PathBuf> {
    let root = git(dir, &["rev-parse", "--show-toplevel"]).ok()?;
    let root = std::fs::canonicalize(root).ok()?;
    (std::fs::canonicalize(dir).ok()? == root).then_some(root)
}

/// The bundle of the bare repository `dir` (what `history` asks for), or `None` if `dir` is
/// not a bare repository.
pub fn bare_bundle(dir: &Path, history: &History) -> Result<Option<Bundle>, ClientError> {
    if git(dir, &["rev-parse", "--is-bare-repository"]).as_deref() != Ok("true") {
        return Ok(None);
    }
    let root = std::fs::canonicalize(dir).map_err(|e| ClientError::Read(dir.to_owned(), e))?;
    // `git -C` into a bare repository found by walking up would be another repository's.
    let git_dir =
        git(&root, &["rev-parse", "--absolute-git-dir"]).ok().and_then(|d| std::fs::canonicalize(d).ok());
    if git_dir.as_deref() != Some(root.as_path()) {
        return Ok(None);
    }
    make(&root, history, "bare")
}

/// Makes the bundle of `dir`'s history that `history` asks for. `Ok(None)` when there is
/// nothing to send (not a git work tree, `--history none`, no commits), said on stderr; an
/// explicit `since=`/`branch=` that git refuses is an error, and so is a failure of the
/// default (`all`) in a work tree.
pub fn bundle(dir: &Path, history: &History, tag: &str) -> Result<Option<Bundle>, ClientError> {
    if *history == History::None {
        return Ok(None);
    }
    let Some(root) = work_tree_root(dir) else {
        if git(dir, &["rev-parse", "--is-inside-work-tree"]).as_deref() == Ok("true") {
            eprintln!(
                "cella scan: {} is inside a git work tree but not its root: its history is not sent (scan the root to include it)",
                dir.display()
            );
        }
        return Ok(None);
    };
    make(&root, history, tag)
}

/// The bundle of the repository at `root` (a work tree's root or a bare repository).
fn make(root: &Path, history: &History, tag: &str) -> Result<Option<Bundle>, ClientError> {
    let revs: Vec<String> = match history {
        History::None => unreachable!("handled above"),
        History::All => vec!["--all".into()],
        History::Since(rev) => vec!["--all".into(), format!("^{rev}")],
        History::Branch(name) => vec![name.clone()],
    };
    let usage = |why: String| ClientError::Usage(format!("--history: {why}"));
    if git(root, &["rev-parse", "--verify", "-q", "HEAD"]).is_err() && *history == History::All {
        eprintln!("cella scan: the repository has no commits yet: no history to send");
        return Ok(None);
    }
    let rev_args: Vec<&str> = revs.iter().map(String::as_str).collect();
    let mut count_args = vec!["rev-list", "--count"];
    count_args.extend(&rev_args);
    let commits: u64 = git(root, &count_args).map_err(usage)?.parse().unwrap_or(0);
    if commits == 0 {
        eprintln!("cella scan: no commits in the history asked for (--history): none sent");
        return Ok(None);
    }
    let file = TempPath::new(&format!("cella-history-{}-{tag}.bundle", std::process::id()));
    let path =
        file.path().to_str().ok_or_else(|| usage("the temporary folder's path is not UTF-8".into()))?;
    match history {
        History::Since(rev) => since_bundle(root, rev, file.path())
            .map_err(|e| usage(format!("making the history bundle: {e}")))?,
        _ => {
            let mut args = vec!["bundle", "create", "-q", path];
            args.extend(&rev_args);
            git(root, &args).map_err(|e| usage(format!("git bundle create failed: {e}")))?;
        }
    }
    Ok(Some(Bundle { file, commits }))
}

/// Writes the bundle of every reference's commits that `rev` does not hold. Not `git bundle
/// create --all ^REV`: that writes a thin pack, whose new trees are deltas against trees of
/// the commits before REV, which the bundle lacks; this pack holds each new object whole or
/// as a delta of another new one, so every new commit's files can be read.
fn since_bundle(root: &Path, rev: &str, out: &Path) -> Result<(), String> {
    use std::io::Write;
    let base = git(root, &["rev-parse", "--verify", "-q", &format!("{rev}^{{commit}}")])
        .map_err(|_| format!("`{rev}` is not a commit of this repository"))?;
    let refs = git(root, &["for-each-ref", "--format=%(objectname) %(refname)"])?;
    let mut header = String::from("# v2 git bundle\n");
    for line in git(root, &["rev-list", "--boundary", "--all", &format!("^{base}")])?.lines() {
        if let Some(oid) = line.strip_prefix('-') {
            header.push_str(&format!("-{oid}\n"));
        }
    }
    for line in refs.lines().filter(|l| !l.trim().is_empty()) {
        header.push_str(line);
        header.push('\n');
    }
    if let Ok(head) = git(root, &["rev-parse", "--verify", "-q", "HEAD"]) {
        header.push_str(&format!("{head} HEAD\n"));
    }
    header.push('\n');
    let mut file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    file.write_all(header.as_bytes()).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut tips = git(root, &["rev-parse", "--all"])?;
    tips.push_str(&format!("\n^{base}\n"));
    let mut child = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["pack-objects", "--stdout", "--revs", "--delta-base-offset", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("git could not be run: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("git pack-objects has no input")?;
    stdin.write_all(tips.as_bytes()).map_err(|e| format!("git pack-objects: {e}"))?;
    drop(stdin);
    let done = child.wait_with_output().map_err(|e| format!("git pack-objects: {e}"))?;
    if !done.status.success() {
        return Err(format!("git pack-objects failed: {}", String::from_utf8_lossy(&done.stderr).trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_choices_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("all".parse::<History>(), Ok(History::All));
        assert_eq!("none".parse::<History>(), Ok(History::None));
        assert_eq!("since=v1.2".parse::<History>(), Ok(History::Since("v1.2".into())));
        assert_eq!("branch=main".parse::<History>(), Ok(History::Branch("main".into())));
        assert!("since=".parse::<History>().unwrap_err().contains("needs a revision"));
        assert!("since=--all".parse::<History>().is_err());
        assert!("everything".parse::<History>().unwrap_err().contains("none, all, since=REV, branch=NAME"));
    }

    #[test]
    fn ignored_paths_become_anchored_escaped_globs() {
        assert_eq!(anchored_glob("fixtures/").as_deref(), Some("/fixtures/"));
        assert_eq!(anchored_glob("a[1]*.log").as_deref(), Some("/a\\[1\\]\\*.log"));
        assert_eq!(anchored_glob("a,b"), None);
        let glob = anchored_glob("odd [x].txt").unwrap();
        let regex = cella_scan::glob_to_regex(&glob).unwrap();
        let re = regex_automata::meta::Regex::new(&regex).unwrap();
        assert!(re.is_match("odd [x].txt") && !re.is_match("odd x.txt") && !re.is_match("sub/odd [x].txt"));
    }
}
