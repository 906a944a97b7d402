//! Guest memory: one memfd, mapped shared into the VMM and registered with KVM as slot 0.
//! Pages are allocated only when the guest (or the VMM) touches them, which is what lets the
//! scrub cost follow the memory the guest used, not the memory it was given.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

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
}

/// Guest memory backed by a memfd. Scrubbed exactly once: explicitly with [`GuestMemfd::scrub`]
/// (which returns the evidence), or else when dropped.
#[derive(Debug)]
pub struct GuestMemfd {
    file: Arc<File>,
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
        Ok(GuestMemfd { file, memory: Some(memory), size, host_addr })
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
        // SAFETY: `host_addr` maps `size` bytes of `file` shared, and stays mapped until
        // `memory` is dropped below; no vCPU runs any more, so nothing else writes it.
        let report = unsafe { scrub::scrub(&self.file, self.host_addr, self.size) };
        drop(memory);
        report
    }
}

impl Drop for GuestMemfd {
    fn drop(&mut self) {
        if self.memory.is_some() {
            if let Err(e) = self.scrub_once() {
                eprintln!("cella-vmm: scrubbing guest memory on drop failed: {}", crate::error_chain(&e));
            }
        }
    }
}
