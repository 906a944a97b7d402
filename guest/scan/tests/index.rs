//! The session index: the same files, findings and refusals as a one-shot scan, and redaction
//! of findings in file bytes.

mod common;

use cella_scan::index::{mask_findings, Grep, GrepLimits, Index, MaskedView};
use cella_scan::{ArtifactError, Limits, Report, SliceSource};
use common::*;

const SECRET: &str = "tok_a1b2c3d4e5f6a7b8";

fn nested() -> Vec<u8> {
    let inner = tar(&[file("deep/creds.txt", format!("token {SECRET}\n").as_bytes())]);
    let zipped = zip(&[
        zfile("z/card.txt", b"pay with 4111 1111 1111 1111 today\n", true),
        zfile("z/inner.tar", &inner, false),
    ]);
    let outer = tar(&[
        file("app/a.txt", format!("line one\nkey = {SECRET}\n// SPDX-License-Identifier: MIT\n").as_bytes()),
        file("app/bin", b"\0\x01binary tok_a1b2c3d4e5f6a7b8"),
        file("app/bundle.zip", &zipped),
    ]);
    gzip(&outer)
}

#[test]
fn scanning_the_index_finds_exactly_what_a_scan_of_the_artifact_finds() {
    let artifact = nested();
    let direct = scan(&artifact, "app.tar.gz").unwrap();
    let mut index = Index::new();
    index.add_artifact(&mut SliceSource(&artifact), "app.tar.gz", "", &Limits::default(), u64::MAX).unwrap();
    let mut engine = engine();
    let mut report = Report::default();
    index.scan(&mut engine, &Limits::default(), &mut report).unwrap();
    assert_eq!(report.findings, direct.findings);
    assert_eq!(report.files_scanned, direct.files_scanned);
    assert_eq!(report.files_binary, direct.files_binary);
    assert_eq!(report.summary(&policy(), 0), direct.summary(&policy(), 0));
    assert_eq!(report.bytes_scanned, direct.bytes_scanned);
    let paths: Vec<&str> = index.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["app/a.txt", "app/bin", "app/bundle.zip!/z/card.txt", "app/bundle.zip!/z/inner.tar!/deep/creds.txt"]
    );
}

#[test]
fn the_index_refuses_what_a_scan_refuses_naming_the_entry() {
    let evil = gzip(&tar(&[file("ok.txt", b"x"), file("../../etc/passwd", b"root")]));
    let scanned = scan(&evil, "evil.tgz").unwrap_err();
    let mut index = Index::new();
    let indexed = index.add_artifact(&mut SliceSource(&evil), "evil.tgz", "", &Limits::default(), u64::MAX);
    assert_eq!(indexed.unwrap_err(), scanned);
    assert!(matches!(scanned, ArtifactError::PathEscapesRoot { ref entry } if entry == "../../etc/passwd"));
    assert!(index.files().is_empty());
}

#[test]
fn masking_hides_secrets_and_card_numbers_but_keeps_length_and_licenses() {
    let text = format!("key = {SECRET}\ncard 4111 1111 1111 1111\n// SPDX-License-Identifier: MIT\n");
    let mut engine = engine();
    let (masked, count) = mask_findings(&mut engine, "f", text.as_bytes()).unwrap().unwrap();
    let masked = String::from_utf8(masked).unwrap();
    assert_eq!(count, 2);
    assert_eq!(masked.len(), text.len());
    assert!(!masked.contains(SECRET) && !masked.contains("4111 1111"), "{masked}");
    assert!(masked.starts_with("key = ********************\ncard *******************\n"), "{masked}");
    assert!(masked.ends_with("SPDX-License-Identifier: MIT\n"));
    assert_eq!(mask_findings(&mut engine, "b", b"\0bin").unwrap(), None, "binary files cannot be masked");
}

/// An index of one file holding `secret` between known context.
fn index_with_secret(secret: &str) -> Index {
    let text = format!("intro line\nconfig: key={secret}; end\nlast é line\n");
    let mut index = Index::new();
    let artifact = tar(&[file("app/conf.txt", text.as_bytes())]);
    index.add_artifact(&mut SliceSource(&artifact), "app.tar", "", &Limits::default(), u64::MAX).unwrap();
    index
}

/// Grep outcome of `pattern` over `index` as the masked view shows it.
fn masked_grep(index: &Index, pattern: &str) -> Vec<(String, u64, u64, String)> {
    let mut view = MaskedView::new();
    view.extend(index, &mut engine()).unwrap();
    let mut grep = Grep::new(pattern, &GrepLimits::default()).unwrap();
    let out = index.grep(&mut grep, Some(&view), None, 100, 200);
    out.matches.into_iter().map(|m| (m.path, m.line, m.column, m.text)).collect()
}

/// The position-probing attack: each pattern is an alternation `.{k}<known context><c>` over
/// every candidate character `c`; against the raw text, the match column gives the next
/// character of the secret. Against the masked view, two different secrets of the same length
/// (so the same masked view) give identical answers to every probe: nothing about the secret
/// can be learnt, whatever the patterns.
#[test]
fn grep_through_a_masked_view_answers_the_same_for_any_secret_behind_the_mask() {
    let a = index_with_secret("tok_a1b2c3d4e5f6a7b8");
    let b = index_with_secret("tok_9z8y7x6w5v4u3t2s");
    let alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_";
    let mut probes: Vec<String> = Vec::new();
    for k in (0..20).step_by(3) {
        let alts: Vec<String> = alphabet.chars().map(|c| format!(".{{{k}}}key=tok_{c}")).collect();
        probes.push(alts.join("|"));
        let alts: Vec<String> = alphabet.chars().map(|c| format!("key=.{{{k}}}{c}")).collect();
        probes.push(alts.join("|"));
    }
    probes.extend(
        [r"(?m)$", r"\b", r"[a-z0-9]{3}", r"tok_", r"=\w", r"\*+", r"key=[^;]*;", r"a1b2", r"(?s).+"]
            .map(String::from),
    );
    for pattern in &probes {
        assert_eq!(masked_grep(&a, pattern), masked_grep(&b, pattern), "pattern {pattern}");
    }
    // Nothing matches into the masked range, and what is shown is the masked text.
    assert!(masked_grep(&a, "tok_a").is_empty());
    assert!(masked_grep(&a, "key=tok").is_empty());
    assert_eq!(
        masked_grep(&a, "; end"),
        [("app/conf.txt".into(), 2, 33, "config: key=********************; end".into())]
    );
    // Columns and lines after a masked range are those of the masked text.
    assert_eq!(
        masked_grep(&a, "(?m)line$"),
        [
            ("app/conf.txt".into(), 1, 7, "intro line".into()),
            ("app/conf.txt".into(), 3, 8, "last é line".into())
        ]
    );
}

#[test]
fn grep_without_a_view_still_sees_the_raw_text() {
    let a = index_with_secret("tok_a1b2c3d4e5f6a7b8");
    let mut grep = Grep::new("tok_a1", &GrepLimits::default()).unwrap();
    let out = a.grep(&mut grep, None, None, 100, 200);
    assert_eq!(out.matches.len(), 1);
    assert_eq!(out.matches[0].column, 13);
}

#[test]
fn a_masked_view_covers_files_added_later_once_extended() {
    let mut index = index_with_secret("tok_a1b2c3d4e5f6a7b8");
    let mut view = MaskedView::new();
    view.extend(&index, &mut engine()).unwrap();
    let more =
        tar(&[file("x.txt", b"other tok_0011223344556677 here\n"), file("y.bin", b"\0tok_0011223344556677")]);
    index.add_artifact(&mut SliceSource(&more), "more", "more/", &Limits::default(), u64::MAX).unwrap();
    assert_eq!(view.covered(), 1);
    let mut grep = Grep::new("other", &GrepLimits::default()).unwrap();
    assert!(
        index.grep(&mut grep, Some(&view), None, 10, 200).matches.is_empty(),
        "not covered: not searched"
    );
    view.extend(&index, &mut engine()).unwrap();
    assert_eq!(view.covered(), 3);
    let out = index.grep(&mut grep, Some(&view), None, 10, 200);
    assert_eq!(out.matches[0].text, "other ******************** here");
    assert_eq!(view.mask_of(&index, "more/x.txt").unwrap().findings, 1);
    assert!(view.mask_of(&index, "more/y.bin").is_none(), "binary files have no mask");
}
