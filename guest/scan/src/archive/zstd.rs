//! zstd (RFC 8878), as image layers may be compressed: every frame of the stream decoded in
//! turn through `ruzstd`, skippable frames skipped, with the same bomb checks as deflate (the
//! artifact's decompressed total and the ratio) and a bound on the window a frame may ask for,
//! checked from its header before the decoder allocates it. Frames that need a dictionary are
//! not read. The optional content checksum is not verified.

use alloc::string::String;
use core::cell::Cell;

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use ruzstd::io::{Error as ZstdIoError, ErrorKind as ZstdIoErrorKind, Read as ZstdRead};

use super::inflate::BombCheck;
use crate::error::ArtifactError;
use crate::source::{read_full, ByteRead};
use crate::Limits;

/// The start of every zstd frame.
pub(crate) const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The largest window a frame may ask for: the decoder holds this much of the output. zstd's
/// levels use at most 8 MiB (`--long` up to 128 MiB, which is refused).
pub const MAX_WINDOW: u64 = 32 << 20;
/// The most window all zstd streams open at once may hold (a zstd stream inside another
/// inside another each holds its own): the guest's memory is not the attacker's to spend.
pub const MAX_WINDOWS_HELD: u64 = 48 << 20;
/// The longest frame header: magic, descriptor, window, 4-byte dictionary id, 8-byte size.
const MAX_HEADER: usize = 18;

/// Whether `head` (the first bytes of a stream) starts a zstd stream: a zstd frame, or a
/// skippable frame with a zstd frame right after it (a skippable frame alone could begin
/// another format, LZ4 for one).
pub(crate) fn starts_stream(head: &[u8]) -> bool {
    if head.starts_with(&MAGIC) {
        return true;
    }
    if head.len() < 8 || !is_skippable(&head[..4]) {
        return false;
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    head.get(8 + len..).is_some_and(|rest| rest.starts_with(&MAGIC))
}

/// The magic of a skippable frame: `0x184D2A5?`, little-endian.
fn is_skippable(magic: &[u8]) -> bool {
    magic.len() == 4 && magic[0] & 0xf0 == 0x50 && magic[1..] == [0x2a, 0x4d, 0x18]
}

/// What a frame header says, as far as the limits care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// The header's length in bytes, magic included.
    pub len: usize,
    pub window: u64,
    pub dictionary: bool,
}

/// Parses the header at the start of `bytes` (which begins with [`MAGIC`]); `None` if it is
/// not all there. The window of a single-segment frame is its content size.
pub(crate) fn frame_header(bytes: &[u8]) -> Option<Result<FrameHeader, &'static str>> {
    let descriptor = *bytes.get(4)?;
    if descriptor & 0x08 != 0 {
        return Some(Err("zstd frame header has its reserved bit set"));
    }
    let single_segment = descriptor & 0x20 != 0;
    let dictionary_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let size_len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut at = 5;
    let window_descriptor = if single_segment {
        None
    } else {
        at += 1;
        Some(*bytes.get(5)?)
    };
    let dictionary = bytes.get(at..at + dictionary_len)?.iter().any(|b| *b != 0);
    at += dictionary_len;
    let size_bytes = bytes.get(at..at + size_len)?;
    at += size_len;
    let mut size = [0u8; 8];
    size[..size_len].copy_from_slice(size_bytes);
    let mut size = u64::from_le_bytes(size);
    if size_len == 2 {
        size += 256;
    }
    let window = match window_descriptor {
        Some(wd) => {
            let base = 1u64 << (10 + u32::from(wd >> 3));
            base + base / 8 * u64::from(wd & 7)
        }
        None => size,
    };
    Some(Ok(FrameHeader { len: at, window, dictionary }))
}

/// The compressed bytes as the decoder reads them: the header this module read ahead first,
/// then the inner reader. An error of the inner reader is kept to be reported as it was.
struct Feed<'a, R: ByteRead + ?Sized> {
    inner: &'a mut R,
    ahead: [u8; MAX_HEADER],
    ahead_pos: usize,
    ahead_len: usize,
    total_in: u64,
    ended: bool,
    error: Option<ArtifactError>,
}

impl<R: ByteRead + ?Sized> ZstdRead for Feed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ZstdIoError> {
        if self.ahead_pos < self.ahead_len {
            let n = (self.ahead_len - self.ahead_pos).min(buf.len());
            buf[..n].copy_from_slice(&self.ahead[self.ahead_pos..self.ahead_pos + n]);
            self.ahead_pos += n;
            return Ok(n);
        }
        match self.inner.read(buf) {
            Ok(n) => {
                self.total_in += n as u64;
                self.ended |= n == 0 && !buf.is_empty();
                Ok(n)
            }
            Err(e) => {
                self.error = Some(e);
                Err(ZstdIoError::from(ZstdIoErrorKind::Other))
            }
        }
    }
}

/// The decompressed bytes of a zstd stream.
pub(crate) struct ZstdReader<'a, R: ByteRead + ?Sized> {
    decoder: StreamingDecoder<Feed<'a, R>, FrameDecoder>,
    entry: String,
    total_out: u64,
    bombs: BombCheck<'a>,
    finished: bool,
    /// The window all open zstd streams of the artifact hold, and this one's part of it.
    windows: &'a Cell<u64>,
    held: u64,
}

impl<R: ByteRead + ?Sized> Drop for ZstdReader<'_, R> {
    fn drop(&mut self) {
        self.windows.set(self.windows.get() - self.held);
    }
}

/// Takes `window` for a stream that held `held` until now, if all streams stay within
/// [`MAX_WINDOWS_HELD`].
fn hold(windows: &Cell<u64>, held: u64, window: u64, entry: &str) -> Result<(), ArtifactError> {
    let others = windows.get() - held;
    if others + window > MAX_WINDOWS_HELD {
        return Err(ArtifactError::Unsupported {
            entry: String::from(entry),
            feature: "zstd streams inside zstd streams whose windows come to over 48 MiB",
        });
    }
    windows.set(others + window);
    Ok(())
}

impl<'a, R: ByteRead + ?Sized> ZstdReader<'a, R> {
    pub(crate) fn new(
        inner: &'a mut R,
        entry: String,
        limits: &Limits,
        total: &'a Cell<u64>,
        windows: &'a Cell<u64>,
    ) -> Result<Self, ArtifactError> {
        let mut feed = Feed {
            inner,
            ahead: [0; MAX_HEADER],
            ahead_pos: 0,
            ahead_len: 0,
            total_in: 0,
            ended: false,
            error: None,
        };
        let Some(window) = next_frame(&mut feed, &entry)? else {
            return Err(ArtifactError::Truncated { entry });
        };
        hold(windows, 0, window, &entry)?;
        // The header is all in `feed.ahead`: starting the decoder reads nothing more.
        let decoder = match StreamingDecoder::new_with_decoder(feed, FrameDecoder::new()) {
            Ok(decoder) => decoder,
            Err(_) => {
                windows.set(windows.get() - window);
                return Err(ArtifactError::Corrupt { entry, reason: "zstd frame header" });
            }
        };
        Ok(ZstdReader {
            decoder,
            entry,
            total_out: 0,
            bombs: BombCheck::new(limits, total),
            finished: false,
            windows,
            held: window,
        })
    }

    /// The error for a decoder failure: the inner reader's own, a cut stream, or damage.
    fn failed(&mut self) -> ArtifactError {
        let feed = self.decoder.get_mut();
        match feed.error.take() {
            Some(e) => e,
            None if feed.ended => ArtifactError::Truncated { entry: self.entry.clone() },
            None => ArtifactError::Corrupt { entry: self.entry.clone(), reason: "malformed zstd data" },
        }
    }

    fn count(&mut self, n: usize) -> Result<(), ArtifactError> {
        self.total_out += n as u64;
        self.bombs.check(&self.entry, n, self.total_out, self.decoder.get_ref().total_in)
    }
}

/// Reads up to the next frame's header into `feed.ahead` (skipping skippable frames) and
/// checks it; the window it asks for, or `None` at the clean end of the stream.
fn next_frame<R: ByteRead + ?Sized>(
    feed: &mut Feed<'_, R>,
    entry: &str,
) -> Result<Option<u64>, ArtifactError> {
    let corrupt = |reason| ArtifactError::Corrupt { entry: String::from(entry), reason };
    loop {
        let mut magic = [0u8; 4];
        let n = read_full(feed.inner, &mut magic)?;
        feed.total_in += n as u64;
        match n {
            0 => return Ok(None),
            4 => {}
            _ => return Err(ArtifactError::Truncated { entry: String::from(entry) }),
        }
        if is_skippable(&magic) {
            // A skippable frame: its length, then that many bytes of anything.
            let mut len = [0u8; 4];
            if read_full(feed.inner, &mut len)? != 4 {
                return Err(ArtifactError::Truncated { entry: String::from(entry) });
            }
            let mut left = u64::from(u32::from_le_bytes(len));
            feed.total_in += 4 + left;
            let mut skip = [0u8; 512];
            while left > 0 {
                let want = left.min(skip.len() as u64) as usize;
                if read_full(feed.inner, &mut skip[..want])? != want {
                    return Err(ArtifactError::Truncated { entry: String::from(entry) });
                }
                left -= want as u64;
            }
            continue;
        }
        if magic != MAGIC {
            return Err(corrupt("bytes after the last zstd frame are not a frame"));
        }
        feed.ahead[..4].copy_from_slice(&magic);
        // The header's length is known from its descriptor byte: read exactly that much.
        let mut have = 4;
        let header = loop {
            match frame_header(&feed.ahead[..have]) {
                Some(header) => break header.map_err(corrupt)?,
                None => {
                    if have == MAX_HEADER || read_full(feed.inner, &mut feed.ahead[have..have + 1])? != 1 {
                        return Err(ArtifactError::Truncated { entry: String::from(entry) });
                    }
                    feed.total_in += 1;
                    have += 1;
                }
            }
        };
        debug_assert_eq!(header.len, have);
        if header.dictionary {
            return Err(ArtifactError::Unsupported {
                entry: String::from(entry),
                feature: "zstd frames that need a dictionary",
            });
        }
        if header.window > MAX_WINDOW {
            return Err(ArtifactError::Unsupported {
                entry: String::from(entry),
                feature: "a zstd window over 32 MiB (zstd --long)",
            });
        }
        feed.ahead_pos = 0;
        feed.ahead_len = have;
        return Ok(Some(header.window));
    }
}

/// Starts `decoder` on the frame whose header `feed` holds.
fn init<R: ByteRead + ?Sized>(
    decoder: &mut FrameDecoder,
    feed: &mut Feed<'_, R>,
    entry: &str,
) -> Result<(), ArtifactError> {
    decoder.init(&mut *feed).map_err(|_| match feed.error.take() {
        Some(e) => e,
        None => ArtifactError::Corrupt { entry: String::from(entry), reason: "zstd frame header" },
    })
}

impl<R: ByteRead + ?Sized> ByteRead for ZstdReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        loop {
            match ZstdRead::read(&mut self.decoder, buf) {
                Ok(0) => {
                    // This frame is done: the next one, if the stream has one.
                    let entry = self.entry.clone();
                    let Some(window) = next_frame(self.decoder.get_mut(), &entry)? else {
                        self.finished = true;
                        return Ok(0);
                    };
                    hold(self.windows, self.held, window, &entry)?;
                    self.held = window;
                    let mut decoder = core::mem::replace(&mut self.decoder.decoder, FrameDecoder::new());
                    init(&mut decoder, self.decoder.get_mut(), &entry)?;
                    self.decoder.decoder = decoder;
                }
                Ok(n) => {
                    self.count(n)?;
                    return Ok(n);
                }
                Err(_) => return Err(self.failed()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_headers_window_and_length_are_read_as_rfc_8878_says() {
        // Window descriptor 0x58: exponent 11, mantissa 0 → 2 MiB (zstd -3 on a stream).
        let h = frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]).unwrap().unwrap();
        assert_eq!(h, FrameHeader { len: 6, window: 2 << 20, dictionary: false });
        // Exponent 17, mantissa 4: 128 MiB + 4/8 of it.
        let h = frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, (17 << 3) | 4]).unwrap().unwrap();
        assert_eq!(h.window, (128u64 << 20) + (64 << 20));
        // Single segment, 2-byte size (+256): the window is the content size.
        let h = frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x10, 0x00]).unwrap().unwrap();
        assert_eq!(h, FrameHeader { len: 7, window: 256 + 16, dictionary: false });
        // Single segment, 1-byte size; an 8-byte size of a huge frame.
        assert_eq!(frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x20, 9]).unwrap().unwrap().window, 9);
        let huge = [0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            frame_header(&huge).unwrap().unwrap(),
            FrameHeader { len: 13, window: 1 << 56, dictionary: false }
        );
        // A 4-byte dictionary id, zero (no dictionary) and not.
        let no_dict = [0x28, 0xb5, 0x2f, 0xfd, 0x03, 0x58, 0, 0, 0, 0];
        assert!(!frame_header(&no_dict).unwrap().unwrap().dictionary);
        let dict = [0x28, 0xb5, 0x2f, 0xfd, 0x03, 0x58, 1, 0, 0, 0];
        assert!(frame_header(&dict).unwrap().unwrap().dictionary);
        // Not all there yet; the reserved bit.
        assert_eq!(frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x03, 0x58, 1]), None);
        assert!(frame_header(&[0x28, 0xb5, 0x2f, 0xfd, 0x08, 0x58]).unwrap().is_err());
    }

    #[test]
    fn a_stream_starts_with_a_frame_or_a_skippable_frame_before_one() {
        assert!(starts_stream(&[0x28, 0xb5, 0x2f, 0xfd, 0]));
        assert!(starts_stream(&[0x5f, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 9, 0x28, 0xb5, 0x2f, 0xfd]));
        // A skippable frame before something else (LZ4's frame, say) is not zstd's.
        assert!(!starts_stream(&[0x50, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 9, 0x04, 0x22, 0x4d, 0x18]));
        assert!(!starts_stream(b"plain text"));
    }
}
