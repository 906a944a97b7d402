//! The `scan` mode: fetch the job, the policy and (if the job has one) the baseline over
//! vsock, scan the artifact on the disk with the job's excludes, send back SARIF and the
//! summary.

use alloc::string::String;
use alloc::vec::Vec;

use cella_abi::BootInfo;
use cella_proto as proto;
use cella_scan::{sarif, scan_artifact, Engine, FingerprintKey, FingerprintSet, Limits, Report};

use super::{fail, CLOSE_TIMEOUT_MS, DEVICE_FAILED};
use crate::rt::blk_source::BlkSource;
use crate::rt::console::Console;
use crate::rt::entry::exit;
use crate::rt::virtio::blk::Blk;
use crate::rt::virtio::vsock::Vsock;

use cella_abi::status::ARTIFACT_REFUSED;

/// Reads frames from `conn` until one arrives.
fn next_frame(
    vsock: &mut Vsock,
    conn: usize,
    decoder: &mut proto::Decoder,
    console: &mut Console,
) -> (proto::Kind, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => return frame,
            Ok(None) => {}
            Err(e) => fail(console, "job protocol", e),
        }
        buf.clear();
        match vsock.recv(conn, &mut buf, 4 << 20, 60_000) {
            Ok(0) => fail(console, "job channel", "closed before the job arrived"),
            Ok(_) => decoder.push(&buf),
            Err(e) => fail(console, "job channel", e),
        }
    }
}

pub fn scan(boot: &BootInfo, console: &mut Console) -> ! {
    let mut vsock = Vsock::open(boot).unwrap_or_else(|e| fail(console, "virtio-vsock", e));
    let conn = vsock.connect(proto::JOB_PORT, 10_000).unwrap_or_else(|e| fail(console, "job channel", e));
    let hello =
        proto::Hello { runner_version: String::from(env!("CARGO_PKG_VERSION")), protocol: proto::VERSION };
    vsock
        .send(conn, &proto::encode_json(proto::Kind::Hello, &hello))
        .unwrap_or_else(|e| fail(console, "send", e));

    let mut decoder = proto::Decoder::default();
    let (kind, payload) = next_frame(&mut vsock, conn, &mut decoder, console);
    if kind != proto::Kind::Job {
        fail(
            console,
            "job protocol",
            proto::ProtoError::Unexpected { expected: proto::Kind::Job, got: kind },
        );
    }
    let job: proto::Job = proto::decode_json(&payload).unwrap_or_else(|e| fail(console, "job", e));
    let (kind, policy) = next_frame(&mut vsock, conn, &mut decoder, console);
    if kind != proto::Kind::Policy {
        fail(
            console,
            "job protocol",
            proto::ProtoError::Unexpected { expected: proto::Kind::Policy, got: kind },
        );
    }

    let baseline = job.baseline.map(|n| {
        let (kind, payload) = next_frame(&mut vsock, conn, &mut decoder, console);
        if kind != proto::Kind::Baseline {
            fail(
                console,
                "job protocol",
                proto::ProtoError::Unexpected { expected: proto::Kind::Baseline, got: kind },
            );
        }
        (n, payload)
    });

    let report_error = |vsock: &mut Vsock, kind: &str, message: String| {
        let error = proto::ErrorReport { kind: String::from(kind), message };
        let _ = vsock.send(conn, &proto::encode_json(proto::Kind::Error, &error));
        vsock.close(conn, CLOSE_TIMEOUT_MS);
    };
    let Some(fingerprint_key) = FingerprintKey::from_hex(&job.fingerprint_key) else {
        report_error(&mut vsock, "protocol", String::from("the job's fingerprint_key is not 64 hex digits"));
        exit(DEVICE_FAILED)
    };
    let mut engine = match Engine::from_policy_json(&policy) {
        Ok(engine) => engine,
        Err(e) => {
            report_error(&mut vsock, "policy", alloc::format!("{e}"));
            exit(DEVICE_FAILED)
        }
    };
    engine.set_fingerprint_key(fingerprint_key);
    if let Err(e) = engine.set_excludes(&job.excludes) {
        report_error(&mut vsock, "protocol", alloc::format!("the job's excludes: {e}"));
        exit(DEVICE_FAILED)
    }
    if let Some((n, payload)) = baseline {
        match FingerprintSet::from_wire(&payload) {
            Some(set) if payload.len() == n as usize * proto::BASELINE_ENTRY_LEN => engine.set_baseline(set),
            _ => {
                let message = alloc::format!(
                    "the baseline frame has {} bytes, not the {n} fingerprints of {} bytes the job announced",
                    payload.len(),
                    proto::BASELINE_ENTRY_LEN
                );
                report_error(&mut vsock, "protocol", message);
                exit(DEVICE_FAILED)
            }
        }
    }
    let disk = match Blk::open(boot) {
        Ok(disk) => disk,
        Err(e) => {
            report_error(&mut vsock, "device", alloc::format!("virtio-blk: {e:?}"));
            exit(DEVICE_FAILED)
        }
    };
    let mut source = BlkSource::new(disk, job.artifact_size);
    let mut report = Report::default();
    if let Err(e) =
        scan_artifact(&mut source, &job.artifact_name, &mut engine, &Limits::default(), &mut report)
    {
        report_error(&mut vsock, "artifact", alloc::format!("{e}"));
        exit(ARTIFACT_REFUSED)
    }
    let details = sarif::RunDetails {
        information_uri: job.sarif.information_uri,
        automation_id: job.sarif.automation_id,
        repository_uri: job.sarif.repository_uri,
        revision_id: job.sarif.revision_id,
        branch: job.sarif.branch,
    };
    let sarif = sarif::to_json(engine.policy(), &report, &details);
    let summary = report.summary_json(engine.policy(), 0);
    let mut out = proto::encode(proto::Kind::Sarif, sarif.as_bytes());
    out.extend(proto::encode(proto::Kind::Summary, summary.as_bytes()));
    vsock.send(conn, &out).unwrap_or_else(|e| fail(console, "send results", e));
    vsock.close(conn, CLOSE_TIMEOUT_MS);
    exit(0)
}
