//! Engine semantics: keyword gating, entropy, validators, allowlists, multiline rules,
//! redaction, deduplication, lazy compilation errors.

mod common;

use cella_scan::{
    scan_artifact, ArtifactError, Category, Engine, EngineError, Limits, Policy, Report, SliceSource,
    Validator, POLICY_FORMAT_VERSION,
};
use common::rule;

fn run(rules: Vec<cella_scan::Rule>, name: &str, text: &str) -> Result<Vec<String>, ArtifactError> {
    let mut engine = Engine::new(Policy { format_version: POLICY_FORMAT_VERSION, rules }).unwrap();
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(text.as_bytes()), name, &mut engine, &Limits::default(), &mut report)?;
    Ok(report.findings.iter().map(|f| format!("{}:{}:{}", f.line, f.rule_id, f.redacted)).collect())
}

/// `line:rule` of each finding in `text`, the line filter built once `after` bytes are scanned
/// (0: from the start; `u64::MAX`: never, every line a candidate).
fn line_and_rule(rules: &[cella_scan::Rule], text: &str, after: u64) -> Vec<String> {
    let mut engine =
        Engine::new(Policy { format_version: POLICY_FORMAT_VERSION, rules: rules.to_vec() }).unwrap();
    engine.set_line_filter_after(after);
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(text.as_bytes()), "f", &mut engine, &Limits::default(), &mut report)
        .unwrap();
    report.findings.iter().map(|f| format!("{}:{}", f.line, f.rule_id)).collect()
}

#[test]
fn keyword_rule_runs_only_where_its_keyword_occurs() {
    let r = rule("k", r"\b(key_[a-z]{12})\b", 1, &["secret"], Category::Secret);
    let got = run(vec![r], "f", "key_abcdefghijkl\nmy_secret = key_abcdefghijkl\n").unwrap();
    assert_eq!(got, ["2:k:ke****kl"]);
}

#[test]
fn keywords_match_case_insensitively() {
    let r = rule("k", r"\b(key_[a-z]{12})\b", 1, &["secret"], Category::Secret);
    assert_eq!(run(vec![r], "f", "MY_SECRET=key_abcdefghijkl\n").unwrap().len(), 1);
}

#[test]
fn a_keyword_that_starts_another_does_not_hide_the_longer_ones_rules() {
    // `acme` comes first in the policy; where `acme_live_` occurs both rules run.
    let generic =
        rule("acme-assign", r#"acme[\w.-]{0,20}secret\s*=\s*"([^"]{8,})""#, 1, &["acme"], Category::Secret);
    let specific = rule("acme-live", r"\b(acme_live_[a-z0-9]{12})\b", 1, &["acme_live_"], Category::Secret);
    let text = "key = acme_live_0a1b2c3d4e5f\nacme_secret = \"hunter2hunter2\"\n";
    let got = run(vec![generic, specific], "f", text).unwrap();
    assert_eq!(got, ["1:acme-live:acm****e5f", "2:acme-assign:hu****r2"]);
}

#[test]
fn rules_past_the_filters_regex_cap_find_what_they_find_without_the_filter() {
    // More keyword rules than the line filter takes regexes of: the last ones go in by keyword.
    let rules: Vec<_> = (0..cella_scan::FILTER_REGEXES + 8)
        .map(|i| {
            rule(
                &format!("r{i}"),
                &format!(r"\b(tok{i}_[a-z0-9]{{12}})\b"),
                1,
                &[&format!("tok{i}_")],
                Category::Secret,
            )
        })
        .collect();
    let last = cella_scan::FILTER_REGEXES + 7;
    let mut text = String::from("nothing here\n").repeat(100);
    text.push_str(&format!("a = tok3_0a1b2c3d4e5f\nb = tok{last}_0a1b2c3d4e5f\n"));
    let scan = |after: u64| line_and_rule(&rules, &text, after);
    let with_filter = scan(0);
    assert_eq!(with_filter, ["101:r3".to_owned(), format!("102:r{last}")]);
    assert_eq!(with_filter, scan(u64::MAX));
}

/// `FILTER_REGEXES` rules that take every place the line filter has for regexes, so the rules
/// added after them are found by their keywords.
fn filter_cap_fillers() -> Vec<cella_scan::Rule> {
    (0..cella_scan::FILTER_REGEXES)
        .map(|i| {
            let (id, regex, keyword) =
                (format!("f{i}"), format!(r"\bfill{i}_[a-z]{{9}}\b"), format!("fill{i}_"));
            rule(&id, &regex, 0, &[&keyword], Category::Secret)
        })
        .collect()
}

#[test]
fn past_the_keyword_dfas_size_the_filter_keywords_still_find_every_rule() {
    // 300 rules past the regex cap, each with a 100-byte keyword: 30 KB of keywords, more than
    // the keyword DFA is built for (a tenant's packs choose them), so the smaller automaton
    // serves; findings are the same as with every line a candidate.
    let mut rules = filter_cap_fillers();
    // 95 letters that look random (no run or sequence a filler check would drop), then the
    // rule's number.
    let letters: String =
        (0..95u32).map(|n| char::from(b'a' + ((n * 7 + n * n * 3 + 5) % 26) as u8)).collect();
    let long = |i: usize| format!("{letters}{i:03}_");
    for i in 0..300 {
        let kw = long(i);
        rules.push(rule(&format!("long{i}"), &format!(r"\b({kw}[0-9]{{6}})\b"), 1, &[&kw], Category::Secret));
    }
    let mut text = String::from("plain text only\n").repeat(50);
    text.push_str(&format!("a = {}123456\nb = {}654321\n", long(7), long(299)));
    let scan = |after: u64| line_and_rule(&rules, &text, after);
    assert_eq!(scan(u64::MAX), ["51:long7", "52:long299"]);
    assert_eq!(scan(0), ["51:long7", "52:long299"]);
    assert_eq!(scan(0), scan(u64::MAX));
}

#[test]
fn keywords_with_regex_characters_and_shared_prefixes_filter_soundly_past_the_cap() {
    let mut rules = filter_cap_fillers();
    rules.push(rule("call", r"\b(a\.b\(c[0-9]{6})", 1, &["A.B(C"], Category::Secret));
    rules.push(rule("short", r"\b(a\.b\([x-z]{6})", 1, &["a.b("], Category::Secret));
    rules.push(rule("plus", r"(x\+y\|[0-9]{6})", 1, &["x+y|"], Category::Secret));
    let mut text = String::from("plain text only\n").repeat(50);
    text.push_str("v = a.b(c123456)\nw = a.b(xyzxyz)\nz = x+y|654321\n");
    let scan = |after: u64| line_and_rule(&rules, &text, after);
    assert_eq!(scan(0), ["51:call", "52:short", "53:plus"]);
    assert_eq!(scan(0), scan(u64::MAX));
}

#[test]
fn entropy_threshold_drops_low_entropy_secrets() {
    let mut r = rule("e", r#"pw = "([^"]{16,})""#, 1, &["pw ="], Category::Secret);
    r.entropy = Some(3.5);
    let got = run(vec![r], "f", "pw = \"aaaaaaaaaaaaaaaaaaaa\"\npw = \"q8Z!x2Lr0@Vw7#Km4$Tn\"\n").unwrap();
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("2:e:"));
}

#[test]
fn validator_rejects_candidates() {
    let mut r = rule("ssn", r"\b\d{3}-\d{2}-\d{4}\b", 0, &[], Category::Pii);
    r.validator = Some(Validator::UsSsn);
    let got = run(vec![r], "f", "666-12-3456 123-45-6789 123-00-4567\n").unwrap();
    assert_eq!(got, ["1:ssn:1****9"]);
}

#[test]
fn allowlist_stopwords_regexes_and_paths() {
    let mut r = rule("t", r"\b(tok_[A-Za-z0-9]{16})\b", 1, &["tok_"], Category::Secret);
    r.allowlist.stopwords = vec!["example".into()];
    r.allowlist.regexes = vec!["^tok_0{16}$".into()];
    r.allowlist.paths = vec![r"(^|/)testdata/".into()];
    let text = "tok_EXAMPLEabcdefghi\ntok_0000000000000000\ntok_Zq81Lm0Xr2Vt6Kp3\n";
    assert_eq!(run(vec![r.clone()], "src/a.txt", text).unwrap(), ["3:t:tok****Kp3"]);
    assert!(run(vec![r], "pkg/testdata/a.txt", text).unwrap().is_empty());
}

#[test]
fn multiline_rule_matches_across_lines_from_its_keyword_line() {
    let mut r = rule(
        "pem",
        r"-----BEGIN KEY-----([\s\S]{8,}?)-----END KEY-----",
        1,
        &["begin key"],
        Category::Secret,
    );
    r.multiline = true;
    let got =
        run(vec![r], "k.pem", "x\n-----BEGIN KEY-----\nabcdefgh\nijklmnop\n-----END KEY-----\n").unwrap();
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("2:pem:"), "{got:?}");
}

#[test]
fn same_secret_found_by_two_rules_is_reported_once_by_the_first() {
    let specific = rule("specific", r"\b(ghp_[A-Za-z0-9]{8})\b", 1, &["ghp_"], Category::Secret);
    let generic = rule("generic", r"token=([A-Za-z0-9_]{8,})", 1, &["token"], Category::Secret);
    let got = run(vec![specific, generic], "f", "token=ghp_Ab3dE6gH\n").unwrap();
    assert_eq!(got, ["1:specific:gh****gH"]);
}

#[test]
fn license_findings_carry_the_spdx_id() {
    let mut r = rule("mit", r"Permission is hereby granted", 0, &["permission is hereby"], Category::License);
    r.spdx = Some("MIT".into());
    assert_eq!(run(vec![r], "LICENSE", "Permission is hereby granted\n").unwrap(), ["1:mit:MIT"]);
}

#[test]
fn lazy_engine_reports_a_bad_regex_when_first_used() {
    let bad = rule("bad", r"(unclosed", 0, &["unclosed"], Category::Secret);
    let json =
        serde_json::to_vec(&Policy { format_version: POLICY_FORMAT_VERSION, rules: vec![bad.clone()] })
            .unwrap();
    let scan = |engine: &mut Engine, text: &[u8]| {
        scan_artifact(&mut SliceSource(text), "f", engine, &Limits::default(), &mut Report::default())
    };
    // Line by line (a small artifact), the rule compiles where its keyword first occurs.
    let mut engine = Engine::from_policy_json(&json).unwrap();
    scan(&mut engine, b"text\n").unwrap();
    let err = scan(&mut engine, b"an unclosed group\n").unwrap_err();
    assert!(matches!(err, ArtifactError::Engine(EngineError::Regex { .. })), "{err}");
    // The line filter holds the rule's regex, so once it is built the error surfaces on the
    // first scan.
    let mut engine = Engine::from_policy_json(&json).unwrap();
    engine.set_line_filter_after(0);
    let err = scan(&mut engine, b"text\n").unwrap_err();
    assert!(matches!(err, ArtifactError::Engine(EngineError::Regex { .. })), "{err}");
    // The eager engine refuses it up front, naming the rule.
    let err = Engine::new(Policy { format_version: POLICY_FORMAT_VERSION, rules: vec![bad] }).unwrap_err();
    assert!(err.to_string().starts_with("rule `bad`: regex does not compile"), "{err}");
}

#[test]
fn rejects_policy_of_another_format_version() {
    let err = Engine::from_policy_json(br#"{"format_version":99,"rules":[]}"#).unwrap_err();
    assert_eq!(err, EngineError::PolicyVersion { found: 99, expected: POLICY_FORMAT_VERSION });
}

#[test]
fn a_generic_rule_skips_placeholders_and_a_specific_rule_does_not() {
    let mut generic = rule("pw-in-url", r"://[a-z]{1,20}:([^@\s]{3,64})@", 1, &["://"], Category::Secret);
    generic.generic = true;
    let text = "a = postgres://app:${DB_PASSWORD}@db\n\
                b = postgres://app:xxxxxxxx@db\n\
                c = postgres://app:changeme@db\n\
                d = postgres://app:<password>@db\n\
                e = postgres://app:Zr8kq2Lm9@db\n";
    assert_eq!(run(vec![generic.clone()], "f", text).unwrap(), ["5:pw-in-url:Z****9"]);
    // A specific rule reports them all but the mask (filler is never key material).
    let mut specific = generic;
    specific.generic = false;
    let got = run(vec![specific], "f", text).unwrap();
    assert_eq!(got.iter().map(|f| &f[..1]).collect::<Vec<_>>(), ["1", "3", "4", "5"], "{got:?}");
}
