//! Devices the guest reaches by port I/O or MMIO, and the bus that routes each exit to one.

pub mod legacy;
pub mod virtio;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use cella_abi::layout::MMIO_DEVICE_SIZE;
use cella_abi::{ports, CONSOLE_LINE_MAX};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vcpu::current_kick_fd;
use legacy::serial::{SerialDevice, SerialDeviceState, SerialStateError};
use serde::{Deserialize, Serialize};
use virtio::mmio::{MmioTransport, MmioTransportState};

/// The longest a single wait exit blocks; the guest asks again if it wants more.
const WAIT_MAX_MS: u32 = 1000;

/// Most vCPUs a VM has: the boot vCPU and one helper.
pub const MAX_VCPUS: usize = 2;

/// What handling one I/O exit came to.
#[derive(Debug, PartialEq, Eq)]
pub enum IoResult {
    /// Handled; resume the guest.
    Done,
    /// The guest asked to end the VM with this status.
    GuestExit(u32),
    /// A template's runner is ready to be snapshotted (only when [`IoBus::allow_park`]).
    Park,
    /// No device answers there; the guest is broken or hostile and the VM ends.
    Unhandled(String),
    /// The guest broke a device's contract (bad descriptors, queue set-up…); the VM ends.
    DeviceFailure { device: &'static str, reason: String },
}

/// Why a saved device could not be rebuilt. Each says what the snapshot expected and what is
/// there now.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "cannot open the disk {path} the snapshot was taken with; restore it at that path or \
         pass the same file as the disk override"
    )]
    Disk { path: std::path::PathBuf, source: std::io::Error },
    #[error(
        "the disk {path} is {now} bytes, but was {saved} bytes when the snapshot was taken; \
         the guest may hold data from the old file, so restore with the original disk"
    )]
    DiskResized { path: std::path::PathBuf, saved: u64, now: u64 },
    #[error("cannot bind the vsock socket {path} for the restored VM")]
    Vsock { path: std::path::PathBuf, source: std::io::Error },
    #[error("the saved {device} transport is inconsistent: {reason}")]
    Transport { device: &'static str, reason: String },
    #[error("the saved serial port is inconsistent")]
    Serial(#[from] SerialStateError),
}

/// Every device on the bus in a snapshot: the UART, then the virtio devices in bus order
/// (their order decides their MMIO addresses, which the guest has in its boot info).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusState {
    pub serial: SerialDeviceState,
    pub mmio_base: u64,
    pub virtio: Vec<MmioTransportState>,
}

/// Routes port and MMIO accesses to devices. Shared by the vCPU threads.
#[derive(Debug)]
pub struct IoBus {
    serial: Mutex<SerialDevice>,
    memory: GuestMemoryMmap,
    /// Virtio devices, the first at `mmio_base`, each `MMIO_DEVICE_SIZE` after the last.
    virtio: Vec<Mutex<MmioTransport>>,
    mmio_base: u64,
    /// One per vCPU, written by its kick handler, so its wait exit wakes for a stop.
    kicks: [EventFd; MAX_VCPUS],
    /// Written by the boot vCPU's [`ports::HELPER_WAKE`]; a helper's [`ports::HELPER_WAIT`]
    /// blocks on it (a wake written first is not lost: the counter stays readable).
    helper_wake: EventFd,
    /// This VM builds a template: a write to [`ports::PARK`] parks the vCPU for its snapshot.
    park_allowed: AtomicBool,
}

impl IoBus {
    pub fn new(serial: SerialDevice, memory: GuestMemoryMmap) -> std::io::Result<Self> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        Ok(IoBus {
            serial: Mutex::new(serial),
            memory,
            virtio: Vec::new(),
            mmio_base: 0,
            kicks: [eventfd()?, eventfd()?],
            helper_wake: eventfd()?,
            park_allowed: AtomicBool::new(false),
        })
    }

    /// Lets the guest park itself for a template snapshot; any other VM that writes to the
    /// park port ends like one that touches a port no device answers.
    pub fn allow_park(&self) {
        self.park_allowed.store(true, Ordering::Release);
    }

    /// Attaches the virtio devices at `base`, in order.
    pub fn with_virtio(mut self, base: u64, devices: Vec<MmioTransport>) -> Self {
        self.mmio_base = base;
        self.virtio = devices.into_iter().map(Mutex::new).collect();
        self
    }

    /// Every device's state, for a snapshot. The vCPUs must be paused (the locks make each
    /// device's state consistent, not the set of them).
    pub fn save_state(&self) -> BusState {
        BusState {
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save_state(),
            mmio_base: self.mmio_base,
            virtio: self
                .virtio
                .iter()
                .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).save_state())
                .collect(),
        }
    }

    /// The descriptor the kick handler of vCPU `index` writes to (-1 past [`MAX_VCPUS`]).
    pub fn kick_fd(&self, index: u64) -> RawFd {
        self.kicks.get(index as usize).map_or(-1, |k| k.as_raw_fd())
    }

    /// The serial device, once the vCPUs are gone.
    pub fn into_serial(self) -> SerialDevice {
        self.serial.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// An `out` (or `rep outs`: `data` then holds every byte) to `port`.
    pub fn port_write(&self, port: u16, data: &[u8]) -> IoResult {
        match port {
            ports::EXIT => IoResult::GuestExit(le_value(data)),
            ports::CONSOLE_LINE => self.console_line(u64::from(le_value(data))),
            ports::WAIT => self.wait(le_value(data)),
            ports::HELPER_WAKE => {
                // Only fails if the counter would overflow, when it is readable anyway.
                let _ = self.helper_wake.write(1);
                IoResult::Done
            }
            ports::HELPER_WAIT => self.helper_wait(le_value(data)),
            ports::PARK if self.park_allowed.load(Ordering::Acquire) => IoResult::Park,
            ports::PARK => {
                IoResult::Unhandled("a park request, but this VM is not building a template".into())
            }
            p if serial_offset(p).is_some() => {
                let offset = serial_offset(p).unwrap_or(0);
                self.serial.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                IoResult::Done
            }
            _ => IoResult::Unhandled(format!("write of {} byte(s) to I/O port {port:#x}", data.len())),
        }
    }

    /// An `in` (or `rep ins`) from `port`.
    pub fn port_read(&self, port: u16, data: &mut [u8]) -> IoResult {
        match serial_offset(port) {
            Some(offset) => {
                self.serial.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                IoResult::Done
            }
            None => IoResult::Unhandled(format!("read of {} byte(s) from I/O port {port:#x}", data.len())),
        }
    }

    /// Feeds the [`cella_abi::ConsoleLine`] at `addr` to the UART's transmit register.
    fn console_line(&self, addr: u64) -> IoResult {
        let bad = |why: String| IoResult::Unhandled(format!("console line at {addr:#x}: {why}"));
        let len = match self.memory.read_obj::<u32>(GuestAddress(addr)) {
            Ok(len) => len as usize,
            Err(_) => return bad("address is outside guest memory".into()),
        };
        if len > CONSOLE_LINE_MAX {
            return bad(format!("length {len} is over the {CONSOLE_LINE_MAX}-byte maximum"));
        }
        let mut text = [0u8; CONSOLE_LINE_MAX];
        if self.memory.read_slice(&mut text[..len], GuestAddress(addr + 4)).is_err() {
            return bad("text runs past the end of guest memory".into());
        }
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).write(0, &text[..len]);
        IoResult::Done
    }

    /// The virtio device whose window holds `addr`, and the offset into it.
    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let rel = addr.checked_sub(self.mmio_base)?;
        let device = self.virtio.get((rel / MMIO_DEVICE_SIZE) as usize)?;
        Some((device, rel % MMIO_DEVICE_SIZE))
    }

    /// A guest load from an address that is not memory.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> IoResult {
        match self.virtio_at(addr) {
            Some((device, offset)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                IoResult::Done
            }
            None => IoResult::Unhandled(format!("MMIO read of {} byte(s) at {addr:#x}", data.len())),
        }
    }

    /// A guest store to an address that is not memory.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> IoResult {
        match self.virtio_at(addr) {
            Some((device, offset)) => {
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                match device.write(offset, data) {
                    Ok(()) => IoResult::Done,
                    Err(e) => IoResult::DeviceFailure { device: device.name(), reason: e.to_string() },
                }
            }
            None => IoResult::Unhandled(format!("MMIO write of {} byte(s) at {addr:#x}", data.len())),
        }
    }

    /// Lets every device deliver host-side work; whether any reached the guest.
    fn poll_devices(&self) -> Result<bool, IoResult> {
        let mut delivered = false;
        for device in &self.virtio {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            match device.poll() {
                Ok(d) => delivered |= d,
                Err(e) => {
                    return Err(IoResult::DeviceFailure { device: device.name(), reason: e.to_string() })
                }
            }
        }
        Ok(delivered)
    }

    /// The guest's wait exit: deliver what is ready; if nothing is, block until a device's
    /// host side has something, a kick arrives, or `timeout_ms` passes.
    fn wait(&self, timeout_ms: u32) -> IoResult {
        match self.poll_devices() {
            Ok(true) => return IoResult::Done,
            Ok(false) if timeout_ms == 0 => return IoResult::Done,
            Ok(false) => {}
            Err(failure) => return failure,
        }
        let mut fds: Vec<libc::pollfd> = self
            .virtio
            .iter()
            .filter_map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).wait_fd())
            .chain([current_kick_fd()])
            .filter(|fd| *fd >= 0)
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the call; EINTR (a kick) is fine.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms.min(WAIT_MAX_MS) as i32)
        };
        match self.poll_devices() {
            Ok(_) => IoResult::Done,
            Err(failure) => failure,
        }
    }
}

impl IoBus {
    /// A helper vCPU's wait for work: block until the boot vCPU's wake, a kick of this vCPU,
    /// or `timeout_ms`; then take the wake.
    fn helper_wait(&self, timeout_ms: u32) -> IoResult {
        let mut fds: Vec<libc::pollfd> = [self.helper_wake.as_raw_fd(), current_kick_fd()]
            .into_iter()
            .filter(|fd| *fd >= 0)
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the call; EINTR (a kick) is fine.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms.min(WAIT_MAX_MS) as i32)
        };
        // Non-blocking: EAGAIN when no wake came (a kick, the timeout) is fine.
        let _ = self.helper_wake.read();
        IoResult::Done
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    let offset = port.checked_sub(ports::SERIAL_COM1)?;
    (offset < ports::SERIAL_LEN).then_some(offset as u8)
}

/// The value of a 1-, 2- or 4-byte port write (little-endian; extra bytes ignored).
fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use legacy::console::{ConsoleLimits, GuestConsole, SharedBuffer};

    fn bus() -> (IoBus, SharedBuffer) {
        let out = SharedBuffer::default();
        let console = GuestConsole::new(Box::new(out.clone()), ConsoleLimits::default());
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (IoBus::new(SerialDevice::new(console), memory).unwrap(), out)
    }

    #[test]
    fn console_line_port_copies_one_line_from_guest_memory() {
        let (bus, out) = bus();
        bus.memory.write_obj(6u32, GuestAddress(0x8000)).unwrap();
        bus.memory.write_slice(b"hello\n", GuestAddress(0x8004)).unwrap();
        assert_eq!(bus.port_write(ports::CONSOLE_LINE, &0x8000u32.to_le_bytes()), IoResult::Done);
        assert_eq!(out.text(), "hello\n");
    }

    #[test]
    fn console_line_port_refuses_bad_lengths_and_addresses() {
        let (bus, _) = bus();
        bus.memory.write_obj(1_000_000u32, GuestAddress(0x8000)).unwrap();
        let too_long = bus.port_write(ports::CONSOLE_LINE, &0x8000u32.to_le_bytes());
        assert!(matches!(too_long, IoResult::Unhandled(w) if w.contains("over the 4092-byte maximum")));
        let outside = bus.port_write(ports::CONSOLE_LINE, &0x20_0000u32.to_le_bytes());
        assert!(matches!(outside, IoResult::Unhandled(w) if w.contains("outside guest memory")));
        bus.memory.write_obj(100u32, GuestAddress((1 << 20) - 8)).unwrap();
        let past_end = bus.port_write(ports::CONSOLE_LINE, &((1u32 << 20) - 8).to_le_bytes());
        assert!(matches!(past_end, IoResult::Unhandled(w) if w.contains("past the end")));
    }

    #[test]
    fn exit_port_ends_the_vm_with_the_written_status() {
        let (bus, _) = bus();
        assert_eq!(bus.port_write(ports::EXIT, &7u32.to_le_bytes()), IoResult::GuestExit(7));
        assert_eq!(bus.port_write(ports::EXIT, &[3]), IoResult::GuestExit(3));
    }

    #[test]
    fn the_park_port_parks_only_a_template_build() {
        let (bus, _) = bus();
        let refused = bus.port_write(ports::PARK, &1u32.to_le_bytes());
        assert!(matches!(refused, IoResult::Unhandled(w) if w.contains("not building a template")));
        bus.allow_park();
        assert_eq!(bus.port_write(ports::PARK, &1u32.to_le_bytes()), IoResult::Park);
    }

    #[test]
    fn a_string_write_to_the_uart_is_one_console_line() {
        let (bus, out) = bus();
        assert_eq!(bus.port_write(ports::SERIAL_COM1, b"hello\n"), IoResult::Done);
        assert_eq!(out.contents(), b"hello\n");
    }

    #[test]
    fn unknown_ports_and_mmio_are_refused() {
        let (bus, _) = bus();
        assert!(matches!(bus.port_write(0x80, &[1]), IoResult::Unhandled(w) if w.contains("0x80")));
        assert!(matches!(bus.port_read(0x3f8 + 8, &mut [0]), IoResult::Unhandled(_)));
        assert!(matches!(bus.mmio_write(0xd000_0000, &[0; 4]), IoResult::Unhandled(_)));
    }
}
