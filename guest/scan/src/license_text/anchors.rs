//! Generates `policies/spdx/text-anchors.tsv` from the licence texts (`texts.zip`): texts with the same
//! words grouped, and for each group up to [`ANCHORS`] shingles spread over its text, each the
//! one of its stretch that the fewest other groups share. A file region holding some of a
//! group's anchors is a candidate for that group; only candidates are compared word by word.
//! Run by `CELLA_UPDATE_SPDX=1 cargo test -p cella-scan --test license_texts`, which also
//! checks that the shipped file is what the texts give.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::catalog::Texts;
use super::tokens::{shingles, tokenize};

/// The most anchors a group has.
pub const ANCHORS: usize = 16;

/// The anchors file for the zip of licence texts `texts_zip`.
pub fn generate(texts_zip: &'static [u8]) -> String {
    let texts = Texts::open(texts_zip);
    // Texts with the same words: their identifiers and their shingles, in a row.
    let mut groups: BTreeMap<Vec<u64>, (Vec<&str>, Vec<u64>)> = BTreeMap::new();
    let mut tokens = Vec::new();
    for id in texts.ids() {
        let text = texts.get(id).unwrap_or_default();
        tokens.clear();
        tokenize(&text, 0, &mut tokens);
        if tokens.len() >= 3 {
            let words = tokens.iter().map(|t| t.hash).collect();
            let group = groups.entry(words).or_insert_with(|| {
                let mut seq = Vec::new();
                shingles(&tokens, &mut seq);
                (Vec::new(), seq)
            });
            group.0.push(id);
        }
    }
    let mut groups: Vec<(Vec<&str>, Vec<u64>)> = groups
        .into_values()
        .map(|(mut ids, seq)| {
            ids.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
            (ids, seq)
        })
        .collect();
    groups.sort_by(|a, b| a.0[0].cmp(b.0[0]));
    let mut shared: BTreeMap<u64, u32> = BTreeMap::new();
    for (_, seq) in &groups {
        let mut distinct = seq.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for s in distinct {
            *shared.entry(s).or_default() += 1;
        }
    }
    let mut out = String::from(
        "# Licence text anchors, generated from texts.zip by cella_scan::license_text::anchors.\n\
         # One group of texts with the same words per line: identifiers (the reported one first),\n\
         # its shingle count, then the hex hashes of its anchor shingles. Regenerate:\n\
         # CELLA_UPDATE_SPDX=1 cargo test -p cella-scan --test license_texts anchors_are_current\n",
    );
    for (ids, seq) in &groups {
        let mut anchors: Vec<u64> = Vec::new();
        let stretch = seq.len().div_ceil(ANCHORS).max(1);
        for part in seq.chunks(stretch) {
            let best = part.iter().min_by_key(|s| shared.get(s).copied().unwrap_or(0));
            if let Some(&b) = best {
                if !anchors.contains(&b) {
                    anchors.push(b);
                }
            }
        }
        out.push_str(&ids.join(" "));
        let _ = write!(out, "\t{}\t", seq.len());
        for (i, a) in anchors.iter().enumerate() {
            let _ = write!(out, "{}{a:016x}", if i == 0 { "" } else { " " });
        }
        out.push('\n');
    }
    out
}
