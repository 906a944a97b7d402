//! The snapshot state file (`state.bin`).
//!
//! Layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `CELLSNAP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 2 | length V of the VMM version (at most 64) |
//! | 14 | V | the VMM version that wrote it (`CARGO_PKG_VERSION`), UTF-8 |
//! | 14+V | 8 | length B of the body (at most [`MAX_STATE_FILE`]) |
//! | 22+V | B | body: [`SnapshotState`] as JSON |
//! | 22+V+B | 32 | SHA-256 of every byte before it |
//!
//! Reading checks, in order, each with its own [`SnapshotError`]: the file's size against
//! [`MAX_STATE_FILE`] (`Oversize`), the magic (`BadMagic`), the format version
//! (`UnsupportedFormat`), the lengths against the file (`Truncated`), the checksum (`Corrupt`),
//! the VMM version (`VmmVersion`), and the body (`Malformed`). The memory file and the CPU
//! features are checked by the restore, which knows the host ([`super::restore`]).
//!
//! **Versioning rule:** any change to a state struct — [`SnapshotState`] or anything it holds
//! (vCPU, devices, queues, the serial port…), a field added, removed, renamed or retyped —
//! bumps [`FORMAT_VERSION`]. A reader accepts its own version only.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::vcpu_state::VcpuState;
use super::{SnapshotError, SnapshotMeta, MEMORY_FILE};
use crate::devices::BusState;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"CELLSNAP";
/// The layout of the state structs this VMM writes and reads (see the versioning rule).
pub const FORMAT_VERSION: u32 = 1;
/// The largest state file read (a real one is tens of KiB: the XSAVE area dominates).
pub const MAX_STATE_FILE: u64 = 16 << 20;
/// The VMM version written into snapshots and required of them.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_VERSION_LEN: usize = 64;
const CHECKSUM_LEN: usize = 32;

/// The guest memory a snapshot was taken of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Guest memory size in bytes (the memory file's size).
    pub size: u64,
    /// The memory file's name in the snapshot directory.
    pub file: String,
}

/// Everything in a state file's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub vcpu: VcpuState,
    pub devices: BusState,
    pub memory: MemoryInfo,
    pub meta: SnapshotMeta,
    /// When the snapshot was taken (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

impl SnapshotState {
    pub fn new(vcpu: VcpuState, devices: BusState, mem_bytes: u64, meta: SnapshotMeta) -> Self {
        let created_unix_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        SnapshotState {
            vcpu,
            devices,
            memory: MemoryInfo { size: mem_bytes, file: MEMORY_FILE.to_owned() },
            meta,
            created_unix_ms,
        }
    }
}

/// Encodes `state` as a whole state file.
pub fn encode(state: &SnapshotState) -> Vec<u8> {
    encode_raw(FORMAT_VERSION, VMM_VERSION, &serde_json::to_vec(state).unwrap_or_default())
}

/// The file layout around any body (magic, versions, length, checksum), for [`encode`] and for
/// tests and the `snapshot_state` fuzz target, which forge files whose body is what they test.
pub fn encode_raw(format_version: u32, vmm_version: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&format_version.to_le_bytes());
    out.extend_from_slice(&(vmm_version.len() as u16).to_le_bytes());
    out.extend_from_slice(vmm_version.as_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    out
}

/// Writes `state` to a new file at `path` and fsyncs it; returns its size. A partial file is
/// removed.
pub fn write(path: &Path, state: &SnapshotState) -> Result<u64, SnapshotError> {
    let bytes = encode(state);
    let result = File::create(path).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_all()
    });
    match result {
        Ok(()) => Ok(bytes.len() as u64),
        Err(source) => {
            let _ = std::fs::remove_file(path);
            Err(SnapshotError::write(path, source))
        }
    }
}

/// [`write`] into `file`, already open and empty (handed over; `path` names it in messages);
/// fsynced. Removing it on error is the caller's.
pub fn write_to(file: &File, path: &Path, state: &SnapshotState) -> Result<u64, SnapshotError> {
    let bytes = encode(state);
    let mut out = file;
    out.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| SnapshotError::write(path, source))?;
    Ok(bytes.len() as u64)
}

/// Reads and checks the state file at `path` (see the module docs for the checks).
pub fn read(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingStateFile { path: path.to_owned() })
        }
        Err(source) => return Err(SnapshotError::ReadState { path: path.to_owned(), source }),
    };
    read_file(file, path)
}

/// [`read`] from a state file already open (handed over as a descriptor; `path` names it in
/// messages).
pub fn read_file(file: File, path: &Path) -> Result<SnapshotState, SnapshotError> {
    let read_error = |source| SnapshotError::ReadState { path: path.to_owned(), source };
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_STATE_FILE {
        return Err(SnapshotError::Oversize { path: path.to_owned(), size, max: MAX_STATE_FILE });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes).map_err(read_error)?;
    decode(path, &bytes)
}

/// Checks and decodes a state file's bytes (`path` is for messages).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let path: PathBuf = path.to_owned();
    let size = bytes.len() as u64;
    if size > MAX_STATE_FILE {
        return Err(SnapshotError::Oversize { path, size, max: MAX_STATE_FILE });
    }
    let truncated = |expected: u64| SnapshotError::Truncated { path: path.clone(), size, expected };
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) { truncated(14) } else { SnapshotError::BadMagic { path } });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let version_bytes = bytes.get(8..12).ok_or_else(|| truncated(14))?;
    let found = u32::from_le_bytes(version_bytes.try_into().unwrap_or_default());
    if found != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedFormat { path, found, supported: FORMAT_VERSION });
    }
    let vlen_bytes = bytes.get(12..14).ok_or_else(|| truncated(14))?;
    let vlen = u16::from_le_bytes(vlen_bytes.try_into().unwrap_or_default()) as usize;
    if vlen > MAX_VERSION_LEN {
        return Err(SnapshotError::Corrupt { path });
    }
    let body_at = 14 + vlen + 8;
    let blen_bytes = bytes.get(14 + vlen..body_at).ok_or_else(|| truncated(body_at as u64))?;
    let blen = u64::from_le_bytes(blen_bytes.try_into().unwrap_or_default());
    if blen > MAX_STATE_FILE {
        return Err(SnapshotError::Corrupt { path });
    }
    let expected = body_at as u64 + blen + CHECKSUM_LEN as u64;
    if size < expected {
        return Err(truncated(expected));
    }
    if size > expected {
        // Bytes after the checksum: not a file this VMM wrote whole.
        return Err(SnapshotError::Corrupt { path });
    }
    let sum_at = body_at + blen as usize;
    if Sha256::digest(&bytes[..sum_at]).as_slice() != &bytes[sum_at..] {
        return Err(SnapshotError::Corrupt { path });
    }
    let snapshot_version = String::from_utf8_lossy(&bytes[14..14 + vlen]).into_owned();
    if snapshot_version != VMM_VERSION {
        return Err(SnapshotError::VmmVersion {
            path,
            snapshot: snapshot_version,
            running: VMM_VERSION.to_owned(),
        });
    }
    serde_json::from_slice(&bytes[body_at..sum_at])
        .map_err(|e| SnapshotError::Malformed { path, reason: e.to_string() })
}
