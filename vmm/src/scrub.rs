//! Teardown scrub: zero what the guest touched, prove it reads back as zero, release it, and
//! prove the release. Freed pages are not zeroed by this host's kernel (`init_on_free` is off),
//! so without this a later tenant could be handed this tenant's bytes.
//!
//! The cost follows the memory the guest touched: `SEEK_DATA`/`SEEK_HOLE` on the memfd list
//! exactly the pages that were ever allocated, and only those are zeroed and read back.
//!
//! A VM restored from a snapshot has different memory ([`scrub_private`]): the snapshot's
//! memory file mapped `MAP_PRIVATE`. Its pages are of two kinds. Pages the guest only read are
//! the file's page-cache pages: they belong to the snapshot (which may be restored again) and
//! are cleaned when the snapshot is removed (`snapshot::remove` zeroes the file's data, punches
//! it out and unlinks it), not here. Pages the guest wrote are private anonymous copies that
//! only this VM has: `/proc/self/pagemap` lists them (present and not a file page, or swapped
//! out), and those are zeroed, read back, released with `MADV_DONTNEED`, and pagemap is asked
//! again to prove none is left.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

/// Size of a page, the unit of the evidence.
const PAGE: u64 = 4096;
/// Read-back buffer size.
const READ_CHUNK: usize = 1 << 20;

/// Why the scrub failed. Any of these means the memory cannot be shown to be clean.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("cannot list the touched ranges of guest memory (lseek SEEK_DATA)")]
    Seek(#[source] io::Error),
    #[error("cannot read guest memory back at offset {offset:#x}")]
    ReadBack { offset: u64, source: io::Error },
    #[error("guest memory at offset {offset:#x} is not zero after scrubbing")]
    NotZero { offset: u64 },
    #[error("cannot release guest memory (fallocate PUNCH_HOLE)")]
    Release(#[source] io::Error),
    #[error("cannot stat guest memory after release")]
    Stat(#[source] io::Error),
    #[error("guest memory still holds {blocks} blocks after release")]
    StillAllocated { blocks: u64 },
    #[error("guest memory was already released")]
    AlreadyReleased,
    #[error("cannot read /proc/self/pagemap to find the pages a restored guest wrote")]
    Pagemap(#[source] io::Error),
    #[error("guest memory at address {addr:#x} is not zero after scrubbing")]
    NotZeroAt { addr: u64 },
    #[error("{pages} private guest pages are still mapped after release (madvise DONTNEED)")]
    StillPrivate { pages: u64 },
}

pub use cella_host::report::ScrubReport;

/// Scrubs `size` bytes of `file`, mapped shared at `base`.
///
/// # Safety
/// `base` must map `size` bytes of `file` read-write and shared, and stay mapped for the call;
/// nothing else may access that memory meanwhile.
pub unsafe fn scrub(file: &File, base: *mut u8, size: u64) -> Result<ScrubReport, ScrubError> {
    let started = Instant::now();
    let ranges = touched_ranges(file, size)?;
    for range in &ranges {
        // SAFETY: the range lies within the mapping (touched_ranges clamps it to `size`), and the
        // caller guarantees exclusive access.
        unsafe {
            std::ptr::write_bytes(base.add(range.start as usize), 0, (range.end - range.start) as usize)
        };
    }
    let pages_verified = verify_zero(file, &ranges)?;
    release(file, size)?;
    let blocks = file.metadata().map_err(ScrubError::Stat)?.blocks();
    if blocks != 0 {
        return Err(ScrubError::StillAllocated { blocks });
    }
    Ok(ScrubReport {
        bytes: ranges.iter().map(|r| r.end - r.start).sum(),
        pages_verified,
        verified_zero: true,
        released: true,
        blocks_after_release: 0,
        mem_bytes: size,
        ranges: ranges.len() as u64,
        ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// The byte ranges of `file` that hold pages, from `SEEK_DATA`/`SEEK_HOLE`.
pub fn touched_ranges(file: &File, size: u64) -> Result<Vec<Range<u64>>, ScrubError> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < size {
        let start = match seek(offset, libc::SEEK_DATA) {
            Ok(start) => start,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(ScrubError::Seek(e)),
        };
        let end = seek(start, libc::SEEK_HOLE).map_err(ScrubError::Seek)?.min(size);
        if start >= end {
            break;
        }
        ranges.push(start..end);
        offset = end;
    }
    Ok(ranges)
}

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED_ANON: u64 = 1 << 61;
/// pagemap entries read per `pread`.
const PAGEMAP_CHUNK: usize = 8192;

/// The byte ranges (offsets from `base`) of the `size`-byte mapping at `base` that hold this
/// process's private anonymous pages: present and not a file page, or swapped out. In a
/// `MAP_PRIVATE` file mapping those are exactly the pages the guest (or the VMM) wrote.
pub fn private_ranges(pagemap: &File, base: u64, size: u64) -> Result<Vec<Range<u64>>, ScrubError> {
    let pages = size.div_ceil(PAGE);
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut raw = vec![0u8; (pages as usize).min(PAGEMAP_CHUNK) * 8];
    let mut page = 0;
    while page < pages {
        let n = ((pages - page) as usize).min(PAGEMAP_CHUNK);
        let offset = (base / PAGE + page) * 8;
        pagemap.read_exact_at(&mut raw[..n * 8], offset).map_err(ScrubError::Pagemap)?;
        for (i, entry) in raw[..n * 8].chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            let private =
                (entry & PM_PRESENT != 0 && entry & PM_FILE_OR_SHARED_ANON == 0) || entry & PM_SWAPPED != 0;
            if private {
                let start = (page + i as u64) * PAGE;
                match ranges.last_mut() {
                    Some(last) if last.end == start => last.end = start + PAGE,
                    _ => ranges.push(start..start + PAGE),
                }
            }
        }
        page += n as u64;
    }
    Ok(ranges)
}

/// Scrubs the private pages of a restored VM's memory: the `size`-byte `MAP_PRIVATE` mapping
/// at `base`. Zeroes every private page, reads each back through the mapping (volatile loads,
/// which the compiler cannot answer from the stores), releases them with `MADV_DONTNEED`, and
/// checks with pagemap that no private page is left. The report has the same meaning as for
/// a memfd: `bytes` zeroed, `pages_verified` read back, `released` with
/// `blocks_after_release` private pages left (always 0 in a returned report).
///
/// # Safety
/// `base` must map `size` bytes privately and stay mapped for the call; nothing else may
/// access that memory meanwhile.
pub unsafe fn scrub_private(pagemap: &File, base: *mut u8, size: u64) -> Result<ScrubReport, ScrubError> {
    let started = Instant::now();
    let ranges = private_ranges(pagemap, base as u64, size)?;
    for range in &ranges {
        // SAFETY: the range lies within the mapping (private_ranges covers only `size` bytes),
        // and the caller guarantees exclusive access.
        unsafe {
            std::ptr::write_bytes(base.add(range.start as usize), 0, (range.end - range.start) as usize)
        };
    }
    let mut pages_verified = 0;
    for range in &ranges {
        let mut offset = range.start;
        while offset < range.end {
            // Word by word (a volatile load of a whole page array is copied byte by byte).
            let words = base.wrapping_add(offset as usize).cast::<u64>();
            let mut any = 0u64;
            for i in 0..(PAGE / 8) as usize {
                // SAFETY: `offset` is a page inside the mapping, so is each of its 512 aligned
                // words; a volatile load the compiler cannot answer from the stores above.
                any |= unsafe { std::ptr::read_volatile(words.add(i)) };
            }
            if any != 0 {
                // SAFETY: as above; the page is read once more only to say where.
                let page = unsafe { std::slice::from_raw_parts(base.add(offset as usize), PAGE as usize) };
                let at = page.iter().position(|b| *b != 0).unwrap_or(0) as u64;
                return Err(ScrubError::NotZeroAt { addr: offset + at });
            }
            pages_verified += 1;
            offset += PAGE;
        }
    }
    // Only the private ranges are released and looked at again: a page outside them was not
    // private at the first look, and nothing has written guest memory since (the caller's
    // guarantee), so none can have become private. (The whole 256 MiB range twice through
    // pagemap and madvise was most of a restored small job's scrub.)
    let mut left = 0;
    for range in &ranges {
        let len = range.end - range.start;
        // SAFETY: the range lies in the mapping the caller owns; dropping its private pages is
        // the point (later reads would see the file again, and nothing reads it any more).
        let r = unsafe {
            libc::madvise(base.add(range.start as usize).cast(), len as usize, libc::MADV_DONTNEED)
        };
        if r < 0 {
            return Err(ScrubError::Release(io::Error::last_os_error()));
        }
        left += private_ranges(pagemap, base as u64 + range.start, len)?
            .iter()
            .map(|r| (r.end - r.start) / PAGE)
            .sum::<u64>();
    }
    if left != 0 {
        return Err(ScrubError::StillPrivate { pages: left });
    }
    Ok(ScrubReport {
        bytes: ranges.iter().map(|r| r.end - r.start).sum(),
        pages_verified,
        verified_zero: true,
        released: true,
        blocks_after_release: 0,
        mem_bytes: size,
        ranges: ranges.len() as u64,
        ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Reads every range back through the file (not through the mapping the zeroes were written
/// with) and checks that it is zero. Returns the number of pages checked.
pub fn verify_zero(file: &File, ranges: &[Range<u64>]) -> Result<u64, ScrubError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pages = 0;
    for range in ranges {
        let mut offset = range.start;
        while offset < range.end {
            let want = ((range.end - offset) as usize).min(READ_CHUNK);
            let chunk = &mut buf[..want];
            file.read_exact_at(chunk, offset).map_err(|source| ScrubError::ReadBack { offset, source })?;
            if !is_zero(chunk) {
                let at = chunk.iter().position(|b| *b != 0).unwrap_or(0) as u64;
                return Err(ScrubError::NotZero { offset: offset + at });
            }
            offset += want as u64;
        }
        pages += (range.end - range.start).div_ceil(PAGE);
    }
    Ok(pages)
}

/// Whether every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Slice equality is a memcmp, fast even in an unoptimised build.
    static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
    bytes.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Hole-punches the whole file, returning its pages to the host.
fn release(file: &File, size: u64) -> Result<(), ScrubError> {
    // SAFETY: fallocate on a descriptor we own; the result is checked.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            size as libc::off_t,
        )
    };
    if r < 0 {
        return Err(ScrubError::Release(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd() -> File {
        // SAFETY: the name is NUL-terminated; the descriptor is checked and then owned by File.
        let fd = unsafe { libc::memfd_create(c"scrub-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is fresh and owned by nobody else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn touched_ranges_lists_only_written_pages() {
        let mut file = memfd();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"x", 0x10_0000).unwrap();
        file.write_all_at(&[1; 8192], 0x20_0000).unwrap();
        let ranges = touched_ranges(&file, 64 << 20).unwrap();
        assert_eq!(ranges, vec![0x10_0000..0x10_1000, 0x20_0000..0x20_2000]);
        file.flush().unwrap();
    }

    #[test]
    fn verify_zero_reports_the_first_nonzero_byte() {
        let file = memfd();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[0; 4096], 0).unwrap();
        file.write_all_at(&[7], 0x1234).unwrap();
        let ranges = touched_ranges(&file, 1 << 20).unwrap();
        match verify_zero(&file, &ranges) {
            Err(ScrubError::NotZero { offset }) => assert_eq!(offset, 0x1234),
            other => panic!("expected NotZero, got {other:?}"),
        }
    }
}
