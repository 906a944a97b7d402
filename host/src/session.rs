//! The host end of a session: a client for a `cella-runner` in `session` mode, which listens
//! on guest vsock port [`cella_proto::SESSION_PORT`].
//!
//! [`GuestSession::connect`] opens the VM's vsock Unix socket, writes `CONNECT 1025\n` and
//! waits for the device's `OK <host port>\n`, retrying while the VM is not up yet (no socket)
//! or the runner is not listening yet (the guest resets the connection) until the timeout.
//! [`GuestSession::exec`] sends one request (and its attached bulk frame) and reads the
//! response and the bulk frames it announces. Requests on one connection are answered in
//! order; the runner serves one connection at a time, so a second client waits until the
//! first one closes.
//!
//! Blocking std I/O with timeouts; the client owns nothing but its socket, so reconnecting is
//! just connecting again (the guest's index is unaffected).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cella_proto::{self as proto, Kind, ProtoError, SessionRequest, SessionResponse};

/// Pause between connection attempts while the guest is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(2);
/// Longest `OK <port>\n` line the device sends (and then some).
const OK_LINE_MAX: usize = 64;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 1 << 20;

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionClientError {
    #[error(
        "the session at {path} did not accept a connection to port {port} within {timeout:?} \
         (last attempt: {last_attempt})"
    )]
    NotListening { path: PathBuf, port: u32, timeout: Duration, last_attempt: String },
    #[error("cannot connect to the VM's vsock socket {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the vsock device answered the CONNECT with {line:?} instead of `OK <port>`")]
    Handshake { line: String },
    #[error("the guest closed the session connection while {stage}")]
    Closed { stage: &'static str },
    #[error("the guest did not answer within {timeout:?} while {stage}")]
    TimedOut { stage: &'static str, timeout: Duration },
    #[error("the session connection failed while {stage}")]
    Io { stage: &'static str, source: io::Error },
    #[error("the attached frame is {len} bytes, over the protocol's {max}-byte frame limit")]
    AttachmentTooLarge { len: usize, max: u32 },
    #[error("the guest broke the session protocol")]
    Protocol(#[from] ProtoError),
}

/// A response and the bulk frames it announced (`Sarif` + `Summary` for a scan, `Data` for a
/// read), in the order they arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionReply {
    pub response: SessionResponse,
    pub frames: Vec<(Kind, Vec<u8>)>,
}

impl SessionReply {
    /// The payload of the first frame of `kind`, if one came.
    pub fn frame(&self, kind: Kind) -> Option<&[u8]> {
        self.frames.iter().find(|(k, _)| *k == kind).map(|(_, p)| p.as_slice())
    }
}

/// One open connection to a session runner.
#[derive(Debug)]
pub struct GuestSession {
    stream: UnixStream,
    decoder: proto::Decoder,
    host_port: u32,
    timeout: Duration,
}

impl GuestSession {
    /// Connects to the session port of the VM whose vsock socket is `vsock_uds`. Retries until
    /// `timeout` while the socket does not exist yet or the guest resets the connection (not
    /// listening yet). `timeout` also bounds each later [`exec`](Self::exec) (see
    /// [`set_timeout`](Self::set_timeout)).
    pub fn connect(vsock_uds: &Path, timeout: Duration) -> Result<GuestSession, SessionClientError> {
        Self::connect_port(vsock_uds, proto::SESSION_PORT, timeout)
    }

    /// [`connect`](Self::connect) to another guest port.
    pub fn connect_port(
        vsock_uds: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<GuestSession, SessionClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last_attempt = match Self::attempt(vsock_uds, port, deadline, timeout) {
                Ok(session) => return Ok(session),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => why,
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(SessionClientError::NotListening {
                    path: vsock_uds.to_owned(),
                    port,
                    timeout,
                    last_attempt,
                });
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    fn attempt(
        vsock_uds: &Path,
        port: u32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<GuestSession, Attempt> {
        let mut stream = match UnixStream::connect(vsock_uds) {
            Ok(stream) => stream,
            // The VM is not built yet, or already gone.
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Err(Attempt::Retry(format!("connect: {e}")));
            }
            Err(source) => {
                return Err(Attempt::Fatal(SessionClientError::Connect {
                    path: vsock_uds.to_owned(),
                    source,
                }))
            }
        };
        let io = |stage| move |source| Attempt::Fatal(SessionClientError::Io { stage, source });
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io("sending CONNECT"))?;
        let mut line = Vec::new();
        let mut buf = [0u8; OK_LINE_MAX];
        let newline = loop {
            if let Some(i) = line.iter().position(|b| *b == b'\n') {
                break i;
            }
            if line.len() > OK_LINE_MAX {
                let line = String::from_utf8_lossy(&line).into_owned();
                return Err(Attempt::Fatal(SessionClientError::Handshake { line }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Attempt::Retry(String::from("no OK from the guest before the deadline")));
            }
            stream.set_read_timeout(Some(left)).map_err(io("waiting for OK"))?;
            match stream.read(&mut buf) {
                // The guest reset the connection: not listening (yet).
                Ok(0) => return Err(Attempt::Retry(String::from("the guest reset the connection"))),
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(Attempt::Retry(String::from("no OK from the guest before the deadline")));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Attempt::Retry(String::from("the guest reset the connection")));
                }
                Err(source) => return Err(io("waiting for OK")(source)),
            }
        };
        let text = String::from_utf8_lossy(&line[..newline]).into_owned();
        let host_port = text
            .strip_prefix("OK ")
            .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok())
            .ok_or(Attempt::Fatal(SessionClientError::Handshake { line: text.clone() }))?;
        let mut decoder = proto::Decoder::default();
        decoder.push(&line[newline + 1..]);
        Ok(GuestSession { stream, decoder, host_port, timeout })
    }

    /// The host-side vsock port of this connection (from the device's `OK` line).
    pub fn host_port(&self) -> u32 {
        self.host_port
    }

    /// Sets how long one [`exec`](Self::exec) may take (writing the request and reading the
    /// whole answer).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `request`, followed by `attach` (the `Policy` frame of a scan or read, the `Data`
    /// frame of an add), and reads the response and the frames it announces.
    ///
    /// A request the guest refuses is still `Ok`: its [`SessionResponse::error`] says why, and
    /// the connection stays usable.
    pub fn exec(
        &mut self,
        request: &SessionRequest,
        attach: Option<(Kind, &[u8])>,
    ) -> Result<SessionReply, SessionClientError> {
        let mut wire = proto::encode_json(Kind::SessionRequest, request);
        if let Some((kind, payload)) = attach {
            if payload.len() > proto::MAX_PAYLOAD as usize {
                return Err(SessionClientError::AttachmentTooLarge {
                    len: payload.len(),
                    max: proto::MAX_PAYLOAD,
                });
            }
            if payload.len() < READ_CHUNK {
                wire.extend(proto::encode(kind, payload));
                return self.exec_frames(&[&wire]);
            }
            // A large attachment goes out in place, not copied behind the request.
            wire.extend(proto::header(kind, payload.len() as u32));
            return self.exec_frames(&[&wire, payload]);
        }
        self.exec_frames(&[&wire])
    }

    /// Sends `request` followed by a `kind` frame of `len` bytes read from `payload` as they
    /// are sent (an add's file, streamed from disk: never held in memory whole), and reads the
    /// response. `payload` must hold at least `len` bytes.
    pub fn exec_streamed(
        &mut self,
        request: &SessionRequest,
        kind: Kind,
        len: u64,
        payload: &mut dyn Read,
    ) -> Result<SessionReply, SessionClientError> {
        let Some(len32) = u32::try_from(len).ok().filter(|n| *n <= proto::MAX_PAYLOAD) else {
            return Err(SessionClientError::AttachmentTooLarge {
                len: len as usize,
                max: proto::MAX_PAYLOAD,
            });
        };
        let deadline = Instant::now() + self.timeout;
        let mut wire = proto::encode_json(Kind::SessionRequest, request);
        wire.extend(proto::header(kind, len32));
        self.send(&wire)?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = payload
                .read(&mut buf[..want])
                .map_err(|source| SessionClientError::Io { stage: "reading the attachment", source })?;
            if n == 0 {
                return Err(SessionClientError::Io {
                    stage: "reading the attachment",
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
            self.send(&buf[..n])?;
            left -= n as u64;
        }
        self.receive(deadline)
    }

    /// Writes `wire` (already-encoded frames, concatenated) and reads one response and its
    /// frames. For callers that build frames themselves, and for tests of malformed input.
    pub fn exec_frames(&mut self, wire: &[&[u8]]) -> Result<SessionReply, SessionClientError> {
        let deadline = Instant::now() + self.timeout;
        for part in wire {
            self.send(part)?;
        }
        self.receive(deadline)
    }

    /// Writes `bytes`, each write bounded by the timeout.
    fn send(&mut self, bytes: &[u8]) -> Result<(), SessionClientError> {
        self.stream
            .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            .map_err(|source| SessionClientError::Io { stage: "sending the request", source })?;
        self.stream.write_all(bytes).map_err(|source| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                SessionClientError::TimedOut { stage: "taking the request", timeout: self.timeout }
            }
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                SessionClientError::Closed { stage: "taking the request" }
            }
            _ => SessionClientError::Io { stage: "sending the request", source },
        })
    }

    /// Reads one response and the frames it announces, by `deadline` ([`read_reply`]).
    fn receive(&mut self, deadline: Instant) -> Result<SessionReply, SessionClientError> {
        read_reply(|stage| self.next_frame(deadline, stage))
    }

    fn next_frame(
        &mut self,
        deadline: Instant,
        stage: &'static str,
    ) -> Result<(Kind, Vec<u8>), SessionClientError> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionClientError::TimedOut { stage, timeout: self.timeout });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| SessionClientError::Io { stage, source })?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(SessionClientError::Closed { stage }),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(SessionClientError::Closed { stage })
                }
                Err(source) => return Err(SessionClientError::Io { stage, source }),
            }
        }
    }
}

/// What the host makes of a session runner's answer to one request, received whole: the
/// response and the frames it announces, with exactly the checks [`GuestSession::exec`] makes.
/// The parse entry point for a runner's bytes without a socket (the `proto_host` fuzz target,
/// tests); bytes that end before the reply does are [`SessionClientError::Closed`].
pub fn decode_reply(wire: &[u8]) -> Result<SessionReply, SessionClientError> {
    let mut decoder = proto::Decoder::default();
    decoder.push(wire);
    read_reply(|stage| decoder.next_frame()?.ok_or(SessionClientError::Closed { stage }))
}

/// One reply from the runner's frames in order (`next` gets one, naming the stage it waits
/// for): a `SessionResponse`, then the frames it announces.
fn read_reply(
    mut next: impl FnMut(&'static str) -> Result<(Kind, Vec<u8>), SessionClientError>,
) -> Result<SessionReply, SessionClientError> {
    let (kind, payload) = next("answering")?;
    if kind != Kind::SessionResponse {
        return Err(ProtoError::Unexpected { expected: Kind::SessionResponse, got: kind }.into());
    }
    let response: SessionResponse = proto::decode_json(&payload)?;
    // The count is the guest's word: checked before anything is sized or awaited by it.
    if response.frames > proto::MAX_RESPONSE_FRAMES {
        return Err(ProtoError::TooManyFrames(response.frames).into());
    }
    let mut frames = Vec::with_capacity(response.frames as usize);
    for _ in 0..response.frames {
        frames.push(next("sending the frames its response announced")?);
    }
    Ok(SessionReply { response, frames })
}

/// How one connection attempt ended.
enum Attempt {
    /// Not up or not listening yet: try again until the deadline.
    Retry(String),
    Fatal(SessionClientError),
}

#[cfg(test)]
mod tests {
    use cella_proto::{SessionResult, SessionStats};

    use super::*;

    fn response(result: SessionResult, frames: u32) -> Vec<u8> {
        proto::encode_json(Kind::SessionResponse, &SessionResponse { result, frames })
    }

    #[test]
    fn a_reply_is_the_response_and_the_frames_it_announces() {
        let mut wire = response(SessionResult::Stop, 2);
        wire.extend(proto::encode(Kind::Sarif, b"s"));
        wire.extend(proto::encode(Kind::Summary, b"m"));
        wire.extend(proto::encode(Kind::Data, b"the next reply's"));
        let reply = decode_reply(&wire).unwrap();
        assert_eq!(reply.response, SessionResponse { result: SessionResult::Stop, frames: 2 });
        assert_eq!(reply.frames, vec![(Kind::Sarif, b"s".to_vec()), (Kind::Summary, b"m".to_vec())]);
    }

    #[test]
    fn a_reply_that_is_not_a_response_is_refused() {
        let stats = SessionStats {
            runner_version: "0.1.0".into(),
            protocol: proto::VERSION,
            artifact_name: "a".into(),
            read_policy: "deny".into(),
            files: 0,
            bytes: 0,
            binary_files: 0,
            index_builds: 1,
            adds: 0,
            index_id: 0,
            index_build_cycles: 0,
            requests: 1,
            connections: 1,
            policies_cached: 0,
        };
        let wire = proto::encode_json(Kind::SessionRequest, &SessionResult::Stats(stats));
        assert!(matches!(
            decode_reply(&wire),
            Err(SessionClientError::Protocol(ProtoError::Unexpected {
                expected: Kind::SessionResponse,
                got: Kind::SessionRequest
            }))
        ));
        let not_json = proto::encode(Kind::SessionResponse, b"{\"result\":");
        assert!(matches!(decode_reply(&not_json), Err(SessionClientError::Protocol(ProtoError::BadJson(_)))));
    }

    #[test]
    fn a_reply_announcing_more_frames_than_a_response_carries_is_refused() {
        // The guest's count used to size an allocation: 4e9 frames asked for 128 GB and the host
        // process aborted (fuzz/corpus/proto_host/crash-frames-4e9 replays it).
        for announced in [proto::MAX_RESPONSE_FRAMES + 1, 4_000_000_000] {
            let mut wire = response(SessionResult::Stop, announced);
            wire.extend(proto::encode(Kind::Data, b"x").repeat(3));
            assert!(matches!(
                decode_reply(&wire),
                Err(SessionClientError::Protocol(ProtoError::TooManyFrames(n))) if n == announced
            ));
        }
    }

    #[test]
    fn a_reply_missing_announced_frames_says_where_it_stopped() {
        let wire = response(SessionResult::Stop, 1);
        assert!(matches!(
            decode_reply(&wire),
            Err(SessionClientError::Closed { stage: "sending the frames its response announced" })
        ));
    }
}
