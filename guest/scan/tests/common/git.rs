//! Scratch git repositories made with the real `git`, for history tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch repository, removed when dropped.
pub struct Repo {
    pub dir: PathBuf,
    /// Seconds added to each commit's date, so commits are ordered.
    pub clock: u64,
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Repo {
    pub fn new(name: &str) -> Repo {
        let dir = std::env::temp_dir().join(format!("cella-git-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let repo = Repo { dir, clock: 0 };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn git(&self, args: &[&str]) -> String {
        git_in(&self.dir, args, self.clock)
    }

    pub fn write(&self, path: &str, text: &str) {
        let file = self.dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }

    /// Commits everything; returns the commit's id.
    pub fn commit(&mut self, subject: &str) -> String {
        self.clock += 60;
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", subject]);
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    pub fn bundle(&self, refs: &[&str]) -> Vec<u8> {
        let out =
            self.dir.join("../").join(format!("{}.bundle", self.dir.file_name().unwrap().to_string_lossy()));
        let mut args = vec!["bundle", "create", "-q", out.to_str().unwrap()];
        args.extend_from_slice(refs);
        self.git(&args);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }
}

pub fn git_in(dir: &Path, args: &[&str], clock: u64) -> String {
    let date = format!("{} +0100", 1_700_000_000 + clock);
    let out = Command::new("git")
        .args(["-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", "-c", "core.autocrlf=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada Example")
        .env("GIT_AUTHOR_EMAIL", "ada@example.org")
        .env("GIT_COMMITTER_NAME", "Ada Example")
        .env("GIT_COMMITTER_EMAIL", "ada@example.org")
        .env("GIT_AUTHOR_DATE", &date)
        .env("GIT_COMMITTER_DATE", &date)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
