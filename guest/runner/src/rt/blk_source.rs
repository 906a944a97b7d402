//! The artifact as the scan engine sees it: a [`Source`] over the virtio-blk disk, read in
//! large aligned windows (few requests, few exits) and cut to the artifact's exact size.

use alloc::vec;
use alloc::vec::Vec;

use cella_scan::{Source, SourceError};

use super::virtio::blk::{Blk, SECTOR};

/// Bytes read from the disk at a time.
const WINDOW: usize = 4 << 20;
/// Aligned reads at least this long go straight into the caller's buffer (no window copy).
const DIRECT_MIN: usize = 256 << 10;

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
        // A window larger than the disk would never be filled.
        let window = vec![0; WINDOW.min(disk.capacity() as usize)];
        BlkSource { disk, size, window, window_start: 0, window_len: 0 }
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
        let direct = (buf.len() as u64).min(self.size - offset) / SECTOR * SECTOR;
        if offset.is_multiple_of(SECTOR) && direct as usize >= DIRECT_MIN {
            let n = direct as usize;
            self.disk.read(offset, &mut buf[..n]).map_err(|_| SourceError("virtio-blk read failed"))?;
            return Ok(n);
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
