//! The snapshot memory file (`memory.bin`): guest memory as a sparse file of exactly the
//! guest's size, in which only pages that are not all zeros hold blocks.
//!
//! Writing reads only the pages that can hold data ([`GuestMemfd::content_ranges`]: the
//! memfd's allocated ranges, or, for a VM that was itself restored, the old file's data plus
//! the pages the guest has written since), skips all-zero pages, and writes runs of non-zero
//! pages at their offsets with `pwrite`. A failed write (a full disk, say) removes the partial
//! file; the VM is only read, never changed.
//!
//! Reading is [`GuestMemfd::from_snapshot`]: the file mapped privately, pages on demand.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::scrub::is_zero;
use crate::vstate::memory::GuestMemfd;

const PAGE: usize = 4096;
/// Guest memory read per step.
const CHUNK: usize = 1 << 20;

/// What writing the memory file did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryFileReport {
    /// Bytes of non-zero pages written.
    pub bytes_written: u64,
    /// Non-zero pages written.
    pub pages: u64,
    /// Bytes of guest memory read to find them.
    pub bytes_scanned: u64,
    /// What the file occupies on disk after fsync (`st_blocks * 512`).
    pub disk_bytes: u64,
    /// Guest memory size (the file's length).
    pub mem_bytes: u64,
    /// Wall time, in ms.
    pub ms: f64,
}

/// Writes `memory` to a new file at `path` (which must not exist) and fsyncs it. On error the
/// partial file is removed.
pub fn write(memory: &GuestMemfd, path: &Path) -> Result<MemoryFileReport, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SnapshotError::write(path, source))?;
    match write_to(memory, &file, path) {
        Ok(report) => Ok(report),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn fill(memory: &GuestMemfd, file: &File, path: &Path) -> Result<(u64, u64, u64), SnapshotError> {
    let write_error = |source| SnapshotError::write(path, source);
    file.set_len(memory.size()).map_err(write_error)?;
    let ranges = memory.content_ranges().map_err(SnapshotError::MemoryRanges)?;
    let mut buf = vec![0u8; CHUNK];
    let (mut written, mut pages, mut scanned) = (0u64, 0u64, 0u64);
    for range in ranges {
        let mut offset = range.start;
        while offset < range.end {
            let len = ((range.end - offset) as usize).min(CHUNK);
            let chunk = &mut buf[..len];
            memory.read_at(offset, chunk).map_err(|source| SnapshotError::ReadMemory { offset, source })?;
            scanned += len as u64;
            // Write each run of consecutive non-zero pages with one pwrite.
            let mut run: Option<usize> = None;
            let page_count = len.div_ceil(PAGE);
            for i in 0..=page_count {
                let nonzero = i < page_count && !is_zero(&chunk[i * PAGE..((i + 1) * PAGE).min(len)]);
                match (nonzero, run) {
                    (true, None) => run = Some(i),
                    (false, Some(start)) => {
                        let bytes = &chunk[start * PAGE..(i * PAGE).min(len)];
                        file.write_all_at(bytes, offset + (start * PAGE) as u64).map_err(write_error)?;
                        written += bytes.len() as u64;
                        pages += (i - start) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            offset += len as u64;
        }
    }
    file.sync_all().map_err(write_error)?;
    Ok((written, pages, scanned))
}

/// [`write`] into `file`, already open and empty (handed over; `path` names it in messages);
/// fsynced. Removing it on error is the caller's.
pub fn write_to(memory: &GuestMemfd, file: &File, path: &Path) -> Result<MemoryFileReport, SnapshotError> {
    let started = Instant::now();
    let (bytes_written, pages, bytes_scanned) = fill(memory, file, path)?;
    let disk_bytes = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    Ok(MemoryFileReport {
        bytes_written,
        pages,
        bytes_scanned,
        disk_bytes,
        mem_bytes: memory.size(),
        ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Checks that the memory file at `path` exists and is `size` bytes long.
pub fn check(path: &Path, size: u64) -> Result<(), SnapshotError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == size => Ok(()),
        Ok(m) => {
            Err(SnapshotError::MemoryFileSize { path: path.to_owned(), expected: size, actual: m.len() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(SnapshotError::MissingMemoryFile { path: path.to_owned() })
        }
        Err(_) => Err(SnapshotError::MissingMemoryFile { path: path.to_owned() }),
    }
}
