//! `cella-runner` in `session` mode on the real KVM, driven with the host client
//! (`cella_vmm::session_client::GuestSession`): the artifact is indexed once, then scanned,
//! grepped, read (policy-gated) and extended over many requests and connections; hostile
//! requests get clear errors and the session keeps answering; `stop` ends the VM with 0 and
//! its memory scrubbed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cella_proto::{self as proto, error_kind, Kind, SessionRequest, SessionResult};
use cella_vmm::session_client::{GuestSession, SessionClientError, SessionReply};
use cella_vmm::{build, GuestExit, RunError, RunReport, SharedBuffer, VmConfig};
use common::{scratch, tar};

const SECRET: &str = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn settings() -> String {
    format!("config:\n  stripe_key = \"{SECRET}\"\n  card: 4111 1111 1111 1111\n// SPDX-License-Identifier: Apache-2.0\n")
}

const README: &[u8] = b"# demo\nhello\nTODO: write docs\nmore text\n  TODO: add tests\n";
const MAIN_RS: &[u8] = b"fn main() {\n    println!(\"hi\");\n}\n";
const LOGO: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR TODO: not text";

/// The test artifact: a tar of four files, one binary.
fn artifact(dir: &Path) -> PathBuf {
    let path = dir.join("app.tar");
    let settings = settings();
    let files: [(&str, &[u8]); 4] = [
        ("app/settings.yaml", settings.as_bytes()),
        ("app/README.md", README),
        ("app/logo.png", LOGO),
        ("app/src/main.rs", MAIN_RS),
    ];
    std::fs::write(&path, tar(&files)).unwrap();
    path
}

fn policy() -> Vec<u8> {
    cella_policies::rules::load_packs(&["secrets", "pii", "licenses"]).unwrap().into_bytes()
}

/// A session VM running on its own thread; stopped (cancel) if the test ends without `stop`.
struct SessionVm {
    uds: PathBuf,
    console: SharedBuffer,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<RunReport, RunError>>>,
    started: Instant,
}

impl SessionVm {
    fn start(dir: &Path, artifact: &Path, read_policy: &str, mem_mib: u64) -> SessionVm {
        let uds = dir.join("v.sock");
        let size = std::fs::metadata(artifact).unwrap().len();
        let name = artifact.file_name().unwrap().to_str().unwrap().to_owned();
        let cancel = Arc::new(AtomicBool::new(false));
        let config = VmConfig {
            mem_mib,
            timeout: Some(Duration::from_secs(120)),
            disk: Some(artifact.to_owned()),
            vsock_uds: Some(uds.clone()),
            cancel: Some(cancel.clone()),
            ..VmConfig::new(
                cella_vmm::default_scanner_image()
                    .unwrap_or_else(|e| panic!("{e}; run scripts/setup.sh first")),
                vec!["session".into(), size.to_string(), read_policy.into(), name],
            )
        };
        let console = SharedBuffer::default();
        let started = Instant::now();
        let vm = build(&config, Box::new(console.clone())).unwrap();
        let thread = Some(std::thread::spawn(move || vm.run()));
        SessionVm { uds, console, cancel, thread, started }
    }

    fn connect(&self) -> GuestSession {
        GuestSession::connect(&self.uds, CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}; console: {}", cella_vmm::error_chain(&e), self.console.text()))
    }

    /// Waits for the VM to end on its own.
    fn join(mut self) -> RunReport {
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for SessionVm {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn exec(s: &mut GuestSession, request: SessionRequest, attach: Option<(Kind, &[u8])>) -> SessionReply {
    s.exec(&request, attach).unwrap_or_else(|e| panic!("{request:?}: {}", cella_vmm::error_chain(&e)))
}

fn stats(s: &mut GuestSession) -> proto::SessionStats {
    match exec(s, SessionRequest::Stats, None).response.result {
        SessionResult::Stats(stats) => stats,
        other => panic!("stats answered {other:?}"),
    }
}

/// The fingerprint key every scan of these tests uses (64 hex digits).
const FINGERPRINT_KEY: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

fn scan_request(policy_name: &str) -> SessionRequest {
    SessionRequest::Scan {
        policy_name: policy_name.into(),
        fingerprint_key: FINGERPRINT_KEY.into(),
        excludes: Vec::new(),
    }
}

fn grep(s: &mut GuestSession, pattern: &str, prefix: Option<&str>) -> proto::GrepResult {
    let request = SessionRequest::Grep {
        pattern: pattern.into(),
        max_matches: 100,
        path_prefix: prefix.map(Into::into),
    };
    let policy = policy();
    match exec(s, request, Some((Kind::Policy, &policy))).response.result {
        SessionResult::Grep(found) => found,
        other => panic!("grep answered {other:?}"),
    }
}

/// The error of a reply, which must be one.
fn error_of(reply: &SessionReply) -> (&str, &str) {
    let e = reply.response.error().unwrap_or_else(|| panic!("expected an error, got {:?}", reply.response));
    (e.kind.as_str(), e.message.as_str())
}

fn sarif_results(sarif: &[u8]) -> serde_json::Value {
    let sarif: serde_json::Value = serde_json::from_slice(sarif).unwrap();
    sarif["runs"][0]["results"].clone()
}

fn assert_scrubbed(report: &RunReport) {
    let scrub = &report.scrub;
    assert!(scrub.verified_zero && scrub.released && scrub.blocks_after_release == 0, "{scrub:?}");
    assert_eq!(scrub.pages_verified, scrub.bytes / 4096, "{scrub:?}");
}

#[test]
fn a_session_indexes_once_and_answers_every_request_until_stop() {
    let dir = scratch("session-life");
    let artifact = artifact(&dir);
    let vm = SessionVm::start(&dir, &artifact, "allow", 256);
    let mut s = vm.connect();

    // stats: the index holds the four files, built once.
    let first = stats(&mut s);
    let settings = settings();
    assert_eq!(first.files, 4);
    assert_eq!(first.bytes as usize, settings.len() + README.len() + LOGO.len() + MAIN_RS.len());
    assert_eq!((first.binary_files, first.index_builds, first.adds), (1, 1, 0));
    assert_eq!((first.artifact_name.as_str(), first.read_policy.as_str()), ("app.tar", "allow"));
    assert_eq!(first.protocol, proto::VERSION);

    // grep: lines, columns and text; binary files are not searched.
    let found = grep(&mut s, r"TODO: \w+", None);
    let hits: Vec<(&str, u64, u64, &str)> =
        found.matches.iter().map(|m| (m.path.as_str(), m.line, m.column, m.text.as_str())).collect();
    assert_eq!(
        hits,
        [("app/README.md", 3, 1, "TODO: write docs"), ("app/README.md", 5, 3, "  TODO: add tests")]
    );
    assert_eq!((found.files_searched, found.truncated, found.masked), (3, false, false));
    assert!(grep(&mut s, "TODO", Some("app/src/")).matches.is_empty());

    // scan: the same findings as a one-shot scan of the same artifact.
    let policy = policy();
    let reply = exec(&mut s, scan_request("default"), Some((Kind::Policy, &policy)));
    let SessionResult::Scan(scan) = &reply.response.result else { panic!("{:?}", reply.response) };
    assert!(!scan.policy_cached);
    // Four files: the binary one's printable strings are scanned too.
    assert_eq!((scan.files_scanned, scan.files_excluded, scan.suppressed), (4, 0, 0));
    let kinds: Vec<Kind> = reply.frames.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [Kind::Sarif, Kind::Summary]);
    let session_results = sarif_results(reply.frame(Kind::Sarif).unwrap());
    assert_eq!(session_results.as_array().unwrap().len() as u64, scan.findings);
    assert!(scan.findings >= 3, "{session_results}");
    let one_shot = cella_vmm::scan::run(
        &cella_vmm::scan::ScanRequest {
            template: None,
            image: cella_vmm::default_scanner_image().unwrap(),
            artifact: artifact.clone(),
            policy: policy.clone(),
            mem_mib: 128,
            timeout: Duration::from_secs(60),
            launch_start: Instant::now(),
            cancel: None,
            fingerprint_key: FINGERPRINT_KEY.into(),
            options: Default::default(),
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    let Ok(cella_vmm::job::JobReport {
        outcome: cella_vmm::job::ScanOutcome::Completed { sarif, .. }, ..
    }) = one_shot.job
    else {
        panic!("the one-shot scan failed: {:?}", one_shot.job)
    };
    assert_eq!(session_results, sarif_results(&sarif), "session and one-shot scans differ");
    let again = exec(&mut s, scan_request("default"), Some((Kind::Policy, &policy)));
    let SessionResult::Scan(again) = &again.response.result else { panic!("{:?}", again.response) };
    assert!(again.policy_cached, "the second scan with the same policy recompiled it");
    // The request's excludes leave files out, as a job's do (the cached engine takes them).
    let request = SessionRequest::Scan {
        policy_name: "default".into(),
        fingerprint_key: FINGERPRINT_KEY.into(),
        excludes: vec!["settings.yaml".into(), "*.png".into()],
    };
    let reply = exec(&mut s, request, Some((Kind::Policy, &policy)));
    let SessionResult::Scan(excluded) = &reply.response.result else { panic!("{:?}", reply.response) };
    assert_eq!((excluded.files_scanned, excluded.files_excluded, excluded.findings), (2, 2, 0));
    let bad = SessionRequest::Scan {
        policy_name: "default".into(),
        fingerprint_key: FINGERPRINT_KEY.into(),
        excludes: vec!["!app/".into()],
    };
    let reply = exec(&mut s, bad, Some((Kind::Policy, &policy)));
    let (kind, message) = error_of(&reply);
    assert_eq!(kind, proto::error_kind::BAD_REQUEST);
    assert!(message.contains("negation is not supported"), "{message}");

    // read (allow): raw bytes, truncation flagged.
    let reply = exec(
        &mut s,
        SessionRequest::Read { path: "app/README.md".into(), max_bytes: 10 },
        Some((Kind::Policy, &policy)),
    );
    let SessionResult::Read(read) = &reply.response.result else { panic!("{:?}", reply.response) };
    assert_eq!(
        (read.size, read.returned, read.truncated, read.mode.as_str()),
        (README.len() as u64, 10, true, "raw")
    );
    assert_eq!(reply.frame(Kind::Data).unwrap(), &README[..10]);

    // add: a tar joins the index under its name, and grep finds its content.
    let extra = tar(&[("docs/notes.txt", b"nothing\nTODO: added later\n")]);
    let reply = exec(&mut s, SessionRequest::Add { name: "more".into() }, Some((Kind::Data, &extra)));
    let SessionResult::Add(added) = &reply.response.result else { panic!("{:?}", reply.response) };
    assert_eq!((added.files_added, added.files), (1, 5));
    let found = grep(&mut s, "TODO: added", None);
    assert_eq!(found.matches.len(), 1);
    assert_eq!((found.matches[0].path.as_str(), found.matches[0].line), ("more/docs/notes.txt", 2));

    // Hostile requests: clear errors, and the session keeps answering.
    let long = "a".repeat(proto::GREP_MAX_PATTERN + 1);
    let reply = exec(
        &mut s,
        SessionRequest::Grep { pattern: long, max_matches: 5, path_prefix: None },
        Some((Kind::Policy, &policy)),
    );
    assert_eq!(error_of(&reply).0, error_kind::PATTERN);
    assert!(error_of(&reply).1.contains("1025 bytes long"), "{}", error_of(&reply).1);
    let huge =
        SessionRequest::Grep { pattern: "(?:[a-z]{1000}){1000}".into(), max_matches: 5, path_prefix: None };
    let reply = exec(&mut s, huge, Some((Kind::Policy, &policy)));
    assert_eq!(error_of(&reply).0, error_kind::PATTERN, "{}", error_of(&reply).1);
    let reply = exec(
        &mut s,
        SessionRequest::Grep { pattern: "x".into(), max_matches: 1_000_000, path_prefix: None },
        Some((Kind::Policy, &policy)),
    );
    assert_eq!(error_of(&reply).0, error_kind::BAD_REQUEST);
    let reply = exec(
        &mut s,
        SessionRequest::Read { path: "app/missing.txt".into(), max_bytes: 10 },
        Some((Kind::Policy, &policy)),
    );
    assert_eq!(error_of(&reply).0, error_kind::NOT_FOUND);
    assert!(error_of(&reply).1.contains("app/missing.txt"));
    let evil = tar(&[("ok.txt", b"fine"), ("../escape", b"boo")]);
    let reply = exec(&mut s, SessionRequest::Add { name: "evil".into() }, Some((Kind::Data, &evil)));
    assert_eq!(error_of(&reply).0, error_kind::ARTIFACT);
    assert!(
        error_of(&reply).1.contains("`evil/../escape` escapes the archive root"),
        "{}",
        error_of(&reply).1
    );
    let reply = exec(&mut s, SessionRequest::Add { name: "../up".into() }, Some((Kind::Data, b"x")));
    assert_eq!(error_of(&reply).0, error_kind::BAD_REQUEST);
    let reply = s.exec_frames(&[&proto::encode(Kind::SessionRequest, b"{not json")]).unwrap();
    assert_eq!(error_of(&reply).0, error_kind::BAD_REQUEST);
    let reply = s.exec_frames(&[&proto::encode(Kind::SessionRequest, br#"{"op":"format_disk"}"#)]).unwrap();
    assert!(error_of(&reply).1.contains("format_disk"), "{}", error_of(&reply).1);
    let reply = s.exec_frames(&[&proto::encode(Kind::Data, b"stray")]).unwrap();
    assert_eq!(error_of(&reply).0, error_kind::BAD_REQUEST);
    // A scan whose policy frame is missing: the request that came instead is still answered.
    let mut wire = proto::encode_json(Kind::SessionRequest, &scan_request("p"));
    wire.extend(proto::encode_json(Kind::SessionRequest, &SessionRequest::Stats));
    let reply = s.exec_frames(&[&wire]).unwrap();
    assert_eq!(error_of(&reply).0, error_kind::MISSING_FRAME);
    let reply = s.exec_frames(&[]).unwrap();
    assert!(matches!(reply.response.result, SessionResult::Stats(_)), "{:?}", reply.response);
    let reply = exec(&mut s, scan_request("bad"), Some((Kind::Policy, b"{}")));
    assert_eq!(error_of(&reply).0, error_kind::POLICY);

    // A broken frame (bad magic) closes that connection only.
    let closed = s.exec_frames(&[b"GARBAGE GARBAGE GARBAGE"]).unwrap_err();
    assert!(matches!(closed, SessionClientError::Closed { .. }), "{closed:?}");
    drop(s);

    // Reconnect: the same index, not rebuilt.
    let mut s = vm.connect();
    let now = stats(&mut s);
    assert_eq!((now.index_id, now.index_builds, now.adds, now.files), (first.index_id, 1, 1, 5));
    assert!(now.connections >= 2 && now.policies_cached == 1, "{now:?}");
    drop(s);
    let mut s = vm.connect();
    assert_eq!(stats(&mut s).index_id, first.index_id);

    // stop: answered, then the VM exits 0 and is scrubbed.
    let reply = exec(&mut s, SessionRequest::Stop, None);
    assert_eq!(reply.response.result, SessionResult::Stop);
    let report = vm.join();
    assert_eq!(report.exit, GuestExit::Exited { code: 0 });
    assert_scrubbed(&report);
}

#[test]
fn redact_masks_the_policys_findings_and_refuses_binary_files() {
    let dir = scratch("session-redact");
    let artifact = artifact(&dir);
    let vm = SessionVm::start(&dir, &artifact, "redact", 128);
    let mut s = vm.connect();
    let policy = policy();
    let reply = exec(
        &mut s,
        SessionRequest::Read { path: "app/settings.yaml".into(), max_bytes: 1 << 20 },
        Some((Kind::Policy, &policy)),
    );
    let SessionResult::Read(read) = &reply.response.result else { panic!("{:?}", reply.response) };
    let bytes = reply.frame(Kind::Data).unwrap();
    let text = String::from_utf8_lossy(bytes);
    let original = settings();
    assert_eq!(read.mode, "redacted");
    assert!(read.redactions >= 2, "{read:?}");
    assert_eq!(bytes.len(), original.len(), "masking keeps the length");
    assert!(!text.contains(SECRET) && !text.contains("4111 1111 1111 1111"), "{text}");
    assert!(text.contains("stripe_key = \"") && text.contains("Apache-2.0"), "{text}");
    let reply = exec(
        &mut s,
        SessionRequest::Read { path: "app/logo.png".into(), max_bytes: 100 },
        Some((Kind::Policy, &policy)),
    );
    assert_eq!(error_of(&reply).0, error_kind::BINARY);
    // grep searches and shows the masked text: the line, with the secret masked.
    let found = grep(&mut s, "stripe_key", None);
    assert!(found.masked && found.matches.len() == 1, "{found:?}");
    let line = &found.matches[0].text;
    assert!(
        line.trim_start().starts_with("stripe_key = \"") && !line.contains(SECRET) && line.contains("****"),
        "{line}"
    );
    assert!(grep(&mut s, &SECRET[..8], None).matches.is_empty(), "a pattern matched inside a masked secret");
    assert_eq!(exec(&mut s, SessionRequest::Stop, None).response.result, SessionResult::Stop);
    assert_eq!(vm.join().exit, GuestExit::Exited { code: 0 });
}

#[test]
fn deny_refuses_every_read_of_a_plain_file_session() {
    let dir = scratch("session-deny");
    let artifact = dir.join("notes.txt");
    std::fs::write(&artifact, settings()).unwrap();
    let vm = SessionVm::start(&dir, &artifact, "deny", 64);
    let mut s = vm.connect();
    let st = stats(&mut s);
    assert_eq!((st.files, st.read_policy.as_str()), (1, "deny"));
    let reply = exec(
        &mut s,
        SessionRequest::Read { path: "notes.txt".into(), max_bytes: 100 },
        Some((Kind::Policy, &policy())),
    );
    assert_eq!(error_of(&reply).0, error_kind::DENIED);
    assert!(error_of(&reply).1.contains("`deny`"), "{}", error_of(&reply).1);
    // grep: paths and counts only, never positions.
    let found = grep(&mut s, "card", None);
    assert!(found.matches.is_empty() && found.masked, "{found:?}");
    assert_eq!(found.counts, [proto::GrepCount { path: "notes.txt".into(), lines: 1 }]);
    assert!(grep(&mut s, &SECRET[..8], None).counts.is_empty(), "a pattern matched inside a masked secret");
    assert_eq!(exec(&mut s, SessionRequest::Stop, None).response.result, SessionResult::Stop);
    assert_eq!(vm.join().exit, GuestExit::Exited { code: 0 });
}

#[test]
fn a_hostile_artifact_is_refused_at_load_naming_the_entry() {
    let dir = scratch("session-hostile");
    let artifact = dir.join("evil.tar");
    std::fs::write(&artifact, tar(&[("../../etc/passwd", b"root:x:0:0\n")])).unwrap();
    let vm = SessionVm::start(&dir, &artifact, "allow", 64);
    let console = vm.console.clone();
    let report = vm.join();
    assert_eq!(report.exit, GuestExit::Exited { code: 3 }, "{}", console.text());
    assert!(console.text().contains("`../../etc/passwd` escapes the archive root"), "{}", console.text());
    assert_scrubbed(&report);
}

#[test]
fn a_client_connecting_before_the_vm_exists_retries_until_it_listens() {
    let dir = scratch("session-early");
    let artifact = artifact(&dir);
    let uds = dir.join("v.sock");
    let early = std::thread::spawn(move || GuestSession::connect(&uds, CONNECT_TIMEOUT));
    std::thread::sleep(Duration::from_millis(200));
    let vm = SessionVm::start(&dir, &artifact, "allow", 64);
    let mut s = early.join().unwrap().unwrap_or_else(|e| panic!("{}", cella_vmm::error_chain(&e)));
    assert_eq!(stats(&mut s).files, 4);
    let gone = GuestSession::connect(&dir.join("nothing.sock"), Duration::from_millis(300)).unwrap_err();
    assert!(cella_vmm::error_chain(&gone).contains("did not accept a connection"), "{gone}");
    drop(vm);
}

/// Figures, not assertions: `cargo test -p cella-vmm --test session_guest -- --ignored
/// --nocapture`. Index build (boot to first answer) for ~1 MiB and ~50 MiB artifacts, and
/// round trips of stats, grep and scan.
#[test]
#[ignore]
fn figures() {
    for (label, mib) in [("1 MiB", 1usize), ("50 MiB", 50)] {
        let dir = scratch(&format!("session-figures-{mib}"));
        let artifact = dir.join("big.tar");
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut line = 0u64;
        for f in 0..(mib * 4) {
            let mut text = Vec::with_capacity(256 << 10);
            while text.len() < (256 << 10) - 100 {
                line += 1;
                text.extend_from_slice(
                    format!("line {line} of some source text with words and numbers {}\n", line * 7)
                        .as_bytes(),
                );
            }
            if f == 0 {
                text.extend_from_slice(settings().as_bytes());
            }
            files.push((format!("src/file{f}.txt"), text));
        }
        let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        std::fs::write(&artifact, tar(&entries)).unwrap();
        let vm = SessionVm::start(&dir, &artifact, "allow", 512);
        let mut s = vm.connect();
        let first = stats(&mut s);
        let ready = vm.started.elapsed();
        let time = |s: &mut GuestSession, request: SessionRequest, attach: Option<(Kind, &[u8])>| {
            let t = Instant::now();
            let reply = exec(s, request, attach);
            assert!(reply.response.error().is_none(), "{:?}", reply.response);
            t.elapsed()
        };
        let stats_rt = time(&mut s, SessionRequest::Stats, None);
        let policy = policy();
        let grep_rt = time(
            &mut s,
            SessionRequest::Grep { pattern: r"numbers 7\d*7\b".into(), max_matches: 100, path_prefix: None },
            Some((Kind::Policy, &policy)),
        );
        let grep_all_rt = time(
            &mut s,
            SessionRequest::Grep { pattern: "stripe_key".into(), max_matches: 100, path_prefix: None },
            Some((Kind::Policy, &policy)),
        );
        let scan_cold = time(&mut s, scan_request("p"), Some((Kind::Policy, &policy)));
        let scan_warm = time(&mut s, scan_request("p"), Some((Kind::Policy, &policy)));
        println!(
            "{label}: {} files, {} bytes; boot + index build to first answer {:?} ({} TSC cycles in the guest); \
             stats {:?}, grep (first 100 matches) {:?}, grep (every file, 1 match) {:?}, scan (compile) {:?}, \
             scan (cached) {:?}",
            first.files, first.bytes, ready, first.index_build_cycles, stats_rt, grep_rt, grep_all_rt, scan_cold, scan_warm
        );
        let _ = exec(&mut s, SessionRequest::Stop, None);
        vm.join();
    }
}
