//! Every licence text of the SPDX License List shipped, scanned as a `LICENSE` file by the
//! built-in policy through the real engine (trigger words, windows, the matcher, findings):
//! each is reported by `license-text` as itself (or as a text with nearly the same words),
//! and the opening-lines rules it overlaps are not reported beside it.

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_scan::license_text::{score_against, shipped, MIN_SCORE};
use cella_scan::{Engine, Limits, Report};

/// How alike two texts must be (per cent) for a match of one to count as finding the other.
const TWIN: u8 = 95;

fn engine() -> Engine {
    let compiled = load_packs(DEFAULT_PACKS).unwrap();
    Engine::from_policy_json(compiled.as_bytes()).unwrap()
}

#[test]
fn every_shipped_text_is_reported_as_itself_by_the_builtin_policy() {
    let mut engine = engine();
    let mut failures = Vec::new();
    for (id, text, group) in shipped() {
        let mut report = Report::default();
        engine.scan_file("LICENSE", &text, &mut report, &Limits::default()).unwrap();
        let texts: Vec<_> = report.findings.iter().filter(|f| f.rule_id == "license-text").collect();
        let ok = texts.iter().any(|f| {
            let named = group.contains(&f.redacted.as_str())
                || score_against(&text, &f.redacted).is_some_and(|s| s >= TWIN);
            named && f.license_score.is_some_and(|s| s >= MIN_SCORE)
        });
        let beside: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.rule_id.starts_with("license-text-"))
            .filter(|f| texts.iter().any(|t| t.line <= f.end_line && f.line <= t.end_line))
            .map(|f| &f.rule_id)
            .collect();
        if !ok || !beside.is_empty() {
            let got: Vec<_> =
                texts.iter().map(|f| (&f.redacted, f.license_score, f.line, f.end_line)).collect();
            failures
                .push(format!("{id}: license-text found {got:?}; opening-lines rules beside it: {beside:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} texts not reported as themselves:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
