//! The licence texts the scanner knows: the SPDX License List's (`policies/spdx/texts.zip`,
//! CC0-1.0 data) and, per text, the anchors it is found by (`policies/spdx/text-anchors.tsv`,
//! generated from the texts by [`super::anchors::generate`]). Texts that normalise to the same
//! words form one group, reported under its shortest identifier (`GPL-3.0` for `GPL-3.0`,
//! `GPL-3.0-only` and `GPL-3.0-or-later`, whose texts are one).
//!
//! Built once per VM, on first use: the anchors are parsed when a file first has a licence
//! trigger word; a text is inflated (a few KB) when a candidate for it needs comparing.

use alloc::vec::Vec;
use core::ops::Range;

use super::key_index::KeyIndex;
use crate::archive::zip;

/// The SPDX License List's licence texts, a zip of one entry each.
pub(crate) const TEXTS_ZIP: &[u8] = include_bytes!("../../../../policies/spdx/texts.zip");
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
    /// Each anchor's first posting.
    index: KeyIndex,
}

static CATALOG: spin::Once<Catalog> = spin::Once::new();
static TEXTS: spin::Once<Texts> = spin::Once::new();

/// The catalog, parsed on first use.
pub(crate) fn catalog() -> &'static Catalog {
    CATALOG.call_once(|| Catalog::parse(ANCHORS))
}

/// The texts' directory, read on first use.
pub(crate) fn texts() -> &'static Texts {
    TEXTS.call_once(|| Texts::open(TEXTS_ZIP))
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
        let index = KeyIndex::new(&postings.iter().map(|p| p.0).collect::<Vec<u64>>());
        Catalog { groups, postings, index }
    }

    /// The groups `shingle` is an anchor of.
    pub fn anchored(&self, shingle: u64) -> &[(u64, u16)] {
        let Some(first) = self.index.find(shingle, |i| self.postings[i].0) else { return &[] };
        let n = self.postings[first..].iter().take_while(|p| p.0 == shingle).count();
        &self.postings[first..first + n]
    }

    /// The entry of the texts that holds a group's text.
    pub fn entry(&self, group: u16) -> &'static str {
        self.groups[group as usize].ids[0]
    }

    /// The identifier a group is reported under (a variant's, `Apache-2.0~terms`, is its
    /// license's).
    pub fn reported(&self, group: u16) -> &'static str {
        license_id(self.groups[group as usize].ids[0])
    }
}

/// The license an entry of the texts is a text of: `Apache-2.0~terms` (the terms without the
/// appendix the SPDX template marks optional) is a text of `Apache-2.0`.
pub(crate) fn license_id(entry: &str) -> &str {
    entry.split_once('~').map_or(entry, |(id, _)| id)
}

/// The licence texts: a zip of `<identifier>.txt` entries, each deflated on its own, read
/// one text at a time. The file is part of this build (`scripts/spdx-texts.py` writes it); a
/// damaged one fails every licence test, and here only finds fewer texts.
pub(crate) struct Texts {
    zip: &'static [u8],
    /// (identifier, where its deflated data is, its size inflated), by identifier.
    index: Vec<(&'static str, Range<usize>, usize)>,
}

/// The largest text inflated (the list's longest is 46 KB).
const MAX_TEXT: usize = 1 << 20;

impl Texts {
    pub(crate) fn open(zip: &'static [u8]) -> Texts {
        Texts { zip, index: Self::read_directory(zip).unwrap_or_default() }
    }

    /// The central directory: every deflated `<identifier>.txt` entry (the parsing is the
    /// archive reader's, [`crate::archive::zip`]).
    fn read_directory(zip: &'static [u8]) -> Option<Vec<(&'static str, Range<usize>, usize)>> {
        let eocd = zip::find_end_record(zip)?;
        let (entries, cd_at) = (zip::u16le(zip, eocd + 10), zip::u32le(zip, eocd + 16) as usize);
        let cd = zip.get(cd_at..eocd)?;
        let mut index = Vec::with_capacity(entries.into());
        let mut p = 0;
        for _ in 0..entries {
            let record = zip::central_record(cd, p).ok()?;
            p = record.next;
            let name = core::str::from_utf8(&cd[record.name]).ok()?;
            let local = usize::try_from(record.lfh_off).ok()?;
            let data = zip::data_offset(zip.get(local..)?, record.lfh_off)? as usize;
            if let (8, Some(id)) = (record.method, name.strip_suffix(".txt")) {
                index.push((id, data..data + record.csize as usize, record.usize_ as usize));
            }
        }
        index.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Some(index)
    }

    /// The text of licence `id`, inflated.
    pub fn get(&self, id: &str) -> Option<Vec<u8>> {
        let i = self.index.binary_search_by(|e| e.0.cmp(id)).ok()?;
        let (_, data, size) = &self.index[i];
        if *size > MAX_TEXT {
            return None;
        }
        miniz_oxide::inflate::decompress_to_vec_with_limit(self.zip.get(data.clone())?, MAX_TEXT).ok()
    }

    /// Every identifier, in order.
    pub fn ids(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.index.iter().map(|e| e.0)
    }
}
