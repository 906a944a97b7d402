//! The guest image: an x86-64 ELF executable linked to run at [`layout::IMAGE_BASE`].
//! The header and program headers are checked here, so a bad image gets an error that says
//! what is wrong with it; the segments are then loaded with linux-loader.

use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};

use cella_abi::layout;
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Images above this size are refused before reading further.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

/// What is wrong with a guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read guest image {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("guest image {path} is larger than {MAX_IMAGE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("guest image {path} is not an ELF file (it does not start with \\x7fELF)")]
    NotElf { path: PathBuf },
    #[error("guest image {path} is not a 64-bit little-endian x86-64 ELF")]
    WrongArch { path: PathBuf },
    #[error(
        "guest image {path} is position-independent (ET_DYN); link it as a fixed executable \
         (-C relocation-model=static, --image-base={:#x})",
        layout::IMAGE_BASE
    )]
    PositionIndependent { path: PathBuf },
    #[error("guest image {path} is not an executable (ELF type {kind})")]
    NotExecutable { path: PathBuf, kind: u16 },
    #[error("guest image {path} is truncated or malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error(
        "guest image {path} has a segment at {addr:#x}, below {:#x} where the VMM's boot structures live",
        layout::IMAGE_BASE
    )]
    SegmentTooLow { path: PathBuf, addr: u64 },
    #[error("cannot load guest image {path} into guest memory")]
    Load { path: PathBuf, source: linux_loader::loader::Error },
}

/// A checked guest image, held in memory.
#[derive(Debug, Clone)]
pub struct GuestImage {
    path: PathBuf,
    bytes: Vec<u8>,
    entry: u64,
    start: u64,
    end: u64,
}

impl GuestImage {
    /// Reads and checks the image at `path`.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let read_err = |source| ImageError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_IMAGE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge { path: path.to_owned() });
        }
        Self::parse(path.to_owned(), bytes)
    }

    fn parse(path: PathBuf, bytes: Vec<u8>) -> Result<Self, ImageError> {
        let malformed = |what: &str| ImageError::Malformed { path: path.clone(), what: what.to_owned() };
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(ImageError::NotElf { path });
        }
        if bytes.len() < 64 {
            return Err(malformed("the ELF header is cut short"));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        if bytes[4] != 2 || bytes[5] != 1 || u16_at(18) != EM_X86_64 {
            return Err(ImageError::WrongArch { path });
        }
        match u16_at(16) {
            ET_EXEC => {}
            ET_DYN => return Err(ImageError::PositionIndependent { path }),
            kind => return Err(ImageError::NotExecutable { path, kind }),
        }
        let entry = u64_at(24);
        let phoff = u64_at(32) as usize;
        let (phentsize, phnum) = (u16_at(54) as usize, u16_at(56) as usize);
        if phentsize != 56 {
            return Err(malformed("program header entries are not 56 bytes"));
        }
        let table_end = phoff.checked_add(phnum * phentsize).filter(|end| *end <= bytes.len());
        if table_end.is_none() {
            return Err(malformed("the program header table lies outside the file"));
        }
        let (mut start, mut end) = (u64::MAX, 0u64);
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(ph) != PT_LOAD {
                continue;
            }
            let (offset, paddr, filesz, memsz) =
                (u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32), u64_at(ph + 40));
            if filesz > memsz {
                return Err(malformed(&format!("segment {i} has more file bytes than memory bytes")));
            }
            if offset.checked_add(filesz).is_none_or(|e| e > bytes.len() as u64) {
                return Err(malformed(&format!("segment {i} lies outside the file")));
            }
            let seg_end = paddr
                .checked_add(memsz)
                .ok_or_else(|| malformed(&format!("segment {i} wraps around the address space")))?;
            if paddr < layout::IMAGE_BASE {
                return Err(ImageError::SegmentTooLow { path, addr: paddr });
            }
            start = start.min(paddr);
            end = end.max(seg_end);
        }
        if end == 0 {
            return Err(malformed("no loadable segment"));
        }
        if entry < start || entry >= end {
            return Err(malformed(&format!("entry point {entry:#x} is outside the loaded segments")));
        }
        Ok(GuestImage { path, bytes, entry, start, end })
    }

    /// Where the guest starts.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// First byte the image occupies.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte the image occupies, bss included.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies the segments into guest memory (which starts zeroed, so bss needs nothing).
    pub fn load(&self, memory: &GuestMemoryMmap) -> Result<(), ImageError> {
        Elf::load(memory, None, &mut Cursor::new(&self.bytes), Some(GuestAddress(layout::IMAGE_BASE)))
            .map(|_| ())
            .map_err(|source| ImageError::Load { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header with one PT_LOAD segment.
    fn elf(kind: u16, paddr: u64, filesz: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 + filesz as usize];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&kind.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    fn parse(bytes: Vec<u8>) -> Result<GuestImage, ImageError> {
        GuestImage::parse(PathBuf::from("img"), bytes)
    }

    #[test]
    fn accepts_a_fixed_executable_and_reports_its_extent() {
        let image = parse(elf(ET_EXEC, 0x20_0000, 16, 0x3000, 0x20_0004)).unwrap();
        assert_eq!((image.start(), image.end(), image.entry()), (0x20_0000, 0x20_3000, 0x20_0004));
    }

    #[test]
    fn refuses_each_kind_of_bad_image() {
        assert!(matches!(parse(b"#!/bin/sh\n".to_vec()), Err(ImageError::NotElf { .. })));
        assert!(matches!(
            parse(elf(ET_DYN, 0x20_0000, 16, 16, 0x20_0000)),
            Err(ImageError::PositionIndependent { .. })
        ));
        assert!(matches!(
            parse(elf(1, 0x20_0000, 16, 16, 0x20_0000)),
            Err(ImageError::NotExecutable { kind: 1, .. })
        ));
        assert!(matches!(
            parse(elf(ET_EXEC, 0x1000, 16, 16, 0x1000)),
            Err(ImageError::SegmentTooLow { addr: 0x1000, .. })
        ));
        assert!(matches!(parse(elf(ET_EXEC, 0x20_0000, 16, 16, 0x10)), Err(ImageError::Malformed { .. })));
        let mut truncated = elf(ET_EXEC, 0x20_0000, 16, 16, 0x20_0000);
        truncated.truncate(100);
        let err = parse(truncated).unwrap_err().to_string();
        assert!(err.contains("program header table lies outside the file"), "{err}");
        let mut wrong_arch = elf(ET_EXEC, 0x20_0000, 16, 16, 0x20_0000);
        wrong_arch[18] = 40;
        assert!(matches!(parse(wrong_arch), Err(ImageError::WrongArch { .. })));
    }
}
