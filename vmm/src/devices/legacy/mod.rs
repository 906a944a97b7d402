//! Legacy PC devices: the 8250 UART the guest uses as its console.

pub mod console;
pub mod serial;
