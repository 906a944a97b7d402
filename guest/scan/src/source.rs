//! Random-access byte sources: where the artifact's bytes come from. The guest implements
//! [`Source`] over its virtio-blk driver; the host over a slice or a file.

use alloc::vec::Vec;
use core::fmt;

/// A read failed in the layer below (device error, I/O error). Carries a short static reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceError(pub &'static str);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading the artifact failed: {}", self.0)
    }
}

impl core::error::Error for SourceError {}

/// A random-access, read-only byte source of known length.
pub trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;

    /// True if the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read. Returns 0 only at
    /// or past the end.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, SourceError>;
}

/// A [`Source`] over bytes in memory.
#[derive(Debug, Clone, Copy)]
pub struct SliceSource<'a>(pub &'a [u8]);

impl Source for SliceSource<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        let len = self.0.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

/// A [`Source`] that owns its bytes (used for archives nested in compressed entries).
#[derive(Debug, Clone)]
pub struct VecSource(pub Vec<u8>);

impl Source for VecSource {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        SliceSource(&self.0).read_at(offset, buf)
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    fn len(&self) -> u64 {
        (**self).len()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        (**self).read_at(offset, buf)
    }
}

/// A sequential reader: what the archive layer hands the scanner for one entry.
pub(crate) trait ByteRead {
    /// Reads up to `buf.len()` bytes; 0 means the end of this stream.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, crate::ArtifactError>;

    /// The bytes left, if the reader knows them (a declared size: a hint for reserving
    /// memory, never trusted as the real length).
    fn size_hint(&self) -> Option<u64> {
        None
    }
}

/// A file held in memory, read as a stream.
pub(crate) struct SliceRead<'a>(pub(crate) &'a [u8]);

impl ByteRead for SliceRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, crate::ArtifactError> {
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }

    fn size_hint(&self) -> Option<u64> {
        Some(self.0.len() as u64)
    }
}

/// Sequential reads over a window of a [`Source`].
pub(crate) struct SourceReader<'a, S: Source + ?Sized> {
    pub(crate) src: &'a mut S,
    pub(crate) pos: u64,
    pub(crate) end: u64,
}

impl<S: Source + ?Sized> ByteRead for SourceReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, crate::ArtifactError> {
        let left = self.end.saturating_sub(self.pos);
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.src.read_at(self.pos, &mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }

    fn size_hint(&self) -> Option<u64> {
        Some(self.end.saturating_sub(self.pos))
    }
}

/// Bytes already read (a sniffed head), then the rest of a reader.
pub(crate) struct Chain<'a, R: ByteRead + ?Sized> {
    pub(crate) head: &'a [u8],
    pub(crate) rest: &'a mut R,
}

impl<R: ByteRead + ?Sized> ByteRead for Chain<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, crate::ArtifactError> {
        if !self.head.is_empty() {
            let n = buf.len().min(self.head.len());
            buf[..n].copy_from_slice(&self.head[..n]);
            self.head = &self.head[n..];
            return Ok(n);
        }
        self.rest.read(buf)
    }

    fn size_hint(&self) -> Option<u64> {
        self.rest.size_hint().map(|n| n.saturating_add(self.head.len() as u64))
    }
}

/// Fills `buf` as far as the reader allows; returns the number of bytes read (short only at
/// the end of the stream).
pub(crate) fn read_full<R: ByteRead + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<usize, crate::ArtifactError> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}
