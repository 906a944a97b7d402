//! `cella-vmm scan`: one artifact, one microVM, end to end. The host never parses the artifact:
//! it attaches it read-only as the VM's disk, hands the runner the job and the compiled policy
//! over vsock, and prints what comes back.
//!
//! With `--jailed` the VMM is a spare in a jail (`cella-jailer … -- cella-vmm spare`), confined
//! before it serves anything, and this process stays outside as the job's host side: it hands
//! the VMM the artifact and one end of the job channel as descriptors (`PUT /vm`), serves the
//! job on the other end, and asks for the VM's final report (`finish`). Both ways end in the
//! same report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use cella_policies::baseline::{Baseline, BaselineError};
use cella_proto::SarifContext;
use cella_scan::{glob_to_regex, ByLevel, Confidence, GlobError, Severity};
use cella_vmm::job::{JobFrames, ScanOutcome};
use cella_vmm::scan::{self, JobOptions, ScanError, ScanRequest, ScanRun};
use cella_vmm::scan_report::{FailOnGate, ScanReport};
use cella_vmm::spare::{Spare, SpareOptions};
use cella_vmm::{default_scanner_image, error_chain, GuestExit};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::exit_code;

/// Guest memory for a scan unless told otherwise.
const SCAN_MEM_MIB: u64 = 256;
/// Wall-clock limit for a scan unless told otherwise.
const SCAN_TIMEOUT_MS: u64 = 600_000;

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The artifact: a tar, tar.gz, zip or plain file
    #[arg(long, value_name = "FILE", required = true)]
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
    /// Restore the VM from this template (`cella-vmm template`) instead of booting the image;
    /// its memory size is the template's. If the template's policy is this scan's, the runner's
    /// engine is already built
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "mem_mib"])]
    pub template: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, value_name = "N", default_value_t = SCAN_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the scan after this many milliseconds
    #[arg(long, value_name = "N", default_value_t = SCAN_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// The artifact's name (a relative path): the path a plain file's findings are reported
    /// under (a gzipped one's without `.gz`) [default: the file's own name]
    #[arg(long, value_name = "NAME")]
    pub artifact_name: Option<String>,
    /// Do not scan files matching this gitignore-like glob (`vendor/`, `*.min.js`, `/build`,
    /// `**/testdata/**`); repeatable. They are counted as excluded
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Report licenses of these SPDX identifiers at `error`: `AGPL-3.0` (also its `-only`,
    /// `-or-later` and `+` forms), or a prefix ending in `*` (`SSPL-*`); comma-separated or
    /// repeated. An expression is judged as a whole: `MIT OR AGPL-3.0-only` is allowed
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub license_deny: Vec<String>,
    /// Report licenses of these SPDX identifiers at `warning` at least (as --license-deny)
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub license_flag: Vec<String>,
    /// Suppress the findings listed here: a Cella baseline file (`cella-baseline/1`) or the
    /// SARIF log of an earlier scan. Needs the same CELLA_FINGERPRINT_KEY as that scan
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Exit 1 if an unsuppressed finding at or above this level exists
    #[arg(long, value_enum, default_value_t = FailOn::Never)]
    pub fail_on: FailOn,
    /// The least confidence a finding needs to count for --fail-on: a provider's own token
    /// format is high, a generic rule's finding or a validated card number medium, an e-mail
    /// address low, and a finding in a test or example folder one step lower
    #[arg(long, default_value = "medium", value_parser = confidence_parser())]
    pub min_confidence: Confidence,
    /// SARIF `tool.driver.informationUri` (an absolute URI)
    #[arg(long, value_name = "URI")]
    pub information_uri: Option<String>,
    /// SARIF `automationDetails.id`: which analysis this is (e.g. `cella/secrets/`)
    #[arg(long, value_name = "ID")]
    pub automation_id: Option<String>,
    /// SARIF `versionControlProvenance`: the repository's URI
    #[arg(long, value_name = "URI")]
    pub vcs_repo: Option<String>,
    /// The revision (commit) scanned
    #[arg(long, value_name = "REV", requires = "vcs_repo")]
    pub vcs_revision: Option<String>,
    /// The branch scanned
    #[arg(long, value_name = "BRANCH", requires = "vcs_repo")]
    pub vcs_branch: Option<String>,
    #[command(flatten)]
    pub jail: super::jailed::JailArgs,
}

/// The lowest level of unsuppressed finding that makes `scan` exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    Note,
    Warning,
    Error,
    /// Never exit 1 for findings
    Never,
}

impl FailOn {
    fn severity(self) -> Option<Severity> {
        match self {
            FailOn::Note => Some(Severity::Note),
            FailOn::Warning => Some(Severity::Warning),
            FailOn::Error => Some(Severity::Error),
            FailOn::Never => None,
        }
    }
}

/// `--min-confidence`: one of [`Confidence::NAMES`].
fn confidence_parser() -> impl clap::builder::TypedValueParser<Value = Confidence> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Confidence::NAMES)
        .map(|name| Confidence::parse(&name).unwrap_or(Confidence::Medium))
}

/// A job option that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("--artifact-name `{name}` {reason}")]
    ArtifactName { name: String, reason: &'static str },
    #[error("an --exclude glob was refused")]
    Exclude(#[source] GlobError),
    #[error("--license-deny/--license-flag: {0}")]
    LicensePolicy(String),
    #[error("{flag} `{value}` is not an absolute URI (a scheme such as https:, then the rest, no spaces)")]
    NotAUri { flag: &'static str, value: String },
    #[error("{flag} {reason}")]
    Text { flag: &'static str, reason: &'static str },
    #[error("--baseline needs the fingerprint key of the scans it came from in {}: fingerprints are keyed, and this scan's random key would match nothing", scan::FINGERPRINT_KEY_ENV)]
    BaselineWithoutKey,
    #[error("--baseline could not be used")]
    Baseline(#[source] BaselineError),
}

/// Longest URI, id, revision or branch accepted.
const MAX_FIELD: usize = 2048;

fn check_text(flag: &'static str, value: &str) -> Result<String, OptionError> {
    if value.is_empty() {
        return Err(OptionError::Text { flag, reason: "is empty" });
    }
    if value.len() > MAX_FIELD {
        return Err(OptionError::Text { flag, reason: "is longer than 2048 bytes" });
    }
    if value.chars().any(char::is_control) {
        return Err(OptionError::Text { flag, reason: "holds a control character" });
    }
    Ok(value.to_owned())
}

fn check_uri(flag: &'static str, value: &str) -> Result<String, OptionError> {
    let value = check_text(flag, value)?;
    let absolute = value.split_once(':').is_some_and(|(scheme, rest)| {
        scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
    });
    if !absolute || value.contains(char::is_whitespace) {
        return Err(OptionError::NotAUri { flag, value });
    }
    Ok(value)
}

fn check_artifact_name(name: &str) -> Result<String, OptionError> {
    let refuse = |reason| OptionError::ArtifactName { name: name.to_owned(), reason };
    check_text("--artifact-name", name)
        .map_err(|_| refuse("is empty, too long or holds a control character"))?;
    let normalized = cella_scan::normalize_entry_path(name).map_err(|_| {
        refuse("must be a relative path that stays inside the artifact (no leading /, no ..)")
    })?;
    if normalized.is_empty() {
        return Err(refuse("names no file"));
    }
    Ok(normalized)
}

/// The job options from the command line, each checked here so that a mistake is reported
/// before anything starts (the runner checks them again).
fn job_options(args: &ScanArgs) -> Result<JobOptions, OptionError> {
    for glob in &args.exclude {
        glob_to_regex(glob).map_err(OptionError::Exclude)?;
    }
    cella_scan::spdx::LicensePolicy::new(&args.license_deny, &args.license_flag)
        .map_err(OptionError::LicensePolicy)?;
    let baseline = match &args.baseline {
        None => None,
        Some(path) => {
            if std::env::var_os(scan::FINGERPRINT_KEY_ENV).is_none() {
                return Err(OptionError::BaselineWithoutKey);
            }
            Some(Baseline::read(path).map_err(OptionError::Baseline)?.wire_payload())
        }
    };
    let opt = |flag, v: &Option<String>, check: fn(&'static str, &str) -> Result<String, OptionError>| {
        v.as_deref().map(|v| check(flag, v)).transpose()
    };
    Ok(JobOptions {
        artifact_name: args.artifact_name.as_deref().map(check_artifact_name).transpose()?,
        excludes: args.exclude.clone(),
        baseline,
        sarif: SarifContext {
            information_uri: opt("--information-uri", &args.information_uri, check_uri)?,
            automation_id: opt("--automation-id", &args.automation_id, check_text)?,
            repository_uri: opt("--vcs-repo", &args.vcs_repo, check_uri)?,
            revision_id: opt("--vcs-revision", &args.vcs_revision, check_text)?,
            branch: opt("--vcs-branch", &args.vcs_branch, check_text)?,
        },
        license_policy: cella_proto::LicensePolicy {
            deny: args.license_deny.clone(),
            flag: args.license_flag.clone(),
        },
    })
}

pub fn main(args: ScanArgs, launch_start: Instant) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    let image = match args.image.clone().map(Ok).unwrap_or_else(default_scanner_image) {
        Ok(image) => image,
        Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
    };
    let Some(artifact) = args.artifact.clone() else {
        return fail(exit_code::BAD_INPUT, "--artifact is required".into());
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
    let options = match job_options(&args) {
        Ok(options) => options,
        Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
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
    let mem_mib = match &args.template {
        Some(dir) => match cella_vmm::template::TemplateIdentity::read(dir) {
            Ok(identity) => identity.mem_mib,
            Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
        },
        None => args.mem_mib,
    };
    let request = ScanRequest {
        image,
        template: args.template.clone(),
        artifact: artifact.clone(),
        policy,
        mem_mib,
        timeout: Duration::from_millis(args.timeout_ms),
        launch_start,
        cancel: None,
        fingerprint_key,
        options,
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
    let mut result = ScanReport {
        exit: report.exit.clone(),
        launch_us: report.launch_us,
        run_us: report.run_us,
        built_ahead: report.built_ahead,
        vcpus: report.vcpus,
        scan_ms: run.scan_ms,
        scrub: report.scrub.clone(),
        artifact: artifact.display().to_string(),
        artifact_bytes: run.artifact_bytes,
        in_vm_ms: None,
        engine_version: None,
        template: match &args.template {
            Some(dir) => cella_vmm::template::TemplateIdentity::read(dir).ok().map(|t| t.id),
            None => None,
        },
        policy_preloaded: None,
        sarif: None,
        summary: None,
        fail_on: None,
        refused: None,
        error: None,
    };
    let code = match run.job {
        Ok(job) => {
            result.in_vm_ms = Some(job.in_vm.as_secs_f64() * 1e3);
            result.engine_version = Some(job.runner_version.clone());
            result.policy_preloaded = Some(job.policy_preloaded);
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
                        result.sarif = Some(path.display().to_string());
                    }
                    let min = args.min_confidence;
                    let at_threshold =
                        args.fail_on.severity().map(|level| unsuppressed_at_or_above(&summary, level, min));
                    if !args.json {
                        print_summary(&summary, &report.exit, run.scan_ms);
                        if let Some(n) = at_threshold {
                            let level = format!("{:?}", args.fail_on).to_lowercase();
                            println!(
                                "{n} unsuppressed finding(s) at or above --fail-on {level} with --min-confidence {}",
                                min.as_str()
                            );
                        }
                    }
                    result.summary = Some(summary);
                    result.fail_on = Some(FailOnGate {
                        level: format!("{:?}", args.fail_on).to_lowercase(),
                        min_confidence: Some(min.as_str().to_owned()),
                        unsuppressed_at_or_above: at_threshold,
                    });
                    match report.exit {
                        GuestExit::Exited { code: 0 } if at_threshold.unwrap_or(0) > 0 => {
                            ExitCode::from(exit_code::FINDINGS)
                        }
                        ref exit => exit_code::for_exit(exit),
                    }
                }
                ScanOutcome::Refused(error) => {
                    // The guest's words (an entry name chosen by the artifact): escaped for the terminal.
                    let said = format!("{} refused: {}", error.kind, error.message);
                    tracing::warn!("{}", cella_proto::text::escape_controls(&said));
                    result.refused = Some(error);
                    ExitCode::from(exit_code::SCAN_REFUSED)
                }
            }
        }
        Err(e) => {
            tracing::error!("no result: {}", error_chain(&e));
            result.error = Some(error_chain(&e));
            match report.exit {
                GuestExit::Exited { .. } => ExitCode::from(exit_code::VMM_FAILED),
                ref other => exit_code::for_exit(other),
            }
        }
    };
    if args.json {
        println!("{}", result.to_line());
    }
    jailer_status.as_ref().and_then(exit_code::for_jailer).unwrap_or(code)
}

/// `scan --jailed`: the VMM a spare in a jail (`cella-vmm spare` under `cella-jailer`), the job
/// served here over the channel handed to it with the artifact. Returns the same run a scan in
/// this process would, and the jailer's status; or the exit code when there is nothing to
/// report (the reason is printed). SIGINT and SIGTERM stop the VM through its control API (it
/// is scrubbed and reported as stopped); if this process dies, the jailer's parent-death
/// signal does the same.
fn jailed(args: &ScanArgs, request: ScanRequest) -> Result<(ScanRun, ExitStatus), ExitCode> {
    let fail = |code: u8, e: &dyn std::error::Error| {
        tracing::error!("{}", error_chain(e));
        ExitCode::from(code)
    };
    let artifact_bytes =
        scan::check_artifact(&request.artifact).map_err(|e| fail(exit_code::BAD_INPUT, &e))?;
    let artifact = std::fs::File::open(&request.artifact).map_err(|source| {
        fail(exit_code::BAD_INPUT, &ScanError::Artifact { path: request.artifact.clone(), source })
    })?;
    let (jail, vmm) = args.jail.spare_jail(request.mem_mib).map_err(|e| super::jailed::refuse(&e))?;
    let options = SpareOptions {
        template: request.template.clone(),
        vmm,
        jail: Some(jail),
        image: Some(request.image.clone()),
        mem_mib: request.mem_mib,
        timeout: request.timeout,
        seccomp: None,
        guest_args: Vec::new(),
        run_dir: std::env::temp_dir(),
        capture_stderr: false,
    };
    let stop_fd = super::stop_signal::install().map_err(|message| {
        tracing::error!("{message}");
        ExitCode::from(exit_code::VMM_FAILED)
    })?;
    let spare = Spare::start(&options).map_err(|e| fail(exit_code::VMM_FAILED, &e))?;
    stop_on_signal(stop_fd, spare.api().clone(), spare.pid());
    let job = request.job(artifact_bytes);
    let policy = std::sync::Arc::new(cella_host::job::SerializedPolicy::new(request.policy));
    let frames = JobFrames { job, policy, baseline: request.options.baseline };
    let started = Instant::now();
    let run = spare.run_job(&artifact, &frames).map_err(|e| fail(exit_code::VMM_FAILED, &e))?;
    let scan_ms = started.elapsed().as_millis() as u64;
    let status = spare.wait().map_err(|e| fail(exit_code::VMM_FAILED, &e))?.status;
    match run.vm {
        Ok(vm) => Ok((ScanRun { vm, job: run.job, artifact_bytes, scan_ms }, status)),
        Err(e) => {
            tracing::error!(
                "no run report from the jailed VMM ({}; cella-jailer {status}, its \
                 message is above)",
                error_chain(&e)
            );
            Err(exit_code::for_jail_without_report(&status))
        }
    }
}

/// Once `stop_fd` (SIGINT/SIGTERM) is readable, stops the spare's VM through its API, or, if it
/// has not started yet, sends the VMM (`pid`, handed off by its jailer) SIGTERM.
fn stop_on_signal(stop_fd: std::os::fd::RawFd, api: cella_vmm::control::ControlClient, pid: u32) {
    std::thread::spawn(move || {
        let mut pfd = libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; the stop eventfd lives until the process exits.
        while unsafe { libc::poll(&mut pfd, 1, -1) } <= 0 {}
        if api.stop().is_err() {
            // SAFETY: kill(2) to the VMM, this process's child (reaped only by `wait` after
            // the job, when this no longer matters).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    });
}

fn print_summary(summary: &Value, exit: &GuestExit, scan_ms: u64) {
    print!("{}", summary_text(summary, exit, scan_ms));
}

/// Unsuppressed findings at `level` or above, from the summary's `unsuppressed` counts.
/// Unsuppressed findings at `level` or above, of confidence `min` or more (a summary without
/// confidences counts them all).
fn unsuppressed_at_or_above(summary: &Value, level: Severity, min: Confidence) -> u64 {
    fn parsed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
        serde_json::from_value(v.clone()).ok()
    }
    match parsed::<BTreeMap<String, ByLevel>>(&summary["by_confidence"]) {
        Some(by) => cella_scan::gate(&by, level, min),
        None => parsed::<ByLevel>(&summary["unsuppressed"]).unwrap_or_default().at_or_above(level),
    }
}

/// The summary as `scan` prints it. The names come from the guest: escaped for the terminal.
fn summary_text(summary: &Value, exit: &GuestExit, scan_ms: u64) -> String {
    let n = |key: &str| summary[key].as_u64().unwrap_or(0);
    let suppressed = |key: &str| summary["suppressed"][key].as_u64().unwrap_or(0);
    let shown = cella_proto::text::escape_controls;
    let mut out = format!(
        "scanned {} files ({} bytes; {} binary, {} excluded) in {scan_ms} ms: {} findings, {} suppressed ({} inline, {} baseline)\n",
        n("files_scanned"),
        n("bytes_scanned"),
        n("files_binary"),
        n("files_excluded"),
        n("findings"),
        suppressed("total"),
        suppressed("inline"),
        suppressed("baseline"),
    );
    if let Some(categories) = summary["by_category"].as_object() {
        let line: Vec<String> = categories.iter().map(|(k, v)| format!("{} {v}", shown(k))).collect();
        out.push_str(&format!("  unsuppressed by category: {}\n", line.join(", ")));
    }
    if let Some(rules) = summary["by_rule"].as_object() {
        for (rule, count) in rules {
            out.push_str(&format!("  {count:>6}  {}\n", shown(rule)));
        }
    }
    if let Ok(history) = serde_json::from_value::<cella_scan::HistorySummary>(summary["history"].clone()) {
        out.push_str(&format!("  {history}\n"));
    }
    if let Ok(image) = serde_json::from_value::<cella_scan::ImageSummary>(summary["image"].clone()) {
        out.push_str(&format!("  {image}\n"));
    }
    out.push_str(&skipped_text(summary));
    if !matches!(exit, GuestExit::Exited { code: 0 }) {
        out.push_str(&format!("  VM: {exit:?}\n"));
    }
    out
}

/// The entries the scan could not read, with the reasons (escaped: the guest wrote them).
fn skipped_text(summary: &Value) -> String {
    let count = summary["entries_skipped"].as_u64().unwrap_or(0);
    if count == 0 {
        return String::new();
    }
    let shown = cella_proto::text::escape_controls;
    let listed = summary["skipped"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out = format!("  {count} entries could not be read and were skipped (the rest was scanned):\n");
    for s in listed {
        let (path, reason) = (s["path"].as_str().unwrap_or("?"), s["reason"].as_str().unwrap_or("?"));
        out.push_str(&format!("    {}: {}\n", shown(path), shown(reason)));
    }
    if (listed.len() as u64) < count {
        out.push_str(&format!("    … and {} more\n", count - listed.len() as u64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_the_guests_names_escaped() {
        let summary = serde_json::json!({
            "files_scanned": 2, "bytes_scanned": 10, "files_binary": 1, "files_excluded": 3, "findings": 2,
            "suppressed": {"inline": 1, "baseline": 0, "total": 1},
            "by_category": {"secrets\u{1b}[2J": 1},
            "by_rule": {"rule\r\u{7}": 1}
        });
        let text = summary_text(&summary, &GuestExit::Exited { code: 0 }, 5);
        assert_eq!(
            text,
            "scanned 2 files (10 bytes; 1 binary, 3 excluded) in 5 ms: 2 findings, 1 suppressed (1 inline, 0 baseline)\n  unsuppressed by category: secrets\\x1b[2J 1\n  1  rule\\r\\x07\n"
        );
    }

    #[test]
    fn skipped_entries_are_listed_escaped_with_the_count_of_those_left_out() {
        let summary = serde_json::json!({
            "entries_skipped": 3,
            "skipped": [{"path": "a.jar", "reason": "artifact entry `a.jar` is truncated"},
                        {"path": "b\u{1b}[2J.zip", "reason": "encrypted"}]
        });
        assert_eq!(
            skipped_text(&summary),
            "  3 entries could not be read and were skipped (the rest was scanned):\n    a.jar: artifact entry `a.jar` is truncated\n    b\\x1b[2J.zip: encrypted\n    … and 1 more\n"
        );
        assert_eq!(skipped_text(&serde_json::json!({"entries_skipped": 0})), "");
    }

    #[test]
    fn the_gate_counts_unsuppressed_findings_at_or_above_the_level_and_the_confidence() {
        // A summary from before confidences: every finding counts.
        let old = serde_json::json!({"unsuppressed": {"error": 1, "warning": 2, "note": 4}});
        let at = |l| unsuppressed_at_or_above(&old, l, Confidence::High);
        assert_eq!((at(Severity::Error), at(Severity::Warning), at(Severity::Note)), (1, 3, 7));
        assert_eq!(unsuppressed_at_or_above(&serde_json::json!({}), Severity::Note, Confidence::Low), 0);
        let summary = serde_json::json!({
            "unsuppressed": {"error": 3, "warning": 3, "note": 4},
            "by_confidence": {
                "high": {"error": 1, "warning": 0, "note": 0},
                "medium": {"error": 1, "warning": 2, "note": 0},
                "low": {"error": 1, "warning": 1, "note": 4},
            }
        });
        let at = |l, c| unsuppressed_at_or_above(&summary, l, c);
        assert_eq!(at(Severity::Error, Confidence::High), 1);
        assert_eq!(at(Severity::Error, Confidence::Medium), 2);
        assert_eq!(at(Severity::Warning, Confidence::Medium), 4);
        assert_eq!(at(Severity::Note, Confidence::Low), 10);
    }

    #[test]
    fn job_options_are_checked_before_launch() {
        assert_eq!(check_artifact_name("./src/app.env").unwrap(), "src/app.env");
        for bad in ["", "/etc/passwd", "../x", ".", "a\nb"] {
            assert!(check_artifact_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_uri("--vcs-repo", "https://git.example.org/a/b").unwrap(),
            "https://git.example.org/a/b"
        );
        for bad in ["git.example.org/a", "https://a b", ":x", "1http://x"] {
            let e = check_uri("--vcs-repo", bad).unwrap_err();
            assert!(e.to_string().starts_with(&format!("--vcs-repo `{bad}` is not an absolute URI")), "{e}");
        }
        assert_eq!(check_text("--vcs-branch", "").unwrap_err().to_string(), "--vcs-branch is empty");
        let e = OptionError::BaselineWithoutKey.to_string();
        assert!(e.starts_with("--baseline needs the fingerprint key"), "{e}");
    }
}
