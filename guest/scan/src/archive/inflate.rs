//! Streaming raw-deflate decompression with bomb checks, over `miniz_oxide`.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

use super::crc32::Crc32;
use crate::error::ArtifactError;
use crate::source::ByteRead;
use crate::Limits;

/// Below this many output bytes the ratio check does not apply (tiny highly compressible files
/// are normal).
pub const RATIO_MIN_OUTPUT: u64 = 1024 * 1024;

/// The bomb limits every decompressor of an artifact applies: the artifact's decompressed
/// total (shared by all its streams) and one stream's ratio of output to input.
pub(crate) struct BombCheck<'a> {
    artifact_total: &'a Cell<u64>,
    max_total: u64,
    max_ratio: u64,
}

impl<'a> BombCheck<'a> {
    pub(crate) fn new(limits: &Limits, artifact_total: &'a Cell<u64>) -> Self {
        BombCheck { artifact_total, max_total: limits.max_decompressed, max_ratio: limits.max_ratio }
    }

    /// Counts `n` more bytes out of the stream `entry`, which has now put out `total_out`
    /// bytes from `total_in`.
    pub(crate) fn check(
        &self,
        entry: &str,
        n: usize,
        total_out: u64,
        total_in: u64,
    ) -> Result<(), ArtifactError> {
        self.artifact_total.set(self.artifact_total.get() + n as u64);
        if self.artifact_total.get() > self.max_total {
            return Err(ArtifactError::DecompressedTotal {
                entry: String::from(entry),
                limit: self.max_total,
            });
        }
        if total_out >= RATIO_MIN_OUTPUT {
            let ratio = total_out / total_in.max(1);
            if ratio > self.max_ratio {
                return Err(ArtifactError::DecompressionRatio {
                    entry: String::from(entry),
                    ratio,
                    limit: self.max_ratio,
                });
            }
        }
        Ok(())
    }
}

/// A raw-deflate stream turned into a [`ByteRead`] of its decompressed bytes.
pub(crate) struct Inflater<'a, R: ByteRead + ?Sized> {
    inner: &'a mut R,
    state: Box<InflateState>,
    inbuf: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    pub(crate) total_in: u64,
    pub(crate) total_out: u64,
    pub(crate) crc: Crc32,
    done: bool,
    /// The inner reader has no more input: what the stream still holds is drained, and if it
    /// has not ended by then, the entry is truncated.
    input_ended: bool,
    entry: String,
    bombs: BombCheck<'a>,
    /// For zip: the size the entry declares; producing more is an error.
    expected: Option<u64>,
}

impl<'a, R: ByteRead + ?Sized> Inflater<'a, R> {
    pub(crate) fn new(
        inner: &'a mut R,
        entry: String,
        limits: &Limits,
        artifact_total: &'a Cell<u64>,
        expected: Option<u64>,
    ) -> Self {
        Inflater {
            inner,
            state: InflateState::new_boxed(DataFormat::Raw),
            inbuf: vec![0; 64 * 1024],
            in_pos: 0,
            in_len: 0,
            total_in: 0,
            total_out: 0,
            crc: Crc32::new(),
            done: false,
            input_ended: false,
            entry,
            bombs: BombCheck::new(limits, artifact_total),
            expected,
        }
    }

    /// Input bytes read from the inner reader but not consumed by the deflate stream (the gzip
    /// trailer begins here).
    pub(crate) fn leftover(&self) -> &[u8] {
        &self.inbuf[self.in_pos..self.in_len]
    }

    pub(crate) fn inner(&mut self) -> &mut R {
        self.inner
    }

    fn truncated(&self) -> ArtifactError {
        ArtifactError::Truncated { entry: self.entry.clone() }
    }
}

impl<R: ByteRead + ?Sized> ByteRead for Inflater<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> Result<usize, ArtifactError> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_pos == self.in_len && !self.input_ended {
                self.in_len = self.inner.read(&mut self.inbuf)?;
                self.in_pos = 0;
                // The input may end while decoded output still waits for room in `out` (all of
                // a small entry's input is taken in at the first, 512-byte read): inflate on
                // with no input until the stream ends or stops giving output.
                self.input_ended = self.in_len == 0;
            }
            let flush = if self.input_ended { MZFlush::Finish } else { MZFlush::None };
            let res = inflate(&mut self.state, &self.inbuf[self.in_pos..self.in_len], out, flush);
            self.in_pos += res.bytes_consumed;
            self.total_in += res.bytes_consumed as u64;
            let n = res.bytes_written;
            self.total_out += n as u64;
            self.crc.update(&out[..n]);
            self.bombs.check(&self.entry, n, self.total_out, self.total_in)?;
            if let Some(exp) = self.expected {
                if self.total_out > exp {
                    return Err(ArtifactError::Corrupt {
                        entry: self.entry.clone(),
                        reason: "inflates to more than its declared size",
                    });
                }
            }
            match res.status {
                Ok(MZStatus::StreamEnd) => {
                    self.done = true;
                    return Ok(n);
                }
                Ok(_) | Err(MZError::Buf) if self.input_ended && n == 0 => return Err(self.truncated()),
                Ok(_) => {}
                Err(MZError::Buf) => {
                    // No progress possible with this input: need more.
                    if self.in_pos < self.in_len && n == 0 {
                        return Err(ArtifactError::Corrupt {
                            entry: self.entry.clone(),
                            reason: "deflate stream stalls",
                        });
                    }
                }
                Err(_) => {
                    return Err(ArtifactError::Corrupt {
                        entry: self.entry.clone(),
                        reason: "invalid deflate data",
                    })
                }
            }
            if n > 0 {
                return Ok(n);
            }
        }
    }
}
