//! SARIF 2.1.0 output validates against the vendored OASIS schema, and the summary counts.

mod common;

use cella_scan::{sarif, Limits, Report};
use common::*;

fn report() -> Report {
    let data = format!(
        "// SPDX-License-Identifier: MIT\nkey = {SECRET}\ncard 4111 1111 1111 1111\nbad card 4111 1111 1111 1112\n"
    );
    let t = tar(&[file("src/a file.rs", data.as_bytes()), file("b.txt", data.as_bytes())]);
    scan_with(&t, "a.tar", &Limits::default()).unwrap()
}

fn schema() -> serde_json::Value {
    let text = include_str!("sarif-schema-2.1.0.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn sarif_output_validates_against_the_2_1_0_schema() {
    let r = report();
    let value: serde_json::Value = serde_json::from_str(&sarif::to_json(&policy(), &r)).unwrap();
    let validator = jsonschema::draft4::new(&schema()).unwrap();
    let errors: Vec<String> =
        validator.iter_errors(&value).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn schema_validation_really_rejects_bad_sarif() {
    let r = report();
    let mut value: serde_json::Value = serde_json::from_str(&sarif::to_json(&policy(), &r)).unwrap();
    value["runs"][0]["results"][0]["level"] = "severe".into();
    let validator = jsonschema::draft4::new(&schema()).unwrap();
    assert!(!validator.is_valid(&value));
}

#[test]
fn sarif_results_carry_location_level_rule_and_fingerprint() {
    let r = report();
    let v: serde_json::Value = serde_json::from_str(&sarif::to_json(&policy(), &r)).unwrap();
    let run = &v["runs"][0];
    assert_eq!(run["tool"]["driver"]["rules"].as_array().unwrap().len(), 3);
    assert_eq!(run["tool"]["driver"]["rules"][0]["help"]["text"], "test-token help");
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    let first = &results[0];
    assert_eq!(first["ruleId"], "spdx");
    assert_eq!(first["level"], "note");
    assert_eq!(first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"], "src/a%20file.rs");
    assert_eq!(first["locations"][0]["physicalLocation"]["region"]["startLine"], 1);
    assert_eq!(first["locations"][0]["physicalLocation"]["region"]["startColumn"], 29);
    let tok = &results[1];
    assert_eq!(tok["ruleId"], "test-token");
    assert_eq!(tok["level"], "error");
    assert_eq!(tok["partialFingerprints"][sarif::FINGERPRINT_KEY].as_str().unwrap().len(), 64);
    // Same secret in two files: same fingerprint.
    assert_eq!(tok["partialFingerprints"], results[4]["partialFingerprints"]);
    assert!(!v.to_string().contains(SECRET));
}

#[test]
fn summary_counts_by_rule_and_category() {
    let r = report();
    let s = r.summary(&policy(), 42);
    assert_eq!((s.files_scanned, s.findings, s.duration_ms), (2, 6, 42));
    assert_eq!(s.by_rule["test-token"], 2);
    assert_eq!(s.by_rule["card"], 2);
    assert_eq!(s.by_category["secret"], 2);
    assert_eq!(s.by_category["pii"], 2);
    assert_eq!(s.by_category["license"], 2);
    assert_eq!(s.bytes_scanned, 2 * 113);
    let json: serde_json::Value = serde_json::from_str(&r.summary_json(&policy(), 42)).unwrap();
    assert_eq!(json["by_category"]["pii"], 2);
}

#[test]
fn to_json_writes_exactly_the_pretty_printed_value() {
    for r in [report(), Report::default()] {
        let expected = serde_json::to_string_pretty(&sarif::to_value(&policy(), &r)).unwrap();
        assert_eq!(sarif::to_json(&policy(), &r), expected);
    }
}
