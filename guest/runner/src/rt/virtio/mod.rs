//! Virtio drivers for the runner: the virtio-mmio handshake, split virtqueues, and the
//! block and vsock devices. Every register access is a VM exit (~60 µs here), so the
//! handshake skips what the VMM's devices make redundant (e.g. zero high address words), and
//! the drivers queue many buffers per notify.

pub mod blk;
pub mod queue;
pub mod vsock;

use core::ptr::{read_volatile, write_volatile};

use cella_abi::{BootInfo, DEVICE_KIND_VIRTIO_MMIO};

use queue::VirtQueue;

use cella_abi::virtio_mmio::{
    self as reg, MAGIC_VALUE, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// No device of that kind in boot-info.
    Absent,
    /// The register window does not answer like virtio-mmio.
    NotVirtio,
    /// The device does not offer virtio 1.x.
    NoVersion1,
    /// The device refused the features.
    FeaturesRefused,
    /// A queue is smaller than the driver needs.
    QueueTooSmall,
}

/// One device's register window.
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// Finds the first virtio-mmio device with `device_id` in boot-info.
    pub fn find(boot: &BootInfo, device_id: u32) -> Result<Mmio, InitError> {
        boot.devices[..boot.device_count as usize]
            .iter()
            .find(|d| d.kind == DEVICE_KIND_VIRTIO_MMIO && d.id == device_id)
            .map(|d| Mmio { base: d.base as usize })
            .ok_or(InitError::Absent)
    }

    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: the VMM maps the device window (boot-info) for us; a load there is an MMIO
        // exit the device answers.
        unsafe { read_volatile((self.base + offset as usize) as *const u32) }
    }

    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`; a store is an MMIO exit the device handles.
        unsafe { write_volatile((self.base + offset as usize) as *mut u32, value) }
    }

    /// Reads a 64-bit value from the device's config space.
    pub fn config_u64(&self, offset: u64) -> u64 {
        u64::from(self.read(reg::CONFIG + offset)) | (u64::from(self.read(reg::CONFIG + offset + 4)) << 32)
    }

    /// Tells the device that `queue` has new buffers. The device processes them before this
    /// returns (the VMM handles the notify synchronously).
    pub fn notify(&self, queue: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(queue));
    }

    /// The virtio 1.x handshake: status, features (VERSION_1 only), queues, DRIVER_OK.
    pub fn init(&self, queues: &mut [VirtQueue]) -> Result<(), InitError> {
        if self.read(reg::MAGIC) != MAGIC_VALUE {
            return Err(InitError::NotVirtio);
        }
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        if self.read(reg::DEVICE_FEATURES) & 1 == 0 {
            return Err(InitError::NoVersion1);
        }
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1);
        let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(reg::STATUS, features_ok);
        if self.read(reg::STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(InitError::FeaturesRefused);
        }
        for (index, queue) in queues.iter().enumerate() {
            self.write(reg::QUEUE_SEL, index as u32);
            if self.read(reg::QUEUE_NUM_MAX) < u32::from(queue.size()) {
                return Err(InitError::QueueTooSmall);
            }
            self.setup_queue(queue.size(), queue.addresses());
        }
        self.write(reg::STATUS, features_ok | STATUS_DRIVER_OK);
        Ok(())
    }

    /// Writes a selected queue's size and ring addresses, and marks it ready. High address
    /// words are written only when non-zero (they reset to zero).
    pub fn setup_queue(&self, size: u16, (desc, avail, used): (u64, u64, u64)) {
        self.write(reg::QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH, avail),
            (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH, used),
        ] {
            self.write(low, addr as u32);
            if addr >> 32 != 0 {
                self.write(high, (addr >> 32) as u32);
            }
        }
        self.write(reg::QUEUE_READY, 1);
    }

    #[cfg(feature = "test-modes")]
    /// Selects `queue` (for hostile tests that set it up by hand).
    pub fn select_queue(&self, queue: u32) {
        self.write(reg::QUEUE_SEL, queue);
    }

    #[cfg(feature = "test-modes")]
    /// Writes the status register (for hostile tests).
    pub fn set_status(&self, status: u32) {
        self.write(reg::STATUS, status);
    }

    #[cfg(feature = "test-modes")]
    /// The handshake up to (not including) queue set-up, for hostile tests.
    pub fn negotiate(&self) {
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    #[cfg(feature = "test-modes")]
    /// Status bits for a driver that finished set-up.
    pub const fn driver_ok_status() -> u32 {
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    }
}
