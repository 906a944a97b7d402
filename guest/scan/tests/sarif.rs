//! SARIF 2.1.0 output validates against the vendored OASIS schema and against what GitHub code
//! scanning requires of an upload (checked here, see [`github_problems`]), for a folder, a
//! single file and a packed `.`; and the summary counts.

mod common;
mod sarif_checks;

use cella_scan::sarif::{self, RunDetails};
use cella_scan::{scan_artifact, Engine, FingerprintKey, Limits, Report, SliceSource};
use common::*;
use sarif_checks::{github_problems, schema_errors};
use serde_json::Value;

fn report() -> Report {
    let data = format!(
        "// SPDX-License-Identifier: MIT\nkey = {SECRET}\ncard 4111 1111 1111 1111\nbad card 4111 1111 1111 1112\n"
    );
    let t = tar(&[file("src/a file.rs", data.as_bytes()), file("b.txt", data.as_bytes())]);
    scan_with(&t, "a.tar", &Limits::default()).unwrap()
}

/// The text every artifact below holds, with one finding of each kind, one suppressed inline.
fn text() -> String {
    format!(
        "// SPDX-License-Identifier: MIT\nkey = {SECRET}\ncard 4111 1111 1111 1111\nold = tok_aaaaaaaaaaaaaaaa # cella:allow\n"
    )
}

fn scan_named(artifact: &[u8], name: &str) -> Report {
    let mut engine = engine();
    engine.set_fingerprint_key(FingerprintKey::new([3; 32]));
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(artifact), name, &mut engine, &Limits::default(), &mut report).unwrap();
    report
}

/// The three shapes `cella scan` sends: a folder packed without its name, `.` packed (entries
/// `./…`), and a single file; plus a binary file in the folder, and a folder with a damaged
/// jar that the scan skips.
fn shapes() -> Vec<(&'static str, Report, Vec<&'static str>)> {
    let t = text();
    let mut bin = b"\x7fELF\0\0".to_vec();
    bin.extend_from_slice(format!("token={SECRET}\0").as_bytes());
    let folder = tar(&[file("src/app.rs", t.as_bytes()), file("bin/blob.bin", &bin)]);
    let dot =
        tar(&[file("./", b""), file("./src/app.rs", t.as_bytes()), file("./config/x.env", t.as_bytes())]);
    vec![
        ("folder", scan_named(&folder, "repo.tar"), vec!["src/app.rs", "bin/blob.bin"]),
        ("dot", scan_named(&dot, "dot.tar"), vec!["src/app.rs", "config/x.env"]),
        ("file", scan_named(t.as_bytes(), "settings.yaml"), vec!["settings.yaml"]),
        ("skipped", scan_named(&with_skipped_entry(), "repo.tar"), vec!["src/app.rs"]),
    ]
}

/// A folder with a source file and a jar cut short (which the scan skips and reports).
fn with_skipped_entry() -> Vec<u8> {
    let jar = zip(&[zfile("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n", true)]);
    tar(&[file("lib/broken #1.jar", &jar[..jar.len() - 30]), file("src/app.rs", text().as_bytes())])
}

#[test]
fn entries_the_scan_could_not_read_are_tool_notifications() {
    let report = scan_named(&with_skipped_entry(), "repo.tar");
    let log = log(&policy(), &report, &details());
    let notes = log["runs"][0]["invocations"][0]["toolExecutionNotifications"].as_array().unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0]["level"], "warning");
    assert_eq!(
        notes[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
        "lib/broken%20%231.jar"
    );
    assert_eq!(notes[0]["message"]["text"], "artifact entry `lib/broken #1.jar` is truncated");
    assert_eq!(log["runs"][0]["invocations"][0]["executionSuccessful"], true);
    // A scan that read everything says nothing of invocations.
    let (_, folder, _) = shapes().remove(0);
    assert!(log_has_no_invocations(&self::log(&policy(), &folder, &details())));
}

fn log_has_no_invocations(log: &Value) -> bool {
    log["runs"][0].get("invocations").is_none()
}

fn details() -> RunDetails {
    RunDetails {
        information_uri: Some("https://cella.example.org/docs".into()),
        automation_id: Some("cella/secrets/".into()),
        repository_uri: Some("https://git.example.org/acme/app".into()),
        revision_id: Some("9fceb02d0ae598e95dc970b74767f19372d61af8".into()),
        branch: Some("main".into()),
    }
}

fn log(policy: &cella_scan::Policy, report: &Report, details: &RunDetails) -> Value {
    serde_json::from_str(&sarif::to_json(policy, report, details)).unwrap()
}

#[test]
fn every_shape_validates_against_the_schema_and_githubs_requirements_with_relative_paths() {
    for details in [RunDetails::default(), details()] {
        for (shape, report, paths) in shapes() {
            let log = log(&policy(), &report, &details);
            assert_eq!(schema_errors(&log), Vec::<String>::new(), "{shape}");
            assert_eq!(github_problems(&log), Vec::<String>::new(), "{shape}");
            let uris: std::collections::BTreeSet<&str> = log["runs"][0]["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap())
                .collect();
            assert_eq!(uris, paths.into_iter().collect(), "{shape}");
        }
    }
}

#[test]
fn the_github_checks_really_reject_bad_sarif() {
    let (_, report, _) = shapes().remove(0);
    let good = log(&policy(), &report, &details());
    let bad = |change: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        change(&mut v);
        github_problems(&v)
    };
    let result = "/runs/0/results/0";
    assert!(!bad(&|v| v
        .pointer_mut(&format!("{result}/locations/0/physicalLocation/artifactLocation/uri"))
        .map(|u| *u = "file:///src/app.rs".into())
        .unwrap())
    .is_empty());
    assert!(!bad(&|v| v
        .pointer_mut(&format!("{result}/locations/0/physicalLocation/artifactLocation/uri"))
        .map(|u| *u = "artifact/../src/app.rs".into())
        .unwrap())
    .is_empty());
    assert!(!bad(&|v| v
        .pointer_mut(result)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("partialFingerprints")
        .map(drop)
        .unwrap())
    .is_empty());
    assert!(!bad(&|v| *v.pointer_mut("/runs/0/tool/driver/rules/0/properties/security-severity").unwrap() =
        "high".into())
    .is_empty());
    assert!(!bad(&|v| *v.pointer_mut("/runs/0/tool/driver/rules/0/properties/security-severity").unwrap() =
        "11".into())
    .is_empty());
    assert!(!bad(&|v| *v.pointer_mut("/runs/0/tool/driver/rules/0/properties/tags").unwrap() =
        serde_json::json!(["secret"]))
    .is_empty());
    assert!(!bad(&|v| *v
        .pointer_mut(&format!("{result}/locations/0/physicalLocation/region/startLine"))
        .unwrap() = 0.into())
    .is_empty());
    assert!(
        !bad(&|v| *v.pointer_mut("/runs/0/tool/driver/informationUri").unwrap() = "cella".into()).is_empty()
    );
    let many = bad(&|v| {
        let results = v.pointer_mut("/runs/0/results").unwrap().as_array_mut().unwrap();
        let one = results[0].clone();
        results.resize(25_001, one);
    });
    assert!(many.iter().any(|p| p.contains("results (at most 25,000)")), "{many:?}");
    let twice = bad(&|v| {
        let results = v.pointer_mut("/runs/0/results").unwrap().as_array_mut().unwrap();
        let one = results[0].clone();
        results.push(one);
    });
    assert!(twice.iter().any(|p| p.contains("same fingerprints")), "{twice:?}");
}

#[test]
fn rules_carry_what_github_shows() {
    let log = log(&policy(), &report(), &RunDetails::default());
    let driver = &log["runs"][0]["tool"]["driver"];
    assert_eq!(driver["name"], "cella-scan");
    assert_eq!(driver["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(driver["semanticVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(driver["informationUri"], sarif::DEFAULT_INFORMATION_URI);
    let rules = driver["rules"].as_array().unwrap();
    let severities: Vec<&str> =
        rules.iter().map(|r| r["properties"]["security-severity"].as_str().unwrap()).collect();
    // test-token: secret, error; card: PII, warning; spdx: license, note.
    assert_eq!(severities, ["9.0", "5.5", "1.0"]);
    assert_eq!(rules[0]["properties"]["tags"], serde_json::json!(["security", "secret", "credentials"]));
    assert_eq!(rules[1]["properties"]["tags"], serde_json::json!(["security", "pii", "privacy"]));
    assert_eq!(rules[0]["help"]["text"], "test-token help");
    let markdown = rules[0]["help"]["markdown"].as_str().unwrap();
    assert!(
        markdown.starts_with("**test-token description** (`test-token`, secret)\n\ntest-token help"),
        "{markdown}"
    );
    assert_eq!(rules[0]["shortDescription"]["text"], "test-token description");
    assert_eq!(
        rules[0]["fullDescription"]["text"],
        "test-token description. Category: secret. test-token help"
    );
}

#[test]
fn the_log_describes_the_rules_its_results_name_and_indexes_them_there() {
    let clean = log(&policy(), &Report::default(), &RunDetails::default());
    assert_eq!(clean["runs"][0]["tool"]["driver"]["rules"], serde_json::json!([]));
    assert_eq!(github_problems(&clean), Vec::<String>::new());
    let t = tar(&[file("pay.txt", b"card 4111 1111 1111 1111\n")]);
    let cards = log(&policy(), &scan_with(&t, "a.tar", &Limits::default()).unwrap(), &RunDetails::default());
    let run = &cards["runs"][0];
    let ids: Vec<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["card"]);
    assert_eq!((&run["results"][0]["ruleId"], &run["results"][0]["ruleIndex"]), (&"card".into(), &0.into()));
    assert_eq!(github_problems(&cards), Vec::<String>::new());
}

#[test]
fn the_run_names_its_automation_and_version_control_details_when_given() {
    let log = log(&policy(), &report(), &details());
    let run = &log["runs"][0];
    assert_eq!(run["automationDetails"], serde_json::json!({"id": "cella/secrets/"}));
    assert_eq!(
        run["versionControlProvenance"],
        serde_json::json!([{
            "repositoryUri": "https://git.example.org/acme/app",
            "revisionId": "9fceb02d0ae598e95dc970b74767f19372d61af8",
            "branch": "main"
        }])
    );
    assert_eq!(run["tool"]["driver"]["informationUri"], "https://cella.example.org/docs");
    let plain = log_of_default();
    assert!(plain["runs"][0].get("automationDetails").is_none());
    assert!(plain["runs"][0].get("versionControlProvenance").is_none());
}

fn log_of_default() -> Value {
    log(&policy(), &report(), &RunDetails::default())
}

#[test]
fn results_carry_regions_fingerprints_and_suppressions() {
    let (_, folder, _) = shapes().remove(0);
    let v = log(&policy(), &folder, &RunDetails::default());
    let results = v["runs"][0]["results"].as_array().unwrap();
    let ids: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["ruleId"].as_str().unwrap(),
                r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("spdx", "src/app.rs"),
            ("test-token", "src/app.rs"),
            ("card", "src/app.rs"),
            ("test-token", "src/app.rs"),
            ("test-token", "bin/blob.bin")
        ]
    );
    let region = &results[1]["locations"][0]["physicalLocation"]["region"];
    assert_eq!(
        *region,
        serde_json::json!({"startLine": 2, "startColumn": 7, "endLine": 2, "endColumn": 7 + SECRET.len()})
    );
    let fps = &results[1]["partialFingerprints"];
    for key in [sarif::FINGERPRINT_KEY, sarif::LOCATION_FINGERPRINT_KEY] {
        assert_eq!(fps[key].as_str().unwrap().len(), 64, "{key}");
    }
    assert!(results[1].get("suppressions").is_none());
    assert_eq!(
        results[3]["suppressions"],
        serde_json::json!([{"kind": "inSource", "status": "accepted", "justification": "marked `cella:allow` in the source"}])
    );
    // The binary file's finding is located by its bytes (after `\x7fELF\0\0token=`).
    let binary = &results[4]["locations"][0]["physicalLocation"]["region"];
    assert_eq!(
        (binary["byteOffset"].as_u64(), binary["byteLength"].as_u64()),
        (Some(12), Some(SECRET.len() as u64))
    );
    // Same secret in two places: one secret fingerprint, two location fingerprints.
    assert_eq!(fps[sarif::FINGERPRINT_KEY], results[4]["partialFingerprints"][sarif::FINGERPRINT_KEY]);
    assert_ne!(
        fps[sarif::LOCATION_FINGERPRINT_KEY],
        results[4]["partialFingerprints"][sarif::LOCATION_FINGERPRINT_KEY]
    );
    assert!(!v.to_string().contains(SECRET));
}

#[test]
fn summary_counts_by_rule_category_level_and_suppression() {
    let r = report();
    let s = r.summary(&policy(), 42);
    assert_eq!((s.files_scanned, s.findings, s.duration_ms), (2, 6, 42));
    assert_eq!(s.by_rule["test-token"], 2);
    assert_eq!(s.by_rule["card"], 2);
    assert_eq!(s.by_category["secret"], 2);
    assert_eq!(s.by_category["pii"], 2);
    assert_eq!(s.by_category["license"], 2);
    assert_eq!((s.unsuppressed.error, s.unsuppressed.warning, s.unsuppressed.note), (2, 2, 2));
    assert_eq!(s.bytes_scanned, 2 * 113);
    let json: serde_json::Value = serde_json::from_str(&r.summary_json(&policy(), 42)).unwrap();
    assert_eq!(json["by_category"]["pii"], 2);
    assert_eq!(json["suppressed"], serde_json::json!({"inline": 0, "baseline": 0, "total": 0}));
    assert_eq!(json["unsuppressed"], serde_json::json!({"error": 2, "warning": 2, "note": 2}));
    for key in ["files_binary", "files_binary_truncated", "files_excluded", "findings_dropped"] {
        assert_eq!(json[key], 0, "{key}");
    }
    let (_, folder, _) = shapes().remove(0);
    let s = folder.summary(&policy(), 0);
    assert_eq!((s.findings, s.suppressed.inline, s.suppressed.total, s.unsuppressed.error), (5, 1, 1, 2));
    assert_eq!((s.files_scanned, s.files_binary), (2, 1));
}

#[test]
fn schema_validation_really_rejects_bad_sarif() {
    let mut value = log_of_default();
    value["runs"][0]["results"][0]["level"] = "severe".into();
    assert!(!schema_errors(&value).is_empty());
}

#[test]
fn to_json_writes_exactly_the_pretty_printed_value() {
    let shaped = shapes().into_iter().map(|(_, r, _)| r);
    for r in [report(), Report::default()].into_iter().chain(shaped) {
        for details in [RunDetails::default(), details()] {
            let expected = serde_json::to_string_pretty(&sarif::to_value(&policy(), &r, &details)).unwrap();
            assert_eq!(sarif::to_json(&policy(), &r, &details), expected);
        }
    }
}

#[test]
fn a_scan_stays_within_githubs_result_limit_by_default() {
    let mut text = String::new();
    for i in 0..26_000 {
        text.push_str(&format!("k = tok_{i:016}\n"));
    }
    let mut engine = Engine::new(policy()).unwrap();
    let mut report = Report::default();
    scan_artifact(
        &mut SliceSource(text.as_bytes()),
        "many.txt",
        &mut engine,
        &Limits::default(),
        &mut report,
    )
    .unwrap();
    assert_eq!((report.findings.len(), report.findings_dropped), (25_000, 1_000));
    let log = log(&policy(), &report, &RunDetails::default());
    assert_eq!(github_problems(&log), Vec::<String>::new());
}

#[test]
fn uris_read_back_as_the_paths_they_encode() {
    for path in ["src/app.rs", "lib/broken #1.jar", "a b/c%d!/é.txt", "x\u{1b}.zip"] {
        assert_eq!(sarif::uri_to_path(&sarif::path_to_uri(path)), path);
    }
    assert_eq!(sarif::uri_to_path("bad%zz%4"), "bad%zz%4", "what is no escape is kept");
}

#[test]
fn a_license_policy_raises_the_level_of_the_licenses_it_denies_or_flags() {
    let text = "// SPDX-License-Identifier: AGPL-3.0-only\n// SPDX-License-Identifier: GPL-2.0+\n\
                // SPDX-License-Identifier: MIT\n// SPDX-License-Identifier: AGPL-3.0-only # cella:allow\n";
    let mut engine = engine();
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    engine.set_license_policy(
        cella_scan::spdx::LicensePolicy::new(&owned(&["agpl-3.0"]), &owned(&["GPL-*"])).unwrap(),
    );
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(text.as_bytes()), "src.rs", &mut engine, &Limits::default(), &mut report)
        .unwrap();
    let levels: Vec<(u64, &str, Option<&str>)> = report
        .findings
        .iter()
        .map(|f| (f.line, f.severity.sarif_level(), f.license_verdict.map(|v| v.as_str())))
        .collect();
    assert_eq!(
        levels,
        [
            (1, "error", Some("denied")),
            (2, "warning", Some("flagged")),
            (3, "note", Some("allowed")),
            (4, "error", Some("denied")),
        ]
    );
    // The gate counts the raised levels (the suppressed one not at all).
    let summary = report.summary(&policy(), 0);
    assert_eq!(
        (summary.unsuppressed.error, summary.unsuppressed.warning, summary.unsuppressed.note),
        (1, 1, 1)
    );
    assert_eq!(summary.gate(cella_scan::Severity::Error, cella_scan::Confidence::Medium), 1);
    // SARIF: the result's level and the verdict, the same from both writers.
    let details = RunDetails::default();
    let log = sarif::to_value(&policy(), &report, &details);
    let results = log["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results[0]["level"], "error");
    assert_eq!(results[0]["properties"]["licensePolicy"], "denied");
    assert_eq!(results[1]["level"], "warning");
    assert_eq!(results[2]["properties"]["licensePolicy"], "allowed");
    let direct: Value = serde_json::from_str(&sarif::to_json(&policy(), &report, &details)).unwrap();
    assert_eq!(direct, log);
    assert!(schema_errors(&log).is_empty(), "{:?}", schema_errors(&log));
}
