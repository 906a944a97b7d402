//! `cella-vmm scan`: one artifact, one microVM, end to end. The host never parses the artifact:
//! it attaches it read-only as the VM's disk, hands the runner the job and the compiled policy
//! over vsock, and prints what comes back.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cella_vmm::job::ScanOutcome;
use cella_vmm::scan::{self, ScanRequest};
use cella_vmm::{default_scanner_image, error_chain, GuestExit};
use clap::Args;
use serde_json::{json, Value};

use super::exit_code;

/// Guest memory for a scan unless told otherwise.
const SCAN_MEM_MIB: u64 = 256;
/// Wall-clock limit for a scan unless told otherwise.
const SCAN_TIMEOUT_MS: u64 = 600_000;

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The artifact: a tar, tar.gz, zip or plain file
    #[arg(long, value_name = "FILE")]
    pub artifact: PathBuf,
    /// Built-in rule packs to apply, comma-separated (secrets, pii, licenses)
    #[arg(long, value_name = "PACKS", default_value = "secrets,pii,licenses", value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Also apply this rule pack file (TOML, same format as policies/rules/*.toml)
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
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
    let policy = match super::policy::compile(&args.policy, args.policy_file.as_deref()) {
        Ok(policy) => policy,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    if args.jail.jailed {
        // The job channel is a vsock socket, whose host listeners do not reach into a jail yet.
        return super::jailed::refuse(&super::jailed::JailedError::Unsupported("scan"));
    }
    // Opened before the VM starts: once the main thread's seccomp filter is on, it can no
    // longer open files.
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
    args.jail.apply_seccomp_mode();
    let request = ScanRequest {
        image,
        artifact: args.artifact.clone(),
        policy,
        mem_mib: args.mem_mib,
        timeout: Duration::from_millis(args.timeout_ms),
        launch_start,
    };
    let run = match scan::run(&request, Box::new(std::io::stderr())) {
        Ok(run) => run,
        Err(e) if e.is_bad_input() => return fail(exit_code::BAD_INPUT, error_chain(&e)),
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    let report = &run.vm;
    let mut result = json!({
        "exit": report.exit,
        "launch_us": report.launch_us,
        "run_us": report.run_us,
        "scan_ms": run.scan_ms,
        "scrub": report.scrub,
        "artifact": args.artifact.display().to_string(),
        "artifact_bytes": run.artifact_bytes,
    });
    let code = match run.job {
        Ok(job) => {
            result["in_vm_ms"] = json!(job.in_vm.as_secs_f64() * 1e3);
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
                    eprintln!("cella-vmm scan: {} refused: {}", error.kind, error.message);
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
    code
}

fn print_summary(summary: &Value, exit: &GuestExit, scan_ms: u64) {
    let n = |key: &str| summary[key].as_u64().unwrap_or(0);
    println!(
        "scanned {} files ({} bytes; {} binary skipped) in {scan_ms} ms: {} findings",
        n("files_scanned"),
        n("bytes_scanned"),
        n("files_skipped_binary"),
        n("findings")
    );
    if let Some(categories) = summary["by_category"].as_object() {
        let line: Vec<String> = categories.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  by category: {}", line.join(", "));
    }
    if let Some(rules) = summary["by_rule"].as_object() {
        for (rule, count) in rules {
            println!("  {count:>6}  {rule}");
        }
    }
    if !matches!(exit, GuestExit::Exited { code: 0 }) {
        println!("  VM: {exit:?}");
    }
}
