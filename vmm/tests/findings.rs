//! `cella-vmm scan` as a CI gate, in real VMs: a tree with every kind of inline suppression,
//! excluded folders and a secret inside a binary file gives exact summary counts, SARIF
//! suppressions and exit codes under `--fail-on`; a baseline made from the SARIF log (or a
//! baseline file written from it) suppresses everything already known, so a new secret alone
//! fails the gate; and the job's SARIF context and artifact name reach the log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use cella_policies::baseline::Baseline;
use common::*;
use serde_json::Value;

/// The fingerprint key of every scan here: baselines only match under the same key.
const KEY: &str = "7a1c0f3e9b2d4c6a8e0f1b3d5c7e9a2b4d6f8a0c2e4b6d8f0a1c3e5b7d9f1a3c";

const STRIPE: &str = "sk_live_Qm7vT2xK9pL4wR8nB3cJ6hZ1";
const NEW_STRIPE: &str = "sk_live_Hd4sW9qE2rT7yU1iO5pA8sD3";
const GITHUB: &str = "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";

/// The tree: one unsuppressed secret in text, one in a binary file, five findings carrying
/// each inline marker (one of them a PEM key marked on its last line), and secrets in two
/// excluded places. `changes` replace files of the same name or add files.
fn tree(changes: &[(&str, String)]) -> Vec<u8> {
    let pem_body = "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQJAIJLixBy2qpFoS4DSmoEm\n";
    let mut binary = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0>\0".to_vec();
    binary.extend_from_slice(b"\x01\x02GITHUB_TOKEN=");
    binary.extend_from_slice(GITHUB.as_bytes());
    binary.extend_from_slice(b"\0\0\x90");
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("src/app.py", format!("import os\nSTRIPE_KEY = \"{STRIPE}\"\n").into_bytes()),
        (
            "src/old.py",
            b"LEGACY = \"sk_live_Zx8Cv6Bn4Mq2Wl9Ek7Rj5Ty3\"  # cella:allow rotated in 2025\n".to_vec(),
        ),
        (
            "src/web.js",
            b"const t = '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';  // gitleaks:allow\n".to_vec(),
        ),
        ("config/ci.yaml", b"gitlab: glpat-Rt5Yu7Io9Pa1Sd3Fg5Hj7  # kingfisher:ignore\n".to_vec()),
        (
            "tests/fixtures.py",
            b"SLACK = 'xoxb-1234567890-1234567890123-Ab3De5Gh7Jk9Mn1Pq3St5Vw7'  # pragma: allowlist secret\n"
                .to_vec(),
        ),
        (
            "keys/test.pem",
            format!("-----BEGIN RSA PRIVATE KEY-----\n{pem_body}-----END RSA PRIVATE KEY----- cella:allow\n")
                .into_bytes(),
        ),
        ("vendor/lib/token.txt", format!("token: {GITHUB}\n").into_bytes()),
        ("web/app.min.js", format!("var k=\"{STRIPE}\";\n").into_bytes()),
        ("bin/blob.bin", binary),
    ];
    for (name, text) in changes {
        match files.iter_mut().find(|(n, _)| n == name) {
            Some(file) => file.1 = text.clone().into_bytes(),
            None => files.push((name, text.clone().into_bytes())),
        }
    }
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    tar(&entries)
}

struct Scan {
    output: Output,
    result: Value,
    sarif: Value,
}

fn scan(artifact: &Path, sarif: &Path, extra: &[&str]) -> Scan {
    let mut args =
        vec!["scan", "--json", "--artifact", artifact.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = cella_vmm(&args).env("CELLA_FINGERPRINT_KEY", KEY).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON; stderr: {}", stderr(&output)));
    let result: Value = serde_json::from_str(last).unwrap();
    assert_scrubbed(&result);
    let sarif: Value = serde_json::from_slice(&std::fs::read(sarif).unwrap()).unwrap();
    Scan { output, result, sarif }
}

fn results(sarif: &Value) -> &Vec<Value> {
    sarif["runs"][0]["results"].as_array().unwrap()
}

/// `(uri, ruleId, suppression kind)` of every result.
fn outcome(sarif: &Value) -> Vec<(String, String, Option<String>)> {
    let mut v: Vec<_> = results(sarif)
        .iter()
        .map(|r| {
            (
                r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap().to_owned(),
                r["ruleId"].as_str().unwrap().to_owned(),
                r["suppressions"][0]["kind"].as_str().map(str::to_owned),
            )
        })
        .collect();
    v.sort();
    v
}

fn row(uri: &str, rule: &str, kind: Option<&str>) -> (String, String, Option<String>) {
    (uri.to_owned(), rule.to_owned(), kind.map(str::to_owned))
}

const EXCLUDES: [&str; 4] = ["--exclude", "vendor/", "--exclude", "*.min.js"];

fn gate<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = EXCLUDES.to_vec();
    v.extend_from_slice(&["--fail-on", "error"]);
    v.extend_from_slice(extra);
    v
}

#[test]
fn every_suppression_kind_is_counted_and_only_unsuppressed_findings_fail_the_gate() {
    let dir = scratch("findings-gate");
    let artifact = dir.join("repo.tar");
    std::fs::write(&artifact, tree(&[])).unwrap();
    let first = scan(&artifact, &dir.join("first.sarif"), &gate(&[]));
    assert_eq!(code(&first.output), 1, "{}", stderr(&first.output));
    let summary = &first.result["summary"];
    assert_eq!(
        summary["suppressed"],
        serde_json::json!({"inline": 5, "baseline": 0, "total": 5}),
        "{summary}"
    );
    assert_eq!(
        summary["unsuppressed"],
        serde_json::json!({"error": 2, "warning": 0, "note": 0}),
        "{summary}"
    );
    assert_eq!((&summary["findings"], &summary["files_excluded"]), (&7.into(), &2.into()), "{summary}");
    assert_eq!((&summary["files_scanned"], &summary["files_binary"]), (&7.into(), &1.into()), "{summary}");
    assert_eq!(
        first.result["fail_on"],
        serde_json::json!({"level": "error", "min_confidence": "medium", "unsuppressed_at_or_above": 2})
    );
    // Both open findings are a provider's own token format outside any test folder: high.
    assert_eq!(summary["by_confidence"]["high"], serde_json::json!({"error": 2, "warning": 0, "note": 0}));
    assert_eq!(
        outcome(&first.sarif),
        [
            row("bin/blob.bin", "github-pat", None),
            row("config/ci.yaml", "gitlab-pat", Some("inSource")),
            row("keys/test.pem", "private-key-pem", Some("inSource")),
            row("src/app.py", "stripe-secret-key", None),
            row("src/old.py", "stripe-secret-key", Some("inSource")),
            row("src/web.js", "npm-access-token", Some("inSource")),
            row("tests/fixtures.py", "slack-bot-token", Some("inSource")),
        ]
    );
    let justifications: Vec<&str> =
        results(&first.sarif).iter().filter_map(|r| r["suppressions"][0]["justification"].as_str()).collect();
    for marker in ["cella:allow", "gitleaks:allow", "kingfisher:ignore", "pragma: allowlist secret"] {
        assert!(
            justifications.contains(&format!("marked `{marker}` in the source").as_str()),
            "{justifications:?}"
        );
    }
    assert!(results(&first.sarif)
        .iter()
        .all(|r| r["suppressions"][0]["status"].is_null() || r["suppressions"][0]["status"] == "accepted"));
    let blob = results(&first.sarif).iter().find(|r| r["ruleId"] == "github-pat").unwrap();
    let region = &blob["locations"][0]["physicalLocation"]["region"];
    assert_eq!(
        (region["byteOffset"].as_u64(), region["byteLength"].as_u64()),
        (Some(35), Some(40)),
        "{region}"
    );
    let text = std::fs::read_to_string(dir.join("first.sarif")).unwrap();
    assert!(!text.contains(GITHUB) && !text.contains(STRIPE), "the SARIF log carries a secret");
    // The default, `never`, does not gate; `note` counts the same two.
    let never = scan(&artifact, &dir.join("never.sarif"), &EXCLUDES);
    assert_eq!(code(&never.output), 0, "{}", stderr(&never.output));
    assert_eq!(
        never.result["fail_on"],
        serde_json::json!({"level": "never", "min_confidence": "medium", "unsuppressed_at_or_above": null})
    );
    let mut note_args = EXCLUDES.to_vec();
    note_args.extend_from_slice(&["--fail-on", "note"]);
    let note = scan(&artifact, &dir.join("note.sarif"), &note_args);
    assert_eq!(code(&note.output), 1, "{}", stderr(&note.output));
    assert_eq!(note.result["fail_on"]["unsuppressed_at_or_above"], 2);
    // With every finding suppressed or excluded, `--fail-on note` passes.
    let quiet = dir.join("quiet.tar");
    let marked = format!("import os\nSTRIPE_KEY = \"{STRIPE}\"  # cella:allow\n");
    std::fs::write(&quiet, tree(&[("src/app.py", marked)])).unwrap();
    let mut quiet_args = EXCLUDES.to_vec();
    quiet_args.extend_from_slice(&["--exclude", "bin/", "--fail-on", "note"]);
    let passed = scan(&quiet, &dir.join("quiet.sarif"), &quiet_args);
    assert_eq!(code(&passed.output), 0, "{}", stderr(&passed.output));
    assert_eq!(passed.result["summary"]["suppressed"]["inline"], 6);
    assert_eq!(passed.result["summary"]["files_excluded"], 3);
}

#[test]
fn a_baseline_from_the_sarif_log_or_a_baseline_file_lets_only_a_new_secret_fail_the_gate() {
    let dir = scratch("findings-baseline");
    let artifact = dir.join("repo.tar");
    std::fs::write(&artifact, tree(&[])).unwrap();
    let first_sarif = dir.join("first.sarif");
    let first = scan(&artifact, &first_sarif, &gate(&[]));
    assert_eq!(code(&first.output), 1, "{}", stderr(&first.output));
    // The baseline file made from that log, as `cella baseline create` will.
    let baseline_file = dir.join("cella-baseline.json");
    Baseline::read(&first_sarif).unwrap().write(&baseline_file).unwrap();
    assert_eq!(Baseline::read(&baseline_file).unwrap().len(), 7);

    // Known findings alone: the gate passes with either form of baseline.
    for baseline in [&first_sarif, &baseline_file] {
        let again =
            scan(&artifact, &dir.join("again.sarif"), &gate(&["--baseline", baseline.to_str().unwrap()]));
        assert_eq!(code(&again.output), 0, "{}: {}", baseline.display(), stderr(&again.output));
        let summary = &again.result["summary"];
        assert_eq!(
            summary["suppressed"],
            serde_json::json!({"inline": 5, "baseline": 2, "total": 7}),
            "{summary}"
        );
    }

    // Lines added above a known secret, and one new secret: only the new one counts.
    let moved = ("src/app.py", format!("# a comment\n\nimport os\nSTRIPE_KEY = \"{STRIPE}\"\n"));
    let new = ("src/billing.py", format!("BILLING_KEY = \"{NEW_STRIPE}\"\n"));
    let artifact2 = dir.join("repo2.tar");
    std::fs::write(&artifact2, tree(&[moved, new])).unwrap();
    for baseline in [&first_sarif, &baseline_file] {
        let second =
            scan(&artifact2, &dir.join("second.sarif"), &gate(&["--baseline", baseline.to_str().unwrap()]));
        assert_eq!(code(&second.output), 1, "{}", stderr(&second.output));
        let summary = &second.result["summary"];
        assert_eq!(summary["unsuppressed"]["error"], 1, "{summary}");
        assert_eq!(summary["by_rule"], serde_json::json!({"stripe-secret-key": 1}), "{summary}");
        assert_eq!(
            summary["suppressed"],
            serde_json::json!({"inline": 5, "baseline": 2, "total": 7}),
            "{summary}"
        );
        let open: Vec<_> = outcome(&second.sarif).into_iter().filter(|(_, _, s)| s.is_none()).collect();
        assert_eq!(open, [row("src/billing.py", "stripe-secret-key", None)]);
        let external = results(&second.sarif)
            .iter()
            .filter(|r| r["suppressions"][0]["kind"] == "external")
            .all(|r| r["suppressions"][0]["justification"] == "in the baseline");
        assert!(external);
    }
}

#[test]
fn a_baseline_is_refused_without_the_key_or_when_it_is_not_a_baseline() {
    let dir = scratch("findings-baseline-refused");
    let artifact = dir.join("a.txt");
    std::fs::write(&artifact, "nothing\n").unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not json at all\n").unwrap();
    let args = ["scan", "--artifact", artifact.to_str().unwrap(), "--baseline", notes.to_str().unwrap()];
    let output = cella_vmm(&args).env_remove("CELLA_FINGERPRINT_KEY").output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("--baseline needs the fingerprint key"), "{}", stderr(&output));
    let output = cella_vmm(&args).env("CELLA_FINGERPRINT_KEY", KEY).output().unwrap();
    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains(
            "--baseline could not be used: the baseline is not JSON: give a Cella baseline file (`cella-baseline/1`) or the SARIF log of a Cella scan"
        ),
        "{}",
        stderr(&output)
    );
    let output = cella_vmm(&["scan", "--artifact", artifact.to_str().unwrap(), "--exclude", "!src/"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("negation is not supported"), "{}", stderr(&output));
}

#[test]
fn a_single_file_keeps_its_name_and_the_run_carries_the_jobs_sarif_context() {
    let dir = scratch("findings-single-file");
    // Named like the service names uploads (the job id): the SARIF path is the given name.
    let artifact: PathBuf = dir.join("0c6f2d9a-3b1e-4d7a-9f42-8e5b1c7a2d30");
    std::fs::write(&artifact, format!("STRIPE_KEY={STRIPE}\n")).unwrap();
    let sarif = dir.join("one.sarif");
    let one = scan(
        &artifact,
        &sarif,
        &[
            "--artifact-name",
            "./config/prod.env",
            "--automation-id",
            "cella/secrets/",
            "--vcs-repo",
            "https://git.example.org/acme/app",
            "--vcs-revision",
            "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "--vcs-branch",
            "main",
            "--information-uri",
            "https://cella.example.org/docs",
        ],
    );
    assert_eq!(code(&one.output), 0, "{}", stderr(&one.output));
    let run = &one.sarif["runs"][0];
    assert_eq!(outcome(&one.sarif), [row("config/prod.env", "stripe-secret-key", None)]);
    assert_eq!(run["automationDetails"]["id"], "cella/secrets/");
    assert_eq!(
        run["versionControlProvenance"],
        serde_json::json!([{
            "repositoryUri": "https://git.example.org/acme/app",
            "revisionId": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "branch": "main"
        }])
    );
    assert_eq!(run["tool"]["driver"]["informationUri"], "https://cella.example.org/docs");
    assert_eq!(run["tool"]["driver"]["semanticVersion"], env!("CARGO_PKG_VERSION"));
    let fps = &results(&one.sarif)[0]["partialFingerprints"];
    for key in ["secretHmac/v1", "cellaLocation/v1", "primaryLocationLineHash"] {
        assert!(fps[key].as_str().is_some_and(|v| !v.is_empty()), "{key}: {fps}");
    }
    // Without --artifact-name the file's own name; a tar of `./src/x` gives `src/x`.
    let default = scan(&artifact, &sarif, &[]);
    assert_eq!(outcome(&default.sarif)[0].0, "0c6f2d9a-3b1e-4d7a-9f42-8e5b1c7a2d30");
    let dot = dir.join("dot.tar");
    std::fs::write(&dot, tar(&[("./src/x.env", format!("K={STRIPE}\n").as_bytes())])).unwrap();
    assert_eq!(outcome(&scan(&dot, &sarif, &[]).sarif)[0].0, "src/x.env");
    // A bad URI is refused before launch.
    let output = cella_vmm(&["scan", "--artifact", artifact.to_str().unwrap(), "--vcs-repo", "acme/app"])
        .output()
        .unwrap();
    assert_eq!(code(&output), 2);
    assert!(stderr(&output).contains("--vcs-repo `acme/app` is not an absolute URI"), "{}", stderr(&output));
}
