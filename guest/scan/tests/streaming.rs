//! Large files are scanned in fixed-size chunks with an overlap: findings on both sides of, and
//! across, chunk boundaries are reported once, with exact line and column.

mod common;

use cella_scan::CHUNK_LEN;
use common::*;

/// Builds a text of `lines` filler lines, planting `plant` at the given 1-based lines; returns
/// the text and, per plant, (line, column) as a reader would count them.
fn build(total_lines: usize, plants: &[(usize, &str)]) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut out = Vec::new();
    let mut at = Vec::new();
    for n in 1..=total_lines {
        match plants.iter().find(|(l, _)| *l == n) {
            Some((_, p)) => {
                let prefix = format!("value_{n} = ");
                at.push((n as u64, prefix.len() as u64 + 1));
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(p.as_bytes());
            }
            None => out.extend_from_slice(format!("filler line {n} with some text to pad it out").as_bytes()),
        }
        out.push(b'\n');
    }
    (out, at)
}

#[test]
fn line_numbers_are_exact_across_chunks() {
    // ~46 bytes per line: a chunk holds ~22,800 lines. Plant around each boundary.
    let per_line = 46;
    let boundary = CHUNK_LEN / per_line;
    let lines: Vec<usize> = [
        1,
        boundary - 200,
        boundary - 1,
        boundary,
        boundary + 1,
        2 * boundary - 150,
        2 * boundary,
        3 * boundary + 7,
    ]
    .into_iter()
    .collect();
    let plants: Vec<(usize, &str)> = lines.iter().map(|&l| (l, SECRET)).collect();
    let (text, expected) = build(4 * boundary, &plants);
    assert!(text.len() > 3 * CHUNK_LEN);
    let r = scan(&text, "big.txt").unwrap();
    let got: Vec<(u64, u64)> = r.findings.iter().map(|f| (f.line, f.column)).collect();
    assert_eq!(got, expected);
    assert_eq!(r.bytes_scanned, text.len() as u64);
}

#[test]
fn every_boundary_offset_is_handled() {
    // Put one secret (and one card) at every offset around the first chunk boundary in turn.
    for shift in (0..64).step_by(7) {
        let mut text = vec![b'x'; CHUNK_LEN - 40 + shift];
        let l = text.len();
        text[l - 1] = b'\n';
        text.extend_from_slice(format!("{SECRET} 4111-1111-1111-1111\n").as_bytes());
        text.extend_from_slice(b"tail\n");
        let r = scan(&text, "f.txt").unwrap();
        assert_eq!(triples(&r), ["f.txt:2:test-token", "f.txt:2:card"], "shift {shift}");
        assert_eq!((r.findings[0].column, r.findings[1].column), (1, 22));
    }
}

#[test]
fn long_line_without_newlines_keeps_columns() {
    // One 3 MiB line: chunks cannot end at a line boundary.
    let mut text = vec![b'a'; 3 * CHUNK_LEN];
    let at = CHUNK_LEN + 12345;
    text[at - 1] = b' ';
    text[at..at + SECRET.len()].copy_from_slice(SECRET.as_bytes());
    text[at + SECRET.len()] = b' ';
    let r = scan(&text, "min.js").unwrap();
    assert_eq!(triples(&r), ["min.js:1:test-token"]);
    assert_eq!(r.findings[0].column, at as u64 + 1);
}

#[test]
fn columns_count_code_points() {
    let text = format!("héllo wörld {SECRET}\n");
    let r = scan(text.as_bytes(), "u.txt").unwrap();
    assert_eq!(r.findings[0].column, 13);
}
