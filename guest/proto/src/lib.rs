//! The wire protocol between the host (the worker side of `cella-vmm scan`, later the service's
//! worker) and `cella-runner`, over one vsock stream. Both sides compile this crate, so the
//! message types are the same types (as in crosvm's e2e fixture).
//!
//! A frame is a 12-byte header — magic `CELP`, protocol version (u16), kind (u16), payload
//! length (u32), all little-endian — then the payload. Control messages are JSON; bulk data
//! (the policy, the SARIF log) travels as raw bytes in a frame of its own.
//!
//! A scan: the runner connects to host port [`JOB_PORT`] and sends [`Kind::Hello`]; the host
//! answers [`Kind::Job`] and [`Kind::Policy`], then, if [`Job::baseline`] says so, one
//! [`Kind::Baseline`] frame; the runner scans the artifact on its disk and sends
//! [`Kind::Sarif`] then [`Kind::Summary`], or [`Kind::Error`].
//!
//! A session: the runner (mode `session`) listens on guest port [`SESSION_PORT`]; the host
//! connects (`CONNECT 1025`) and sends, per request, a [`Kind::SessionRequest`] frame (JSON
//! [`SessionRequest`]) followed, for `scan` and `read`, by one [`Kind::Policy`] frame and, for
//! `add`, by one [`Kind::Data`] frame. The runner answers each request, in order, with one
//! [`Kind::SessionResponse`] frame (JSON [`SessionResponse`]) followed by the number of bulk
//! frames it announces in [`SessionResponse::frames`] (`Sarif` + `Summary` for a scan, `Data`
//! for a read). Many requests travel over one connection; connections are served one after
//! another.
//!
//! Versioning: [`VERSION`] is 3. Version 2 keyed fingerprints; version 3 gave the job its
//! excludes, baseline (and the [`Kind::Baseline`] frame that follows the policy) and SARIF
//! context, and the summary its suppressed counts. The session kinds (8, 9, 10) and the
//! session port are additive: a job (port 1024) never carries them, and a peer that does not
//! know them refuses the frame as [`ProtoError::UnknownKind`] instead of misreading it. New
//! optional fields in the JSON messages are additive too (`#[serde(default)]`); changing the
//! meaning or layout of an existing frame or field, or adding a frame to a flow, bumps the
//! version.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

pub mod text;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CELP";
/// Protocol version; any incompatible change bumps it.
pub const VERSION: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = 256 << 20;
/// Host vsock port the runner connects to for its job.
pub const JOB_PORT: u32 = 1024;
/// Guest vsock port a runner in `session` mode listens on.
pub const SESSION_PORT: u32 = 1025;

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
    /// Host → runner, JSON [`SessionRequest`].
    SessionRequest = 8,
    /// Runner → host, JSON [`SessionResponse`].
    SessionResponse = 9,
    /// Raw bytes: host → runner, the file or archive of an `add`; runner → host, the file of a
    /// `read`.
    Data = 10,
    /// Host → runner, after the policy of a job whose [`Job::baseline`] is set: the baseline's
    /// `cellaLocation/v1` fingerprints, [`BASELINE_ENTRY_LEN`] bytes each, back to back.
    Baseline = 11,
}

/// Bytes of one fingerprint in a [`Kind::Baseline`] frame.
pub const BASELINE_ENTRY_LEN: usize = 32;

impl Kind {
    /// The kind with this wire number, if it is one.
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Job,
            3 => Kind::Policy,
            5 => Kind::Sarif,
            6 => Kind::Summary,
            7 => Kind::Error,
            8 => Kind::SessionRequest,
            9 => Kind::SessionResponse,
            10 => Kind::Data,
            11 => Kind::Baseline,
            _ => return None,
        })
    }
}

/// The runner introduces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub runner_version: String,
    pub protocol: u16,
    /// A runner restored from a template already holds a built engine: the SHA-256 (hex) of
    /// the serialized policy it was built from. When it is the job's policy, the host sets
    /// [`Job::policy_preloaded`] and sends no `Policy` frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
}

/// What to scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The artifact's name, for format detection and paths: a plain file's findings are
    /// reported under it (the tenant's name for the file, or its file name on the host).
    pub artifact_name: String,
    /// Its exact size: the disk is padded to whole sectors.
    pub artifact_size: u64,
    /// The key of the findings' fingerprints (64 hex digits): the tenant's, so its findings
    /// deduplicate across its jobs while nobody can try values against a fingerprint.
    pub fingerprint_key: String,
    /// Gitignore-like globs of files not to scan (counted as excluded).
    #[serde(default)]
    pub excludes: Vec<String>,
    /// `Some(n)`: a [`Kind::Baseline`] frame of `n` fingerprints follows the policy; findings
    /// it lists are suppressed.
    #[serde(default)]
    pub baseline: Option<u32>,
    /// What the SARIF run says about itself.
    #[serde(default)]
    pub sarif: SarifContext,
    /// The runner's preloaded engine (its hello's `policy_sha256`) is this job's policy: no
    /// `Policy` frame follows. Otherwise one does, and the runner builds its engine from it.
    #[serde(default)]
    pub policy_preloaded: bool,
    /// The job's license policy: SPDX identifiers (or prefixes ending in `*`) whose licenses
    /// are reported at `error` (`deny`) or `warning` (`flag`).
    #[serde(default, skip_serializing_if = "LicensePolicy::is_empty")]
    pub license_policy: LicensePolicy,
}

/// A job's license policy, as the host sends it (checked again by the runner).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LicensePolicy {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flag: Vec<String>,
}

impl LicensePolicy {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.flag.is_empty()
    }
}

/// The SARIF run's own details, from whoever asked for the scan (all optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SarifContext {
    /// `tool.driver.informationUri` (absolute URI).
    pub information_uri: Option<String>,
    /// `automationDetails.id`.
    pub automation_id: Option<String>,
    /// `versionControlProvenance[0].repositoryUri` (absolute URI).
    pub repository_uri: Option<String>,
    /// `versionControlProvenance[0].revisionId`.
    pub revision_id: Option<String>,
    /// `versionControlProvenance[0].branch`.
    pub branch: Option<String>,
}

/// Why the runner could not do the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// `artifact` (the artifact was refused: unsafe or corrupt), `policy`, `device`, `protocol`.
    pub kind: String,
    /// What was wrong, for the user.
    pub message: String,
}

/// One request in a session (JSON in a [`Kind::SessionRequest`] frame, tagged by `op`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionRequest {
    /// Scan every indexed file with the policy in the [`Kind::Policy`] frame that follows.
    /// Answered with a [`ScanResult`] and two frames: [`Kind::Sarif`], [`Kind::Summary`].
    Scan {
        /// The policy's name, echoed in the result (the runner identifies the policy by a hash
        /// of its bytes, not by this name).
        policy_name: String,
        /// The key of the findings' fingerprints (64 hex digits), as in [`Job`].
        fingerprint_key: String,
        /// Globs of indexed files not to scan, as in [`Job::excludes`].
        #[serde(default)]
        excludes: Vec<String>,
    },
    /// An ad-hoc regex over the indexed text files, followed by the [`Kind::Policy`] frame of
    /// the masking policy. Under `allow` the raw text is searched; under `redact` and `deny`
    /// the text with that policy's findings masked (see `read`), each unmasked stretch on its
    /// own, so a match never touches a masked byte. Answered with a [`GrepResult`].
    Grep {
        pattern: String,
        /// At most this many matching lines (capped by the runner, see [`GREP_MAX_MATCHES`]).
        max_matches: u32,
        /// Only files whose path starts with this.
        #[serde(default)]
        path_prefix: Option<String>,
    },
    /// Counters of the session. Answered with [`SessionStats`].
    Stats,
    /// A file's bytes, gated by the session's read policy; for `redact`, the findings of the
    /// masking policy in the [`Kind::Policy`] frame that follows are masked. Answered with a
    /// [`ReadResult`] and one [`Kind::Data`] frame.
    Read { path: String, max_bytes: u64 },
    /// Adds the file or archive in the [`Kind::Data`] frame that follows to the index, its
    /// paths under `name/`. Answered with an [`AddResult`].
    Add { name: String },
    /// Answer, close the connection and end the VM with status 0.
    Stop,
}

impl SessionRequest {
    /// The `op` tag.
    pub fn op(&self) -> &'static str {
        match self {
            SessionRequest::Scan { .. } => "scan",
            SessionRequest::Grep { .. } => "grep",
            SessionRequest::Stats => "stats",
            SessionRequest::Read { .. } => "read",
            SessionRequest::Add { .. } => "add",
            SessionRequest::Stop => "stop",
        }
    }

    /// The bulk frame that must follow this request, if any.
    pub fn attachment(&self) -> Option<Kind> {
        match self {
            SessionRequest::Scan { .. } | SessionRequest::Grep { .. } | SessionRequest::Read { .. } => {
                Some(Kind::Policy)
            }
            SessionRequest::Add { .. } => Some(Kind::Data),
            _ => None,
        }
    }
}

/// Longest grep pattern the runner compiles, in bytes.
pub const GREP_MAX_PATTERN: usize = 1024;
/// Most matching lines one grep returns.
pub const GREP_MAX_MATCHES: u32 = 10_000;
/// Bytes of a matching line a grep returns.
pub const GREP_MAX_LINE: usize = 200;

/// Most bulk frames one [`SessionResponse`] announces (a scan's `Sarif` and `Summary`). A reader
/// refuses a response that announces more, before waiting for any of them.
pub const MAX_RESPONSE_FRAMES: u32 = 2;

/// The runner's answer to one request (JSON in a [`Kind::SessionResponse`] frame).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionResponse {
    /// The result, or the error.
    pub result: SessionResult,
    /// How many bulk frames follow this response (0 for an error).
    pub frames: u32,
}

impl SessionResponse {
    /// The error, if the request failed.
    pub fn error(&self) -> Option<&SessionError> {
        match &self.result {
            SessionResult::Error(e) => Some(e),
            _ => None,
        }
    }
}

/// What a request produced, tagged by `op` (`error` for a failed request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionResult {
    Scan(ScanResult),
    Grep(GrepResult),
    Stats(SessionStats),
    Read(ReadResult),
    Add(AddResult),
    Stop,
    Error(SessionError),
}

/// Why a request failed. The session keeps going.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionError {
    /// One of the `error_kind` constants.
    pub kind: String,
    /// What was wrong, for the user.
    pub message: String,
}

/// The values of [`SessionError::kind`].
pub mod error_kind {
    /// The request frame is not a valid request (bad JSON, unknown op, missing field).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The bulk frame the request needs did not follow it.
    pub const MISSING_FRAME: &str = "missing_frame";
    /// No indexed file has that path.
    pub const NOT_FOUND: &str = "not_found";
    /// The grep pattern was refused (too long, does not compile, too large once compiled).
    pub const PATTERN: &str = "pattern";
    /// The policy does not load.
    pub const POLICY: &str = "policy";
    /// Added content was refused (unsafe or corrupt archive), naming the entry.
    pub const ARTIFACT: &str = "artifact";
    /// The session's read policy forbids this read.
    pub const DENIED: &str = "denied";
    /// A binary file cannot be read with redaction (its findings cannot be located).
    pub const BINARY: &str = "binary";
    /// The request would exceed a session limit.
    pub const LIMIT: &str = "limit";
}

/// The result of `scan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanResult {
    pub policy_name: String,
    /// The compiled engine came from the cache (this policy was used before).
    pub policy_cached: bool,
    pub files_scanned: u64,
    /// All findings, suppressed ones included.
    pub findings: u64,
    /// Findings suppressed by an inline marker.
    #[serde(default)]
    pub suppressed: u64,
    /// Files the request's excludes left out.
    #[serde(default)]
    pub files_excluded: u64,
}

/// The result of `grep`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrepResult {
    /// The matching lines (`allow`, `redact`); empty under `deny`.
    pub matches: Vec<GrepMatch>,
    /// Under `deny`: matching lines per file, and nothing about where they are.
    #[serde(default)]
    pub counts: Vec<GrepCount>,
    /// Stopped at `max_matches`: more lines match.
    pub truncated: bool,
    /// Text files searched (binary files are skipped).
    pub files_searched: u64,
    /// The text searched and shown had the masking policy's findings masked (`redact`, `deny`).
    pub masked: bool,
}

/// Matching lines in one file (a `deny` session's grep).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrepCount {
    pub path: String,
    pub lines: u64,
}

/// One matching line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrepMatch {
    pub path: String,
    /// 1-based line of the match's start.
    pub line: u64,
    /// 1-based column of the match's start, in Unicode code points (as SARIF findings).
    pub column: u64,
    /// The line (lossy UTF-8, at most [`GREP_MAX_LINE`] bytes of it), masked under `redact`.
    pub text: String,
    /// The line was cut to [`GREP_MAX_LINE`] bytes.
    pub truncated: bool,
}

/// The result of `stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {
    pub runner_version: String,
    pub protocol: u16,
    pub artifact_name: String,
    /// `deny`, `redact` or `allow`.
    pub read_policy: String,
    /// Files in the index (binary ones included).
    pub files: u64,
    /// Bytes in the index.
    pub bytes: u64,
    /// Files that look binary (a NUL byte in the first 8 KiB).
    pub binary_files: u64,
    /// Times the index was built from the disk: 1 for the session's life.
    pub index_builds: u64,
    /// Successful `add` requests.
    pub adds: u64,
    /// Set once when the index is built (the guest's TSC then): the same value after pause,
    /// resume, snapshot and restore proves the index was not rebuilt.
    pub index_id: u64,
    /// TSC ticks the index build took (the guest has no calibrated clock).
    pub index_build_cycles: u64,
    /// Requests answered, this one included, over all connections.
    pub requests: u64,
    /// Connections accepted, the current one included.
    pub connections: u64,
    /// Compiled policies kept for later scans.
    pub policies_cached: u64,
}

/// The result of `read`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResult {
    pub path: String,
    /// The file's full size.
    pub size: u64,
    /// Bytes in the [`Kind::Data`] frame that follows.
    pub returned: u64,
    /// The file is longer than `max_bytes`.
    pub truncated: bool,
    /// Findings masked (each masked byte replaced by `*`, length kept); 0 for `allow`.
    pub redactions: u64,
    /// `raw` or `redacted`.
    pub mode: String,
}

/// The result of `add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResult {
    pub name: String,
    pub files_added: u64,
    pub bytes_added: u64,
    /// Index totals after the add.
    pub files: u64,
    pub bytes: u64,
}

/// A protocol violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    BadMagic,
    UnsupportedVersion(u16),
    UnknownKind(u16),
    TooLarge(u32),
    BadJson(String),
    Unexpected {
        expected: Kind,
        got: Kind,
    },
    /// A response announced more bulk frames than [`MAX_RESPONSE_FRAMES`].
    TooManyFrames(u32),
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
            ProtoError::TooManyFrames(n) => {
                write!(f, "a response announces {n} bulk frames; at most {MAX_RESPONSE_FRAMES} follow one")
            }
        }
    }
}

impl core::error::Error for ProtoError {}

/// The header of a frame of `kind` with a payload of `len` bytes (for senders that write a
/// large payload in place rather than copying it behind the header).
pub fn header(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// One frame: header and payload.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&header(kind, payload.len() as u32));
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
            // Room for the rest of a large frame at once, instead of doubling as it arrives.
            self.buf.reserve(end - self.buf.len());
            return Ok(None);
        }
        if end == self.buf.len() {
            // The usual case for bulk frames: hand over the buffer without copying it.
            let mut payload = core::mem::take(&mut self.buf);
            payload.drain(..HEADER_LEN);
            return Ok(Some((kind, payload)));
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
        let mut wire = encode_json(
            Kind::Hello,
            &Hello { runner_version: "0.1.0".into(), protocol: VERSION, policy_sha256: None },
        );
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
    fn a_job_without_the_newer_fields_reads_as_none_given() {
        let job: Job =
            decode_json(br#"{"artifact_name":"a","artifact_size":1,"fingerprint_key":"k"}"#).unwrap();
        assert_eq!((job.excludes.len(), job.baseline, &job.sarif), (0, None, &SarifContext::default()));
        let job = Job { baseline: Some(2), excludes: alloc::vec!["vendor/".into()], ..job };
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(decode_json::<Job>(text.as_bytes()).unwrap(), job);
        assert_eq!(Kind::from_u16(11), Some(Kind::Baseline));
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

    #[test]
    fn session_requests_use_the_op_tag() {
        let grep: SessionRequest = decode_json(br#"{"op":"grep","pattern":"a+","max_matches":5}"#).unwrap();
        assert_eq!(grep, SessionRequest::Grep { pattern: "a+".into(), max_matches: 5, path_prefix: None });
        assert_eq!(decode_json::<SessionRequest>(br#"{"op":"stats"}"#).unwrap(), SessionRequest::Stats);
        let text = serde_json::to_string(&SessionRequest::Read { path: "a/b".into(), max_bytes: 9 }).unwrap();
        assert_eq!(text, r#"{"op":"read","path":"a/b","max_bytes":9}"#);
        assert_eq!(SessionRequest::Add { name: "x".into() }.attachment(), Some(Kind::Data));
        assert_eq!(grep.attachment(), Some(Kind::Policy), "grep carries the masking policy");
        let e = decode_json::<SessionRequest>(br#"{"op":"format_disk"}"#).unwrap_err();
        assert!(alloc::format!("{e}").contains("format_disk"), "{e}");
    }

    #[test]
    fn session_responses_round_trip_with_their_op() {
        let r = SessionResponse {
            result: SessionResult::Error(SessionError {
                kind: error_kind::NOT_FOUND.into(),
                message: "m".into(),
            }),
            frames: 0,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"result":{"op":"error","kind":"not_found","message":"m"},"frames":0}"#);
        assert_eq!(decode_json::<SessionResponse>(text.as_bytes()).unwrap(), r);
        let stop = SessionResponse { result: SessionResult::Stop, frames: 0 };
        let text = serde_json::to_string(&stop).unwrap();
        assert_eq!(decode_json::<SessionResponse>(text.as_bytes()).unwrap(), stop);
        let mut d = Decoder::default();
        d.push(&encode_json(Kind::SessionResponse, &stop));
        d.push(&encode(Kind::Data, b"bytes"));
        assert_eq!(d.next_frame().unwrap().unwrap().0, Kind::SessionResponse);
        assert_eq!(d.next_frame().unwrap().unwrap(), (Kind::Data, b"bytes".to_vec()));
        assert_eq!(d.next_frame().unwrap(), None);
    }
}
