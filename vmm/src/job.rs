//! The host end of a scan job: listens where the runner's vsock connection to
//! [`cella_proto::JOB_PORT`] arrives (`<vsock_uds>_1024`), hands over the job, the policy and
//! the baseline if there is one, and collects the SARIF log and summary. The worker side of `cella-vmm scan` today, and of
//! the service's workers later; it never parses the artifact.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cella_proto::{self as proto, ErrorReport, Hello, Job, Kind};

/// How often the server checks whether the VM is gone.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// Why a job could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot listen for the runner at {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give the job listener {path} to uid {uid}, gid {gid} (chown, chmod 0600)")]
    Permissions { path: PathBuf, uid: u32, gid: u32, source: io::Error },
    #[error("the VM ended before the runner {stage}")]
    VmGone { stage: &'static str },
    #[error("the runner did not {stage} within {timeout:?}")]
    TimedOut { stage: &'static str, timeout: Duration },
    #[error("the job channel failed while the runner {stage}")]
    Io { stage: &'static str, source: io::Error },
    #[error("the runner broke the job protocol: {0}")]
    Protocol(#[from] proto::ProtoError),
}

/// What the runner sent back.
#[derive(Debug)]
pub enum ScanOutcome {
    /// The scan ran: the SARIF log and the summary, as the runner wrote them.
    Completed { sarif: Vec<u8>, summary: Vec<u8> },
    /// The runner could not do the job (for example, the artifact was refused) and said why.
    Refused(ErrorReport),
}

/// The outcome and how long the runner took from receiving the job to answering: policy
/// load, artifact read and scan, all inside the VM.
#[derive(Debug)]
pub struct JobReport {
    pub outcome: ScanOutcome,
    pub in_vm: Duration,
    /// The runner's (the scan engine's) version, from its hello.
    pub runner_version: String,
}

/// What the host sends the runner: the job, the serialized policy and, if the job announces
/// one, the baseline frame's payload.
#[derive(Debug, Clone)]
pub struct JobFrames {
    pub job: Job,
    pub policy: Vec<u8>,
    pub baseline: Option<Vec<u8>>,
}

impl JobFrames {
    /// The bytes of the `Job`, `Policy` and (if any) `Baseline` frames.
    fn encode(&self) -> Vec<u8> {
        let mut out = proto::encode_json(Kind::Job, &self.job);
        out.extend(proto::encode(Kind::Policy, &self.policy));
        if let Some(baseline) = &self.baseline {
            out.extend(proto::encode(Kind::Baseline, baseline));
        }
        out
    }
}

/// A bound job listener, before the VM starts.
#[derive(Debug)]
pub struct JobServer {
    listener: UnixListener,
    path: PathBuf,
}

/// The listener path for a VM whose vsock socket is `vsock_uds`.
pub fn job_socket_path(vsock_uds: &Path) -> PathBuf {
    let mut path = vsock_uds.as_os_str().to_owned();
    path.push(format!("_{}", proto::JOB_PORT));
    PathBuf::from(path)
}

impl JobServer {
    /// Listens at `<vsock_uds>_1024`.
    pub fn bind(vsock_uds: &Path) -> Result<JobServer, JobError> {
        let path = job_socket_path(vsock_uds);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|source| JobError::Bind { path: path.clone(), source })?;
        Ok(JobServer { listener, path })
    }

    /// Where the server listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets only `uid`/`gid` connect: the listener's socket file becomes theirs, mode 0600
    /// (connecting to a Unix socket needs write permission on it). For a VMM in a jail, which
    /// runs as its own uid/gid and reaches the listener through its socket folder.
    pub fn allow_only(&self, uid: u32, gid: u32) -> Result<(), JobError> {
        use std::os::unix::fs::PermissionsExt;
        let restrict = || {
            std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))?;
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
        };
        restrict().map_err(|source| JobError::Permissions { path: self.path.clone(), uid, gid, source })
    }

    /// Serves one job on a thread. `vm_done` tells it the VM has ended (it then stops
    /// waiting; unpark the thread after setting it); `timeout` bounds each wait for the runner. `cleanup` is dropped on that thread
    /// once the VM has ended: the VMM's own threads may be too confined to remove files.
    pub fn serve<C: Send + 'static>(
        self,
        frames: JobFrames,
        vm_done: Arc<AtomicBool>,
        timeout: Duration,
        cleanup: C,
    ) -> JoinHandle<Result<JobReport, JobError>> {
        std::thread::spawn(move || {
            let result = self.run(&frames, &vm_done, timeout);
            let _ = std::fs::remove_file(&self.path);
            // Whoever sets `vm_done` unparks this thread (see `scan::run`); the timeout is a
            // fallback.
            while !vm_done.load(Ordering::Acquire) {
                std::thread::park_timeout(POLL_SLICE);
            }
            drop(cleanup);
            result
        })
    }

    fn run(
        &self,
        frames: &JobFrames,
        vm_done: &AtomicBool,
        timeout: Duration,
    ) -> Result<JobReport, JobError> {
        let deadline = Instant::now() + timeout;
        wait_readable(self.listener.as_raw_fd(), vm_done, deadline, "connected")
            .map_err(|e| with_timeout(e, timeout))?;
        let (mut stream, _) =
            self.listener.accept().map_err(|source| JobError::Io { stage: "connected", source })?;
        serve_connected(&mut stream, frames, vm_done, deadline, timeout)
    }
}

/// Serves one job on `channel`, the host end of a channel handed to the VM (the guest's
/// connection to [`proto::JOB_PORT`] gets the other end; see `HostEnds`). The VM's end closes
/// when the VM ends, which ends the wait; `timeout` bounds it otherwise.
pub fn serve_channel(
    mut channel: UnixStream,
    frames: &JobFrames,
    timeout: Duration,
) -> Result<JobReport, JobError> {
    let never = AtomicBool::new(false);
    serve_connected(&mut channel, frames, &never, Instant::now() + timeout, timeout)
}

/// The job on a connected stream: the runner's hello, the job, the runner's results.
fn serve_connected(
    stream: &mut UnixStream,
    frames: &JobFrames,
    vm_done: &AtomicBool,
    deadline: Instant,
    timeout: Duration,
) -> Result<JobReport, JobError> {
    stream
        .set_read_timeout(Some(POLL_SLICE))
        .map_err(|source| JobError::Io { stage: "connected", source })?;
    let mut reader = FrameReader { stream, decoder: proto::Decoder::default(), timeout };

    let (kind, payload) = reader.next(vm_done, deadline, "said hello")?;
    let hello = check_hello(kind, &payload)?;
    let out = frames.encode();
    reader.stream.write_all(&out).map_err(|source| JobError::Io { stage: "took the job", source })?;
    let sent = Instant::now();

    let mut in_vm = None;
    let outcome = read_results(|stage| {
        let frame = reader.next(vm_done, deadline, stage);
        in_vm.get_or_insert_with(|| sent.elapsed());
        frame
    })?;
    Ok(JobReport { outcome, in_vm: in_vm.unwrap_or_default(), runner_version: hello.runner_version })
}

/// What the host makes of everything a runner sent on a job connection, received whole: its
/// hello, then its results, with exactly the checks a served job makes, in the same order. The
/// parse entry point for a runner's bytes without a socket (the `proto_host` fuzz target, tests);
/// bytes that end before the results are [`JobError::VmGone`].
pub fn decode_runner_stream(wire: &[u8]) -> Result<ScanOutcome, JobError> {
    let mut decoder = proto::Decoder::default();
    decoder.push(wire);
    let mut next = |stage| decoder.next_frame()?.ok_or(JobError::VmGone { stage });
    let (kind, payload) = next("said hello")?;
    check_hello(kind, &payload)?;
    read_results(next)
}

/// The runner's first frame must be a [`Hello`] of this protocol version; returns it.
fn check_hello(kind: Kind, payload: &[u8]) -> Result<Hello, JobError> {
    expect(Kind::Hello, kind)?;
    let hello: Hello = proto::decode_json(payload)?;
    if hello.protocol != proto::VERSION {
        return Err(proto::ProtoError::UnsupportedVersion(hello.protocol).into());
    }
    Ok(hello)
}

/// The runner's answer to the job, from its frames in order (`next` gets one, naming the stage
/// it waits for): an `Error` frame, or `Sarif` then `Summary`.
fn read_results(
    mut next: impl FnMut(&'static str) -> Result<(Kind, Vec<u8>), JobError>,
) -> Result<ScanOutcome, JobError> {
    let (kind, payload) = next("sent its results")?;
    match kind {
        Kind::Error => Ok(ScanOutcome::Refused(proto::decode_json(&payload)?)),
        Kind::Sarif => {
            let (kind, summary) = next("sent its summary")?;
            expect(Kind::Summary, kind)?;
            Ok(ScanOutcome::Completed { sarif: payload, summary })
        }
        other => Err(proto::ProtoError::Unexpected { expected: Kind::Sarif, got: other }.into()),
    }
}

fn expect(expected: Kind, got: Kind) -> Result<(), JobError> {
    if expected == got {
        Ok(())
    } else {
        Err(proto::ProtoError::Unexpected { expected, got }.into())
    }
}

/// Waits until `fd` is readable, the VM is gone, or the deadline passes.
fn wait_readable(
    fd: i32,
    vm_done: &AtomicBool,
    deadline: Instant,
    stage: &'static str,
) -> Result<(), JobError> {
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, POLL_SLICE.as_millis() as i32) };
        if n > 0 {
            return Ok(());
        }
        if vm_done.load(Ordering::Acquire) {
            return Err(JobError::VmGone { stage });
        }
        if Instant::now() >= deadline {
            return Err(JobError::TimedOut { stage, timeout: Duration::ZERO });
        }
    }
}

/// Puts the configured timeout into a timeout error (the waits only know their deadline).
fn with_timeout(error: JobError, timeout: Duration) -> JobError {
    match error {
        JobError::TimedOut { stage, .. } => JobError::TimedOut { stage, timeout },
        other => other,
    }
}

struct FrameReader<'a> {
    stream: &'a mut UnixStream,
    decoder: proto::Decoder,
    timeout: Duration,
}

impl FrameReader<'_> {
    fn next(
        &mut self,
        vm_done: &AtomicBool,
        deadline: Instant,
        stage: &'static str,
    ) -> Result<(Kind, Vec<u8>), JobError> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(JobError::VmGone { stage }),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    // A finished VM may still have left bytes in the socket; only give up
                    // once a read after it ended comes back empty-handed.
                    if vm_done.load(Ordering::Acquire) && self.decoder.next_frame()?.is_none() {
                        let mut pfd =
                            libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: one valid pollfd for the call.
                        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
                            return Err(JobError::VmGone { stage });
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(JobError::TimedOut { stage, timeout: self.timeout });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(JobError::Io { stage, source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(protocol: u16) -> Vec<u8> {
        proto::encode_json(Kind::Hello, &Hello { runner_version: "0.1.0".into(), protocol })
    }

    #[test]
    fn a_runner_stream_with_sarif_and_summary_is_a_completed_scan() {
        let mut wire = hello(proto::VERSION);
        wire.extend(proto::encode(Kind::Sarif, b"sarif"));
        wire.extend(proto::encode(Kind::Summary, b"summary"));
        match decode_runner_stream(&wire).unwrap() {
            ScanOutcome::Completed { sarif, summary } => {
                assert_eq!((sarif.as_slice(), summary.as_slice()), (&b"sarif"[..], &b"summary"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_runner_stream_with_an_error_report_is_a_refusal() {
        let mut wire = hello(proto::VERSION);
        let report = ErrorReport { kind: "artifact".into(), message: "entry `../x` escapes".into() };
        wire.extend(proto::encode_json(Kind::Error, &report));
        match decode_runner_stream(&wire).unwrap() {
            ScanOutcome::Refused(got) => assert_eq!(got, report),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_runner_stream_that_breaks_the_protocol_is_refused_by_name() {
        let sarif_first = proto::encode(Kind::Sarif, b"{}");
        assert!(matches!(
            decode_runner_stream(&sarif_first),
            Err(JobError::Protocol(proto::ProtoError::Unexpected {
                expected: Kind::Hello,
                got: Kind::Sarif
            }))
        ));
        assert!(matches!(
            decode_runner_stream(&hello(9)),
            Err(JobError::Protocol(proto::ProtoError::UnsupportedVersion(9)))
        ));
        let mut no_summary = hello(proto::VERSION);
        no_summary.extend(proto::encode(Kind::Sarif, b"{}"));
        no_summary.extend(proto::encode(Kind::Sarif, b"{}"));
        assert!(matches!(
            decode_runner_stream(&no_summary),
            Err(JobError::Protocol(proto::ProtoError::Unexpected {
                expected: Kind::Summary,
                got: Kind::Sarif
            }))
        ));
    }

    #[test]
    fn a_runner_stream_that_ends_early_says_where() {
        assert!(matches!(decode_runner_stream(&[]), Err(JobError::VmGone { stage: "said hello" })));
        let mut wire = hello(proto::VERSION);
        wire.extend(proto::encode(Kind::Sarif, b"{}"));
        assert!(matches!(decode_runner_stream(&wire), Err(JobError::VmGone { stage: "sent its summary" })));
    }
}
