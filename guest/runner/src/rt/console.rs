//! The guest console: text is gathered into one static line buffer and handed to the VMM a
//! line at a time through the console-line port: one VM exit per line, not per byte.

use core::cell::UnsafeCell;
use core::fmt;

use cella_abi::{ports, ConsoleLine, CONSOLE_LINE_MAX};

use super::io;

/// The line buffer. It lives in the image's bss, below 4 GiB, as the port requires.
struct LineCell(UnsafeCell<ConsoleLine>);

// SAFETY: the runner has one thread of execution and no interrupts, so the buffer is never
// accessed concurrently; `Console` is the only code that touches it.
unsafe impl Sync for LineCell {}

static LINE: LineCell = LineCell(UnsafeCell::new(ConsoleLine { len: 0, bytes: [0; CONSOLE_LINE_MAX] }));

/// A line-buffered writer to the VMM's console. Flushes at each newline, when full, and on drop.
pub struct Console(());

impl Console {
    pub const fn new() -> Self {
        Console(())
    }

    fn line(&mut self) -> &mut ConsoleLine {
        // SAFETY: see `LineCell`: single-threaded, and `&mut self` keeps this the only borrow
        // created through this console; consoles are not held across each other's use.
        unsafe { &mut *LINE.0.get() }
    }

    pub fn flush(&mut self) {
        let line = self.line();
        if line.len == 0 {
            return;
        }
        let addr = line as *mut ConsoleLine as u64;
        io::out_u32(ports::CONSOLE_LINE, addr as u32);
        self.line().len = 0;
    }

    fn push(&mut self, byte: u8) {
        if self.line().len as usize == CONSOLE_LINE_MAX {
            self.flush();
        }
        let line = self.line();
        line.bytes[line.len as usize] = byte;
        line.len += 1;
        if byte == b'\n' {
            self.flush();
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}
