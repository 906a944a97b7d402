//! The `scan` mode: fetch the job, the policy and (if the job has one) the baseline over
//! vsock, scan the artifact on the disk with the job's excludes, send back SARIF and the
//! summary. And the `template` mode: the same scanner with its devices set up and its engine
//! built ahead, parked for a snapshot; every VM restored from that snapshot skips both.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use cella_abi::BootInfo;
use cella_proto as proto;
use cella_scan::{sarif, scan_artifact, Engine, FingerprintKey, FingerprintSet, Limits, Report};

use super::{fail, CLOSE_TIMEOUT_MS, DEVICE_FAILED};
use crate::rt::blk_source::BlkSource;
use crate::rt::console::Console;
use cella_abi::split_args;
use cella_runner::mode::Mode;

use crate::rt::entry::{args, boot_info, exit, park};
use crate::rt::virtio::blk::{Blk, SECTOR};
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

/// An engine built ahead (by a template), and the SHA-256 (hex) of the policy it came from.
struct Preloaded {
    engine: Engine,
    policy_sha256: String,
}

pub fn scan(boot: &BootInfo, console: &mut Console) -> ! {
    let vsock = Vsock::open(boot).unwrap_or_else(|e| fail(console, "virtio-vsock", e));
    serve(boot, vsock, None, None, console)
}

/// Builds a template: devices set up, the engine built from the policy on the disk, then the
/// park. What follows runs in each VM restored from the snapshot, with its own arguments.
pub fn template(boot: &BootInfo, console: &mut Console) -> ! {
    use cella_runner::mode::{TEMPLATE_POLICY_HEADER, TEMPLATE_POLICY_MAX};
    use sha2::Digest;

    let vsock = Vsock::open(boot).unwrap_or_else(|e| fail(console, "virtio-vsock", e));
    let mut disk = Blk::open(boot).unwrap_or_else(|e| fail(console, "virtio-blk", e));
    let mut header = [0u8; SECTOR as usize];
    disk.read(0, &mut header).unwrap_or_else(|e| fail(console, "template policy", e));
    let len = u64::from_le_bytes(header[..TEMPLATE_POLICY_HEADER].try_into().unwrap_or_default());
    let total = len.saturating_add(TEMPLATE_POLICY_HEADER as u64);
    if len > TEMPLATE_POLICY_MAX || total > disk.capacity() {
        fail(console, "template policy", alloc::format!("length {len} does not fit the disk"));
    }
    let mut bytes = alloc::vec![0u8; total.next_multiple_of(SECTOR) as usize];
    disk.read(0, &mut bytes).unwrap_or_else(|e| fail(console, "template policy", e));
    let policy = &bytes[TEMPLATE_POLICY_HEADER..total as usize];
    let engine = Engine::from_policy_json(policy).unwrap_or_else(|e| fail(console, "template policy", e));
    let policy_sha256 = hex(&sha2::Sha256::digest(policy));
    drop(bytes);

    park();

    // A restored VM: its own arguments, its own disk behind the device.
    let boot = boot_info();
    disk.refresh_capacity();
    match Mode::parse(split_args(args(&boot))) {
        Ok(Mode::Scan) => serve(&boot, vsock, Some(disk), Some(Preloaded { engine, policy_sha256 }), console),
        Ok(Mode::Template) => fail(console, "template", "a template cannot be built from a template"),
        Ok(mode) => {
            drop((engine, disk, vsock));
            super::run(mode, &boot, console)
        }
        Err(e) => {
            let _ = writeln!(console, "cella-runner: {e}");
            exit(cella_abi::status::USAGE)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Serves one scan job on the job channel: with the template's engine if it is the job's
/// policy, else with one built from the `Policy` frame.
fn serve(
    boot: &BootInfo,
    mut vsock: Vsock,
    disk: Option<Blk>,
    preloaded: Option<Preloaded>,
    console: &mut Console,
) -> ! {
    crate::rt::helper::install();
    let conn = vsock.connect(proto::JOB_PORT, 10_000).unwrap_or_else(|e| fail(console, "job channel", e));
    let hello = proto::Hello {
        runner_version: String::from(env!("CARGO_PKG_VERSION")),
        protocol: proto::VERSION,
        policy_sha256: preloaded.as_ref().map(|p| p.policy_sha256.clone()),
    };
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
    // The template's engine, if the host says it is the job's; else the policy frame's.
    let (preloaded, policy) = match preloaded {
        Some(p) if job.policy_preloaded => (Some(p.engine), Vec::new()),
        held => {
            if job.policy_preloaded {
                fail(
                    console,
                    "job protocol",
                    "the host says the policy is preloaded, but this runner holds none",
                );
            }
            // Its memory goes back to the heap before the job's engine is built.
            drop(held);
            let (kind, policy) = next_frame(&mut vsock, conn, &mut decoder, console);
            if kind != proto::Kind::Policy {
                fail(
                    console,
                    "job protocol",
                    proto::ProtoError::Unexpected { expected: proto::Kind::Policy, got: kind },
                );
            }
            (None, policy)
        }
    };

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
    let mut engine = match preloaded.map_or_else(|| Engine::from_policy_json(&policy), Ok) {
        Ok(engine) => engine,
        Err(e) => {
            report_error(&mut vsock, "policy", alloc::format!("{e}"));
            exit(DEVICE_FAILED)
        }
    };
    drop(policy);
    engine.set_fingerprint_key(fingerprint_key);
    if let Err(e) = engine.set_excludes(&job.excludes) {
        report_error(&mut vsock, "protocol", alloc::format!("the job's excludes: {e}"));
        exit(DEVICE_FAILED)
    }
    match cella_scan::spdx::LicensePolicy::new(&job.license_policy.deny, &job.license_policy.flag) {
        Ok(policy) => engine.set_license_policy(policy),
        Err(e) => {
            report_error(&mut vsock, "protocol", alloc::format!("the job's license policy: {e}"));
            exit(DEVICE_FAILED)
        }
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
    let disk = match disk.map_or_else(|| Blk::open(boot), Ok) {
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
