//! A split virtqueue, driver side. Rings live on the heap, page-aligned; the guest uses
//! identity mapping, so a pointer is also the guest-physical address the device sees.

use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One buffer to put in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The device writes it.
    pub writable: bool,
}

impl Buf {
    pub fn read(bytes: &[u8]) -> Buf {
        Buf { addr: bytes.as_ptr() as u64, len: bytes.len() as u32, writable: false }
    }
    pub fn write(bytes: &mut [u8]) -> Buf {
        Buf { addr: bytes.as_mut_ptr() as u64, len: bytes.len() as u32, writable: true }
    }
}

/// A split virtqueue of `size` entries.
pub struct VirtQueue {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    free: Vec<u16>,
    /// Descriptors of each in-flight chain, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

fn ring_alloc(bytes: usize) -> *mut u8 {
    let layout = Layout::from_size_align(bytes.next_multiple_of(4096), 4096).expect("ring layout");
    // SAFETY: the layout has a non-zero size; a null result (out of memory) panics below.
    let ptr = unsafe { alloc_zeroed(layout) };
    assert!(!ptr.is_null(), "out of memory for a virtqueue");
    ptr
}

impl VirtQueue {
    /// A queue of `size` (a power of two) entries; its rings are never freed (queues live as
    /// long as the runner).
    pub fn new(size: u16) -> VirtQueue {
        let n = usize::from(size);
        VirtQueue {
            size,
            desc: ring_alloc(16 * n),
            avail: ring_alloc(6 + 2 * n),
            used: ring_alloc(6 + 8 * n),
            free: (0..size).rev().collect(),
            chains: (0..size).map(|_| Vec::new()).collect(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Writes raw descriptor `index` (hostile tests use this to build bad chains).
    pub fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = usize::from(index) * 16;
        // SAFETY: `index` < size (callers pass table indices), so the 16 bytes at `at` are inside
        // the descriptor table allocation.
        unsafe {
            write_volatile(self.desc.add(at) as *mut u64, addr);
            write_volatile(self.desc.add(at + 8) as *mut u32, len);
            write_volatile(self.desc.add(at + 12) as *mut u16, flags);
            write_volatile(self.desc.add(at + 14) as *mut u16, next);
        }
    }

    /// Publishes `head` in the available ring (hostile tests use this directly).
    pub fn publish(&mut self, head: u16) {
        let slot = 4 + 2 * usize::from(self.avail_idx % self.size);
        // SAFETY: `slot` indexes the ring inside the available-ring allocation; the index word
        // at offset 2 is written after the entry, with a fence between (the device reads the
        // ring only during our next exit, but order it anyway).
        unsafe {
            write_volatile(self.avail.add(slot) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile(self.avail.add(2) as *mut u16, self.avail_idx);
        }
    }

    /// Puts a chain of `bufs` in the queue (not yet notified). `None` if too few descriptors
    /// are free.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, buf) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if buf.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let next = if last { 0 } else { ids[i + 1] };
            self.write_desc(ids[i], buf.addr, buf.len, flags, next);
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.publish(head);
        Some(head)
    }

    /// Takes one completed chain: its head and the bytes the device wrote.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring's index word is at offset 2 of its allocation.
        let used_idx = unsafe { read_volatile(self.used.add(2) as *const u16) };
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = 4 + 8 * usize::from(self.last_used % self.size);
        // SAFETY: `slot` indexes an element inside the used-ring allocation.
        let (id, len) = unsafe {
            (
                read_volatile(self.used.add(slot) as *const u32),
                read_volatile(self.used.add(slot + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = (id as u16) % self.size;
        let ids = core::mem::take(&mut self.chains[usize::from(head)]);
        self.free.extend(ids);
        Some((head, len))
    }
}
