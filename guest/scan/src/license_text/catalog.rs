//! The licence texts the scanner knows: the SPDX License List's (`policies/spdx/texts.tsv.gz`,
//! CC0-1.0 data) and, per text, the anchors it is found by (`policies/spdx/text-anchors.tsv`,
//! generated from the texts by [`super::anchors::generate`]). Texts that normalise to the same
//! words form one group, reported under its shortest identifier (`GPL-3.0` for `GPL-3.0`,
//! `GPL-3.0-only` and `GPL-3.0-or-later`, whose texts are one).
//!
//! Built once per VM, on first use: the anchors are parsed when a file first has a licence
//! trigger word, the texts inflated (5 MB) when a candidate first needs checking.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

/// The SPDX License List's licence texts, gzip.
pub(crate) const TEXTS_GZ: &[u8] = include_bytes!("../../../../policies/spdx/texts.tsv.gz");
/// Each group of texts with the same words: identifiers, shingle count, anchors.
pub(crate) const ANCHORS: &str = include_str!("../../../../policies/spdx/text-anchors.tsv");

/// Texts with the same words.
pub(crate) struct Group {
    /// Identifiers, the reported one (the shortest) first.
    pub ids: Vec<&'static str>,
    /// How many anchors it has.
    pub anchors: u16,
    /// How many shingles its text has in a row.
    pub len: u32,
}

/// The groups and their anchors.
pub(crate) struct Catalog {
    pub groups: Vec<Group>,
    /// (anchor, group), sorted.
    postings: Vec<(u64, u16)>,
    /// Open addressing over `postings`: each slot the index of an anchor's first posting + 1
    /// (0: empty).
    slots: Vec<u32>,
}

static CATALOG: spin::Once<Catalog> = spin::Once::new();
static TEXTS: spin::Once<Texts> = spin::Once::new();

/// The catalog, parsed on first use.
pub(crate) fn catalog() -> &'static Catalog {
    CATALOG.call_once(|| Catalog::parse(ANCHORS))
}

/// The texts, inflated on first use.
pub(crate) fn texts() -> &'static Texts {
    TEXTS.call_once(|| Texts::inflate(TEXTS_GZ))
}

impl Catalog {
    fn parse(anchors: &'static str) -> Catalog {
        let mut groups = Vec::new();
        let mut postings = Vec::new();
        for line in anchors.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let mut fields = line.split('\t');
            let ids: Vec<&'static str> = fields.next().unwrap_or_default().split(' ').collect();
            let len = fields.next().and_then(|l| l.parse().ok()).unwrap_or(0);
            let hashes: Vec<u64> = fields
                .next()
                .unwrap_or_default()
                .split(' ')
                .filter_map(|h| u64::from_str_radix(h, 16).ok())
                .collect();
            let g = groups.len() as u16;
            postings.extend(hashes.iter().map(|&h| (h, g)));
            groups.push(Group { ids, anchors: hashes.len() as u16, len });
        }
        postings.sort_unstable();
        postings.dedup();
        let mut slots = alloc::vec![0u32; (postings.len() * 2).next_power_of_two().max(16)];
        let mask = slots.len() - 1;
        for (i, &(h, _)) in postings.iter().enumerate() {
            if i > 0 && postings[i - 1].0 == h {
                continue;
            }
            let mut s = (h as usize) & mask;
            while slots[s] != 0 {
                s = (s + 1) & mask;
            }
            slots[s] = i as u32 + 1;
        }
        Catalog { groups, postings, slots }
    }

    /// The groups `shingle` is an anchor of.
    pub fn anchored(&self, shingle: u64) -> &[(u64, u16)] {
        let mask = self.slots.len() - 1;
        let mut s = (shingle as usize) & mask;
        loop {
            let first = match self.slots[s] {
                0 => return &[],
                i => i as usize - 1,
            };
            if self.postings[first].0 == shingle {
                let n = self.postings[first..].iter().take_while(|p| p.0 == shingle).count();
                return &self.postings[first..first + n];
            }
            s = (s + 1) & mask;
        }
    }

    /// The identifier a group is reported under.
    pub fn reported(&self, group: u16) -> &'static str {
        self.groups[group as usize].ids[0]
    }
}

/// The licence texts, unescaped, by identifier.
pub(crate) struct Texts {
    bytes: Vec<u8>,
    /// (identifier, where its text is in `bytes`), sorted by identifier.
    index: Vec<(String, Range<usize>)>,
}

impl Texts {
    pub(crate) fn inflate(gz: &[u8]) -> Texts {
        // A gzip member with no optional fields (the generator writes no name): a 10-byte
        // header, raw deflate, an 8-byte trailer. The file is part of this build; a bad one
        // fails every licence test.
        let raw = gz
            .get(10..gz.len().saturating_sub(8))
            .and_then(|d| miniz_oxide::inflate::decompress_to_vec(d).ok())
            .unwrap_or_default();
        Self::parse(&raw)
    }

    /// Reads the TSV: `identifier<TAB>text`, escapes `\\ \t \r \n`.
    pub(crate) fn parse(raw: &[u8]) -> Texts {
        let mut bytes = Vec::with_capacity(raw.len());
        let mut index = Vec::new();
        for line in raw.split(|&b| b == b'\n').filter(|l| !l.starts_with(b"#") && !l.is_empty()) {
            let Some(tab) = memchr::memchr(b'\t', line) else { continue };
            let id = String::from_utf8_lossy(&line[..tab]).into_owned();
            let start = bytes.len();
            let mut escaped = false;
            for &b in &line[tab + 1..] {
                match (escaped, b) {
                    (false, b'\\') => escaped = true,
                    (false, b) => bytes.push(b),
                    (true, b) => {
                        escaped = false;
                        bytes.push(match b {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b => b,
                        });
                    }
                }
            }
            index.push((id, start..bytes.len()));
        }
        index.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Texts { bytes, index }
    }

    /// The text of licence `id`.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        let i = self.index.binary_search_by(|e| e.0.as_str().cmp(id)).ok()?;
        Some(&self.bytes[self.index[i].1.clone()])
    }

    /// Every identifier and its text, by identifier.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.index.iter().map(|(id, r)| (id.as_str(), &self.bytes[r.clone()]))
    }
}
