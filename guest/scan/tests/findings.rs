//! What keeps a finding from counting, and how findings are told apart: inline markers, the
//! baseline, excludes (job and rule path allowlists), specific rules over generic ones, binary
//! files' printable strings, fingerprints, regions, and the findings cap.

mod common;

use cella_scan::index::Index;
use cella_scan::{
    glob_to_regex, scan_artifact, ArtifactError, ByteRange, Category, Engine, EngineError, Finding,
    FingerprintKey, FingerprintSet, GlobError, Limits, Policy, Report, SliceSource, Suppression, Validator,
    CHUNK_LEN, INLINE_MARKERS, POLICY_FORMAT_VERSION,
};
use common::*;

const KEY: FingerprintKey = FingerprintKey::new([0x5e; 32]);

fn engine_of(rules: Vec<cella_scan::Rule>) -> Engine {
    let mut e = Engine::new(Policy { format_version: POLICY_FORMAT_VERSION, rules }).unwrap();
    e.set_fingerprint_key(KEY);
    e
}

fn keyed_engine() -> Engine {
    let mut e = engine();
    e.set_fingerprint_key(KEY);
    e
}

fn scan_in(engine: &mut Engine, data: &[u8], name: &str, limits: &Limits) -> Report {
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(data), name, engine, limits, &mut report).unwrap();
    report
}

/// `path:line:rule` and how the finding is suppressed, if it is.
fn outcome(r: &Report) -> Vec<(String, Option<Suppression>)> {
    r.findings.iter().map(|f| (format!("{}:{}:{}", f.path, f.line, f.rule_id), f.suppression)).collect()
}

fn pem_rule() -> cella_scan::Rule {
    let mut r = rule(
        "pem",
        r"-----BEGIN KEY-----([\s\S]{16,}?)-----END KEY-----",
        1,
        &["begin key-----"],
        Category::Secret,
    );
    r.multiline = true;
    r
}

#[test]
fn each_inline_marker_suppresses_the_finding_on_its_line_only() {
    for marker in INLINE_MARKERS {
        for written in [marker.to_string(), marker.to_ascii_uppercase()] {
            let text = format!("a = {SECRET} # {written}\nb = {SECRET}\n");
            let r = scan_in(&mut keyed_engine(), text.as_bytes(), "f.py", &Limits::default());
            assert_eq!(
                outcome(&r),
                [
                    ("f.py:1:test-token".into(), Some(Suppression::Inline { marker })),
                    ("f.py:2:test-token".into(), None)
                ],
                "{written}"
            );
            let s = r.summary(&policy(), 0);
            assert_eq!((s.findings, s.suppressed.inline, s.suppressed.total), (2, 1, 1), "{written}");
            assert_eq!((s.unsuppressed.error, s.by_rule["test-token"]), (1, 1), "{written}");
        }
    }
}

#[test]
fn a_marker_on_the_first_or_last_line_of_a_multiline_finding_suppresses_it() {
    let body = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY\nWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\n";
    let cases = [
        (format!("-----BEGIN KEY----- cella:allow\n{body}-----END KEY-----\n"), true),
        (format!("-----BEGIN KEY-----\n{body}-----END KEY----- # pragma: allowlist secret\n"), true),
        (
            format!(
                "-----BEGIN KEY-----\nQUJD gitleaks:allow REVGR0hJSktMTU5PUFFS\n{body}-----END KEY-----\n"
            ),
            false,
        ),
        (format!("cella:allow\n-----BEGIN KEY-----\n{body}-----END KEY-----\n"), false),
    ];
    for (text, suppressed) in cases {
        let r = scan_in(&mut engine_of(vec![pem_rule()]), text.as_bytes(), "k.pem", &Limits::default());
        assert_eq!(r.findings.len(), 1, "{text}");
        assert_eq!(r.findings[0].suppression.is_some(), suppressed, "{text}");
    }
}

#[test]
fn the_baseline_suppresses_exactly_the_findings_it_lists() {
    let first = format!("a = {SECRET}\ncard 4111 1111 1111 1111\nb = tok_aaaaaaaaaaaaaaaa\n");
    let known = scan_in(&mut keyed_engine(), first.as_bytes(), "app.env", &Limits::default());
    assert_eq!(known.findings.len(), 3);
    let baseline: Vec<[u8; 32]> =
        known.findings.iter().map(|f| FingerprintSet::parse_hex(&f.location_fingerprint).unwrap()).collect();
    // The same file with lines added above and a new secret: only the new one counts.
    let second = format!("# header\n\n{first}c = tok_bbbbbbbbbbbbbbbb\n");
    let mut engine = keyed_engine();
    engine.set_baseline(FingerprintSet::new(baseline.clone()));
    let r = scan_in(&mut engine, second.as_bytes(), "app.env", &Limits::default());
    assert_eq!(
        outcome(&r),
        [
            ("app.env:3:test-token".into(), Some(Suppression::Baseline)),
            ("app.env:4:card".into(), Some(Suppression::Baseline)),
            ("app.env:5:test-token".into(), Some(Suppression::Baseline)),
            ("app.env:6:test-token".into(), None),
        ]
    );
    let s = r.summary(&policy(), 0);
    assert_eq!((s.suppressed.baseline, s.suppressed.inline, s.suppressed.total), (3, 0, 3));
    assert_eq!((s.findings, s.unsuppressed.error, s.unsuppressed.warning), (4, 1, 0));
    // Under another key the fingerprints differ and nothing matches.
    let mut other = common::engine();
    other.set_fingerprint_key(FingerprintKey::new([1; 32]));
    other.set_baseline(FingerprintSet::new(baseline));
    let r = scan_in(&mut other, second.as_bytes(), "app.env", &Limits::default());
    assert!(r.findings.iter().all(|f| f.suppression.is_none()));
}

#[test]
fn an_inline_marker_is_counted_before_the_baseline() {
    let text = format!("a = {SECRET} # cella:allow\n");
    let known = scan_in(&mut keyed_engine(), text.as_bytes(), "f", &Limits::default());
    let mut engine = keyed_engine();
    engine.set_baseline(FingerprintSet::new(vec![FingerprintSet::parse_hex(
        &known.findings[0].location_fingerprint,
    )
    .unwrap()]));
    let r = scan_in(&mut engine, text.as_bytes(), "f", &Limits::default());
    assert_eq!(r.findings[0].suppression, Some(Suppression::Inline { marker: "cella:allow" }));
    assert_eq!((r.suppressed_inline, r.suppressed_baseline), (1, 0));
}

#[test]
fn fingerprints_are_stable_across_runs_and_distinct_per_location() {
    // Thirteen equal card numbers: one secret fingerprint, thirteen location fingerprints.
    let mut text = String::new();
    for i in 0..13 {
        text.push_str(&format!("row {i}\ncard: 4111 1111 1111 1111\n"));
    }
    let run = |text: &str| scan_in(&mut keyed_engine(), text.as_bytes(), "cards.txt", &Limits::default());
    let a = run(&text);
    assert_eq!(a.findings.len(), 13);
    let secrets: std::collections::BTreeSet<&str> =
        a.findings.iter().map(|f| f.fingerprint.as_str()).collect();
    assert_eq!(secrets.len(), 1);
    let locations: std::collections::BTreeSet<&str> =
        a.findings.iter().map(|f| f.location_fingerprint.as_str()).collect();
    assert_eq!(locations.len(), 13);
    let lines: Vec<&str> = a.findings.iter().map(|f| f.line_hash.as_str()).collect();
    let hash = &lines[0][..16];
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(lines, (1..=13).map(|n| format!("{hash}:{n}")).collect::<Vec<_>>());
    // A second run gives the same values; so does one with lines moved and re-indented.
    let fps = |r: &Report| -> Vec<(String, String, String)> {
        r.findings
            .iter()
            .map(|f| (f.fingerprint.clone(), f.location_fingerprint.clone(), f.line_hash.clone()))
            .collect()
    };
    assert_eq!(fps(&run(&text)), fps(&a));
    let moved = format!("new first line\n\n{}", text.replace("card: ", "    card:  "));
    let b = run(&moved);
    assert_eq!(fps(&b), fps(&a));
    assert_eq!(b.findings[0].line, a.findings[0].line + 2);
    // The same secret in another file, or found by another key, has other location values.
    let other = scan_in(&mut keyed_engine(), text.as_bytes(), "copy.txt", &Limits::default());
    assert_ne!(other.findings[0].location_fingerprint, a.findings[0].location_fingerprint);
    assert_eq!(other.findings[0].fingerprint, a.findings[0].fingerprint);
}

#[test]
fn regions_end_just_after_the_secret() {
    let text = format!("é = {SECRET}\n");
    let r = scan_in(&mut keyed_engine(), text.as_bytes(), "f", &Limits::default());
    let f = &r.findings[0];
    assert_eq!((f.line, f.column, f.end_line, f.end_column), (1, 5, 1, 5 + SECRET.len() as u64));
    let pem = "x\n-----BEGIN KEY-----\nQUJDREVGR0hJSktMTU5PUFFS\nab-----END KEY-----\n";
    let r = scan_in(&mut engine_of(vec![pem_rule()]), pem.as_bytes(), "k", &Limits::default());
    let f = &r.findings[0];
    // The secret runs from the end of the BEGIN line to just before the END marker.
    assert_eq!((f.line, f.column, f.end_line, f.end_column), (2, 20, 4, 3));
    assert_eq!(f.bytes, None);
}

#[test]
fn job_excludes_skip_and_count_files_and_archives() {
    let deep = format!("k = {SECRET}\n");
    let inner = zip(&[zfile("lib/deep.txt", deep.as_bytes(), true)]);
    let data = format!("k = {SECRET}\n");
    let t = tar(&[
        file("./src/app.txt", data.as_bytes()),
        file("vendor/lib/x.txt", data.as_bytes()),
        file("web/app.min.js", data.as_bytes()),
        file("test/t.txt", data.as_bytes()),
        file("src/test/kept.txt", data.as_bytes()),
        file("third_party.zip", &inner),
        file("bundle.zip", &inner),
    ]);
    let mut engine = keyed_engine();
    engine.set_excludes(&["vendor/", "*.min.js", "/test", "third_party.zip", "**/lib/deep.txt"]).unwrap();
    let r = scan_in(&mut engine, &t, "repo.tar", &Limits::default());
    assert_eq!(triples(&r), ["src/app.txt:1:test-token", "src/test/kept.txt:1:test-token"]);
    // vendor/lib/x.txt, web/app.min.js, test/t.txt, third_party.zip (once), bundle.zip!/lib/deep.txt
    assert_eq!((r.files_excluded, r.files_scanned), (5, 2));
    assert_eq!(r.summary(&policy(), 0).files_excluded, 5);
    // The same artifact held in a session's index gives the same scan.
    let mut index = Index::new();
    index.add_artifact(&mut SliceSource(&t), "repo.tar", "", &Limits::default(), u64::MAX).unwrap();
    let mut report = Report::default();
    index.scan(&mut engine, &Limits::default(), &mut report).unwrap();
    assert_eq!(report.findings, r.findings);
    assert_eq!((report.files_excluded, report.files_scanned), (5, 2));
}

#[test]
fn an_excluded_plain_file_is_not_scanned() {
    let mut engine = keyed_engine();
    engine.set_excludes(&["*.env"]).unwrap();
    let r = scan_in(&mut engine, format!("k = {SECRET}\n").as_bytes(), "prod.env", &Limits::default());
    assert_eq!((r.findings.len(), r.files_excluded, r.files_scanned), (0, 1, 0));
    // An excluded entry is still read past: a corrupt one is still refused.
    let mut bad = tar(&[file("vendor/x.zip", b"PK\x03\x04 not really a zip")]);
    bad.truncate(700);
    let mut report = Report::default();
    let e = scan_artifact(&mut SliceSource(&bad), "a.tar", &mut engine, &Limits::default(), &mut report);
    assert!(matches!(e, Err(ArtifactError::Truncated { .. })), "{e:?}");
}

#[test]
fn a_bad_exclude_glob_is_refused_saying_why() {
    let mut engine = keyed_engine();
    let e = engine.set_excludes(&["src/", "!src/keep.rs"]).unwrap_err();
    assert_eq!(e, EngineError::Exclude(GlobError::Negation { glob: "!src/keep.rs".into() }));
    assert!(e.to_string().contains("negation is not supported"), "{e}");
}

#[test]
fn a_rule_path_allowlist_from_globs_turns_the_rule_off_for_matching_files_and_archives() {
    let mut token = rule("test-token", r"\b(tok_[a-z0-9]{16})\b", 1, &["tok_"], Category::Secret);
    token.allowlist.paths = vec![glob_to_regex("test/").unwrap(), glob_to_regex("fixtures.zip").unwrap()];
    let mut card = rule("card", r"\b\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}\b", 0, &[], Category::Pii);
    card.validator = Some(Validator::PaymentCard);
    let data = format!("k = {SECRET}\ncard 4111 1111 1111 1111\n");
    let inner = zip(&[zfile("a.txt", data.as_bytes(), false)]);
    let t = tar(&[
        file("test/a.txt", data.as_bytes()),
        file("pkg/test/b.txt", data.as_bytes()),
        file("src/c.txt", data.as_bytes()),
        file("fixtures.zip", &inner),
    ]);
    let r = scan_in(&mut engine_of(vec![token, card]), &t, "a.tar", &Limits::default());
    assert_eq!(
        triples(&r),
        [
            "test/a.txt:2:card",
            "pkg/test/b.txt:2:card",
            "src/c.txt:1:test-token",
            "src/c.txt:2:card",
            "fixtures.zip!/a.txt:2:card"
        ]
    );
    assert_eq!(r.files_excluded, 0, "a rule's allowlist excludes no file");
}

#[test]
fn a_specific_rule_beats_a_generic_one_wherever_it_stands() {
    let mut generic =
        rule("generic", r#"(?i)token\s*=\s*"([A-Za-z0-9_]{16,})""#, 1, &["token"], Category::Secret);
    generic.generic = true;
    generic.severity = cella_scan::Severity::Warning;
    let specific = rule("acme", r"\b(acme_[a-z0-9]{16})\b", 1, &["acme_"], Category::Secret);
    // The specific secret overlaps the generic one without being equal to it.
    let partial = rule("acme-prefix", r#""(acme_[a-z]{4})"#, 1, &["acme_"], Category::Secret);
    let text = "token = \"acme_0123456789abcdef\"\ntoken = \"Zq8Lr0Vw7Km4Tn2Xp5Yc\"\ntoken = \"acme_abcdzzzzzzzzzzzz\"\n";
    for rules in [vec![generic.clone(), specific.clone()], vec![specific.clone(), generic.clone()]] {
        let r = scan_in(&mut engine_of(rules), text.as_bytes(), "f", &Limits::default());
        assert_eq!(
            r.findings.iter().map(|f| format!("{}:{}", f.line, f.rule_id)).collect::<Vec<_>>(),
            ["1:acme", "2:generic", "3:acme"]
        );
    }
    let r = scan_in(&mut engine_of(vec![generic.clone(), partial]), text.as_bytes(), "f", &Limits::default());
    assert_eq!(
        r.findings.iter().map(|f| format!("{}:{}", f.line, f.rule_id)).collect::<Vec<_>>(),
        ["1:generic", "2:generic", "3:acme-prefix"]
    );
    // Among rules of one kind, the first in policy order, as before.
    let mut other_generic = generic.clone();
    other_generic.id = "generic-2".into();
    let r = scan_in(&mut engine_of(vec![other_generic, generic]), text.as_bytes(), "f", &Limits::default());
    assert_eq!(r.findings.iter().map(|f| f.rule_id.as_str()).collect::<Vec<_>>(), ["generic-2"; 3]);
}

fn utf16(s: &str) -> Vec<u8> {
    s.bytes().flat_map(|b| [b, 0]).collect()
}

#[test]
fn binary_files_are_scanned_by_their_ascii_and_utf16_strings_with_byte_offsets() {
    let wide = "tok_ffffeeeeddddcccc";
    let mut bin = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    bin.extend_from_slice(&[0x90; 100]);
    let ascii_at = bin.len() + 5;
    bin.extend_from_slice(format!("key= {SECRET}").as_bytes());
    bin.extend_from_slice(b"\0\0\xff\x01card 4111 1111 1111 1111\0\n\n");
    let wide_at = bin.len() + 2 * "pw=".len();
    bin.extend(utf16(&format!("pw={wide}")));
    bin.extend_from_slice(&[0, 0, 0xfe]);
    // Too short to be a string: not scanned.
    bin.extend_from_slice(b"\0tok_\0");
    let r = scan_in(&mut keyed_engine(), &bin, "bin/blob.bin", &Limits::default());
    assert_eq!(triples(&r), ["bin/blob.bin:1:test-token", "bin/blob.bin:3:test-token"]);
    let bytes: Vec<Option<ByteRange>> = r.findings.iter().map(|f| f.bytes).collect();
    assert_eq!(
        bytes,
        [
            Some(ByteRange { offset: ascii_at as u64, length: SECRET.len() as u64 }),
            Some(ByteRange { offset: wide_at as u64, length: 2 * wide.len() as u64 }),
        ]
    );
    assert!(r.findings.iter().all(|f| f.redacted.starts_with("tok")));
    let s = r.summary(&policy(), 0);
    assert_eq!((s.files_scanned, s.files_binary, s.files_binary_truncated), (1, 1, 0));
    assert_eq!(s.bytes_scanned, bin.len() as u64);
    assert_eq!(s.by_category["pii"], 0, "personal data is not looked for in binary files");
}

#[test]
fn binary_strings_are_found_whole_across_chunks_at_exact_offsets() {
    let mut bin = vec![0u8; 16];
    let mut expected = Vec::new();
    let mut n = 0u32;
    while bin.len() < 3 * CHUNK_LEN {
        // Filler of non-text bytes and short runs, then a token every ~61 KiB.
        for i in 0..61_000u32 {
            bin.push(if i % 7 == 3 { b'a' } else { (0x80 + i % 64) as u8 });
        }
        let token = format!("tok_{n:016x}");
        expected.push((bin.len() + 4, token.len()));
        bin.extend_from_slice(format!("id: {token}").as_bytes());
        n += 1;
    }
    let r = scan_in(&mut keyed_engine(), &bin, "big.bin", &Limits::default());
    let got: Vec<(usize, usize)> =
        r.findings.iter().map(|f| f.bytes.map(|b| (b.offset as usize, b.length as usize)).unwrap()).collect();
    assert_eq!(got, expected);
}

#[test]
fn binary_scanning_stops_at_the_byte_limit() {
    let mut bin = vec![0u8; 1000];
    bin.extend_from_slice(format!("k={SECRET}\0").as_bytes());
    bin.resize(5000, 0);
    bin.extend_from_slice(format!("k={SECRET}\0").as_bytes());
    let limits = Limits { max_binary_bytes: 4096, ..Limits::default() };
    let r = scan_in(&mut keyed_engine(), &bin, "b.bin", &limits);
    assert_eq!(r.findings.len(), 1);
    assert_eq!((r.files_binary, r.files_binary_truncated, r.bytes_scanned), (1, 1, 4096));
    // The rest was read, so an archive around it goes on.
    let t = tar(&[file("b.bin", &bin), file("c.txt", format!("k={SECRET}\n").as_bytes())]);
    let r = scan_in(&mut keyed_engine(), &t, "a.tar", &limits);
    assert_eq!(triples(&r), ["b.bin:1:test-token", "c.txt:1:test-token"]);
}

fn suppressed_then_open(limits: &Limits) -> Report {
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&format!("k{i} = tok_{i:016} # cella:allow\n"));
    }
    for i in 5..7 {
        text.push_str(&format!("k{i} = tok_{i:016}\n"));
    }
    scan_in(&mut keyed_engine(), text.as_bytes(), "f", limits)
}

#[test]
fn at_the_cap_unsuppressed_findings_take_the_place_of_suppressed_ones() {
    let r = suppressed_then_open(&Limits { max_findings: 3, ..Limits::default() });
    assert_eq!(r.findings.iter().map(|f| f.line).collect::<Vec<_>>(), [6, 7]);
    assert!(r.findings.iter().all(|f: &Finding| f.suppression.is_none()));
    let s = r.summary(&policy(), 0);
    assert_eq!((s.findings, s.findings_dropped, s.suppressed.inline, s.unsuppressed.error), (7, 5, 5, 2));
    let all = suppressed_then_open(&Limits::default());
    assert_eq!((all.findings.len(), all.findings_dropped), (7, 0));
}
