//! Artifact formats: a plain file, tar, gzip (so tar.gz), and zip, nested up to a limit. The
//! format is recognised from the bytes, not the name. Every refusal names the entry.

mod batch;
mod crc32;
mod gzip;
pub(crate) mod image;
mod inflate;
pub mod path;
mod tar;
pub(crate) mod zip;
mod zstd;

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
    /// Findings kept in the report (the rest are counted only). The default is GitHub code
    /// scanning's limit of results in one SARIF run.
    pub max_findings: usize,
    /// Bytes of one binary file whose printable strings are scanned; the rest of the file is
    /// read (archive checks still apply) but not scanned.
    pub max_binary_bytes: u64,
    /// A git bundle (history) is read into memory; this caps its size.
    pub max_history_bundle: u64,
    /// Objects in one bundle's pack.
    pub max_git_objects: u64,
    /// Size of one git object (or delta result), inflated.
    pub max_git_object: u64,
    /// Length of a delta chain (git itself writes at most 4095).
    pub max_delta_depth: u32,
    /// Bytes of the objects of one delta chain held at once to resolve it.
    pub max_delta_chain_bytes: u64,
    /// Bytes inflated and rebuilt from deltas in one bundle (objects are inflated up to three
    /// times: to index, to name and to read them).
    pub max_history_inflated: u64,
    /// A file version rebuilt from a delta is scanned only where it differs from the version
    /// it was rebuilt from (the findings of the lines they share are carried over): the same
    /// findings, several times faster. `false` scans every version whole.
    pub history_delta_scan: bool,
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
            max_findings: 25_000,
            max_binary_bytes: 32 << 20,
            max_history_bundle: 512 << 20,
            max_git_objects: 500_000,
            max_git_object: 64 << 20,
            max_delta_depth: 4095,
            max_delta_chain_bytes: 96 << 20,
            max_history_inflated: 64 << 30,
            history_delta_scan: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Tar,
    Gzip,
    Zip,
    /// A git bundle: a repository's history.
    Bundle,
    /// A zstd frame (image layers may be compressed so).
    Zstd,
}

fn sniff(head: &[u8]) -> Kind {
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        Kind::Gzip
    } else if head.len() >= 4 && (head[..4] == *b"PK\x03\x04" || head[..4] == *b"PK\x05\x06") {
        Kind::Zip
    } else if head.len() >= 512 && tar::looks_like_header(&head[..512]) {
        Kind::Tar
    } else if crate::history::is_bundle(head) {
        Kind::Bundle
    } else if zstd::starts_stream(head) {
        Kind::Zstd
    } else {
        Kind::Plain
    }
}

/// Scans an artifact read from `source`. `name` is the artifact's display name: the path of a
/// plain file, and the prefix of nothing for an archive (its entries are reported by their own
/// paths, normalized: a tar entry `./src/x` is `src/x`). Files the engine's excludes name are
/// skipped and counted. Findings and counts are appended to `report`.
pub fn scan_artifact<S: Source + ?Sized>(
    source: &mut S,
    name: &str,
    engine: &mut Engine,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), ArtifactError> {
    let total = Cell::new(0);
    report.image_capture.get_or_insert_with(Default::default);
    let walked = {
        let batch = batch::Batch::new(crate::parallel::workers());
        let mut sink = ScanSink { engine: &mut *engine, report: &mut *report, limits, batch };
        let zstd_windows = Cell::new(0);
        let mut walk =
            Walk { sink: &mut sink, limits, entries: 0, total: &total, zstd_windows: &zstd_windows };
        let walked = walk.source(&mut &mut *source, name, 0, "");
        // The files still held are scanned even after an error: a single worker had scanned
        // them before it met the error.
        let flushed = sink.flush();
        walked.and(flushed)
    };
    image::attribute(report, engine);
    walked?;
    crate::history::merge(report, limits);
    Ok(())
}

/// Reads an artifact's files without scanning them, with exactly the checks and limits of
/// [`scan_artifact`] (so a hostile archive is refused the same way, naming the entry): calls
/// `file(path, bytes)` for every file, nested archives opened, in archive order. The paths are
/// the ones a scan reports, each prefixed with `prefix` (for an archive's entries; a plain file
/// is called `name`). At most `max_bytes` of file content in all; beyond it the entry that
/// does not fit is refused with [`ArtifactError::EntryTooLarge`].
pub fn extract_artifact<S, F>(
    source: &mut S,
    name: &str,
    prefix: &str,
    limits: &Limits,
    max_bytes: u64,
    mut file: F,
) -> Result<(), ArtifactError>
where
    S: Source + ?Sized,
    F: FnMut(&str, Vec<u8>) -> Result<(), ArtifactError>,
{
    let file: &mut OnFile<'_> = &mut file;
    let total = Cell::new(0);
    let mut sink = ExtractSink { file, left: max_bytes, limits };
    let zstd_windows = Cell::new(0);
    let mut walk = Walk { sink: &mut sink, limits, entries: 0, total: &total, zstd_windows: &zstd_windows };
    walk.source(&mut &mut *source, name, 0, prefix)
}

/// What the walk does with each file it reaches.
pub(crate) trait FileSink {
    fn file(&mut self, path: &str, r: &mut dyn ByteRead) -> Result<(), ArtifactError>;

    /// Whether the entry (file or archive) at `path` is left out: not scanned, not opened.
    fn excluded(&mut self, _path: &str) -> bool {
        false
    }

    /// The entry at `path` could not be read (`why`); the walk goes on past it.
    fn skipped(&mut self, _path: &str, _why: &ArtifactError) {}

    /// A git bundle `bundle` (read whole) at `path`: its history's files are reported under
    /// `path_prefix`.
    fn history(&mut self, path: &str, path_prefix: &str, bundle: Vec<u8>) -> Result<(), ArtifactError>;
}

struct ScanSink<'a> {
    engine: &'a mut Engine,
    report: &'a mut Report,
    limits: &'a Limits,
    /// Small files held to be scanned by several workers at once; `None` with one worker.
    batch: Option<batch::Batch>,
}

impl ScanSink<'_> {
    /// Scans the files the batch holds (before anything that must come after them).
    fn flush(&mut self) -> Result<(), ArtifactError> {
        match self.batch.as_mut() {
            Some(batch) => batch.scan(self.engine, self.report, self.limits),
            None => Ok(()),
        }
    }

    /// Scans the file `path` as it streams from `r`, or holds it in the batch.
    fn scan(&mut self, path: &str, r: &mut dyn ByteRead) -> Result<(), ArtifactError> {
        let Some(batch) = self.batch.as_mut() else {
            self.engine.scan_stream(path, r, self.report, self.limits)?;
            return Ok(());
        };
        match batch.take(path, r)? {
            None if batch.full() => self.flush(),
            None => Ok(()),
            Some(head) => {
                // Too large to hold: the files held before it first, then it, as it streams.
                self.flush()?;
                self.engine.scan_stream(
                    path,
                    &mut Chain { head: &head, rest: r },
                    self.report,
                    self.limits,
                )?;
                Ok(())
            }
        }
    }
}

impl FileSink for ScanSink<'_> {
    fn file(&mut self, path: &str, r: &mut dyn ByteRead) -> Result<(), ArtifactError> {
        let Some(capture) = self.report.image_capture.as_mut() else {
            return self.scan(path, r);
        };
        capture.note(path);
        if !capture.wants(path) {
            return self.scan(path, r);
        }
        self.flush()?;
        // Image JSON (a manifest, a config) is scanned like any file and kept.
        let mut tee = Tee { inner: r, kept: Vec::new() };
        self.engine.scan_stream(path, &mut tee, self.report, self.limits)?;
        if let Some(capture) = self.report.image_capture.as_mut() {
            capture.keep(path, &tee.kept);
        }
        Ok(())
    }

    fn excluded(&mut self, path: &str) -> bool {
        let excluded = self.engine.excludes_path(path);
        self.report.files_excluded += u64::from(excluded);
        excluded
    }

    fn skipped(&mut self, path: &str, why: &ArtifactError) {
        self.report.skip(path, format!("{why}"));
    }

    fn history(&mut self, path: &str, path_prefix: &str, bundle: Vec<u8>) -> Result<(), ArtifactError> {
        self.flush()?;
        crate::history::scan_bundle(&bundle, path, path_prefix, self.engine, self.limits, self.report)
    }
}

/// A reader that keeps a copy of what it reads, up to a limit (past it, nothing: `kept` is
/// then longer than any JSON an image keeps, so it is not kept).
struct Tee<'a> {
    inner: &'a mut dyn ByteRead,
    kept: Vec<u8>,
}

impl ByteRead for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        let n = self.inner.read(buf)?;
        if self.kept.len() <= image::MAX_KEPT {
            self.kept.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }

    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }
}

/// The callback of [`extract_artifact`].
type OnFile<'a> = dyn FnMut(&str, Vec<u8>) -> Result<(), ArtifactError> + 'a;

struct ExtractSink<'a> {
    file: &'a mut OnFile<'a>,
    /// Content bytes that may still be extracted.
    left: u64,
    limits: &'a Limits,
}

impl ExtractSink<'_> {
    fn too_large(&self, path: &str, size: u64) -> ArtifactError {
        let limit = self.left.min(self.limits.max_entry_size);
        ArtifactError::EntryTooLarge { entry: String::from(path), size, limit }
    }
}

impl FileSink for ExtractSink<'_> {
    /// A bundle is history, not files of the artifact: checked as a scan reads it (so the
    /// same bundles are refused), nothing extracted.
    fn history(&mut self, path: &str, _path_prefix: &str, bundle: Vec<u8>) -> Result<(), ArtifactError> {
        crate::history::check_bundle(&bundle, path, self.limits)
    }

    fn file(&mut self, path: &str, r: &mut dyn ByteRead) -> Result<(), ArtifactError> {
        let limit = self.left.min(self.limits.max_entry_size);
        let mut data: Vec<u8> = Vec::new();
        // A declared size is only a hint (a tar header may lie), so it is checked against the
        // limit before anything is reserved, and the reservation may fail without harm.
        if let Some(hint) = r.size_hint() {
            if hint > limit {
                return Err(self.too_large(path, hint));
            }
            if data.try_reserve_exact(hint as usize).is_err() {
                return Err(self.too_large(path, hint));
            }
        }
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let k = r.read(&mut chunk)?;
            if k == 0 {
                break;
            }
            let len = (data.len() + k) as u64;
            if len > limit {
                return Err(self.too_large(path, len));
            }
            if data.capacity() - data.len() < k {
                // Undeclared size (gzip, deflate): grow by doubling, within the limit.
                let grow = data.capacity().clamp(k, 16 << 20);
                if data.try_reserve(grow).is_err() {
                    return Err(self.too_large(path, len));
                }
            }
            data.extend_from_slice(&chunk[..k]);
        }
        self.left -= data.len() as u64;
        (self.file)(path, data)
    }
}

pub(crate) struct Walk<'a> {
    sink: &'a mut dyn FileSink,
    limits: &'a Limits,
    entries: u64,
    total: &'a Cell<u64>,
    /// The window the zstd streams open now hold (`zstd::MAX_WINDOWS_HELD`).
    zstd_windows: &'a Cell<u64>,
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
            // An archive's entries were checked against the excludes as they were reached
            // (`entry`); a plain artifact (or the file in a plain gzip) is checked here.
            Kind::Plain if prefix.is_empty() && self.sink.excluded(name) => drain(&mut chained),
            Kind::Plain => self.sink.file(name, &mut chained),
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
                let data = buffer(&mut chained, name, self.limits.max_nested_archive)?;
                self.source(&mut VecSource(data), name, depth, prefix)
            }
            Kind::Bundle => {
                if prefix.is_empty() {
                    // The artifact itself: one file, checked against the excludes here.
                    if self.sink.excluded(name) {
                        return drain(&mut chained);
                    }
                }
                let data = buffer(&mut chained, name, self.limits.max_history_bundle)?;
                // The history of the artifact itself, or of the tree `cella scan` packed it
                // in, is reported at the repository's own paths; any other bundle's under it.
                let own = prefix.is_empty() || name == crate::history::HISTORY_ENTRY;
                self.sink.history(name, if own { "" } else { prefix }, data)
            }
            Kind::Zstd => {
                let depth = self.enter(name, depth)?;
                let inner_name = strip_zst(name);
                let mut zst = zstd::ZstdReader::new(
                    &mut chained,
                    String::from(name),
                    self.limits,
                    self.total,
                    self.zstd_windows,
                )?;
                self.stream(&mut zst, &inner_name, depth, prefix)?;
                drain(&mut zst)
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

    /// An entry's content: scanned as a file, or walked as a nested archive; or, if the
    /// job's excludes name it, neither (the caller reads past it, so its checks still apply).
    ///
    /// A nested archive that turns out unreadable (damaged, cut short, a feature Cella does not
    /// read) although its bytes came whole from this archive is skipped and reported, and the
    /// walk goes on: one such file must not fail a scan of everything around it. A failure
    /// reading this archive's own bytes, a limit or a path out of the root still refuses.
    pub(crate) fn entry(
        &mut self,
        r: &mut dyn ByteRead,
        display: &str,
        depth: u32,
    ) -> Result<(), ArtifactError> {
        if self.sink.excluded(display) {
            return Ok(());
        }
        let child_prefix = format!("{display}!/");
        let mut content = Watched { inner: r, failed: false };
        match self.stream(&mut content, display, depth, &child_prefix) {
            Err(e) if !content.failed && e.is_unreadable_entry() => {
                self.skip(display, &e);
                Ok(())
            }
            result => result,
        }
    }

    /// Records that the entry at `path` was not read, and why; the walk goes on past it.
    pub(crate) fn skip(&mut self, path: &str, why: &ArtifactError) {
        self.sink.skipped(path, why);
    }

    pub(crate) fn limits(&self) -> &'a Limits {
        self.limits
    }

    pub(crate) fn total(&self) -> &'a Cell<u64> {
        self.total
    }
}

/// A reader that remembers whether a read of it failed: so an error in what was read from it
/// can be told apart from an error in reading it.
struct Watched<'a> {
    inner: &'a mut dyn ByteRead,
    failed: bool,
}

impl ByteRead for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        let r = self.inner.read(buf);
        self.failed |= r.is_err();
        r
    }

    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }
}

/// Reads the rest of `r` into memory, at most `limit` bytes (`name` is named if it is more).
fn buffer<R: ByteRead + ?Sized>(r: &mut R, name: &str, limit: u64) -> Result<Vec<u8>, ArtifactError> {
    let too_large = |size| ArtifactError::EntryTooLarge { entry: String::from(name), size, limit };
    let mut data = Vec::new();
    if let Some(hint) = r.size_hint().filter(|h| *h <= limit) {
        // A hint only: reserving may fail without harm.
        let _ = data.try_reserve_exact(hint as usize);
    }
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let k = r.read(&mut chunk)?;
        if k == 0 {
            return Ok(data);
        }
        let len = (data.len() + k) as u64;
        if len > limit {
            return Err(too_large(len));
        }
        data.try_reserve(k).map_err(|_| too_large(len))?;
        data.extend_from_slice(&chunk[..k]);
    }
}

pub(crate) fn drain<R: ByteRead + ?Sized>(r: &mut R) -> Result<(), ArtifactError> {
    let mut sink = [0u8; 8 * 1024];
    while r.read(&mut sink)? != 0 {}
    Ok(())
}

/// The name of what a zstd file holds: `x.tar.zst` → `x.tar`, `x.tzst` → `x.tar`.
fn strip_zst(name: &str) -> String {
    if let Some(stem) = name.strip_suffix(".tzst") {
        format!("{stem}.tar")
    } else if let Some(stem) = name.strip_suffix(".zst").or_else(|| name.strip_suffix(".zstd")) {
        String::from(stem)
    } else {
        String::from(name)
    }
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
