//! The session index: the same files, findings and refusals as a one-shot scan, and redaction
//! of findings in file bytes.

mod common;

use cella_scan::index::{mask_findings, Index};
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
    assert_eq!(report.files_skipped_binary, direct.files_skipped_binary);
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
