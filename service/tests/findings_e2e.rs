//! Findings management end to end: `cella serve` and the `cella` command line as real
//! processes, real (jailed, as root) microVMs, a git repository made by the test. One scan
//! shows every way to silence a finding (the inline markers, Cella's and the peers'; `--exclude`;
//! `.gitignore` with negation and a nested file, `.git/info/exclude`, `.cellaignore`), that
//! `.git/` never goes as files, and that a token inside a binary file is found; its SARIF log
//! passes the OASIS schema and GitHub's upload rules for a folder, a single file and `.`; every
//! output format is read back by a real parser. A baseline made with `cella baseline create`
//! silences what it holds, kept as a file or in the service, and only new findings fail the gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use cella_e2e::git;
use common::{cella, cella_in, test_db_url, Scratch, Serve, Server};
use sarif_checks::checked_sarif;

const ORIGIN: &str = "https://git.example.org/acme/ledger.git";

/// A Stripe-shaped live key, different for each `n` (made up: none of these is real).
fn stripe_key(n: u32) -> String {
    const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut state = 0x9e37_79b9_u32.wrapping_mul(n + 1);
    let tail: String = (0..24)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ALNUM[(state >> 24) as usize % ALNUM.len()] as char
        })
        .collect();
    format!("sk_live_{tail}")
}

/// `cella serve` with a short lease and drain, jailed as root (the common harness); its log in
/// `serve.log` next to the data folder, as JSON lines.
fn serve(data: &Path, db: &str) -> Server {
    let jailed = if common::is_root() { "1" } else { "0" };
    Serve::new(data)
        .db(Some(db))
        .envs(&[("CELLA_JAILED", jailed), ("CELLA_LEASE_SECS", "2"), ("CELLA_DRAIN_SECS", "1")])
        .arg("--log-format")
        .arg("json")
        .log_to(&data.with_file_name("serve.log"))
        .start()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tenant(data: &Path, name: &str) -> String {
    let o = cella(data, None, &["tenant", "create", name]);
    assert!(o.status.success(), "{}", err(&o));
    out(&o).lines().find_map(|l| l.strip_prefix("API key ")).unwrap().trim().to_owned()
}

fn write(root: &Path, path: &str, bytes: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// What a path of the fixture repository holds and how the scan must treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Reported, not suppressed.
    Found,
    /// Reported, suppressed in the source by this marker.
    Marked(&'static str),
    /// Never reaches the scan (ignore files, `.git/`) or left out by `--exclude`.
    Absent,
}

/// The fixture repository: a git work tree with an `origin`, one commit, a key in every file
/// below; returns the paths and what each must give. `.git/` itself holds a key too.
fn fixture_repo(root: &Path) -> (BTreeMap<&'static str, Expect>, String) {
    use Expect::*;
    let mut expect = BTreeMap::new();
    let mut n = 0;
    let mut key = || {
        n += 1;
        stripe_key(n)
    };
    let mut text = |path: &'static str, line: String, e: Expect| {
        write(root, path, format!("# {path}\n{line}\n").as_bytes());
        expect.insert(path, e);
    };
    text("config/live.env", format!("STRIPE_KEY={}", key()), Found);
    text(
        "config/allowed.env",
        format!("STRIPE_KEY={}  # cella:allow rotated, kept for a test", key()),
        Marked("cella:allow"),
    );
    text("legacy/billing.py", format!("KEY = \"{}\"  # gitleaks:allow", key()), Marked("gitleaks:allow"));
    text("legacy/billing.rb", format!("KEY = '{}' # kingfisher:ignore", key()), Marked("kingfisher:ignore"));
    text(
        "legacy/billing.yaml",
        format!("key: {}  # pragma: allowlist secret", key()),
        Marked("pragma: allowlist secret"),
    );
    // `--exclude vendor/**`
    text("vendor/lib.js", format!("const k = '{}';", key()), Absent);
    // .gitignore: `build/`, `*.log`, `!keep.log`; sub/.gitignore: `local.env`
    text("build/out.env", format!("K={}", key()), Absent);
    text("debug.log", format!("K={}", key()), Absent);
    text("keep.log", format!("K={}", key()), Found);
    text("sub/local.env", format!("K={}", key()), Absent);
    text("sub/app.env", format!("K={}", key()), Found);
    // .cellaignore: `fixtures/`; .git/info/exclude: `notes.txt`
    text("fixtures/sample.env", format!("K={}", key()), Absent);
    text("notes.txt", format!("K={}", key()), Absent);
    write(root, ".gitignore", b"build/\n*.log\n!keep.log\n");
    write(root, "sub/.gitignore", b"local.env\n");
    write(root, ".cellaignore", b"fixtures/\n");
    // A binary file with a key as ASCII and one as UTF-16LE, and a card number (binary files
    // are scanned for secrets only).
    let mut blob = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00".to_vec();
    blob.extend_from_slice(&[0u8; 300]);
    blob.extend_from_slice(key().as_bytes());
    blob.extend_from_slice(&[0u8; 40]);
    blob.extend(key().encode_utf16().flat_map(u16::to_le_bytes));
    blob.extend_from_slice(b"\x00\x00card 4111 1111 1111 1111\x00\x01\x02");
    write(root, "bin/blob.bin", &blob);
    expect.insert("bin/blob.bin", Found);
    git(root, &["init", "-q", "-b", "trunk"]);
    git(root, &["remote", "add", "origin", ORIGIN]);
    git(root, &["add", "-A"]);
    git(root, &["commit", "-qm", "fixture"]);
    let head = git(root, &["rev-parse", "HEAD"]);
    write(root, ".git/info/exclude", b"notes.txt\n");
    write(root, ".git/stray-credentials", format!("K={}\n", key()).as_bytes());
    (expect, head)
}

fn uris(log: &Value) -> Vec<String> {
    let mut uris: Vec<String> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap().to_owned()
        })
        .collect();
    uris.sort();
    uris.dedup();
    uris
}

/// Reads `text` with a real parser: Python's `csv` module (rows as JSON) or `xml.etree`
/// (the JUnit test cases as JSON).
fn python(program: &str, text: &str) -> Value {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "python3: {}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

const READ_CSV: &str = "import csv, json, sys\nprint(json.dumps(list(csv.DictReader(sys.stdin))))";
const READ_JUNIT: &str = r#"
import json, sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
cases = []
for case in root.iter("testcase"):
    state = "failed" if case.find("failure") is not None else "skipped" if case.find("skipped") is not None else "passed"
    cases.append({"name": case.get("name"), "classname": case.get("classname"), "state": state})
print(json.dumps({"tag": root.tag, "cases": cases}))
"#;

#[sqlx::test(migrations = "../migrations")]
async fn every_way_to_silence_a_finding_and_every_output_format_in_a_real_job(pool: PgPool) {
    let dir = Scratch::new("findings-e2e");
    let server = serve(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant(&data, "ledger");
    let repo = dir.join("ledger");
    let (expect, head) = fixture_repo(&repo);
    let f = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (sarif, json, csv, junit) = (f("scan.sarif"), f("scan.json"), f("scan.csv"), f("scan.junit.xml"));
    let o = cella(
        &data,
        Some(&key),
        &[
            "scan",
            repo.to_str().unwrap(),
            "--exclude",
            "vendor/**",
            "--sarif",
            &sarif,
            "--json",
            &json,
            "--csv",
            &csv,
            "--junit",
            &junit,
        ],
    );
    // Unsuppressed live keys are errors: the gate fails.
    assert_eq!(o.status.code(), Some(1), "{}\n{}", out(&o), err(&o));
    let stderr = err(&o);
    assert!(
        stderr.contains("left out")
            && [".git", "build/", "debug.log", "sub/local.env", "fixtures/", "notes.txt"]
                .iter()
                .all(|p| stderr.contains(p)),
        "the scan says what it left out: {stderr}"
    );

    // JSON: every finding where it must be, suppressed by the marker on its line.
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let findings = report["findings"].as_array().unwrap();
    for (path, e) in &expect {
        let here: Vec<&Value> = findings.iter().filter(|x| x["path"] == *path).collect();
        match e {
            Expect::Absent => assert!(here.is_empty(), "{path} must not be scanned: {here:?}"),
            Expect::Found => {
                assert!(!here.is_empty(), "{path}: no finding in {report}");
                assert!(here.iter().all(|x| x["suppressed"].is_null()), "{path}: {here:?}");
                assert!(here.iter().all(|x| x["rule"] == "stripe-secret-key"), "{path}: {here:?}");
            }
            Expect::Marked(marker) => {
                assert_eq!(here.len(), 1, "{path}: {here:?}");
                let why = here[0]["suppressed"].as_str().unwrap_or_default();
                assert!(why.starts_with("inSource") && why.contains(marker), "{path}: {why}");
            }
        }
    }
    assert!(
        findings.iter().all(|x| !x["path"].as_str().unwrap().starts_with(".git")),
        ".git/ is never sent as files"
    );
    let blob: Vec<&Value> = findings.iter().filter(|x| x["path"] == "bin/blob.bin").collect();
    assert_eq!(blob.len(), 2, "the ASCII and the UTF-16LE key, and no card number: {blob:?}");
    let marked = expect.values().filter(|e| matches!(e, Expect::Marked(_))).count();
    let found = findings.iter().filter(|x| x["suppressed"].is_null()).count();
    let summary = &report["summary"];
    assert_eq!(summary["suppressed"], serde_json::json!({"inline": marked, "baseline": 0, "total": marked}));
    assert_eq!(
        (summary["findings"].as_u64(), summary["unsuppressed"]["error"].as_u64()),
        (Some(9), Some(found as u64))
    );
    assert!(
        out(&o).contains(&format!(
            "{} finding(s) ({marked} suppressed); {found} at or above --fail-on error",
            found + marked
        )),
        "{}",
        out(&o)
    );

    // SARIF: valid for GitHub, repository-relative paths, the suppressions, byte offsets in
    // the binary, the repository's provenance.
    let log = checked_sarif(Path::new(&sarif));
    let run = &log["runs"][0];
    let expected_uris: Vec<String> =
        expect.iter().filter(|(_, e)| **e != Expect::Absent).map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(uris(&log), expected_uris);
    for r in run["results"].as_array().unwrap() {
        let loc = &r["locations"][0]["physicalLocation"];
        let uri = loc["artifactLocation"]["uri"].as_str().unwrap();
        match expect[uri] {
            Expect::Marked(marker) => {
                let s = &r["suppressions"][0];
                assert_eq!(s["kind"], "inSource", "{r}");
                assert!(s["justification"].as_str().unwrap().contains(marker), "{r}");
            }
            _ => assert!(r.get("suppressions").is_none(), "{r}"),
        }
        assert_eq!(uri == "bin/blob.bin", loc["region"]["byteOffset"].is_u64(), "{r}");
    }
    // The web address of the repository: `origin` without `.git`.
    assert_eq!(run["versionControlProvenance"][0]["repositoryUri"], ORIGIN.trim_end_matches(".git"));
    assert_eq!(run["versionControlProvenance"][0]["revisionId"], head.as_str());
    assert_eq!(run["versionControlProvenance"][0]["branch"], "trunk");

    // CSV and JUnit read back by real parsers, the same findings in each.
    let rows = python(READ_CSV, &std::fs::read_to_string(&csv).unwrap());
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), findings.len());
    for (row, finding) in rows.iter().zip(findings) {
        assert_eq!(row["path"], finding["path"]);
        assert_eq!(row["line"], finding["line"].to_string());
        assert_eq!(row["suppressed"].as_str().unwrap().is_empty(), finding["suppressed"].is_null());
    }
    let junit = python(READ_JUNIT, &std::fs::read_to_string(&junit).unwrap());
    let cases = junit["cases"].as_array().unwrap();
    assert_eq!(cases.len(), findings.len(), "{junit}");
    let count = |state: &str| cases.iter().filter(|c| c["state"] == state).count();
    assert_eq!((count("failed"), count("skipped")), (found, marked), "{junit}");

    // --format on stdout: JSON and SARIF parse, the same findings.
    for format in ["json", "sarif", "csv"] {
        let o = cella(
            &data,
            Some(&key),
            &["scan", repo.to_str().unwrap(), "--exclude", "vendor/**", "--format", format],
        );
        assert_eq!(o.status.code(), Some(1), "{}", err(&o));
        let n = match format {
            "json" => {
                serde_json::from_slice::<Value>(&o.stdout).unwrap()["findings"].as_array().unwrap().len()
            }
            "sarif" => serde_json::from_slice::<Value>(&o.stdout).unwrap()["runs"][0]["results"]
                .as_array()
                .unwrap()
                .len(),
            _ => python(READ_CSV, &out(&o)).as_array().unwrap().len(),
        };
        assert_eq!(n, findings.len(), "--format {format}");
    }

    // --no-ignore sends what the ignore files hold (never .git/).
    let all = f("all.json");
    let o = cella(
        &data,
        Some(&key),
        &["scan", repo.to_str().unwrap(), "--no-ignore", "--json", &all, "--format", "json"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let every: Value = serde_json::from_slice(&std::fs::read(&all).unwrap()).unwrap();
    let paths: Vec<&str> =
        every["findings"].as_array().unwrap().iter().map(|x| x["path"].as_str().unwrap()).collect();
    for p in
        ["build/out.env", "debug.log", "sub/local.env", "fixtures/sample.env", "notes.txt", "vendor/lib.js"]
    {
        assert!(paths.contains(&p), "--no-ignore sends {p}: {paths:?}");
    }
    assert!(paths.iter().all(|p| !p.starts_with(".git/")), "{paths:?}");

    // A single file keeps its own name; `.` has no prefix. Both valid for GitHub.
    let single = f("single.sarif");
    let o = cella(
        &data,
        Some(&key),
        &["scan", repo.join("config/live.env").to_str().unwrap(), "--sarif", &single],
    );
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(uris(&checked_sarif(Path::new(&single))), ["live.env"]);
    let dot = f("dot.sarif");
    let o = cella_in(&repo, &data, Some(&key), &["scan", ".", "--exclude", "vendor/**", "--sarif", &dot]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let dot_log = checked_sarif(Path::new(&dot));
    assert_eq!(uris(&dot_log), expected_uris, "`.` scans like the folder named");
    assert_eq!(dot_log["runs"][0]["versionControlProvenance"][0]["revisionId"], head.as_str());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_baseline_silences_known_findings_as_a_file_and_stored_and_new_ones_fail_the_gate(pool: PgPool) {
    let dir = Scratch::new("baseline-e2e");
    let server = serve(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant(&data, "ledger");
    let repo: PathBuf = dir.join("app");
    for (i, path) in ["a.env", "b/c.env", "d.py"].iter().enumerate() {
        write(&repo, path, format!("K={}\n", stripe_key(100 + i as u32)).as_bytes());
    }
    let f = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let run = |extra: &[&str]| -> (Output, Value) {
        let json = f("run.json");
        let _ = std::fs::remove_file(&json);
        let mut args = vec!["scan", repo.to_str().unwrap(), "--json", &json];
        args.extend_from_slice(extra);
        let o = cella(&data, Some(&key), &args);
        let report = std::fs::read(&json).map(|b| serde_json::from_slice(&b).unwrap()).unwrap_or(Value::Null);
        (o, report)
    };
    let unsuppressed = |report: &Value| -> Vec<String> {
        let mut v: Vec<String> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["suppressed"].is_null())
            .map(|x| x["path"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };

    // The first scan: three findings; its SARIF becomes the baseline.
    let first = f("first.sarif");
    let (o, report) = run(&["--sarif", &first]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(unsuppressed(&report), ["a.env", "b/c.env", "d.py"]);
    let baseline = f("baseline.json");
    let o = cella(&data, Some(&key), &["baseline", "create", &first, "--out", &baseline]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("wrote a baseline of 3 finding(s)"), "{}", err(&o));

    // Nothing new: the gate passes, the known findings stay countable as suppressed.
    let (o, report) = run(&["--baseline", &baseline]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert_eq!(report["summary"]["suppressed"]["baseline"], 3, "{report}");
    assert!(report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["suppressed"].as_str().is_some_and(|s| s.starts_with("external"))));

    // A new key (and an old one moved down a line): only the new one is reported.
    write(&repo, "e.env", format!("K={}\n", stripe_key(200)).as_bytes());
    write(&repo, "a.env", format!("# moved\nK={}\n", stripe_key(100)).as_bytes());
    let (o, report) = run(&["--baseline", &baseline]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(unsuppressed(&report), ["e.env"]);
    assert_eq!(report["summary"]["suppressed"]["baseline"], 3, "{report}");

    // Kept in the service under a name, listed, named by a job, removed.
    let o = cella(&data, Some(&key), &["baseline", "push", &baseline, "--name", "trunk"]);
    assert!(o.status.success(), "{}", err(&o));
    let o = cella(&data, Some(&key), &["baseline", "ls", "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let kept = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "trunk")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(kept["fingerprints"], 3, "{kept}");
    let (o, report) = run(&["--baseline", "trunk"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(unsuppressed(&report), ["e.env"]);
    let o = cella(&data, Some(&key), &["baseline", "rm", "trunk"]);
    assert!(o.status.success(), "{}", err(&o));
    let (o, _) = run(&["--baseline", "trunk"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(err(&o).contains("trunk"), "a removed baseline is named in the refusal: {}", err(&o));

    // The server log is JSON lines, with one line per state change of each job, naming the
    // job and its tenant in fields.
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let job = report["job"].as_str().unwrap();
    let of_job: Vec<&Value> = events.iter().filter(|e| e["job"] == job).collect();
    let said: Vec<&str> = of_job.iter().map(|e| e["message"].as_str().unwrap_or("?")).collect();
    assert_eq!(said, ["job queued", "job running", "job succeeded"], "{of_job:?}");
    assert!(of_job.iter().all(|e| e["tenant"].is_string() && e["level"] == "INFO"), "{of_job:?}");
    assert_eq!((of_job[1]["attempt"].as_u64(), of_job[2]["took_ms"].is_u64()), (Some(1), true));

    // Another tenant cannot name this tenant's baseline.
    let o = cella(&data, Some(&key), &["baseline", "push", &baseline, "--name", "mine"]);
    assert!(o.status.success(), "{}", err(&o));
    let other = tenant(&data, "other");
    let o = cella(&data, Some(&other), &["scan", repo.to_str().unwrap(), "--baseline", "mine"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(!out(&o).contains("suppressed]"), "{}", out(&o));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_gate_counts_findings_at_or_above_the_confidence_floor(pool: PgPool) {
    let dir = Scratch::new("confidence-e2e");
    let server = serve(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant(&data, "ledger");
    let repo: PathBuf = dir.join("app");
    // A password in a URL of a scheme no specific rule knows (the generic rule: medium) in a
    // test folder: one step lower, low. An e-mail address (low) is only a note.
    write(&repo, "tests/db_test.py", b"URL = \"svn://svc:Zr8vK2qLm4Tx9wQe@repo.internal/app\"\n");
    write(&repo, "README.md", b"Write to priya.raman@northwind-freight.co.uk\n");
    let json = dir.join("run.json");
    let run = |extra: &[&str]| -> (Output, Value) {
        let _ = std::fs::remove_file(&json);
        let mut args = vec!["scan", repo.to_str().unwrap(), "--json", json.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = cella(&data, Some(&key), &args);
        (o, serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap())
    };
    let (o, report) = run(&["--fail-on", "warning"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    let confidence: Vec<(&str, &str)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["rule"].as_str().unwrap(), f["confidence"].as_str().unwrap()))
        .collect();
    assert_eq!(confidence, [("email-address", "low"), ("password-in-url", "low")], "{report}");
    assert!(
        out(&o).contains("2 finding(s) (0 suppressed); 0 at or above --fail-on warning (1 more below --min-confidence medium)"),
        "{}",
        out(&o)
    );
    assert_eq!(
        report["summary"]["by_confidence"]["low"],
        serde_json::json!({"error": 0, "warning": 1, "note": 1})
    );
    // A lower floor counts it; a note gate with the floor at low counts both.
    let (o, _) = run(&["--fail-on", "warning", "--min-confidence", "low"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("1 at or above --fail-on warning;"), "{}", out(&o));
    let (o, _) = run(&["--fail-on", "note", "--min-confidence", "low"]);
    assert!(out(&o).contains("2 at or above --fail-on note;"), "{}", out(&o));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_license_policy_fails_the_gate_on_a_denied_license_and_judges_choices_whole(pool: PgPool) {
    let dir = Scratch::new("license-policy-e2e");
    let server = serve(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant(&data, "lawful");
    let repo: PathBuf = dir.join("app");
    write(&repo, "src/lib.rs", b"// SPDX-License-Identifier: MIT OR AGPL-3.0-only\npub fn f() {}\n");
    write(&repo, "vendor/codec.c", b"/* SPDX-License-Identifier: AGPL-3.0-or-later */\n");
    write(
        &repo,
        "vendor/util.c",
        b"/* SPDX-License-Identifier: GPL-2.0-only WITH Classpath-exception-2.0 */\n",
    );
    // A vendored component's licence text, re-wrapped, under another copyright line: found by
    // the whole text with a match score, and judged by the policy like a tag.
    write(&repo, "vendor/ext/LICENSE", agpl_text_rewrapped().as_bytes());
    let json = dir.join("run.json");
    let sarif = dir.join("run.sarif");
    let run = |extra: &[&str]| -> (Output, Value) {
        let _ = std::fs::remove_file(&json);
        let mut args = vec![
            "scan",
            repo.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--sarif",
            sarif.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = cella(&data, Some(&key), &args);
        let report = std::fs::read(&json).map(|b| serde_json::from_slice(&b).unwrap()).unwrap_or(Value::Null);
        (o, report)
    };
    let levels = |report: &Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["path"].as_str().unwrap().to_owned(), f["level"].as_str().unwrap().to_owned()))
            .collect();
        v.sort();
        v
    };
    // No policy: four license notes, nothing fails an error gate.
    let (o, report) = run(&["--fail-on", "error"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert!(levels(&report).iter().all(|(_, l)| l == "note"), "{report}");
    // AGPL denied, GPL flagged: the vendored AGPL file fails the gate; the crate's own file may
    // be taken under MIT, so it stays a note.
    let (o, report) = run(&["--fail-on", "error", "--license-deny", "AGPL-3.0", "--license-flag", "GPL-*"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", out(&o), err(&o));
    assert_eq!(
        levels(&report),
        [
            ("src/lib.rs".into(), "note".into()),
            ("vendor/codec.c".into(), "error".into()),
            ("vendor/ext/LICENSE".into(), "error".into()),
            ("vendor/util.c".into(), "warning".into()),
        ]
    );
    let log: Value = serde_json::from_slice(&std::fs::read(&sarif).unwrap()).unwrap();
    let verdicts: Vec<(&str, &str)> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["level"].as_str().unwrap(), r["properties"]["licensePolicy"].as_str().unwrap()))
        .collect();
    assert_eq!(verdicts.iter().filter(|v| **v == ("error", "denied")).count(), 2, "{verdicts:?}");
    let text = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ruleId"] == "license-text")
        .unwrap_or_else(|| panic!("no license-text result: {log}"));
    let score = text["properties"]["licenseScore"].as_u64().unwrap();
    assert!((90..=100).contains(&score), "{text}");
    let message = text["message"]["text"].as_str().unwrap();
    assert!(message.contains("license AGPL-3.0 (") && message.contains("% match)"), "{message}");
    assert_eq!(verdicts.iter().filter(|v| **v == ("warning", "flagged")).count(), 1, "{verdicts:?}");
    // The job keeps its policy.
    let job = report["job"].as_str().unwrap();
    let stored: (Vec<String>, Vec<String>) =
        sqlx::query_as("SELECT license_deny, license_flag FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, (vec!["AGPL-3.0".to_owned()], vec!["GPL-*".to_owned()]));
    // A mistake is told before anything is uploaded.
    let (o, _) = run(&["--license-deny", "GPL/2"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("`GPL/2` is not a license identifier"), "{}", err(&o));

    // The tenant's own policy applies to jobs that give none; a job's own replaces it.
    let pack = |args: &[&str]| {
        let mut all = vec!["pack", "license-policy"];
        all.extend_from_slice(args);
        let o = cella(&data, Some(&key), &all);
        assert!(o.status.success(), "{args:?}: {}", err(&o));
        out(&o)
    };
    pack(&["set", "--deny", "agpl-3.0", "--flag", "GPL-*,SSPL-1.0"]);
    let shown: Value = serde_json::from_str(&pack(&["show", "--json"])).unwrap();
    assert_eq!(shown, serde_json::json!({"deny": ["agpl-3.0"], "flag": ["GPL-*", "SSPL-1.0"]}));
    assert_eq!(pack(&["show"]), "denied (error):    agpl-3.0\nflagged (warning): GPL-*,SSPL-1.0\n");
    let (o, report) = run(&["--fail-on", "error"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", out(&o), err(&o));
    assert_eq!(levels(&report)[1], ("vendor/codec.c".into(), "error".into()));
    let (o, report) = run(&["--fail-on", "error", "--license-flag", "GPL-*"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert_eq!(levels(&report)[1], ("vendor/codec.c".into(), "note".into()));
    pack(&["clear"]);
    let (o, _) = run(&["--fail-on", "error"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    // Each change is on the tenant's chain with what it replaced.
    let changes: Vec<Value> = sqlx::query_scalar::<_, String>(
        "SELECT body FROM audit_events WHERE action = 'tenant.license_policy_changed' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|b| serde_json::from_str::<Value>(b).unwrap()["details"].clone())
    .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["before"]["deny"], serde_json::json!(["agpl-3.0"]));
    assert_eq!(changes[1]["after"], serde_json::json!({"deny": [], "flag": []}));
    let refused = cella(&data, Some(&key), &["pack", "license-policy", "set", "--deny", "MIT OR GPL"]);
    assert_eq!(refused.status.code(), Some(2), "{}", err(&refused));
}

/// The AGPL-3.0 text shipped with the scanner, re-wrapped at 66 columns under a copyright line
/// of its own.
fn agpl_text_rewrapped() -> String {
    let (_, text, _) = cella_scan::license_text::shipped()
        .into_iter()
        .find(|(id, _, _)| *id == "AGPL-3.0-only")
        .expect("AGPL-3.0-only is shipped");
    let mut out = String::from("Copyright (C) 2030 Vendored Codec Authors\n\n");
    let mut column = 0;
    for word in String::from_utf8_lossy(&text).split_whitespace() {
        if column + word.len() > 66 {
            out.push('\n');
            column = 0;
        }
        out.push_str(word);
        out.push(' ');
        column += word.len() + 1;
    }
    out
}
