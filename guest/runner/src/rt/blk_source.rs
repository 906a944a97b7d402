//! The artifact as the scan engine sees it: a [`Source`] over the virtio-blk disk, read in
//! large aligned windows (few requests, few exits) and cut to the artifact's exact size.

use alloc::vec;
use alloc::vec::Vec;

use cella_scan::{Source, SourceError};

use super::virtio::blk::{Blk, SECTOR};

/// Bytes read from the disk at a time.
const WINDOW: usize = 4 << 20;

pub struct BlkSource {
    disk: Blk,
    size: u64,
    window: Vec<u8>,
    window_start: u64,
    window_len: usize,
}

impl BlkSource {
    /// The first `size` bytes of `disk`.
    pub fn new(disk: Blk, size: u64) -> BlkSource {
        let size = size.min(disk.capacity());
        BlkSource { disk, size, window: vec![0; WINDOW], window_start: 0, window_len: 0 }
    }

    fn fill(&mut self, offset: u64) -> Result<(), SourceError> {
        let start = offset - offset % SECTOR;
        let len = ((self.disk.capacity() - start) as usize).min(WINDOW);
        self.disk.read(start, &mut self.window[..len]).map_err(|_| SourceError("virtio-blk read failed"))?;
        self.window_start = start;
        self.window_len = len;
        Ok(())
    }
}

impl Source for BlkSource {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let in_window = offset >= self.window_start && offset < self.window_start + self.window_len as u64;
        if !in_window {
            self.fill(offset)?;
        }
        let at = (offset - self.window_start) as usize;
        let n = buf.len().min(self.window_len - at).min((self.size - offset) as usize);
        buf[..n].copy_from_slice(&self.window[at..at + n]);
        Ok(n)
    }
}
