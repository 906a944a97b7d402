//! The wire protocol between the host (the worker side of `cella-vmm scan`, later the service's
//! worker) and `cella-runner`, over one vsock stream. Both sides compile this crate, so the
//! message types are the same types (as in crosvm's e2e fixture).
//!
//! A frame is a 12-byte header — magic `CELP`, protocol version (u16), kind (u16), payload
//! length (u32), all little-endian — then the payload. Control messages are JSON; bulk data
//! (the policy, the SARIF log) travels as raw bytes in a frame of its own.
//!
//! A scan: the runner connects to host port [`JOB_PORT`] and sends [`Kind::Hello`]; the host
//! answers [`Kind::Job`] and [`Kind::Policy`]; the runner scans the artifact on its disk and
//! sends [`Kind::Sarif`] then [`Kind::Summary`], or [`Kind::Error`].
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CELP";
/// Protocol version; any incompatible change bumps it.
pub const VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = 256 << 20;
/// Host vsock port the runner connects to for its job.
pub const JOB_PORT: u32 = 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Runner → host, JSON [`Hello`].
    Hello = 1,
    /// Host → runner, JSON [`Job`].
    Job = 2,
    /// Host → runner, the serialized policy (JSON bytes of `cella_scan::Policy`).
    Policy = 3,
    /// Runner → host, the SARIF 2.1.0 log (JSON bytes).
    Sarif = 5,
    /// Runner → host, the summary (JSON bytes of `cella_scan::Summary`).
    Summary = 6,
    /// Runner → host, JSON [`ErrorReport`]: the job could not be done.
    Error = 7,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Job,
            3 => Kind::Policy,
            5 => Kind::Sarif,
            6 => Kind::Summary,
            7 => Kind::Error,
            _ => return None,
        })
    }
}

/// The runner introduces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub runner_version: String,
    pub protocol: u16,
}

/// What to scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The artifact's name (its file name on the host), for format detection and paths.
    pub artifact_name: String,
    /// Its exact size: the disk is padded to whole sectors.
    pub artifact_size: u64,
}

/// Why the runner could not do the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// `artifact` (the artifact was refused: unsafe or corrupt), `policy`, `device`, `protocol`.
    pub kind: String,
    /// What was wrong, for the user.
    pub message: String,
}

/// A protocol violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    BadMagic,
    UnsupportedVersion(u16),
    UnknownKind(u16),
    TooLarge(u32),
    BadJson(String),
    Unexpected { expected: Kind, got: Kind },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic => write!(f, "frame does not start with CELP"),
            ProtoError::UnsupportedVersion(v) => write!(f, "protocol version {v}, expected {VERSION}"),
            ProtoError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            ProtoError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds {MAX_PAYLOAD}"),
            ProtoError::BadJson(e) => write!(f, "malformed message: {e}"),
            ProtoError::Unexpected { expected, got } => {
                write!(f, "expected a {expected:?} frame, got {got:?}")
            }
        }
    }
}

impl core::error::Error for ProtoError {}

/// One frame: header and payload.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&(kind as u16).to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A frame with a JSON payload.
pub fn encode_json<T: Serialize>(kind: Kind, message: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    encode(kind, &serde_json::to_vec(message).unwrap_or_default())
}

/// Parses a JSON payload.
pub fn decode_json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(payload).map_err(|e| ProtoError::BadJson(alloc::format!("{e}")))
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<(Kind, Vec<u8>)>, ProtoError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.buf[0..4] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let version = u16::from_le_bytes([self.buf[4], self.buf[5]]);
        if version != VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        let raw_kind = u16::from_le_bytes([self.buf[6], self.buf[7]]);
        let kind = Kind::from_u16(raw_kind).ok_or(ProtoError::UnknownKind(raw_kind))?;
        let len = u32::from_le_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]]);
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(len));
        }
        let end = HEADER_LEN + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..end].to_vec();
        self.buf.drain(..end);
        Ok(Some((kind, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let mut wire = encode_json(Kind::Hello, &Hello { runner_version: "0.1.0".into(), protocol: VERSION });
        wire.extend(encode(Kind::Policy, b"{\"rules\":[]}"));
        let mut d = Decoder::default();
        let mut frames = Vec::new();
        for byte in &wire {
            d.push(core::slice::from_ref(byte));
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, Kind::Hello);
        let hello: Hello = decode_json(&frames[0].1).unwrap();
        assert_eq!(hello.protocol, VERSION);
        assert_eq!(frames[1], (Kind::Policy, b"{\"rules\":[]}".to_vec()));
    }

    #[test]
    fn refuses_bad_frames() {
        let mut d = Decoder::default();
        d.push(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(d.next_frame(), Err(ProtoError::BadMagic));
        let mut d = Decoder::default();
        let mut f = encode(Kind::Job, b"");
        f[4] = 9;
        d.push(&f);
        assert_eq!(d.next_frame(), Err(ProtoError::UnsupportedVersion(9)));
        let mut d = Decoder::default();
        let mut f = encode(Kind::Job, b"");
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        d.push(&f);
        assert_eq!(d.next_frame(), Err(ProtoError::TooLarge(u32::MAX)));
    }
}
