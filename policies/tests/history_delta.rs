//! A history's file versions scanned only where they differ from their delta base (the
//! default) find exactly what scanning every version whole finds, with the built-in packs:
//! checked on a history made by the real `git` from the fixture corpus' lines (secrets, PII,
//! licence texts, a PEM key, decoys), edited at random for many commits (lines inserted,
//! deleted, replaced, duplicated, blocks moved, whole files' chunks pasted) and packed with
//! deep delta chains.

use std::path::{Path, PathBuf};
use std::process::Command;

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};

fn corpus_lines() -> (Vec<String>, Vec<Vec<String>>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
    let mut lines = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                let file: Vec<String> = text.lines().map(str::to_owned).collect();
                lines.extend(file.iter().cloned());
                files.push(file);
            }
        }
    }
    (lines, files)
}

/// A small deterministic generator (the test must be the same on every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .args(["-c", "user.name=T", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn scan(bundle: &[u8], delta_scan: bool) -> Report {
    let compiled = load_packs(DEFAULT_PACKS).unwrap();
    let mut engine = Engine::from_policy_json(compiled.as_bytes()).unwrap();
    let mut report = Report::default();
    let limits = Limits { history_delta_scan: delta_scan, ..Limits::default() };
    scan_artifact(&mut SliceSource(bundle), "h.bundle", &mut engine, &limits, &mut report).unwrap();
    report
}

#[test]
fn scanning_what_changed_finds_what_scanning_every_version_whole_finds() {
    let dir = std::env::temp_dir().join(format!("cella-history-delta-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    let (pool, files) = corpus_lines();
    let mut rng = Lcg(7);
    let names = ["app/config.txt", "app/notes.md", "LICENSE", "keys/all.txt"];
    let mut texts: Vec<Vec<String>> = (0..names.len())
        .map(|i| {
            (0..600 + 300 * i).map(|j| format!("filler line {j} of file {i}, plain words only")).collect()
        })
        .collect();
    for commit in 0..90 {
        for _ in 0..1 + rng.below(4) {
            let t = &mut texts[rng.below(names.len())];
            let at = rng.below(t.len() + 1);
            match rng.below(7) {
                0 | 1 => t.insert(at, pool[rng.below(pool.len())].clone()),
                2 if !t.is_empty() => {
                    t.remove(at.min(t.len() - 1));
                }
                3 if !t.is_empty() => {
                    let i = at.min(t.len() - 1);
                    t[i] = pool[rng.below(pool.len())].clone();
                }
                4 if !t.is_empty() => {
                    let i = at.min(t.len() - 1);
                    let line = t[i].clone();
                    t.insert(i, line);
                }
                5 if t.len() > 10 => {
                    // Move a block elsewhere.
                    let start = rng.below(t.len() - 5);
                    let block: Vec<String> = t.drain(start..start + 5).collect();
                    let to = rng.below(t.len() + 1);
                    for (k, line) in block.into_iter().enumerate() {
                        t.insert(to + k, line);
                    }
                }
                _ => {
                    // Paste a chunk of a corpus file (a PEM key, a licence text, a CSV).
                    let file = &files[rng.below(files.len())];
                    let from = rng.below(file.len());
                    let len = 1 + rng.below(40);
                    for (k, line) in file.iter().skip(from).take(len).enumerate() {
                        t.insert(at + k, line.clone());
                    }
                }
            }
        }
        for (name, text) in names.iter().zip(&texts) {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text.join("\n") + "\n").unwrap();
        }
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-qm", &format!("commit {commit}")]);
    }
    git(&dir, &["repack", "-adf", "-q", "--depth=50", "--window=50"]);
    let bundle_path = dir.join("h.bundle");
    git(&dir, &["bundle", "create", "-q", bundle_path.to_str().unwrap(), "--all"]);
    let bundle = std::fs::read(&bundle_path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let delta = scan(&bundle, true);
    let whole = scan(&bundle, false);
    let history = delta.history.clone().unwrap();
    assert!(history.blobs_scanned_in_part * 4 > history.blobs_scanned, "{history:?}");
    assert!(delta.bytes_scanned < whole.bytes_scanned, "{} vs {}", delta.bytes_scanned, whole.bytes_scanned);
    assert!(whole.findings.len() > 20, "the history holds findings of every kind: {}", whole.findings.len());
    let kinds: std::collections::BTreeSet<&str> = whole.findings.iter().map(|f| f.rule_id.as_str()).collect();
    assert!(kinds.contains("private-key-pem"), "{kinds:?}");
    assert_eq!(delta.findings.len(), whole.findings.len());
    let show = |r: &Report| -> Vec<String> {
        let mut v: Vec<String> = r
            .findings
            .iter()
            .map(|f| {
                let h = f.history.as_ref().unwrap();
                format!(
                    "{}:{}:{}:{} {} {} {}",
                    f.path, f.line, f.column, f.rule_id, h.subject, f.location_fingerprint, f.line_hash
                )
            })
            .collect();
        v.sort();
        v
    };
    let (d, w) = (show(&delta), show(&whole));
    for line in d.iter().filter(|l| !w.contains(l)) {
        eprintln!("only in the delta scan: {line}");
    }
    for line in w.iter().filter(|l| !d.contains(l)) {
        eprintln!("only in the whole scan: {line}");
    }
    assert_eq!(d, w);
    assert_eq!(delta.findings, whole.findings);
}
