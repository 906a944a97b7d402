//! The 8250 UART (vm-superio) at COM1, writing to a bounded [`GuestConsole`]. The runner
//! polls and takes no interrupts, so the interrupt line goes nowhere.
//!
//! In a snapshot the UART's registers and its receive FIFO are saved ([`SerialDeviceState`]);
//! the console behind it is not (it is the host's sink, given anew on restore, and its partial
//! line and rate counters start over).

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
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

/// The UART's registers in a snapshot: vm-superio's `SerialState`, field for field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Why a saved UART could not be rebuilt.
#[derive(Debug, thiserror::Error)]
#[error("the saved UART receive FIFO holds {0} bytes, more than the 64 an 8250 has")]
pub struct SerialStateError(usize);

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

    /// The UART's registers, for a snapshot.
    pub fn save_state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with saved registers, writing to a new `console`.
    pub fn restore(state: &SerialDeviceState, console: GuestConsole) -> Result<Self, SerialStateError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let len = s.in_buffer.len();
        let uart = Serial::from_state(&s, NoInterrupt, vm_superio::serial::NoEvents, console)
            .map_err(|_| SerialStateError(len))?;
        Ok(SerialDevice { uart })
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
