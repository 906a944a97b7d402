//! gzip (RFC 1952): header parsing, then raw deflate through [`Inflater`], then the CRC-32 and
//! size trailer checked. Only the first member is read.

use alloc::string::String;
use core::cell::Cell;

use super::inflate::Inflater;
use crate::error::ArtifactError;
use crate::source::{read_full, ByteRead};
use crate::Limits;

/// The decompressed bytes of a gzip stream.
pub(crate) struct GzipReader<'a, R: ByteRead + ?Sized> {
    inflater: Inflater<'a, R>,
    entry: String,
    finished: bool,
}

fn read_exact<R: ByteRead + ?Sized>(r: &mut R, buf: &mut [u8], entry: &str) -> Result<(), ArtifactError> {
    if read_full(r, buf)? != buf.len() {
        return Err(ArtifactError::Truncated { entry: String::from(entry) });
    }
    Ok(())
}

fn skip_cstring<R: ByteRead + ?Sized>(r: &mut R, entry: &str) -> Result<(), ArtifactError> {
    let mut b = [0u8; 1];
    for _ in 0..65536 {
        read_exact(r, &mut b, entry)?;
        if b[0] == 0 {
            return Ok(());
        }
    }
    Err(ArtifactError::Corrupt { entry: String::from(entry), reason: "gzip header string is not terminated" })
}

impl<'a, R: ByteRead + ?Sized> GzipReader<'a, R> {
    pub(crate) fn new(
        inner: &'a mut R,
        entry: String,
        limits: &Limits,
        total: &'a Cell<u64>,
    ) -> Result<Self, ArtifactError> {
        let corrupt = |reason| ArtifactError::Corrupt { entry: entry.clone(), reason };
        let mut h = [0u8; 10];
        read_exact(inner, &mut h, &entry)?;
        if h[0] != 0x1f || h[1] != 0x8b {
            return Err(corrupt("not a gzip stream"));
        }
        if h[2] != 8 {
            return Err(ArtifactError::Unsupported {
                entry,
                feature: "gzip compression method other than deflate",
            });
        }
        let flags = h[3];
        if flags & 0xe0 != 0 {
            return Err(corrupt("reserved gzip header flags set"));
        }
        if flags & 0x04 != 0 {
            let mut x = [0u8; 2];
            read_exact(inner, &mut x, &entry)?;
            let mut left = usize::from(u16::from_le_bytes(x));
            let mut skip = [0u8; 256];
            while left > 0 {
                let n = left.min(skip.len());
                read_exact(inner, &mut skip[..n], &entry)?;
                left -= n;
            }
        }
        if flags & 0x08 != 0 {
            skip_cstring(inner, &entry)?;
        }
        if flags & 0x10 != 0 {
            skip_cstring(inner, &entry)?;
        }
        if flags & 0x02 != 0 {
            let mut x = [0u8; 2];
            read_exact(inner, &mut x, &entry)?;
        }
        let inflater = Inflater::new(inner, entry.clone(), limits, total, None);
        Ok(GzipReader { inflater, entry, finished: false })
    }

    fn check_trailer(&mut self) -> Result<(), ArtifactError> {
        let mut t = [0u8; 8];
        let left = self.inflater.leftover();
        let k = left.len().min(8);
        t[..k].copy_from_slice(&left[..k]);
        if k < 8 {
            let entry = self.entry.clone();
            read_exact(self.inflater.inner(), &mut t[k..], &entry)?;
        }
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let size = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if crc != self.inflater.crc.finish() {
            return Err(ArtifactError::Corrupt { entry: self.entry.clone(), reason: "gzip CRC-32 mismatch" });
        }
        if size != self.inflater.total_out as u32 {
            return Err(ArtifactError::Corrupt { entry: self.entry.clone(), reason: "gzip size mismatch" });
        }
        Ok(())
    }
}

impl<R: ByteRead + ?Sized> ByteRead for GzipReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inflater.read(buf)?;
        if n == 0 {
            self.finished = true;
            self.check_trailer()?;
        }
        Ok(n)
    }
}
