//! Guest memory: one memfd, mapped shared into the VMM and registered with KVM as slot 0.
//! Pages are allocated only when the guest (or the VMM) touches them, which is what lets the
//! scrub cost follow the memory the guest used, not the memory it was given.
//!
//! A VM restored from a snapshot has a second kind of backing: the snapshot's memory file
//! mapped `MAP_PRIVATE | MAP_NORESERVE` ([`GuestMemfd::from_snapshot`]). Mapping costs the same
//! whatever the size; pages fault in from the file when the guest first touches them, and a
//! guest write makes a private anonymous copy, so the file (and any other VM restored from it)
//! never sees it. The interface is the same for both backings; the scrub differs (see
//! [`crate::scrub`]).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::scrub::{self, ScrubError, ScrubReport};

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create)")]
    Memfd(#[source] io::Error),
    #[error("cannot size the guest memory file to {size} bytes")]
    Resize { size: u64, source: io::Error },
    #[error("cannot map {size} bytes of guest memory")]
    Map { size: u64, source: vm_memory::mmap::MmapRegionError },
    #[error("cannot describe guest memory to vm-memory")]
    Region,
    #[error("cannot open the snapshot memory file {path}")]
    OpenSnapshot { path: std::path::PathBuf, source: io::Error },
    #[error(
        "cannot open /proc/self/pagemap, which the scrub of restored memory needs; \
         mount procfs where the VMM runs (in a jail too)"
    )]
    Pagemap(#[source] io::Error),
}

/// Opens `/proc/self/pagemap`, which the scrub of restored memory reads.
pub fn open_pagemap() -> Result<File, MemoryError> {
    File::open("/proc/self/pagemap").map_err(MemoryError::Pagemap)
}

/// Where guest memory lives.
#[derive(Debug)]
enum Backing {
    /// A memfd mapped shared: the file holds exactly the guest's memory.
    Memfd,
    /// A snapshot memory file mapped private; the guest's writes live in anonymous pages,
    /// which `pagemap` (opened at map time, before any seccomp filter) finds.
    Private { pagemap: File },
}

/// Guest memory backed by a memfd or, restored, by a snapshot file mapped privately.
/// Scrubbed exactly once: explicitly with [`GuestMemfd::scrub`] (which returns the evidence),
/// or else when dropped.
#[derive(Debug)]
pub struct GuestMemfd {
    file: Arc<File>,
    backing: Backing,
    memory: Option<GuestMemoryMmap>,
    size: u64,
    host_addr: *mut u8,
}

// SAFETY: `host_addr` is only the address of the mapping that `memory` owns; it is never
// dereferenced except through methods that document how they synchronise with the vCPU.
unsafe impl Send for GuestMemfd {}

impl GuestMemfd {
    /// Creates `size` bytes of zeroed guest memory at guest address 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        const NAME: &CStr = c"cella-guest-memory";
        // SAFETY: NAME is NUL-terminated; the result is checked before use.
        let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size).map_err(|source| MemoryError::Resize { size, source })?;
        let region = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), size as usize)
            .map_err(|source| MemoryError::Map { size, source })?;
        let host_addr = region.as_ptr();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Region)?;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)?;
        Ok(GuestMemfd { file, backing: Backing::Memfd, memory: Some(memory), size, host_addr })
    }

    /// Maps the `size`-byte snapshot memory file at `path` privately as guest memory at guest
    /// address 0. Nothing is read: pages come in from the file on first touch. The caller checks
    /// that the file is `size` bytes long (`snapshot::restore` does, with a clear error). The
    /// file must not change while the VM lives (snapshots are written to new files and
    /// renamed, never rewritten in place).
    pub fn from_snapshot(path: &Path, size: u64) -> Result<Self, MemoryError> {
        let file =
            File::open(path).map_err(|source| MemoryError::OpenSnapshot { path: path.to_owned(), source })?;
        Self::from_snapshot_file(file, size, open_pagemap()?)
    }

    /// [`GuestMemfd::from_snapshot`] for a memory file already open (handed over as a
    /// descriptor), with this process's `/proc/self/pagemap` opened ahead ([`open_pagemap`]):
    /// a VMM confined to no paths opens neither.
    pub fn from_snapshot_file(file: File, size: u64, pagemap: File) -> Result<Self, MemoryError> {
        let file = Arc::new(file);
        let region = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        let host_addr = region.as_ptr();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Region)?;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)?;
        Ok(GuestMemfd { file, backing: Backing::Private { pagemap }, memory: Some(memory), size, host_addr })
    }

    /// Gives every page of the snapshot file that holds data its private copy now, ahead of
    /// the guest (a restored VM's; nothing for a memfd). A guest's first touch of a page costs a
    /// fault that is expensive under nested virtualization; one taken here, before the launch,
    /// is not on the job's clock. (Populating read-only does not help here: the guest's first
    /// write still faults.) The copies are the guest's memory like any page it writes, and are
    /// scrubbed at teardown. Returns the bytes faulted in.
    pub fn prefault(&self) -> io::Result<u64> {
        if !self.is_restored() {
            return Ok(0);
        }
        let advice = libc::MADV_POPULATE_WRITE;
        let ranges = scrub::touched_ranges(&self.file, self.size).map_err(io::Error::other)?;
        let mut total = 0;
        for range in ranges {
            // SAFETY: the range lies inside this live mapping (the file is `size` bytes, the
            // mapping too); populating changes which pages are present, not what they hold.
            let r = unsafe {
                libc::madvise(
                    self.host_addr.add(range.start as usize).cast(),
                    (range.end - range.start) as usize,
                    advice,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            total += range.end - range.start;
        }
        Ok(total)
    }

    /// Whether this memory was restored from a snapshot (mapped privately).
    pub fn is_restored(&self) -> bool {
        matches!(self.backing, Backing::Private { .. })
    }

    /// The byte ranges that may hold something other than zeros, sorted and disjoint. For a
    /// memfd: its allocated ranges. Restored: the snapshot file's data ranges plus every page
    /// the guest wrote since (pagemap).
    pub fn content_ranges(&self) -> Result<Vec<Range<u64>>, ScrubError> {
        let file_ranges = scrub::touched_ranges(&self.file, self.size)?;
        match &self.backing {
            Backing::Memfd => Ok(file_ranges),
            Backing::Private { pagemap } => {
                let written = scrub::private_ranges(pagemap, self.host_addr as u64, self.size)?;
                Ok(merge_ranges(file_ranges, written))
            }
        }
    }

    /// Copies guest memory at byte `offset` into `buf`: what the guest sees there now. For a
    /// memfd this reads the file; restored, the mapping. The vCPUs must be paused for the copy
    /// to be consistent.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|end| *end <= self.size);
        if end.is_none() || self.memory.is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read outside guest memory"));
        }
        match self.backing {
            Backing::Memfd => self.file.read_exact_at(buf, offset),
            Backing::Private { .. } => {
                // SAFETY: `offset + buf.len() <= size` (checked above), so the source lies in the
                // live mapping (`memory` is present); `buf` is a distinct host buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.host_addr.add(offset as usize),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                Ok(())
            }
        }
    }

    /// The memory, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory.as_ref().expect("guest memory is present until scrubbed")
    }

    /// Bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the memory is mapped in this process (for KVM's memory slot).
    pub fn host_addr(&self) -> u64 {
        self.host_addr as u64
    }

    /// Asks for 2 MiB pages for the guest addresses `range` (shrunk to whole 2 MiB pages). A
    /// guest that works through a lot of memory runs faster on them: each first touch of a page
    /// costs a fault that is expensive under nested virtualization, and the TLB reaches 512
    /// times further. They take effect only where the host allows huge pages for shared
    /// memory (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` at `advise` or more); a
    /// touched 2 MiB page is zeroed and scrubbed whole, so small guests are better off without.
    pub fn advise_huge_pages(&self, range: Range<u64>) -> io::Result<()> {
        const HUGE: u64 = 2 << 20;
        let (start, end) = (range.start.next_multiple_of(HUGE), range.end.min(self.size) / HUGE * HUGE);
        if start >= end || !matches!(self.backing, Backing::Memfd) {
            return Ok(());
        }
        // SAFETY: [start, end) lies inside this mapping (end <= size); madvise only changes how
        // the kernel backs it, not its contents.
        let r = unsafe {
            libc::madvise(
                self.host_addr.add(start as usize).cast(),
                (end - start) as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Zeroes every page the guest touched, verifies through the file that it reads back as
    /// zero, hole-punches the whole file, checks that it holds no blocks, and unmaps it.
    /// The caller must have stopped every vCPU and closed the VM first.
    pub fn scrub(mut self) -> Result<ScrubReport, ScrubError> {
        self.scrub_once()
    }

    fn scrub_once(&mut self) -> Result<ScrubReport, ScrubError> {
        let Some(memory) = self.memory.take() else {
            return Err(ScrubError::AlreadyReleased);
        };
        let report = match &self.backing {
            // SAFETY: `host_addr` maps `size` bytes of `file` shared, and stays mapped until
            // `memory` is dropped below; no vCPU runs any more, so nothing else writes it.
            Backing::Memfd => unsafe { scrub::scrub(&self.file, self.host_addr, self.size) },
            // SAFETY: `host_addr` maps `size` bytes privately until `memory` is dropped below;
            // no vCPU runs any more.
            Backing::Private { pagemap } => unsafe {
                scrub::scrub_private(pagemap, self.host_addr, self.size)
            },
        };
        drop(memory);
        report
    }
}

/// The union of two sorted lists of disjoint page ranges, sorted, disjoint and coalesced.
fn merge_ranges(a: Vec<Range<u64>>, b: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.into_iter().chain(b).collect();
    all.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

impl Drop for GuestMemfd {
    fn drop(&mut self) {
        if self.memory.is_some() {
            if let Err(e) = self.scrub_once() {
                tracing::error!("scrubbing guest memory on drop failed: {}", crate::error_chain(&e));
            }
        }
    }
}
