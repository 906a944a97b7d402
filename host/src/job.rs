//! The host end of a scan job, on the host end of the job channel (a socket pair whose other
//! end the VM's vsock device gives the runner's connection to [`cella_proto::JOB_PORT`]): hands
//! over the job, the policy and the baseline if there is one, and collects the SARIF log and
//! summary. Used by `cella-vmm scan` and the service's workers; it never parses the artifact.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_proto::{self as proto, ErrorReport, Hello, Job, Kind};

/// How often a wait for the runner looks at its deadline.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// Why a job could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
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
    /// The runner came from a template whose engine was built from this job's policy, so the
    /// policy was not sent (see [`cella_proto::Hello::policy_sha256`]).
    pub policy_preloaded: bool,
}

/// A serialized policy (what a job's `Policy` frame carries) and its SHA-256, computed once:
/// a worker hands the same policy to many jobs, shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerializedPolicy {
    bytes: Vec<u8>,
    sha256: String,
}

impl SerializedPolicy {
    pub fn new(bytes: Vec<u8>) -> Self {
        let sha256 = policy_sha256(&bytes);
        SerializedPolicy { bytes, sha256 }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The SHA-256 (hex) of the bytes: the identity a template's runner reports for the
    /// engine it holds.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// What the host sends the runner: the job, the serialized policy and, if the job announces
/// one, the baseline frame's payload.
#[derive(Debug, Clone)]
pub struct JobFrames {
    pub job: Job,
    pub policy: Arc<SerializedPolicy>,
    pub baseline: Option<Vec<u8>>,
}

impl JobFrames {
    /// The SHA-256 (hex) of the serialized policy.
    pub fn policy_sha256(&self) -> &str {
        self.policy.sha256()
    }

    /// Whether a runner that says hello with `hello` already holds this job's engine.
    fn preloaded_for(&self, hello: &Hello) -> bool {
        hello.policy_sha256.as_deref().is_some_and(|held| held == self.policy_sha256())
    }

    /// The bytes of the `Job` frame, then the `Policy` frame unless the runner holds that
    /// policy's engine already (`preloaded`), then the `Baseline` frame if the job has one.
    fn encode(&self, preloaded: bool) -> Vec<u8> {
        let job = Job { policy_preloaded: preloaded, ..self.job.clone() };
        let mut out = proto::encode_json(Kind::Job, &job);
        if !preloaded {
            out.extend(proto::encode(Kind::Policy, self.policy.bytes()));
        }
        if let Some(baseline) = &self.baseline {
            out.extend(proto::encode(Kind::Baseline, baseline));
        }
        out
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
    let deadline = Instant::now() + timeout;
    channel
        .set_read_timeout(Some(POLL_SLICE))
        .map_err(|source| JobError::Io { stage: "connected", source })?;
    // A runner that never reads cannot hold the host in the job's write either.
    channel
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|source| JobError::Io { stage: "connected", source })?;
    let mut reader = FrameReader {
        stream: &mut channel,
        decoder: proto::Decoder::default(),
        timeout,
        buf: vec![0u8; READ_CHUNK],
    };

    let (kind, payload) = reader.next(deadline, "said hello")?;
    let hello = check_hello(kind, &payload)?;
    let policy_preloaded = frames.preloaded_for(&hello);
    let out = frames.encode(policy_preloaded);
    reader.stream.write_all(&out).map_err(|source| JobError::Io { stage: "took the job", source })?;
    let sent = Instant::now();

    let mut in_vm = None;
    let outcome = read_results(|stage| {
        let frame = reader.next(deadline, stage);
        in_vm.get_or_insert_with(|| sent.elapsed());
        frame
    })?;
    Ok(JobReport {
        outcome,
        in_vm: in_vm.unwrap_or_default(),
        runner_version: hello.runner_version,
        policy_preloaded,
    })
}

/// The SHA-256 (hex) of a serialized policy.
pub fn policy_sha256(policy: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(policy).iter().map(|b| format!("{b:02x}")).collect()
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

/// How much of the channel one read takes (one buffer per job, not per frame).
const READ_CHUNK: usize = 64 << 10;

struct FrameReader<'a> {
    stream: &'a mut UnixStream,
    decoder: proto::Decoder,
    timeout: Duration,
    buf: Vec<u8>,
}

impl FrameReader<'_> {
    fn next(&mut self, deadline: Instant, stage: &'static str) -> Result<(Kind, Vec<u8>), JobError> {
        let buf = &mut self.buf;
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            match self.stream.read(buf) {
                Ok(0) => return Err(JobError::VmGone { stage }),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    // The VM's end closes when it ends (a read then returns 0): only the
                    // deadline is checked here.
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
        proto::encode_json(
            Kind::Hello,
            &Hello { runner_version: "0.1.0".into(), protocol, policy_sha256: None },
        )
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

    #[test]
    fn the_policy_is_sent_unless_the_runner_holds_exactly_its_engine() {
        let frames = JobFrames {
            job: Job {
                artifact_name: "a".into(),
                artifact_size: 1,
                fingerprint_key: "00".repeat(32),
                excludes: Vec::new(),
                baseline: None,
                sarif: Default::default(),
                policy_preloaded: true,
                license_policy: Default::default(),
            },
            policy: Arc::new(SerializedPolicy::new(b"{\"rules\":[]}".to_vec())),
            baseline: None,
        };
        let hello = |held: Option<String>| Hello {
            runner_version: "0.1.0".into(),
            protocol: proto::VERSION,
            policy_sha256: held,
        };
        let kinds = |wire: Vec<u8>| {
            let mut decoder = proto::Decoder::default();
            decoder.push(&wire);
            let mut out = Vec::new();
            while let Some((kind, payload)) = decoder.next_frame().unwrap() {
                out.push((kind, payload));
            }
            out
        };
        for held in [None, Some("ab".repeat(32)), Some(frames.policy_sha256().to_uppercase())] {
            assert!(!frames.preloaded_for(&hello(held.clone())), "{held:?}");
            let sent = kinds(frames.encode(false));
            assert_eq!(sent.iter().map(|f| f.0).collect::<Vec<_>>(), [Kind::Job, Kind::Policy]);
            // The caller's flag never leaks through: only the hello decides.
            let job: Job = proto::decode_json(&sent[0].1).unwrap();
            assert!(!job.policy_preloaded);
        }
        let held = hello(Some(policy_sha256(frames.policy.bytes())));
        assert!(frames.preloaded_for(&held));
        let sent = kinds(frames.encode(true));
        assert_eq!(sent.iter().map(|f| f.0).collect::<Vec<_>>(), [Kind::Job]);
        let job: Job = proto::decode_json(&sent[0].1).unwrap();
        assert!(job.policy_preloaded);
    }
}
