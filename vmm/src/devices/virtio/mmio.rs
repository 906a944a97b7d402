//! The virtio-mmio transport (virtio 1.x, "version 2" registers): feature negotiation, queue
//! set-up, status, notify, config space. Each register access is one VM exit, so the runner's
//! drivers touch as few as they can.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{DeviceError, DeviceState, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::StateError;

use cella_abi::virtio_mmio::{self as reg, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK};

const VENDOR: u32 = 0x4c4c_4543; // "CELL"

/// Which half of a 64-bit queue address a register holds.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

/// Which of a queue's three rings an address register sets.
#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// One virtqueue in a snapshot: virtio-queue's `QueueState`, field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A transport and its device in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub device: DeviceState,
    pub queues: Vec<QueueSnapshot>,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub active: bool,
}

/// One device and its transport state.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            mem,
        }
    }

    /// The transport's and the device's state, for a snapshot (the guest is paused).
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            device: self.device.save_state(),
            queues: self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            active: self.active,
        }
    }

    /// Rebuilds a transport around `device` (already restored from `state.device`). The saved
    /// queues are checked like a driver's writes would be: the device's queue count and sizes,
    /// a valid size, and, for an active device, rings inside guest memory.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        state: &MmioTransportState,
    ) -> Result<Self, StateError> {
        let name = device.name();
        let bad = |reason: String| StateError::Transport { device: name, reason };
        if device.device_type() != state.device_type {
            return Err(bad(format!(
                "the snapshot holds device type {} here, the restored device is type {}",
                state.device_type,
                device.device_type()
            )));
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != *max {
                return Err(bad(format!(
                    "queue {index}: saved maximum size {}, device offers {max}",
                    saved.max_size
                )));
            }
            let q =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| bad(format!("queue {index}: {e}")))?;
            if state.active && q.ready() && !q.is_valid(&mem) {
                return Err(bad(format!("queue {index}: its rings lie outside guest memory")));
            }
            queues.push(q);
        }
        if state.driver_features & !device.features() != 0 {
            return Err(bad(format!(
                "driver features {:#x} include some this device does not offer ({:#x})",
                state.driver_features,
                device.features()
            )));
        }
        Ok(MmioTransport {
            device,
            queues,
            queue_sel: state.queue_sel,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            status: state.status,
            active: state.active,
            mem,
        })
    }

    /// The device's name, for reasons.
    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest load from the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = match offset {
            reg::MAGIC => reg::MAGIC_VALUE,
            reg::VERSION_REG => reg::VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest store to the register window. An error ends the VM.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                let offered = self.device.features();
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | u64::from(value),
                    1 => {
                        self.driver_features = (self.driver_features & 0xFFFF_FFFF) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
                self.driver_features &= offered;
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let queue = self.queue_sel as u16;
                if let Some(q) = self.queue() {
                    let max = q.max_size();
                    let size = u16::try_from(value).unwrap_or(0);
                    q.try_set_size(size).map_err(|_| DeviceError::QueueSize { queue, size: value, max })?;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.set_queue_address(Ring::Desc, Half::Low, value)?,
            reg::QUEUE_DESC_HIGH => self.set_queue_address(Ring::Desc, Half::High, value)?,
            reg::QUEUE_AVAIL_LOW => self.set_queue_address(Ring::Avail, Half::Low, value)?,
            reg::QUEUE_AVAIL_HIGH => self.set_queue_address(Ring::Avail, Half::High, value)?,
            reg::QUEUE_USED_LOW => self.set_queue_address(Ring::Used, Half::Low, value)?,
            reg::QUEUE_USED_HIGH => self.set_queue_address(Ring::Used, Half::High, value)?,
            reg::QUEUE_NOTIFY => {
                let index = value as usize;
                if !self.active || !self.queues.get(index).is_some_and(|q| q.ready()) {
                    return Err(DeviceError::BadNotify(value));
                }
                self.device.notify(index, &mut self.queues, &self.mem)?;
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.set_status(value)?,
            _ => {}
        }
        Ok(())
    }

    fn set_queue_address(&mut self, ring: Ring, half: Half, value: u32) -> Result<(), DeviceError> {
        let queue = self.queue_sel as u16;
        let Some(q) = self.queue() else { return Ok(()) };
        let current = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Avail => q.avail_ring(),
            Ring::Used => q.used_ring(),
        };
        let address = match half {
            Half::Low => (current & !0xFFFF_FFFF) | u64::from(value),
            Half::High => (current & 0xFFFF_FFFF) | (u64::from(value) << 32),
        };
        let result = match ring {
            Ring::Desc => q.try_set_desc_table_address(GuestAddress(address)),
            Ring::Avail => q.try_set_avail_ring_address(GuestAddress(address)),
            Ring::Used => q.try_set_used_ring_address(GuestAddress(address)),
        };
        result.map_err(|e| DeviceError::QueueInvalid { queue, reason: format!("address {address:#x}: {e}") })
    }

    fn set_status(&mut self, value: u32) -> Result<(), DeviceError> {
        if value == 0 {
            self.reset();
            return Ok(());
        }
        if value & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            self.status = value | STATUS_FAILED;
            return Err(DeviceError::NoVersion1);
        }
        let newly_ok = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if newly_ok {
            for (index, q) in self.queues.iter().enumerate() {
                if !q.is_valid(&self.mem) {
                    let reason = if q.ready() {
                        "its rings are misplaced or outside guest memory".to_owned()
                    } else {
                        "the driver did not set it up".to_owned()
                    };
                    return Err(DeviceError::QueueInvalid { queue: index as u16, reason });
                }
            }
            self.device.activate(&mut self.queues, &self.mem)?;
            self.active = true;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.status = 0;
        self.active = false;
        self.driver_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Host-side work for the guest (see [`VirtioDevice::poll`]).
    pub fn poll(&mut self) -> Result<bool, DeviceError> {
        if !self.active {
            return Ok(false);
        }
        self.device.poll(&mut self.queues, &self.mem)
    }

    /// See [`VirtioDevice::wait_fd`].
    pub fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.wait_fd()
    }
}
