//! `cella-vmm scan`: one artifact, one microVM, end to end. The host never parses the artifact:
//! it attaches it read-only as the VM's disk, hands the runner the job and the compiled policy
//! over vsock, and prints what comes back.
//!
//! With `--jailed` the VMM runs in a jail as `cella-vmm run --disk /disk --vsock /run/vsock.sock
//! --json -- scan`, and this process stays outside as the job's host side: its job server
//! listens in a private socket folder that the jailer binds in as the jail's `/run`, and the
//! VMM's run report comes back on the VMM's stdout. Both ways end in the same report.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_proto::Job;
use cella_vmm::job::{JobError, JobServer, ScanOutcome};
use cella_vmm::scan::{self, ScanError, ScanRequest, ScanRun, SocketDir};
use cella_vmm::{default_scanner_image, error_chain, GuestExit};
use clap::Args;
use serde_json::{json, Value};

use super::exit_code;
use super::jailed::{JailedLaunch, JAIL_SOCKET_DIR};

/// Guest memory for a scan unless told otherwise.
const SCAN_MEM_MIB: u64 = 256;
/// Wall-clock limit for a scan unless told otherwise.
const SCAN_TIMEOUT_MS: u64 = 600_000;

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The artifact: a tar, tar.gz, zip or plain file (required, but for --jail-hold)
    #[arg(long, value_name = "FILE", required_unless_present = "jail_hold", conflicts_with = "jail_hold")]
    pub artifact: Option<PathBuf>,
    /// Built-in rule packs to apply, comma-separated (secrets, pii, licenses)
    #[arg(long, value_name = "PACKS", default_value = "secrets,pii,licenses", value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Also apply this rule pack file (TOML, same format as policies/rules/*.toml)
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// Apply this compiled policy instead (JSON, as cella-policies serializes it), as it is: its
    /// packs were validated in full before (the service's worker passes a job's built-in and
    /// tenant packs this way)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["policy", "policy_file"])]
    pub compiled_policy: Option<PathBuf>,
    /// Write the SARIF 2.1.0 log here
    #[arg(long, value_name = "OUT")]
    pub sarif: Option<PathBuf>,
    /// Print one JSON object (exit, summary, timings, scrub) as the last line of stdout
    #[arg(long)]
    pub json: bool,
    /// Guest image [default: the cella-scanner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, value_name = "N", default_value_t = SCAN_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the scan after this many milliseconds
    #[arg(long, value_name = "N", default_value_t = SCAN_TIMEOUT_MS)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub jail: super::jailed::JailArgs,
}

pub fn main(args: ScanArgs, launch_start: Instant) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("cella-vmm scan: error: {message}");
        ExitCode::from(code)
    };
    let image = match args.image.clone().map(Ok).unwrap_or_else(default_scanner_image) {
        Ok(image) => image,
        Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
    };
    let Some(artifact) = args.artifact.clone() else {
        return hold(&args, image);
    };
    let compiled = args.compiled_policy.as_deref();
    let policy = match super::policy::compile(&args.policy, args.policy_file.as_deref(), compiled) {
        Ok(policy) => policy,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    let fingerprint_key = match scan::fingerprint_key() {
        Ok(key) => key,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    // Opened before the VM starts: once the main thread's seccomp filter is on, it can no
    // longer open files (and a jailed VMM cannot reach host paths at all).
    let mut sarif_out = match &args.sarif {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => Some(file),
            Err(e) => {
                return fail(
                    exit_code::BAD_INPUT,
                    format!("cannot create SARIF file {}: {e}", path.display()),
                )
            }
        },
        None => None,
    };
    let request = ScanRequest {
        image,
        artifact: artifact.clone(),
        policy,
        mem_mib: args.mem_mib,
        timeout: Duration::from_millis(args.timeout_ms),
        launch_start,
        cancel: None,
        fingerprint_key,
    };
    let (run, jailer_status) = if args.jail.jailed {
        match jailed(&args, request) {
            Ok((run, status)) => (run, Some(status)),
            Err(code) => return code,
        }
    } else {
        args.jail.apply_seccomp_mode();
        let request = ScanRequest { cancel: Some(super::run::stop_on_signals()), ..request };
        match scan::run(&request, Box::new(std::io::stderr())) {
            Ok(run) => (run, None),
            Err(e) if e.is_bad_input() => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
        }
    };
    let report = &run.vm;
    let mut result = json!({
        "exit": report.exit,
        "launch_us": report.launch_us,
        "run_us": report.run_us,
        "built_ahead": report.built_ahead,
        "scan_ms": run.scan_ms,
        "scrub": report.scrub,
        "artifact": artifact.display().to_string(),
        "artifact_bytes": run.artifact_bytes,
    });
    let code = match run.job {
        Ok(job) => {
            result["in_vm_ms"] = json!(job.in_vm.as_secs_f64() * 1e3);
            result["engine_version"] = json!(job.runner_version);
            match job.outcome {
                ScanOutcome::Completed { sarif, summary } => {
                    let mut summary: Value = match serde_json::from_slice(&summary) {
                        Ok(summary) => summary,
                        Err(e) => {
                            return fail(
                                exit_code::VMM_FAILED,
                                format!("the runner sent an unreadable summary: {e}"),
                            )
                        }
                    };
                    summary["duration_ms"] = json!(run.scan_ms);
                    if let (Some(file), Some(path)) = (sarif_out.as_mut(), &args.sarif) {
                        if let Err(e) = std::io::Write::write_all(file, &sarif) {
                            return fail(
                                exit_code::VMM_FAILED,
                                format!("cannot write SARIF to {}: {e}", path.display()),
                            );
                        }
                        result["sarif"] = json!(path.display().to_string());
                    }
                    if !args.json {
                        print_summary(&summary, &report.exit, run.scan_ms);
                    }
                    result["summary"] = summary;
                    exit_code::for_exit(&report.exit)
                }
                ScanOutcome::Refused(error) => {
                    // The guest's words (an entry name chosen by the artifact): escaped for the terminal.
                    let said = format!("{} refused: {}", error.kind, error.message);
                    eprintln!("cella-vmm scan: {}", cella_proto::text::escape_controls(&said));
                    result["refused"] = json!(error);
                    ExitCode::from(exit_code::SCAN_REFUSED)
                }
            }
        }
        Err(e) => {
            eprintln!("cella-vmm scan: no result: {}", error_chain(&e));
            result["error"] = json!(error_chain(&e));
            match report.exit {
                GuestExit::Exited { .. } => ExitCode::from(exit_code::VMM_FAILED),
                ref other => exit_code::for_exit(other),
            }
        }
    };
    if args.json {
        println!("{result}");
    }
    jailer_status.as_ref().and_then(exit_code::for_jailer).unwrap_or(code)
}

/// `scan --jailed`: the job server here, the VMM in a jail. Returns the same run a scan in this
/// process would, and the jailer's status; or the exit code when there is nothing to report
/// (the reason is printed).
fn jailed(args: &ScanArgs, request: ScanRequest) -> Result<(ScanRun, ExitStatus), ExitCode> {
    let fail = |code: u8, e: &dyn std::error::Error| {
        eprintln!("cella-vmm scan: error: {}", error_chain(e));
        ExitCode::from(code)
    };
    let artifact_bytes = match scan::check_artifact(&request.artifact) {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(exit_code::BAD_INPUT, &e)),
    };
    // The folder is root's and 0700 (the jailer checks) until the jail's child hands it to the
    // jail's uid/gid; the listener in it is theirs alone from the start.
    let sockets = SocketDir::create().map_err(|e| fail(exit_code::VMM_FAILED, &ScanError::SocketDir(e)))?;
    let server = JobServer::bind(&sockets.vsock_uds())
        .and_then(|server| server.allow_only(args.jail.jail_uid, args.jail.jail_gid).map(|()| server))
        .map_err(|e| fail(exit_code::VMM_FAILED, &ScanError::Job(e)))?;
    let launch = jailed_launch(&request, &request.artifact, Some(sockets.path().to_owned()));
    let started = Instant::now();
    let vmm = args.jail.spawn(&launch).map_err(|e| super::jailed::refuse(&e))?;
    // The runner learns the artifact's real name from the job; in the jail it is `/disk`.
    let job = Job {
        artifact_name: scan::artifact_name(&request.artifact),
        artifact_size: artifact_bytes,
        fingerprint_key: request.fingerprint_key.clone(),
    };
    let vm_done = Arc::new(AtomicBool::new(false));
    let serving = server.serve(job, request.policy, vm_done.clone(), request.timeout, sockets);
    let end = vmm.wait();
    vm_done.store(true, Ordering::Release);
    serving.thread().unpark();
    let job = serving.join().unwrap_or(Err(JobError::VmGone { stage: "answered" }));
    let scan_ms = started.elapsed().as_millis() as u64;
    let end = end.map_err(|e| super::jailed::refuse(&e))?;
    match end.report {
        Some(vm) => Ok((ScanRun { vm, job, artifact_bytes, scan_ms }, end.status)),
        None => {
            eprintln!(
                "cella-vmm scan: error: no run report from the jailed VMM (cella-jailer {}; its \
                 message is above)",
                end.status
            );
            Err(exit_code::for_jail_without_report(&end.status))
        }
    }
}

/// The jailed VMM of a scan: `run --disk /disk --vsock /run/vsock.sock --json -- scan`.
fn jailed_launch(request: &ScanRequest, artifact: &Path, socket_dir: Option<PathBuf>) -> JailedLaunch {
    JailedLaunch {
        subcommand: "run",
        mem_mib: request.mem_mib,
        files: vec![("--image", request.image.clone()), ("--disk", artifact.to_owned())],
        options: vec![
            "--vsock".into(),
            format!("{JAIL_SOCKET_DIR}/{}", scan::VSOCK_SOCKET_NAME).into(),
            "--timeout-ms".into(),
            request.timeout.as_millis().to_string().into(),
            "--json".into(),
        ],
        guest_args: vec!["scan".into()],
        socket_dir,
    }
}

/// `scan --jailed --jail-hold ID`: a held spare for later scans of the same kind. Its disk is
/// the guest image until a launch binds its artifact over it (the VMM opens its disk only when
/// launched); its socket folder the jail's own until the launch's is bound over it.
fn hold(args: &ScanArgs, image: PathBuf) -> ExitCode {
    if !args.jail.jailed || args.jail.jail_hold.is_none() {
        eprintln!("cella-vmm scan: error: --artifact is required (only --jailed --jail-hold goes without)");
        return ExitCode::from(exit_code::BAD_INPUT);
    }
    let request = ScanRequest {
        image: image.clone(),
        artifact: image.clone(),
        policy: Vec::new(),
        mem_mib: args.mem_mib,
        timeout: Duration::from_millis(args.timeout_ms),
        launch_start: Instant::now(),
        cancel: None,
        fingerprint_key: String::new(),
    };
    args.jail.exec(&jailed_launch(&request, &image, None))
}

fn print_summary(summary: &Value, exit: &GuestExit, scan_ms: u64) {
    print!("{}", summary_text(summary, exit, scan_ms));
}

/// The summary as `scan` prints it. The names come from the guest: escaped for the terminal.
fn summary_text(summary: &Value, exit: &GuestExit, scan_ms: u64) -> String {
    let n = |key: &str| summary[key].as_u64().unwrap_or(0);
    let shown = cella_proto::text::escape_controls;
    let mut out = format!(
        "scanned {} files ({} bytes; {} binary skipped) in {scan_ms} ms: {} findings\n",
        n("files_scanned"),
        n("bytes_scanned"),
        n("files_skipped_binary"),
        n("findings")
    );
    if let Some(categories) = summary["by_category"].as_object() {
        let line: Vec<String> = categories.iter().map(|(k, v)| format!("{} {v}", shown(k))).collect();
        out.push_str(&format!("  by category: {}\n", line.join(", ")));
    }
    if let Some(rules) = summary["by_rule"].as_object() {
        for (rule, count) in rules {
            out.push_str(&format!("  {count:>6}  {}\n", shown(rule)));
        }
    }
    if !matches!(exit, GuestExit::Exited { code: 0 }) {
        out.push_str(&format!("  VM: {exit:?}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_the_guests_names_escaped() {
        let summary = serde_json::json!({
            "files_scanned": 2, "bytes_scanned": 10, "files_skipped_binary": 0, "findings": 1,
            "by_category": {"secrets\u{1b}[2J": 1},
            "by_rule": {"rule\r\u{7}": 1}
        });
        let text = summary_text(&summary, &GuestExit::Exited { code: 0 }, 5);
        assert_eq!(
            text,
            "scanned 2 files (10 bytes; 0 binary skipped) in 5 ms: 1 findings\n  by category: secrets\\x1b[2J 1\n  1  rule\\r\\x07\n"
        );
    }
}
