//! Devices the guest reaches by port I/O or MMIO, and the bus that routes each exit to one.

pub mod legacy;

use std::sync::Mutex;

use cella_abi::{ports, CONSOLE_LINE_MAX};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use legacy::serial::SerialDevice;

/// What handling one I/O exit came to.
#[derive(Debug, PartialEq, Eq)]
pub enum IoResult {
    /// Handled; resume the guest.
    Done,
    /// The guest asked to end the VM with this status.
    GuestExit(u32),
    /// No device answers there; the guest is broken or hostile and the VM ends.
    Unhandled(String),
}

/// Routes port and MMIO accesses to devices. Shared by the vCPU threads.
#[derive(Debug)]
pub struct IoBus {
    serial: Mutex<SerialDevice>,
    memory: GuestMemoryMmap,
}

impl IoBus {
    pub fn new(serial: SerialDevice, memory: GuestMemoryMmap) -> Self {
        IoBus { serial: Mutex::new(serial), memory }
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

    /// A guest load from an address that is not memory.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> IoResult {
        IoResult::Unhandled(format!("MMIO read of {} byte(s) at {addr:#x}", data.len()))
    }

    /// A guest store to an address that is not memory.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> IoResult {
        IoResult::Unhandled(format!("MMIO write of {} byte(s) at {addr:#x}", data.len()))
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
        (IoBus::new(SerialDevice::new(console), memory), out)
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
