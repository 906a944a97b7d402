//! Parsing one virtio-blk request from a checked descriptor chain.

use vm_memory::{Bytes, GuestMemoryMmap};

use super::super::chain::Buffer;
use super::super::DeviceError;

pub const SECTOR: u64 = 512;
pub const TYPE_IN: u32 = 0;
pub const TYPE_OUT: u32 = 1;
pub const TYPE_FLUSH: u32 = 4;
pub const TYPE_GET_ID: u32 = 8;
pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

/// A request: what to do, where, into which buffers, and where the status byte goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub data: Vec<Buffer>,
    pub status: Buffer,
}

impl Request {
    /// Checks the chain's shape: a read-only 16-byte header first, a write-only status byte
    /// last, data between (write-only for reads).
    pub fn parse(mem: &GuestMemoryMmap, chain: &[Buffer]) -> Result<Request, DeviceError> {
        let (header, rest) =
            chain.split_first().ok_or_else(|| DeviceError::BadRequest("empty chain".into()))?;
        let (status, data) = rest
            .split_last()
            .ok_or_else(|| DeviceError::BadRequest("a request needs a header and a status buffer".into()))?;
        if header.writable {
            return Err(DeviceError::WrongDirection {
                what: "the virtio-blk request header",
                expected: "read-only",
                actual: "write-only",
            });
        }
        if header.len < 16 {
            return Err(DeviceError::BadRequest(format!("request header of {} bytes, need 16", header.len)));
        }
        if !status.writable || status.len < 1 {
            return Err(DeviceError::WrongDirection {
                what: "the virtio-blk status buffer",
                expected: "write-only with at least 1 byte",
                actual: if status.writable { "empty" } else { "read-only" },
            });
        }
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, header.addr).map_err(|e| DeviceError::Memory(e.to_string()))?;
        let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        if kind == TYPE_IN {
            if let Some(bad) = data.iter().find(|b| !b.writable) {
                let _ = bad;
                return Err(DeviceError::WrongDirection {
                    what: "a data buffer of a virtio-blk read",
                    expected: "write-only",
                    actual: "read-only",
                });
            }
        }
        Ok(Request { kind, sector, data: data.to_vec(), status: *status })
    }

    /// Bytes of data the request covers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|b| u64::from(b.len)).sum()
    }
}
