//! Artifact formats: a plain file, tar, gzip (so tar.gz), and zip, nested up to a limit. The
//! format is recognised from the bytes, not the name. Every refusal names the entry.

mod crc32;
mod gzip;
mod inflate;
pub mod path;
mod tar;
mod zip;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use crate::engine::Engine;
use crate::error::ArtifactError;
use crate::finding::Report;
use crate::source::{read_full, ByteRead, Chain, Source, SourceReader, VecSource};

pub use inflate::RATIO_MIN_OUTPUT;

/// Limits applied while reading an artifact. The defaults suit a VM with a few hundred MiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries (files, directories, links) across all archives in the artifact.
    pub max_entries: u64,
    /// Declared or actual size of one archive entry.
    pub max_entry_size: u64,
    /// Decompressed bytes across the whole artifact.
    pub max_decompressed: u64,
    /// Decompressed : compressed ratio of one stream, checked once it has produced
    /// [`RATIO_MIN_OUTPUT`] bytes.
    pub max_ratio: u64,
    /// Container layers (tar, zip, gzip each count one) around the innermost file; a
    /// `tar.gz` is 2 layers.
    pub max_depth: u32,
    /// An archive nested in a compressed entry is read into memory; this caps its size.
    pub max_nested_archive: u64,
    /// Findings kept in the report (the rest are counted only).
    pub max_findings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 100_000,
            max_entry_size: 1 << 30,
            max_decompressed: 4 << 30,
            max_ratio: 200,
            max_depth: 4,
            max_nested_archive: 64 << 20,
            max_findings: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Tar,
    Gzip,
    Zip,
}

fn sniff(head: &[u8]) -> Kind {
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        Kind::Gzip
    } else if head.len() >= 4 && (head[..4] == *b"PK\x03\x04" || head[..4] == *b"PK\x05\x06") {
        Kind::Zip
    } else if head.len() >= 512 && tar::looks_like_header(&head[..512]) {
        Kind::Tar
    } else {
        Kind::Plain
    }
}

/// Scans an artifact read from `source`. `name` is the artifact's display name: the path of a
/// plain file, and the prefix of nothing for an archive (its entries are reported by their own
/// paths). Findings and counts are appended to `report`.
pub fn scan_artifact<S: Source + ?Sized>(
    source: &mut S,
    name: &str,
    engine: &mut Engine,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), ArtifactError> {
    let total = Cell::new(0);
    let mut walk = Walk { engine, limits, report, entries: 0, total: &total };
    walk.source(&mut &mut *source, name, 0, "")
}

pub(crate) struct Walk<'a> {
    engine: &'a mut Engine,
    limits: &'a Limits,
    report: &'a mut Report,
    entries: u64,
    total: &'a Cell<u64>,
}

impl<'a> Walk<'a> {
    /// Content with random access (the artifact itself, or a buffered nested archive).
    fn source(
        &mut self,
        src: &mut dyn Source,
        name: &str,
        depth: u32,
        prefix: &str,
    ) -> Result<(), ArtifactError> {
        let mut head = [0u8; 512];
        let len = src.len();
        let n = {
            let mut r = SourceReader { src: &mut *src, pos: 0, end: len };
            read_full(&mut r, &mut head)?
        };
        if sniff(&head[..n]) == Kind::Zip {
            let depth = self.enter(name, depth)?;
            return zip::walk(self, src, name, depth, prefix);
        }
        let mut r = SourceReader { src, pos: 0, end: len };
        self.stream(&mut r, name, depth, prefix)
    }

    /// Sequential content: sniffs it and scans it as a file or walks it as an archive.
    pub(crate) fn stream(
        &mut self,
        r: &mut dyn ByteRead,
        name: &str,
        depth: u32,
        prefix: &str,
    ) -> Result<(), ArtifactError> {
        let mut head = [0u8; 512];
        let n = read_full(r, &mut head)?;
        let mut chained = Chain { head: &head[..n], rest: r };
        match sniff(&head[..n]) {
            Kind::Plain => {
                self.engine.scan_stream(name, &mut chained, self.report, self.limits.max_findings)?;
                Ok(())
            }
            Kind::Tar => {
                let depth = self.enter(name, depth)?;
                tar::walk(self, &mut chained, name, depth, prefix)
            }
            Kind::Gzip => {
                let depth = self.enter(name, depth)?;
                let inner_name = strip_gz(name);
                let mut gz =
                    gzip::GzipReader::new(&mut chained, String::from(name), self.limits, self.total)?;
                self.stream(&mut gz, &inner_name, depth, prefix)?;
                // Reach the end so the trailer is checked.
                drain(&mut gz)
            }
            Kind::Zip => {
                // zip needs random access: buffer it (bounded).
                let mut data = Vec::new();
                data.extend_from_slice(&head[..n]);
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let k = r.read(&mut chunk)?;
                    if k == 0 {
                        break;
                    }
                    data.extend_from_slice(&chunk[..k]);
                    if data.len() as u64 > self.limits.max_nested_archive {
                        return Err(ArtifactError::EntryTooLarge {
                            entry: String::from(name),
                            size: data.len() as u64,
                            limit: self.limits.max_nested_archive,
                        });
                    }
                }
                self.source(&mut VecSource(data), name, depth, prefix)
            }
        }
    }

    /// One more container layer around `name`.
    fn enter(&self, name: &str, depth: u32) -> Result<u32, ArtifactError> {
        if depth + 1 > self.limits.max_depth {
            return Err(ArtifactError::NestingTooDeep {
                entry: String::from(name),
                limit: self.limits.max_depth,
            });
        }
        Ok(depth + 1)
    }

    /// Counts one entry against [`Limits::max_entries`].
    pub(crate) fn count_entry(&mut self, entry: &str) -> Result<(), ArtifactError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArtifactError::TooManyEntries {
                entry: String::from(entry),
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// An entry's content: scanned as a file, or walked as a nested archive.
    pub(crate) fn entry(
        &mut self,
        r: &mut dyn ByteRead,
        display: &str,
        depth: u32,
    ) -> Result<(), ArtifactError> {
        let child_prefix = format!("{display}!/");
        self.stream(r, display, depth, &child_prefix)
    }

    pub(crate) fn limits(&self) -> &'a Limits {
        self.limits
    }

    pub(crate) fn total(&self) -> &'a Cell<u64> {
        self.total
    }
}

pub(crate) fn drain<R: ByteRead + ?Sized>(r: &mut R) -> Result<(), ArtifactError> {
    let mut sink = [0u8; 8 * 1024];
    while r.read(&mut sink)? != 0 {}
    Ok(())
}

fn strip_gz(name: &str) -> String {
    if let Some(stem) = name.strip_suffix(".tgz") {
        format!("{stem}.tar")
    } else if let Some(stem) = name.strip_suffix(".gz") {
        String::from(stem)
    } else {
        String::from(name)
    }
}
