//! Small files scanned in batches by every worker the scan may use (see [`crate::parallel`]):
//! the walk reads each small file whole into the batch; a full batch is shared out file by
//! file, each worker scanning with its own engine (a fork of the job's) into a report of the
//! file's own; the files' reports are then added to the artifact's in walk order, finding by
//! finding, so the report is the one a single worker would have made.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::Engine;
use crate::error::ArtifactError;
use crate::finding::Report;
use crate::parallel::{each_worker, Workers};
use crate::source::ByteRead;
use crate::Limits;

/// Files up to this size go into the batch; a larger one is scanned as it streams.
pub(super) const BATCH_FILE_MAX: u64 = 8 << 20;
/// A batch is scanned once it holds this many bytes (or at the end of the walk).
const BATCH_BYTES: usize = 16 << 20;

/// Files read, waiting to be scanned.
pub(super) struct Batch {
    workers: &'static dyn Workers,
    /// The engines of workers 1.., forked from the job's when the first batch is scanned.
    forks: Vec<Engine>,
    files: Vec<(String, Vec<u8>)>,
    bytes: usize,
}

/// What one worker made of the files it scanned: each file's report by its place in the
/// batch, and the first error it met.
type Scanned = (Vec<(usize, Report)>, Option<(usize, ArtifactError)>);

impl Batch {
    /// A batch for `workers`, or `None` if there is only one (files are then scanned as they
    /// stream, with nothing held).
    pub(super) fn new(workers: &'static dyn Workers) -> Option<Batch> {
        (workers.count() > 1).then(|| Batch { workers, forks: Vec::new(), files: Vec::new(), bytes: 0 })
    }

    /// Reads the file at `path` whole if it is small (its declared size, and what it really
    /// holds, at most [`BATCH_FILE_MAX`]) and keeps it: returns `None`. Any other file is
    /// handed back to be scanned as it streams: `Some(head)`, the bytes already read from `r`
    /// (none if its declared size was too large; past the limit if the declaration lied),
    /// which come before the rest of `r`. On a read error the file's bytes read so far are
    /// kept, and the error returned.
    pub(super) fn take(
        &mut self,
        path: &str,
        r: &mut dyn ByteRead,
    ) -> Result<Option<Vec<u8>>, ArtifactError> {
        match r.size_hint() {
            Some(size) if size <= BATCH_FILE_MAX => {}
            _ => return Ok(Some(Vec::new())),
        }
        let mut data = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let read = loop {
            match r.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(k) => data.extend_from_slice(&chunk[..k]),
                Err(e) => break Err(e),
            }
            if data.len() as u64 > BATCH_FILE_MAX {
                // Larger than declared: the rest streams, never held.
                return Ok(Some(data));
            }
        };
        self.bytes += data.len();
        self.files.push((String::from(path), data));
        read.map(|()| None)
    }

    /// Whether the batch is full: time to [`Batch::scan`] it.
    pub(super) fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES
    }

    /// Scans the files held, on every worker, and adds their findings and counts to `report`
    /// in walk order. The first error (in walk order) is returned after the files before it
    /// are added, as a single worker would have stopped there.
    pub(super) fn scan(
        &mut self,
        engine: &mut Engine,
        report: &mut Report,
        limits: &Limits,
    ) -> Result<(), ArtifactError> {
        let files = core::mem::take(&mut self.files);
        self.bytes = 0;
        if files.is_empty() {
            return Ok(());
        }
        while self.forks.len() + 1 < self.workers.count() {
            self.forks.push(engine.fork());
        }
        // Each file's report keeps all of its findings: the cap is applied below, as they are
        // added in order.
        let per_file = Limits { max_findings: usize::MAX, ..limits.clone() };
        // Largest first, so the batch does not end with one worker on a large file while the
        // other waits.
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_unstable_by_key(|&i| core::cmp::Reverse(files[i].1.len()));
        let next = AtomicUsize::new(0);
        let mut runs: Vec<(&mut Engine, Scanned)> =
            core::iter::once(engine).chain(self.forks.iter_mut()).map(|e| (e, (Vec::new(), None))).collect();
        each_worker(self.workers, &mut runs, |_, (engine, (done, error))| {
            // Every file is scanned even after an error: the error that counts is the first in
            // walk order, and every file before it must be in the report.
            while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (path, data) = &files[i];
                let mut file_report = Report::default();
                match engine.scan_file(path, data, &mut file_report, &per_file) {
                    Ok(_) => done.push((i, file_report)),
                    Err(e) if error.as_ref().is_none_or(|(j, _)| i < *j) => *error = Some((i, e)),
                    Err(_) => {}
                }
            }
        });
        let mut done: Vec<(usize, Report)> = Vec::new();
        let mut first_error: Option<(usize, ArtifactError)> = None;
        for (_, (scanned, error)) in runs {
            done.extend(scanned);
            if let Some((i, e)) = error {
                if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_error = Some((i, e));
                }
            }
        }
        done.sort_unstable_by_key(|(i, _)| *i);
        let stop = first_error.as_ref().map_or(usize::MAX, |(i, _)| *i);
        for (_, file_report) in done.into_iter().take_while(|(i, _)| *i < stop) {
            add_file(report, file_report, limits);
        }
        first_error.map_or(Ok(()), |(_, e)| Err(e))
    }
}

/// Adds one file's report to the artifact's: its counts, and its findings one by one within
/// the cap (what the engine does when it scans into the artifact's report).
fn add_file(report: &mut Report, file: Report, limits: &Limits) {
    report.files_scanned += file.files_scanned;
    report.files_binary += file.files_binary;
    report.files_binary_truncated += file.files_binary_truncated;
    report.bytes_scanned += file.bytes_scanned;
    for finding in file.findings {
        report.add(finding, limits.max_findings);
    }
}
