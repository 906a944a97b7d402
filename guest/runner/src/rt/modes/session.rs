//! The `session` mode: read the artifact from the disk once into an in-memory index
//! ([`cella_scan::index::Index`]), then listen on vsock port [`proto::SESSION_PORT`] and answer
//! requests (`scan`, `grep`, `stats`, `read`, `add`, `stop`; see `cella_proto`) over
//! connection after connection until `stop`.
//!
//! - A request that cannot be carried out (bad JSON, unknown op, missing frame, no such path,
//!   refused pattern, refused archive) gets a `SessionResponse` with an error; the connection
//!   and the session go on. A frame that breaks the framing itself (bad magic, version, size)
//!   makes the rest of that stream unreadable: that connection is closed, the listener stays.
//! - A connection the host closes or resets (including the reset of every open connection when
//!   the VM is restored from a snapshot) ends; the runner goes back to `accept`. Waiting for a
//!   connection or a request is done in wait exits: an idle session costs no CPU.
//! - Compiled policies are cached by the SHA-256 of their bytes, so repeated scans (and reads)
//!   with one policy compile it once.
//!
//! Read policy (`session SIZE deny|redact|allow NAME`). Under `redact` and `deny` every answer
//! is computed from the *masked view*: the text files with every secret and personal-data
//! finding of the masking policy (the one the host sends with `grep` and `read`) masked, each
//! byte `*` ([`MaskedView`], kept per policy and extended after an `add`):
//! - `read`: `deny` refuses; `redact` returns the masked text and refuses binary files (the
//!   masked view is of text: a binary file's strings are scanned, its bytes are not masked);
//!   `allow` returns the bytes as they are.
//! - `grep`: under `allow` the raw text is searched; otherwise the masked view, each unmasked
//!   stretch on its own, so a pattern never matches inside or across a masked range and no
//!   position depends on a masked byte. `redact` answers with the masked lines (path, line,
//!   column, text); `deny` with match counts per file only.
//! - `scan`: findings name the rule and the place, as the masked ranges show; their snippets
//!   are masked whole (no prefix or suffix of the value), and fingerprints are keyed. Inline
//!   markers suppress findings and the request's excludes leave files out, as in a job.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::Write;

use cella_abi::BootInfo;
use cella_proto::{
    self as proto, error_kind, Kind, SessionError, SessionRequest, SessionResponse, SessionResult,
};
use cella_runner::mode::{ReadPolicy, SessionArgs};
use cella_scan::index::{Grep, GrepLimits, Index, MaskedView};
use cella_scan::{normalize_entry_path, sarif, Engine, FingerprintKey, Limits, Report, SliceSource};
use sha2::{Digest, Sha256};

use super::{fail, CLOSE_TIMEOUT_MS};
use crate::rt::blk_source::BlkSource;
use crate::rt::console::Console;
use crate::rt::entry::exit;
use crate::rt::virtio::blk::Blk;
use crate::rt::virtio::vsock::{ConnId, Vsock, VsockError};

use cella_abi::status::ARTIFACT_REFUSED;
/// Compiled policies kept (each holds its regex caches: a few MiB at most).
const MAX_CACHED_ENGINES: usize = 4;
/// The index may hold at most this fraction (1/n) of the heap: the rest is for the policies,
/// an `add`'s frame while it is unpacked, and answers.
const INDEX_HEAP_FRACTION: u64 = 2;
/// How long the bulk frame that must follow a request may take to start arriving.
const ATTACHMENT_WAIT_MS: u32 = 10_000;

/// The guest's time-stamp counter (no calibrated clock here: used as an identity and a count).
fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` reads the time-stamp counter into edx:eax; it touches no memory and the
    // VMM leaves CR4.TSD clear, so it is allowed at CPL 3.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Everything that lives as long as the session.
struct Session<'a> {
    args: SessionArgs<'a>,
    index: Index,
    /// Bytes of content the index may hold in all.
    index_budget: u64,
    index_id: u64,
    index_build_cycles: u64,
    adds: u64,
    requests: u64,
    connections: u64,
    /// (SHA-256 of the policy bytes, its engine), most recently used last.
    engines: VecDeque<([u8; 32], Engine)>,
    /// The masked view of the index under the masking policy with this SHA-256 (see the
    /// module documentation); rebuilt if the host ever sends another masking policy.
    view: Option<([u8; 32], MaskedView)>,
    limits: Limits,
}

/// How serving one connection ended.
enum Served {
    /// The host closed or reset it, or broke the framing: accept the next one.
    Closed,
    /// `stop` was answered.
    Stop,
}

pub fn session(boot: &BootInfo, console: &mut Console, args: SessionArgs<'_>) -> ! {
    // The device first: a host that connects while the index loads waits for the answer.
    let mut vsock = Vsock::open(boot).unwrap_or_else(|e| fail(console, "virtio-vsock", e));
    let started = rdtsc();
    let heap = boot.heap_end - boot.heap_start;
    let mut session = Session {
        args,
        index: Index::new(),
        index_budget: heap / INDEX_HEAP_FRACTION,
        index_id: started,
        index_build_cycles: 0,
        adds: 0,
        requests: 0,
        connections: 0,
        engines: VecDeque::new(),
        view: None,
        limits: Limits::default(),
    };
    {
        let disk = Blk::open(boot).unwrap_or_else(|e| fail(console, "virtio-blk", e));
        let mut source = BlkSource::new(disk, args.artifact_size);
        let loaded = session.index.add_artifact(
            &mut source,
            args.artifact_name,
            "",
            &session.limits,
            session.index_budget,
        );
        if let Err(e) = loaded {
            let _ = writeln!(console, "cella-runner: session: the artifact was refused: {e}");
            exit(ARTIFACT_REFUSED)
        }
    }
    session.index_build_cycles = rdtsc().wrapping_sub(started);
    let _ = writeln!(
        console,
        "cella-runner: session: {} files, {} bytes indexed; listening on port {}",
        session.index.files().len(),
        session.index.bytes(),
        proto::SESSION_PORT
    );

    vsock.listen(proto::SESSION_PORT);
    loop {
        let conn = match vsock.accept(u32::MAX) {
            Ok(conn) => conn,
            Err(VsockError::TimedOut) => continue,
            Err(e) => fail(console, "vsock accept", e),
        };
        session.connections += 1;
        match session.serve(&mut vsock, conn, console) {
            Served::Closed => {
                vsock.close(conn, CLOSE_TIMEOUT_MS);
                vsock.release(conn);
            }
            Served::Stop => {
                vsock.close(conn, CLOSE_TIMEOUT_MS);
                exit(0)
            }
        }
    }
}

/// The next frame on `conn`: `Ok(None)` once the host closed (or reset) it, `Err` for a
/// framing violation or (with a finite `timeout_ms`) when nothing arrived in time.
fn next_frame(
    vsock: &mut Vsock,
    conn: ConnId,
    decoder: &mut proto::Decoder,
    timeout_ms: u32,
) -> Result<Option<(Kind, Vec<u8>)>, FrameError> {
    let mut buf = Vec::new();
    loop {
        if let Some(frame) = decoder.next_frame().map_err(FrameError::Protocol)? {
            return Ok(Some(frame));
        }
        buf.clear();
        match vsock.recv(conn, &mut buf, 4 << 20, timeout_ms) {
            Ok(0) => return Ok(None),
            Ok(_) => decoder.push(&buf),
            Err(VsockError::TimedOut) if timeout_ms == u32::MAX => {}
            Err(VsockError::TimedOut) => return Err(FrameError::TimedOut),
            Err(_) => return Ok(None),
        }
    }
}

enum FrameError {
    Protocol(proto::ProtoError),
    TimedOut,
}

fn error(kind: &str, message: String) -> SessionResponse {
    SessionResponse { result: SessionResult::Error(fault(kind, message)), frames: 0 }
}

fn fault(kind: &str, message: String) -> SessionError {
    SessionError { kind: String::from(kind), message }
}

impl From<SessionError> for Answer {
    fn from(e: SessionError) -> Answer {
        SessionResponse { result: SessionResult::Error(e), frames: 0 }.into()
    }
}

/// A response and the bulk frames it announces.
struct Answer {
    response: SessionResponse,
    frames: Vec<(Kind, Vec<u8>)>,
}

impl From<SessionResponse> for Answer {
    fn from(response: SessionResponse) -> Answer {
        Answer { response, frames: Vec::new() }
    }
}

impl Answer {
    fn with_frames(result: SessionResult, frames: Vec<(Kind, Vec<u8>)>) -> Answer {
        Answer { response: SessionResponse { result, frames: frames.len() as u32 }, frames }
    }
}

impl Session<'_> {
    /// Answers the requests of one connection, in order, until it ends.
    fn serve(&mut self, vsock: &mut Vsock, conn: ConnId, console: &mut Console) -> Served {
        let mut decoder = proto::Decoder::default();
        // A frame read while looking for an attachment that turned out to be the next request.
        let mut pending: Option<(Kind, Vec<u8>)> = None;
        loop {
            let (kind, payload) = match pending.take() {
                Some(frame) => frame,
                None => match next_frame(vsock, conn, &mut decoder, u32::MAX) {
                    Ok(Some(frame)) => frame,
                    Ok(None) | Err(FrameError::TimedOut) => return Served::Closed,
                    Err(FrameError::Protocol(e)) => {
                        let _ = writeln!(console, "cella-runner: session: closing a connection: {e}");
                        return Served::Closed;
                    }
                },
            };
            self.requests += 1;
            let answer = if kind != Kind::SessionRequest {
                error(
                    error_kind::BAD_REQUEST,
                    format!("expected a SessionRequest frame, got a {kind:?} frame"),
                )
                .into()
            } else {
                match proto::decode_json::<SessionRequest>(&payload) {
                    Err(e) => error(error_kind::BAD_REQUEST, format!("{e}")).into(),
                    Ok(request) => match request.attachment() {
                        None => self.handle(&request, None),
                        Some(needed) => match next_frame(vsock, conn, &mut decoder, ATTACHMENT_WAIT_MS) {
                            Ok(Some((got, bytes))) if got == needed => self.handle(&request, Some(bytes)),
                            Ok(Some(other)) => {
                                pending = Some(other);
                                missing(&request, needed, "another frame came first").into()
                            }
                            Err(FrameError::TimedOut) => {
                                missing(&request, needed, "none arrived within 10 s").into()
                            }
                            Ok(None) => return Served::Closed,
                            Err(FrameError::Protocol(e)) => {
                                let _ = writeln!(console, "cella-runner: session: closing a connection: {e}");
                                return Served::Closed;
                            }
                        },
                    },
                }
            };
            let stop = matches!(answer.response.result, SessionResult::Stop);
            if send_answer(vsock, conn, answer).is_err() {
                return Served::Closed;
            }
            if stop {
                return Served::Stop;
            }
        }
    }

    fn handle(&mut self, request: &SessionRequest, attachment: Option<Vec<u8>>) -> Answer {
        let attachment = attachment.unwrap_or_default();
        match request {
            SessionRequest::Stats => Answer::with_frames(SessionResult::Stats(self.stats()), Vec::new()),
            SessionRequest::Stop => Answer::with_frames(SessionResult::Stop, Vec::new()),
            SessionRequest::Scan { policy_name, fingerprint_key, excludes } => {
                self.scan(policy_name, fingerprint_key, excludes, &attachment)
            }
            SessionRequest::Grep { pattern, max_matches, path_prefix } => {
                self.grep(pattern, *max_matches, path_prefix.as_deref(), &attachment)
            }
            SessionRequest::Read { path, max_bytes } => self.read(path, *max_bytes, &attachment),
            SessionRequest::Add { name } => self.add(name, attachment),
        }
    }

    fn stats(&self) -> proto::SessionStats {
        proto::SessionStats {
            runner_version: String::from(env!("CARGO_PKG_VERSION")),
            protocol: proto::VERSION,
            artifact_name: String::from(self.args.artifact_name),
            read_policy: String::from(self.args.read_policy.as_str()),
            files: self.index.files().len() as u64,
            bytes: self.index.bytes(),
            binary_files: self.index.binary_files(),
            index_builds: 1,
            adds: self.adds,
            index_id: self.index_id,
            index_build_cycles: self.index_build_cycles,
            requests: self.requests,
            connections: self.connections,
            policies_cached: self.engines.len() as u64,
        }
    }

    fn scan(
        &mut self,
        policy_name: &str,
        fingerprint_key: &str,
        excludes: &[String],
        policy: &[u8],
    ) -> Answer {
        let Some(key) = FingerprintKey::from_hex(fingerprint_key) else {
            return error(error_kind::BAD_REQUEST, String::from("fingerprint_key is not 64 hex digits"))
                .into();
        };
        let (engine, policy_cached) = match cached_engine(&mut self.engines, policy) {
            Ok(found) => found,
            Err(e) => return e.into(),
        };
        engine.set_fingerprint_key(key);
        if let Err(e) = engine.set_excludes(excludes) {
            return error(error_kind::BAD_REQUEST, format!("{e}")).into();
        }
        let mut report = Report::default();
        if let Err(e) = self.index.scan(engine, &self.limits, &mut report) {
            // Only a rule that fails to compile on first use can fail a scan of the index.
            return error(error_kind::POLICY, format!("{e}")).into();
        }
        if self.args.read_policy != ReadPolicy::Allow {
            report.mask_snippets(engine.policy());
        }
        let sarif = sarif::to_json(engine.policy(), &report, &sarif::RunDetails::default());
        let summary = report.summary_json(engine.policy(), 0);
        let result = proto::ScanResult {
            policy_name: String::from(policy_name),
            policy_cached,
            files_scanned: report.files_scanned,
            findings: report.findings_total(),
            suppressed: report.suppressed_inline + report.suppressed_baseline,
            files_excluded: report.files_excluded,
        };
        Answer::with_frames(
            SessionResult::Scan(result),
            alloc::vec![(Kind::Sarif, sarif.into_bytes()), (Kind::Summary, summary.into_bytes())],
        )
    }

    /// The masked view under the masking policy `policy`, extended to every file of the index.
    fn masked_view(&mut self, policy: &[u8]) -> Result<&MaskedView, SessionError> {
        let key: [u8; 32] = Sha256::digest(policy).into();
        let (engine, _) = cached_engine(&mut self.engines, policy)?;
        if self.view.as_ref().is_none_or(|(k, _)| *k != key) {
            self.view = Some((key, MaskedView::new()));
        }
        let (_, view) = self.view.as_mut().unwrap_or_else(|| unreachable!());
        view.extend(&self.index, engine).map_err(|e| fault(error_kind::POLICY, format!("{e}")))?;
        Ok(view)
    }

    fn grep(&mut self, pattern: &str, max_matches: u32, path_prefix: Option<&str>, policy: &[u8]) -> Answer {
        if max_matches == 0 || max_matches > proto::GREP_MAX_MATCHES {
            return error(
                error_kind::BAD_REQUEST,
                format!("max_matches is {max_matches}; it must be between 1 and {}", proto::GREP_MAX_MATCHES),
            )
            .into();
        }
        let limits = GrepLimits { max_pattern: proto::GREP_MAX_PATTERN, ..GrepLimits::default() };
        let mut grep = match Grep::new(pattern, &limits) {
            Ok(grep) => grep,
            Err(e) => return error(error_kind::PATTERN, format!("{e}")).into(),
        };
        let policy_mode = self.args.read_policy;
        let view = match policy_mode {
            ReadPolicy::Allow => None,
            ReadPolicy::Redact | ReadPolicy::Deny => match self.masked_view(policy) {
                Ok(_) => self.view.as_ref().map(|(_, view)| view),
                Err(e) => return e.into(),
            },
        };
        let found = self.index.grep(&mut grep, view, path_prefix, max_matches as usize, proto::GREP_MAX_LINE);
        let mut matches: Vec<proto::GrepMatch> = found
            .matches
            .into_iter()
            .map(|m| proto::GrepMatch {
                path: m.path,
                line: m.line,
                column: m.column,
                text: m.text,
                truncated: m.truncated,
            })
            .collect();
        let mut counts: Vec<proto::GrepCount> = Vec::new();
        if policy_mode == ReadPolicy::Deny {
            // Paths and counts only: hits come grouped by file, in index order.
            for m in matches.drain(..) {
                match counts.last_mut() {
                    Some(c) if c.path == m.path => c.lines += 1,
                    _ => counts.push(proto::GrepCount { path: m.path, lines: 1 }),
                }
            }
        }
        let result = proto::GrepResult {
            matches,
            counts,
            truncated: found.truncated,
            files_searched: found.files_searched,
            masked: view.is_some(),
        };
        Answer::with_frames(SessionResult::Grep(result), Vec::new())
    }

    fn read(&mut self, path: &str, max_bytes: u64, policy: &[u8]) -> Answer {
        let mode = self.args.read_policy;
        if mode == ReadPolicy::Deny {
            return error(
                error_kind::DENIED,
                String::from(
                    "this session's read policy is `deny`: file contents cannot be read (scan and grep still work)",
                ),
            )
            .into();
        }
        let Some(file) = self.index.get(path) else {
            return error(
                error_kind::NOT_FOUND,
                format!("no file `{path}` in the index (paths are as scan results name them)"),
            )
            .into();
        };
        if mode == ReadPolicy::Redact && file.binary {
            return error(
                error_kind::BINARY,
                format!(
                    "`{path}` is a binary file; with read policy `redact` only text files can be read \
                     (only text is masked: a binary file's bytes around its strings are not)"
                ),
            )
            .into();
        }
        let size = file.bytes.len() as u64;
        let take = max_bytes.min(size).min(u64::from(proto::MAX_PAYLOAD)) as usize;
        let (bytes, redactions, how) = match mode {
            ReadPolicy::Allow => (file.bytes[..take].to_vec(), 0, "raw"),
            ReadPolicy::Redact | ReadPolicy::Deny => {
                if let Err(e) = self.masked_view(policy) {
                    return e.into();
                }
                let view = self.view.as_ref().map(|(_, view)| view);
                let (Some(mask), Some(file)) =
                    (view.and_then(|v| v.mask_of(&self.index, path)), self.index.get(path))
                else {
                    return error(error_kind::BINARY, format!("`{path}` is a binary file")).into();
                };
                (mask.apply(&file.bytes[..take]).into_owned(), mask.findings, "redacted")
            }
        };
        let result = proto::ReadResult {
            path: String::from(path),
            size,
            returned: bytes.len() as u64,
            truncated: (bytes.len() as u64) < size,
            redactions,
            mode: String::from(how),
        };
        Answer::with_frames(SessionResult::Read(result), alloc::vec![(Kind::Data, bytes)])
    }

    fn add(&mut self, name: &str, data: Vec<u8>) -> Answer {
        match normalize_entry_path(name) {
            Ok(normal) if normal == name && !name.contains('!') => {}
            _ => {
                return error(
                    error_kind::BAD_REQUEST,
                    format!(
                        "`{name}` cannot name added content: use a relative path without `..`, `.`, `!`, \
                         or empty parts"
                    ),
                )
                .into()
            }
        }
        let budget = self.index_budget.saturating_sub(self.index.bytes());
        let prefix = format!("{name}/");
        match self.index.add_artifact(&mut SliceSource(&data), name, &prefix, &self.limits, budget) {
            Ok(added) => {
                self.adds += 1;
                let result = proto::AddResult {
                    name: String::from(name),
                    files_added: added.files,
                    bytes_added: added.bytes,
                    files: self.index.files().len() as u64,
                    bytes: self.index.bytes(),
                };
                Answer::with_frames(SessionResult::Add(result), Vec::new())
            }
            Err(e) => error(error_kind::ARTIFACT, e.to_string()).into(),
        }
    }
}

/// The engine for these policy bytes, from `engines` or compiled now (and cached there);
/// whether it came from the cache.
fn cached_engine<'e>(
    engines: &'e mut VecDeque<([u8; 32], Engine)>,
    policy: &[u8],
) -> Result<(&'e mut Engine, bool), SessionError> {
    let key: [u8; 32] = Sha256::digest(policy).into();
    let cached = match engines.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            let entry = engines.remove(i).unwrap_or_else(|| unreachable!());
            engines.push_back(entry);
            true
        }
        None => {
            let engine = Engine::from_policy_json(policy)
                .map_err(|e| fault(error_kind::POLICY, format!("the policy does not load: {e}")))?;
            if engines.len() >= MAX_CACHED_ENGINES {
                engines.pop_front();
            }
            engines.push_back((key, engine));
            false
        }
    };
    let engine = &mut engines.back_mut().unwrap_or_else(|| unreachable!()).1;
    Ok((engine, cached))
}

fn missing(request: &SessionRequest, needed: Kind, why: &str) -> SessionResponse {
    error(
        error_kind::MISSING_FRAME,
        format!("a `{}` request must be followed by a {needed:?} frame; {why}", request.op()),
    )
}

/// Sends the response frame, then each bulk frame (large payloads in place, not copied).
fn send_answer(vsock: &mut Vsock, conn: ConnId, answer: Answer) -> Result<(), VsockError> {
    let mut out = proto::encode_json(Kind::SessionResponse, &answer.response);
    for (kind, payload) in &answer.frames {
        if payload.len() < (64 << 10) {
            out.extend(proto::encode(*kind, payload));
            continue;
        }
        out.extend_from_slice(&proto::header(*kind, payload.len() as u32));
        vsock.send(conn, &out)?;
        out.clear();
        vsock.send(conn, payload)?;
    }
    if !out.is_empty() {
        vsock.send(conn, &out)?;
    }
    Ok(())
}
