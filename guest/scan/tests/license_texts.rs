//! The SPDX License List's licence texts as the matcher sees them: the anchors file is what
//! the shipped texts give; every shipped text is found as itself (or as a text with the same
//! words), whole and in modified copies (reflowed, re-cased, another copyright line, in
//! comments).

use cella_scan::license_text::{anchors, find_all, score_against, shipped, MIN_SCORE};

/// How alike two texts must be (per cent) for a match of one to count as finding the other.
const TWIN: u8 = 95;

const ANCHORS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/spdx/text-anchors.tsv");

#[test]
fn anchors_are_current() {
    let generated = anchors::generate(cella_scan::license_text::TEXTS_ZIP);
    if std::env::var_os("CELLA_UPDATE_SPDX").is_some() {
        std::fs::write(ANCHORS_PATH, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(ANCHORS_PATH).unwrap();
    assert!(
        shipped == generated,
        "policies/spdx/text-anchors.tsv is not what texts.zip gives; regenerate it with \
         CELLA_UPDATE_SPDX=1 cargo test -p cella-scan --test license_texts anchors_are_current"
    );
}

/// `text`'s words re-wrapped at `width` columns.
fn reflowed(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out.push('\n');
    out
}

/// `text` with its copyright lines replaced by another holder's, and one added on top.
fn other_copyright(text: &str) -> String {
    let mut out = String::from("Copyright (c) 2031 Someone Else <someone@example.org>\n\n");
    for line in text.lines() {
        let notice = line.trim_start().to_ascii_lowercase().starts_with("copyright")
            && line.bytes().any(|b| b.is_ascii_digit());
        if notice {
            out.push_str("Copyright 2029-2031 The Other Authors\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `text` as a block comment.
fn commented(text: &str) -> String {
    let mut out = String::from("/*\n");
    for line in text.lines() {
        out.push_str(" * ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(" */\nfn main() {}\n");
    out
}

#[test]
fn every_shipped_text_is_found_as_itself_and_so_are_modified_copies() {
    let texts = shipped();
    assert!(texts.len() > 700, "{} licence texts shipped", texts.len());
    let mut failures = Vec::new();
    for (id, text, group) in &texts {
        let text = String::from_utf8_lossy(text);
        let variants = [
            ("as shipped", text.to_string()),
            ("reflowed at 40 columns", reflowed(&text, 40)),
            ("upper-cased", text.to_uppercase()),
            ("with another copyright line", other_copyright(&text)),
            ("in a comment", commented(&text)),
        ];
        for (how, variant) in &variants {
            let found = find_all(variant.as_bytes());
            let best = found.iter().max_by_key(|f| f.1);
            // Itself, or a text with (nearly) the same words: `GPL-2.0+` reflowed may match
            // `GPL-2.0` as well as itself, their texts differing in a word or two.
            let twin = |other: &str| score_against(text.as_bytes(), other).is_some_and(|s| s >= TWIN);
            let ok = found.iter().any(|f| (group.contains(&f.0) || twin(f.0)) && f.1 >= MIN_SCORE);
            let exact = *how != "as shipped" || found.iter().any(|f| group.contains(&f.0) && f.1 == 100);
            if !ok || !exact {
                failures.push(format!("{id} {how}: found {found:?} (best {best:?})"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} texts not found:\n{}",
        failures.len(),
        texts.len() * 5,
        failures.join("\n")
    );
}

/// A notices file holds the same licence once per component: each copy is a match of its own,
/// back to back or with other words between them, short text or long.
#[test]
fn each_copy_of_a_text_in_a_notices_file_is_found() {
    let texts = shipped();
    let text = |id: &str| String::from_utf8_lossy(&texts.iter().find(|t| t.0 == id).unwrap().1).into_owned();
    for id in ["MIT", "0BSD", "Apache-2.0"] {
        let one = text(id);
        let back_to_back = one.repeat(5);
        let between: String = (0..5)
            .map(|i| format!("Component {i} (https://example.com/c{i}) is licensed as follows:\n\n{one}\n"))
            .collect();
        for (how, file) in [("back to back", &back_to_back), ("with words between", &between)] {
            let found = find_all(file.as_bytes());
            let copies = found.iter().filter(|f| f.0 == id && f.1 >= 95).count();
            assert_eq!(copies, 5, "{id} {how}: {found:?}");
        }
    }
}
