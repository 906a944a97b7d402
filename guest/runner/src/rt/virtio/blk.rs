//! The virtio-blk driver: reads many sectors per notify.

use alloc::boxed::Box;
use alloc::vec::Vec;

use cella_abi::{BootInfo, VIRTIO_ID_BLOCK};

use super::queue::{Buf, VirtQueue};
use super::{InitError, Mmio};

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const TYPE_IN: u32 = 0;
/// Bytes per request: large requests mean few descriptors and few exits.
const REQUEST_BYTES: usize = 1 << 20;

/// Why a read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkError {
    /// Offset or length not sector-aligned, or beyond the disk.
    OutOfRange,
    /// The device reported an error status.
    Io(u8),
    /// The device did not complete the requests.
    Lost,
}

/// Per-request scratch: the 16-byte header and the status byte.
#[repr(C, align(16))]
struct Slot {
    header: [u8; 16],
    status: [u8; 1],
}

/// A read-only virtio-blk disk.
pub struct Blk {
    mmio: Mmio,
    queue: VirtQueue,
    slots: Box<[Slot]>,
    capacity: u64,
}

impl Blk {
    /// Finds and initialises the disk.
    pub fn open(boot: &BootInfo) -> Result<Blk, InitError> {
        let mmio = Mmio::find(boot, VIRTIO_ID_BLOCK)?;
        let mut queues = [VirtQueue::new(QUEUE_SIZE)];
        mmio.init(&mut queues)?;
        let capacity = mmio.config_u64(0) * SECTOR;
        let [queue] = queues;
        let slots = (0..QUEUE_SIZE).map(|_| Slot { header: [0; 16], status: [0xff] }).collect();
        Ok(Blk { mmio, queue, slots, capacity })
    }

    /// Reads the capacity again: a VM restored from a template has the job's disk behind the
    /// device the template set up.
    #[cfg(feature = "scanner")]
    pub fn refresh_capacity(&mut self) {
        self.capacity = self.mmio.config_u64(0) * SECTOR;
    }

    /// Capacity in bytes (a multiple of the sector size).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Reads `buf.len()` bytes at `offset`; both must be multiples of [`SECTOR`].
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        let len = buf.len() as u64;
        if !offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || offset.checked_add(len).is_none_or(|e| e > self.capacity)
        {
            return Err(BlkError::OutOfRange);
        }
        let mut pending: Vec<u16> = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            // Queue as many requests as there are free descriptors, then notify once.
            while at < buf.len() && self.queue.free() >= 3 {
                let n = (buf.len() - at).min(REQUEST_BYTES);
                let sector = (offset + at as u64) / SECTOR;
                let slot_index = pending.len() % self.slots.len();
                let slot = &mut self.slots[slot_index];
                slot.header = [0; 16];
                slot.header[0..4].copy_from_slice(&TYPE_IN.to_le_bytes());
                slot.header[8..16].copy_from_slice(&sector.to_le_bytes());
                slot.status = [0xff];
                let chunk = &mut buf[at..at + n];
                let head = self
                    .queue
                    .add(&[Buf::read(&slot.header), Buf::write(chunk), Buf::write(&mut slot.status)])
                    .ok_or(BlkError::Lost)?;
                pending.push(head);
                at += n;
            }
            self.mmio.notify(0);
            let mut done = 0;
            while self.queue.pop_used().is_some() {
                done += 1;
            }
            if done != pending.len() {
                return Err(BlkError::Lost);
            }
            for i in 0..pending.len() {
                let status = self.slots[i % self.slots.len()].status[0];
                if status != 0 {
                    return Err(BlkError::Io(status));
                }
            }
            pending.clear();
        }
        Ok(())
    }

    #[cfg(feature = "test-modes")]
    /// The device's register window and queue (for hostile tests).
    pub fn parts(&mut self) -> (&Mmio, &mut VirtQueue) {
        (&self.mmio, &mut self.queue)
    }
}
