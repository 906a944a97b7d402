//! A bundle's members as the verifier reads them, from a [`Bundle`] in memory or straight from
//! a tar file: the small JSON files whole, `events.jsonl` in blocks, and any member's size and
//! SHA-256 for the manifest check.

use std::borrow::Cow;
use std::io::{self, Read, Seek, SeekFrom};

use ring::digest;

use super::blocks::{BlockSource, ReaderBlocks, SliceBlocks};
use super::pipeline::StreamDigest;
use crate::bundle::{self, Bundle, BundleError, Span, TarIndex};
use crate::hash;

/// Where the verifier reads a bundle from.
pub trait Members {
    /// Every member's name, sorted.
    fn names(&self) -> Vec<String>;
    /// A member's whole contents; `None` if there is no such member.
    fn contents(&mut self, name: &str) -> Result<Option<Cow<'_, [u8]>>, BundleError>;
    /// `events.jsonl` in blocks, with enough buffers to keep `workers` busy; `None` if absent.
    fn events(&mut self, workers: usize) -> Result<Option<Box<dyn BlockSource<'_> + '_>>, BundleError>;
    /// A member's size and SHA-256.
    fn digest(&mut self, name: &str) -> Result<Option<StreamDigest>, BundleError>;
}

/// The members of a bundle held in memory.
#[derive(Debug)]
pub struct InMemory<'b> {
    bundle: &'b Bundle,
    block_size: usize,
}

impl<'b> InMemory<'b> {
    /// `bundle`, with `events.jsonl` handed out in blocks of `block_size` bytes.
    pub fn new(bundle: &'b Bundle, block_size: usize) -> Self {
        Self { bundle, block_size }
    }
}

impl Members for InMemory<'_> {
    fn names(&self) -> Vec<String> {
        self.bundle.files.keys().cloned().collect()
    }

    fn contents(&mut self, name: &str) -> Result<Option<Cow<'_, [u8]>>, BundleError> {
        Ok(self.bundle.files.get(name).map(|data| Cow::Borrowed(&data[..])))
    }

    fn events(&mut self, _workers: usize) -> Result<Option<Box<dyn BlockSource<'_> + '_>>, BundleError> {
        let block_size = self.block_size;
        Ok(self.bundle.files.get(bundle::EVENTS).map(|data| {
            let blocks: Box<dyn BlockSource<'_>> = Box::new(SliceBlocks::new(data, block_size));
            blocks
        }))
    }

    fn digest(&mut self, name: &str) -> Result<Option<StreamDigest>, BundleError> {
        Ok(self
            .bundle
            .files
            .get(name)
            .map(|data| StreamDigest { bytes: data.len() as u64, sha256: hash::sha256(data) }))
    }
}

/// The members of a tar file, read where its [`TarIndex`] says they are.
#[derive(Debug)]
pub struct TarMembers<R> {
    reader: R,
    index: TarIndex,
    block_size: usize,
}

impl<R: Read + Seek + Send> TarMembers<R> {
    /// The members `index` lists, read from `reader`, with `events.jsonl` read in blocks of
    /// `block_size` bytes.
    pub fn new(reader: R, index: TarIndex, block_size: usize) -> Self {
        Self { reader, index, block_size }
    }

    /// A reader over member `name`'s data, if there is such a member.
    fn open(&mut self, name: &str) -> Result<Option<MemberData<'_, R>>, BundleError> {
        let Some(&Span { offset, len }) = self.index.members.get(name) else { return Ok(None) };
        self.reader.seek(SeekFrom::Start(offset))?;
        Ok(Some(MemberData { data: (&mut self.reader).take(len), name: name.to_owned() }))
    }
}

impl<R: Read + Seek + Send> Members for TarMembers<R> {
    fn names(&self) -> Vec<String> {
        self.index.members.keys().cloned().collect()
    }

    fn contents(&mut self, name: &str) -> Result<Option<Cow<'_, [u8]>>, BundleError> {
        let Some(mut member) = self.open(name)? else { return Ok(None) };
        // The header's size is only a hint until the data is read: cap what is reserved.
        let mut data = Vec::with_capacity(member.data.limit().min(1 << 30) as usize);
        member.read_to_end(&mut data).map_err(|e| member.error(e))?;
        Ok(Some(Cow::Owned(data)))
    }

    fn events(&mut self, workers: usize) -> Result<Option<Box<dyn BlockSource<'_> + '_>>, BundleError> {
        let block_size = self.block_size;
        let Some(member) = self.open(bundle::EVENTS)? else { return Ok(None) };
        // Blocks queued for each worker and the whole-file hasher, and one being read.
        let buffers = 2 * workers.max(1) + 2;
        Ok(Some(Box::new(ReaderBlocks::new(member, block_size, buffers))))
    }

    fn digest(&mut self, name: &str) -> Result<Option<StreamDigest>, BundleError> {
        let Some(mut member) = self.open(name)? else { return Ok(None) };
        let mut context = digest::Context::new(&digest::SHA256);
        let mut buffer = vec![0; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = match member.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(member.error(e)),
            };
            context.update(&buffer[..n]);
            bytes += n as u64;
        }
        let mut sha256 = [0; 32];
        sha256.copy_from_slice(context.finish().as_ref());
        Ok(Some(StreamDigest { bytes, sha256 }))
    }
}

/// One member's data: the tar file from the member's offset, for as many bytes as its header
/// says. Ending early (the file changed since it was indexed) is an error, not a shorter member.
#[derive(Debug)]
struct MemberData<'r, R> {
    data: io::Take<&'r mut R>,
    name: String,
}

impl<R> MemberData<'_, R> {
    fn error(&self, e: io::Error) -> BundleError {
        read_error(&self.name, e)
    }
}

/// What failing to read member `name` means: cut short, or another I/O error.
pub fn read_error(name: &str, e: io::Error) -> BundleError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        BundleError::CutShort { name: name.to_owned() }
    } else {
        BundleError::Io(e)
    }
}

impl<R: Read> Read for MemberData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.read(buf)?;
        if n == 0 && !buf.is_empty() && self.data.limit() > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }
}
