//! The guest console as the host sees it: line-buffered, sanitised, and bounded so that a
//! guest cannot flood the host's terminal, logs or disk. Output over the rate (a token bucket)
//! or over the total cap is dropped, and the console says so in a line of its own.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The longest line kept; longer ones are cut into several.
const LINE_MAX: usize = 1024;

/// How much guest output the host accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// Sustained bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes that may arrive at once before the rate applies.
    pub burst: u64,
    /// Bytes in the whole run; everything after is dropped.
    pub total: u64,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        ConsoleLimits { bytes_per_sec: 64 << 10, burst: 256 << 10, total: 4 << 20 }
    }
}

pub use cella_host::report::ConsoleStats;

/// The sink for guest console bytes.
pub struct GuestConsole {
    out: Box<dyn Write + Send>,
    limits: ConsoleLimits,
    line: Vec<u8>,
    tokens: f64,
    refilled: Instant,
    stats: ConsoleStats,
    /// Bytes dropped since the last note about dropping.
    dropping: u64,
}

impl fmt::Debug for GuestConsole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestConsole").field("limits", &self.limits).field("stats", &self.stats).finish()
    }
}

impl GuestConsole {
    pub fn new(out: Box<dyn Write + Send>, limits: ConsoleLimits) -> Self {
        GuestConsole {
            out,
            limits,
            line: Vec::with_capacity(128),
            tokens: limits.burst as f64,
            refilled: Instant::now(),
            stats: ConsoleStats::default(),
            dropping: 0,
        }
    }

    /// Takes one byte from the guest.
    fn push(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                self.line.push(b'\n');
                self.emit();
            }
            b'\t' | 0x20..=0x7e => self.line.push(byte),
            b'\r' => {}
            // Escape sequences and other control or non-ASCII bytes never reach the terminal raw.
            _ => self.line.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
        }
        if self.line.len() >= LINE_MAX {
            self.line.push(b'\n');
            self.emit();
        }
    }

    fn emit(&mut self) {
        let len = self.line.len() as u64;
        if self.admit(len) {
            if self.dropping > 0 {
                let note = format!("[cella-vmm: dropped {} bytes of guest console output]\n", self.dropping);
                let _ = self.out.write_all(note.as_bytes());
                self.dropping = 0;
            }
            let _ = self.out.write_all(&self.line);
            self.stats.bytes += len;
        } else {
            if self.dropping == 0 {
                let note = format!(
                    "[cella-vmm: guest console over its limit ({} B/s, {} B in all); dropping output]\n",
                    self.limits.bytes_per_sec, self.limits.total
                );
                let _ = self.out.write_all(note.as_bytes());
            }
            self.dropping += len;
            self.stats.dropped += len;
        }
        self.line.clear();
    }

    fn admit(&mut self, len: u64) -> bool {
        if self.stats.bytes + len > self.limits.total {
            return false;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * self.limits.bytes_per_sec as f64;
        self.tokens = (self.tokens + refill).min(self.limits.burst as f64);
        self.refilled = now;
        // Once dropping, wait for half the burst to refill before passing output again, so a
        // flood cannot turn into a stream of drop notes.
        let floor = if self.dropping > 0 { (self.limits.burst / 2).max(len) } else { len };
        if self.tokens >= floor as f64 {
            self.tokens -= len as f64;
            true
        } else {
            false
        }
    }

    /// Emits a partial last line and a final note about dropped bytes; returns the counters.
    pub fn finish(&mut self) -> ConsoleStats {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            self.emit();
        }
        if self.dropping > 0 {
            let note = format!("[cella-vmm: dropped {} bytes of guest console output]\n", self.dropping);
            let _ = self.out.write_all(note.as_bytes());
            self.dropping = 0;
        }
        let _ = self.out.flush();
        self.stats
    }
}

impl Write for GuestConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        buf.iter().for_each(|b| self.push(*b));
        Ok(buf.len())
    }

    /// The UART flushes after every byte; lines are emitted whole instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Write` into shared memory, for tests and for callers that want the console as bytes.
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(limits: ConsoleLimits) -> (GuestConsole, SharedBuffer) {
        let out = SharedBuffer::default();
        (GuestConsole::new(Box::new(out.clone()), limits), out)
    }

    #[test]
    fn passes_lines_and_escapes_control_bytes() {
        let (mut c, out) = console(ConsoleLimits::default());
        c.write_all(b"ok line\n\x1b[31mred\n").unwrap();
        let stats = c.finish();
        assert_eq!(out.text(), "ok line\n\\x1b[31mred\n");
        assert_eq!(stats, ConsoleStats { bytes: 20, dropped: 0 });
    }

    #[test]
    fn drops_output_over_the_total_cap_and_says_so() {
        let (mut c, out) = console(ConsoleLimits { bytes_per_sec: 1 << 30, burst: 1 << 30, total: 100 });
        for _ in 0..50 {
            c.write_all(b"0123456789\n").unwrap();
        }
        let stats = c.finish();
        assert_eq!(stats.bytes, 99);
        assert_eq!(stats.dropped, 50 * 11 - 99);
        let text = out.text();
        assert!(text.contains("guest console over its limit"), "{text}");
        assert!(text.contains(&format!("dropped {} bytes", 50 * 11 - 99)), "{text}");
    }

    #[test]
    fn rate_limit_holds_a_flood_to_the_burst() {
        let (mut c, _out) = console(ConsoleLimits { bytes_per_sec: 10, burst: 1000, total: 1 << 30 });
        let started = Instant::now();
        for _ in 0..10_000 {
            c.write_all(b"flood flood flood\n").unwrap();
        }
        let stats = c.finish();
        let allowed = 1000 + (started.elapsed().as_secs_f64() * 10.0) as u64 + 18;
        assert!(stats.bytes <= allowed, "{stats:?} > {allowed}");
        assert!(stats.dropped > 170_000, "{stats:?}");
    }

    #[test]
    fn long_lines_are_cut() {
        let (mut c, out) = console(ConsoleLimits::default());
        c.write_all(&[b'a'; LINE_MAX * 2 + 10]).unwrap();
        c.finish();
        assert_eq!(out.text().lines().count(), 3);
    }
}
