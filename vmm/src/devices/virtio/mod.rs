//! Virtio devices over the virtio-mmio transport, on `virtio-queue`.
//!
//! Everything a guest writes into a queue is checked before use ([`chain`]): a chain that
//! loops, leaves the table or guest memory, overflows, or points the wrong way is refused
//! with a [`DeviceError`], which ends the VM with that reason. The runner drives its devices
//! by polling: it queues many requests and notifies once, and the device completes them
//! before the notify exit returns.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod vsock;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit every device offers and every driver must accept: virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A guest broke the virtio contract. The VM ends with this as its reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("descriptor chain starting at {head} loops or runs past the {size}-entry table")]
    ChainLoops { head: u16, size: u16 },
    #[error("descriptor index {index} is outside the {size}-entry table")]
    IndexOutOfRange { index: u16, size: u16 },
    #[error("descriptor {index} covers {addr:#x}+{len:#x}, outside guest memory")]
    OutOfMemory { index: u16, addr: u64, len: u32 },
    #[error("descriptor {index} at {addr:#x}+{len:#x} overflows the address space")]
    LengthOverflow { index: u16, addr: u64, len: u32 },
    #[error("{what} must be {expected}, but the guest made it {actual}")]
    WrongDirection { what: &'static str, expected: &'static str, actual: &'static str },
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("queue {queue}: size {size} is not a power of two between 1 and {max}")]
    QueueSize { queue: u16, size: u32, max: u16 },
    #[error("queue {queue} is unusable: {reason}")]
    QueueInvalid { queue: u16, reason: String },
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
    #[error("the driver notified queue {0}, which does not exist or is not ready")]
    BadNotify(u32),
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

/// Copies the bytes of a device's config space at `offset` into `data` (zeros past its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = config.get(offset as usize + i).copied().unwrap_or(0);
    }
}

/// A virtio device's own state in a snapshot (the transport's is in [`mmio::MmioTransportState`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    Block(block::BlockState),
    Vsock(vsock::VsockState),
}

/// A device behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 block, 19 vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK; the queues are valid and ready.
    fn activate(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The driver notified `queue`: process what it made available.
    fn notify(
        &mut self,
        queue: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError>;
    /// Host-side work the guest is waiting for (the "wait" exit): deliver what is ready;
    /// returns whether anything reached the guest.
    fn poll(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// A descriptor that becomes readable when the device has host-side work (for `wait`).
    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// A short name for reasons and logs ("virtio-blk").
    fn name(&self) -> &'static str;
    /// The device's own state, for a snapshot (the guest is paused).
    fn save_state(&self) -> DeviceState;
}
