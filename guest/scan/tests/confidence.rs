//! Confidence: a rule's own (set, or by what the rule is), one step lower in a test, example or
//! fixture folder; counted in the summary by confidence and level, which is what a gate reads;
//! and shown in SARIF as `rank` and `properties.confidence`.

mod common;

use cella_scan::{
    in_test_fixture, scan_artifact, Category, Confidence, Engine, Limits, Policy, Report, Severity,
    SliceSource, Validator, POLICY_FORMAT_VERSION,
};
use common::*;

#[test]
fn a_rule_is_as_sure_as_what_it_finds_unless_its_pack_says() {
    let token = rule("t", r"\b(tok_[a-z0-9]{16})\b", 1, &["tok_"], Category::Secret);
    assert_eq!(token.confidence(), Confidence::High);
    let mut generic = token.clone();
    generic.generic = true;
    assert_eq!(generic.confidence(), Confidence::Medium);
    let mut card = rule("card", r"\d{16}", 0, &[], Category::Pii);
    card.validator = Some(Validator::PaymentCard);
    assert_eq!(card.confidence(), Confidence::Medium);
    card.validator = Some(Validator::Email);
    assert_eq!(card.confidence(), Confidence::Low);
    assert_eq!(rule("mit", "MIT", 0, &[], Category::License).confidence(), Confidence::High);
    let mut set = token;
    set.confidence = Some(Confidence::Low);
    assert_eq!(set.confidence(), Confidence::Low);
}

#[test]
fn test_example_and_fixture_paths_are_recognised() {
    for path in [
        "repo/tests/keys.rs",
        "src/__tests__/api.test.ts",
        "pkg/testdata/config.env",
        "app/fixtures/users.json",
        "docs/examples/client.py",
        "x/spec/models/user_spec.rb",
        "internal/auth/token_test.go",
        "test_settings.py",
        "web/login.spec.js",
        "vendor.zip!/Tests/Data.cs",
    ] {
        assert!(in_test_fixture(path), "{path} is a fixture");
    }
    for path in
        ["src/main.rs", "config/settings.yaml", "contest/results.txt", "latest/app.env", "attestation.rs"]
    {
        assert!(!in_test_fixture(path), "{path} is not a fixture");
    }
}

fn scan(files: &[(&str, &str)]) -> Report {
    let mut engine = Engine::new(policy()).unwrap();
    let t = tar(&files.iter().map(|(name, text)| file(name, text.as_bytes())).collect::<Vec<_>>());
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(&t), "a.tar", &mut engine, &Limits::default(), &mut report).unwrap();
    report
}

#[test]
fn a_finding_in_a_fixture_is_one_step_less_sure_and_the_summary_counts_by_confidence() {
    let line = format!("key = {SECRET}\ncard 4111 1111 1111 1111\n");
    let r = scan(&[("src/app.env", &line), ("tests/fixture.env", &line)]);
    let got: Vec<(String, String, Confidence)> =
        r.findings.iter().map(|f| (f.path.clone(), f.rule_id.clone(), f.confidence)).collect();
    assert_eq!(
        got,
        [
            ("src/app.env".into(), "test-token".into(), Confidence::High),
            ("src/app.env".into(), "card".into(), Confidence::Medium),
            ("tests/fixture.env".into(), "test-token".into(), Confidence::Medium),
            ("tests/fixture.env".into(), "card".into(), Confidence::Low),
        ]
    );
    let policy = policy();
    let s = r.summary(&policy, 0);
    let counts = |c: &str| {
        let l = &s.by_confidence[c];
        (l.error, l.warning, l.note)
    };
    // test-token is an error, card a warning.
    assert_eq!((counts("high"), counts("medium"), counts("low")), ((1, 0, 0), (1, 1, 0), (0, 1, 0)));
    // The gate: at error, medium or more: both tokens; at warning, medium or more: three.
    assert_eq!(s.gate(Severity::Error, Confidence::Medium), 2);
    assert_eq!(s.gate(Severity::Warning, Confidence::Medium), 3);
    assert_eq!(s.gate(Severity::Warning, Confidence::High), 1);
    assert_eq!(s.gate(Severity::Note, Confidence::Low), 4);
}

#[test]
fn sarif_shows_each_results_confidence_as_a_rank_and_a_property() {
    let r = scan(&[("src/app.env", &format!("k = {SECRET}\n")), ("tests/a.env", &format!("k = {SECRET}\n"))]);
    let policy = policy();
    let details = cella_scan::sarif::RunDetails::default();
    let log: serde_json::Value =
        serde_json::from_str(&cella_scan::sarif::to_json(&policy, &r, &details)).expect("SARIF is JSON");
    // Both writers agree.
    assert_eq!(log, cella_scan::sarif::to_value(&policy, &r, &details));
    let results = log["runs"][0]["results"].as_array().unwrap();
    let shown: Vec<(f64, &str)> = results
        .iter()
        .map(|r| (r["rank"].as_f64().unwrap(), r["properties"]["confidence"].as_str().unwrap()))
        .collect();
    assert_eq!(shown, [(90.0, "high"), (60.0, "medium")]);
}

#[test]
fn policies_without_confidences_serialize_as_before() {
    // Templates are keyed by the policy's bytes: a rule without a confidence adds none.
    let p = Policy {
        format_version: POLICY_FORMAT_VERSION,
        rules: vec![rule("r", "x", 0, &[], Category::Secret)],
    };
    let json = serde_json::to_string(&p).unwrap();
    assert!(!json.contains("confidence"), "{json}");
    let mut r = rule("r", "x", 0, &[], Category::Secret);
    r.confidence = Some(Confidence::Low);
    assert!(serde_json::to_string(&r).unwrap().contains(r#""confidence":"low""#));
}
