//! The fixture corpus (`tests/fixtures/corpus/`) scanned with the built-in packs: planted
//! findings of every category are found at the exact file:line:rule (the token inside the
//! binary `bin/blob.bin` too, by its printable strings), and the decoys next to them
//! (Luhn-invalid cards, invalid SSNs, bad IBAN checksums, low-entropy and placeholder values,
//! allowlisted examples) are not.

use std::path::{Path, PathBuf};

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus")
}

fn files(dir: &Path, root: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, root, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read(&p).unwrap()));
        }
    }
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    files(&corpus_root(), &corpus_root(), &mut v);
    v
}

fn engine() -> Engine {
    let compiled = load_packs(DEFAULT_PACKS).unwrap();
    Engine::from_policy_json(compiled.as_bytes()).unwrap()
}

fn triples(report: &Report) -> Vec<String> {
    let mut v: Vec<String> =
        report.findings.iter().map(|f| format!("{}:{}:{}", f.path, f.line, f.rule_id)).collect();
    v.sort();
    v
}

const EXPECTED: &[&str] = &[
    "COPYING:1:license-text-gpl-3.0",
    "LICENSE:5:license-text-mit",
    "bin/blob.bin:1:github-pat",
    "config/app.env:10:npm-access-token",
    "config/app.env:11:pypi-upload-token",
    "config/app.env:12:gitlab-pat",
    "config/app.env:13:gcp-api-key",
    "config/app.env:14:jwt",
    "config/app.env:15:generic-secret-assignment",
    "config/app.env:2:aws-access-key-id",
    "config/app.env:3:aws-secret-access-key",
    "config/app.env:6:github-pat",
    "config/app.env:7:slack-bot-token",
    "config/app.env:8:stripe-secret-key",
    "config/app.env:9:sendgrid-api-key",
    "data/customers.csv:2:email-address",
    "data/customers.csv:2:iban",
    "data/customers.csv:2:payment-card-number",
    "data/customers.csv:2:phone-number",
    "data/customers.csv:2:us-ssn",
    "data/customers.csv:4:iban",
    "data/customers.csv:4:payment-card-number",
    "data/customers.csv:4:phone-number",
    "keys/deploy.pem:2:private-key-pem",
    "src/lib.rs:1:spdx-license-identifier",
    "vendor/bsd2/LICENSE:3:license-text-bsd-2-clause",
    "vendor/bsd3/LICENSE:3:license-text-bsd-3-clause",
];

/// The files as one ustar archive.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    cella_e2e::ustar(&entries)
}

#[test]
fn corpus_files_yield_exactly_the_planted_findings() {
    let mut engine = engine();
    let mut report = Report::default();
    for (name, data) in corpus() {
        scan_artifact(&mut SliceSource(&data), &name, &mut engine, &Limits::default(), &mut report).unwrap();
    }
    assert_eq!(triples(&report), EXPECTED);
    assert_eq!(report.files_binary, 1, "bin/blob.bin is binary");
    let blob = report.findings.iter().find(|f| f.path == "bin/blob.bin").unwrap();
    assert_eq!(blob.bytes, Some(cella_scan::ByteRange { offset: 26, length: 40 }));
}

#[test]
fn corpus_as_tar_yields_the_same_findings() {
    let tar = tar_of(&corpus());
    let mut engine = engine();
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(&tar), "corpus.tar", &mut engine, &Limits::default(), &mut report)
        .unwrap();
    assert_eq!(triples(&report), EXPECTED);
}

#[test]
fn findings_never_carry_the_secret() {
    let mut engine = engine();
    let mut report = Report::default();
    let corpus = corpus();
    for (name, data) in &corpus {
        scan_artifact(&mut SliceSource(data), name, &mut engine, &Limits::default(), &mut report).unwrap();
    }
    let json = cella_scan::sarif::to_json(engine.policy(), &report, &Default::default());
    for secret in [
        "AKIAUJZDEGXDNCF32EPF",
        "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",
        "4111 1111 1111 1111",
        "123-45-6789",
    ] {
        assert!(!json.contains(secret), "SARIF output contains `{secret}`");
        assert!(!format!("{:?}", report.findings).contains(secret));
    }
}

/// The findings (every field) and the SARIF log of `artifact` scanned by an engine that builds
/// its line filter after `after` bytes of text.
fn scan_with_line_filter_after(artifact: &[u8], name: &str, after: u64) -> (Report, String) {
    let mut engine = engine();
    engine.set_line_filter_after(after);
    let mut report = Report::default();
    let limits = Limits { max_findings: usize::MAX, ..Limits::default() };
    scan_artifact(&mut SliceSource(artifact), name, &mut engine, &limits, &mut report).unwrap();
    let sarif = cella_scan::sarif::to_json(engine.policy(), &report, &Default::default());
    (report, sarif)
}

/// Text that holds every keyword of every built-in rule, each on its own line and embedded in
/// assignments, plus values for the keyword-less rules: every rule's regex gets to run.
fn every_keyword_text() -> Vec<u8> {
    let compiled = load_packs(DEFAULT_PACKS).unwrap();
    let mut text = String::new();
    for rule in &compiled.policy().rules {
        for k in &rule.keywords {
            text.push_str(&format!("{k}\n{k} = \"{k}AbCdEf0123456789AbCdEf0123456789xyz\"\n"));
        }
    }
    text.push_str("4111 1111 1111 1111 a@b.io +14155552671 123-45-6789 GB82 WEST 1234 5698 7654 32\n");
    text.into_bytes()
}

#[test]
fn line_by_line_and_line_filter_find_the_same() {
    let (generated, planted) = cella_policies::rules::bench::generate_corpus(3 << 20);
    let generated_files: Vec<(String, Vec<u8>)> =
        generated.chunks(40_000).enumerate().map(|(i, c)| (format!("src/{i}.rs"), c.to_vec())).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corpus.tar", tar_of(&corpus())),
        ("every-keyword.txt", every_keyword_text()),
        // Many files: an engine switching to the line filter part-way through.
        ("generated.tar", tar_of(&generated_files)),
        // Several chunks, so line-by-line scanning also crosses chunk boundaries.
        ("generated.txt", generated),
    ];
    for (name, artifact) in &cases {
        let (filtered, filtered_sarif) = scan_with_line_filter_after(artifact, name, 0);
        let (by_line, by_line_sarif) = scan_with_line_filter_after(artifact, name, u64::MAX);
        let (default, default_sarif) =
            scan_with_line_filter_after(artifact, name, cella_scan::LINE_FILTER_AFTER);
        assert!(!filtered.findings.is_empty(), "{name}: no findings at all");
        assert_eq!(by_line.findings, filtered.findings, "{name}");
        assert_eq!(default.findings, filtered.findings, "{name}");
        assert_eq!(by_line_sarif, filtered_sarif, "{name}");
        let compiled = load_packs(DEFAULT_PACKS).unwrap();
        let value = cella_scan::sarif::to_value(compiled.policy(), &filtered, &Default::default());
        assert_eq!(filtered_sarif, serde_json::to_string_pretty(&value).unwrap(), "{name}");
        assert_eq!(default_sarif, filtered_sarif, "{name}");
        assert_eq!(by_line.bytes_scanned, filtered.bytes_scanned, "{name}");
        let (switching, switching_sarif) = scan_with_line_filter_after(artifact, name, 100_000);
        assert_eq!(switching.findings, filtered.findings, "{name}");
        assert_eq!(switching_sarif, filtered_sarif, "{name}");
    }
    let (generated, _) = scan_with_line_filter_after(&cases[3].1, "generated.txt", u64::MAX);
    assert_eq!(generated.findings.len() as u64, planted);
}
