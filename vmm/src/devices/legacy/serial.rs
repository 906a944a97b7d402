//! The 8250 UART (vm-superio) at COM1, writing to a bounded [`GuestConsole`]. The runner
//! polls and takes no interrupts, so the interrupt line goes nowhere.

use vm_superio::{Serial, Trigger};

use super::console::GuestConsole;

/// An interrupt line that is not connected.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1 and its console.
pub struct SerialDevice {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, GuestConsole>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").field("console", self.uart.writer()).finish()
    }
}

impl SerialDevice {
    pub fn new(console: GuestConsole) -> Self {
        SerialDevice { uart: Serial::new(NoInterrupt, console) }
    }

    /// Writes each byte of `data` to the register at `offset`.
    pub fn write(&mut self, offset: u8, data: &[u8]) {
        for byte in data {
            // The console never fails a write (it drops over its limits), so neither does this.
            let _ = self.uart.write(offset, *byte);
        }
    }

    /// Reads the register at `offset` into each byte of `data`.
    pub fn read(&mut self, offset: u8, data: &mut [u8]) {
        for byte in data {
            *byte = self.uart.read(offset);
        }
    }

    /// The console, to flush it and read its counters at teardown.
    pub fn into_console(self) -> GuestConsole {
        self.uart.into_writer()
    }
}
