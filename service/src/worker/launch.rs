//! Launching one scan: `cella-vmm scan --json` (through `cella-jailer` when jailed) as a child
//! process, and turning how it ended into a queue [`Outcome`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cella_vmm::scan_report::ScanReport;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::config::WorkerConfig;
use crate::queue::Outcome;

/// The most of the VMM's stderr kept for an error message (the tail).
const STDERR_TAIL: usize = 4096;

/// `cella-vmm scan`'s exit statuses (see `cella-vmm scan --help`), as `ExitStatus::code` gives them.
mod status {
    use cella_abi::exit;

    pub const BAD_INPUT: i32 = exit::BAD_INPUT as i32;
    pub const REFUSED: i32 = exit::SCAN_REFUSED as i32;
    pub const CRASHED: i32 = exit::CRASHED as i32;
    pub const TIMED_OUT: i32 = exit::TIMED_OUT as i32;
    pub const STOPPED: i32 = exit::STOPPED as i32;
    pub const SECCOMP: i32 = exit::VMM_KILLED_BY_SECCOMP as i32;
}

/// Why a scan could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0} does not exist: {1}")]
    Missing(PathBuf, &'static str),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
}

/// Starts scans as configured.
#[derive(Debug, Clone)]
pub struct Launcher {
    vmm: PathBuf,
    config: WorkerConfig,
    vm_cpu_percent: u32,
}

/// One scan to run.
#[derive(Debug)]
pub struct ScanSpec<'a> {
    pub job_id: &'a str,
    pub artifact: &'a Path,
    pub policy: &'a str,
    /// The job's policy compiled, when it has tenant packs (`cella-vmm scan --compiled-policy`;
    /// built-in packs alone go by name with `--policy`).
    pub compiled_policy: Option<&'a Path>,
    pub sarif_out: &'a Path,
    /// The uid/gid a jailed VMM runs as (see [`crate::held_spares`]).
    pub uid: u32,
    /// A held spare to take (see [`crate::held_spares`]).
    pub spare: Option<&'a str>,
    /// The tenant's fingerprint key, hex: in the environment of `cella-vmm scan`, which only
    /// this process's user can read, not on its command line.
    pub fingerprint_key: &'a str,
    /// The tenant's CPU quota per VM, percent of one CPU (jailed VMMs' cgroup).
    pub cpu_percent: u32,
    /// The scan's options (excludes, version-control details), its artifact's name as the
    /// tenant gave it, and the baseline file written for it.
    pub extras: ScanExtras<'a>,
}

/// What a scan carries besides its artifact and packs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanExtras<'a> {
    pub artifact_name: Option<&'a str>,
    pub options: Option<&'a crate::jobs::JobOptions>,
    pub baseline_file: Option<&'a Path>,
    /// SARIF `tool.driver.informationUri`.
    pub information_uri: Option<&'a str>,
}

/// The name the scan gives a tenant-named artifact (format detection, a plain file's path in
/// the results): its last path part, if that is a usable file name; else none, and the scan
/// uses the file's own name.
fn artifact_name_for_scan(name: &str) -> Option<&str> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name).trim();
    let usable = !last.is_empty()
        && last != "."
        && last != ".."
        && last.len() <= 255
        && !last.chars().any(char::is_control);
    usable.then_some(last)
}

/// A started scan.
#[derive(Debug)]
pub struct RunningScan {
    child: Child,
    pid: u32,
    sarif_out: PathBuf,
}

/// The default `cella-vmm`: next to the running `cella`.
pub fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("cella-vmm")))
        .unwrap_or_else(|| PathBuf::from("cella-vmm"))
}

impl Launcher {
    /// `vm_cpu_percent`: the CPU quota of a VMM whose tenant has no quota of its own (held
    /// spares are made with it).
    pub fn new(config: &WorkerConfig, vm_cpu_percent: u32) -> Self {
        Self { vmm: config.vmm.clone().unwrap_or_else(default_vmm), config: config.clone(), vm_cpu_percent }
    }

    /// The CPU quota held spares are made with.
    pub fn default_cpu_percent(&self) -> u32 {
        self.vm_cpu_percent
    }

    /// The `cella-vmm` this launcher runs.
    pub fn vmm(&self) -> &Path {
        &self.vmm
    }

    /// The first uid of jailed VMMs (see [`crate::held_spares`]).
    pub fn jail_uid_base(&self) -> u32 {
        self.config.jail_uid_base
    }

    pub fn mem_mib(&self) -> u32 {
        self.config.mem_mib
    }

    pub fn jailed(&self) -> bool {
        self.config.is_jailed()
    }

    /// Checks that the binaries exist before any job is leased.
    pub fn check(&self) -> Result<(), LaunchError> {
        if !self.vmm.is_file() {
            return Err(LaunchError::Missing(
                self.vmm.clone(),
                "build it (scripts/setup.sh builds target/release/cella-vmm) or set CELLA_VMM",
            ));
        }
        let jailer = self.vmm.with_file_name("cella-jailer");
        if self.jailed() && !jailer.is_file() {
            return Err(LaunchError::Missing(
                jailer,
                "jailed VMMs need cella-jailer next to cella-vmm; build it, or set CELLA_JAILED=0 (development only)",
            ));
        }
        Ok(())
    }

    /// What every scan of this worker as `uid` shares: VM size, time limit, image, and, when
    /// jailed, the jail's uid/gid. A held spare is made from the same (see
    /// [`Launcher::hold_command`]), so a launch finds it of its own shape.
    fn base_command(&self, uid: u32, cpu_percent: u32) -> Command {
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("scan")
            .arg("--json")
            .arg("--mem-mib")
            .arg(self.config.mem_mib.to_string())
            .arg("--timeout-ms")
            .arg((self.config.timeout_secs.max(1) * 1000).to_string());
        if let Some(image) = &self.config.scanner_image {
            cmd.arg("--image").arg(image);
        }
        if self.jailed() {
            let id = uid.to_string();
            cmd.args(["--jailed", "--jail-uid", &id, "--jail-gid", &id]);
            // The VMM's cgroup CPU quota: one tenant's VMs cannot take the others' CPU time.
            cmd.arg("--cpus").arg(format!("{}", f64::from(cpu_percent.max(1)) / 100.0));
        }
        cmd
    }

    /// The command line for `spec`.
    pub fn command(&self, spec: &ScanSpec<'_>) -> Command {
        let mut cmd = self.base_command(spec.uid, spec.cpu_percent);
        cmd.arg("--artifact").arg(spec.artifact);
        match spec.compiled_policy {
            Some(file) => cmd.arg("--compiled-policy").arg(file),
            None => cmd.arg("--policy").arg(spec.policy),
        };
        cmd.arg("--sarif").arg(spec.sarif_out);
        // SARIF's `automationDetails.id`: one analysis per policy, so GitHub keeps one set of
        // alerts for each.
        cmd.arg("--automation-id").arg(format!("cella/{}/", spec.policy));
        let extras = &spec.extras;
        if let Some(name) = extras.artifact_name.and_then(artifact_name_for_scan) {
            cmd.arg("--artifact-name").arg(name);
        }
        if let Some(uri) = extras.information_uri {
            cmd.arg("--information-uri").arg(uri);
        }
        if let Some(options) = extras.options {
            for glob in &options.excludes {
                cmd.arg("--exclude").arg(glob);
            }
            if let Some(vcs) = &options.vcs {
                cmd.arg("--vcs-repo").arg(&vcs.repository_uri);
                if let Some(revision) = &vcs.revision_id {
                    cmd.arg("--vcs-revision").arg(revision);
                }
                if let Some(branch) = &vcs.branch {
                    cmd.arg("--vcs-branch").arg(branch);
                }
            }
        }
        if let Some(baseline) = extras.baseline_file {
            cmd.arg("--baseline").arg(baseline);
        }
        if self.jailed() {
            let jail_id = format!("job-{}", spec.job_id.trim_start_matches("job_"));
            cmd.args(["--jail-id", &jail_id]);
            if let Some(spare) = spec.spare {
                cmd.args(["--jail-prepared", spare]);
            }
        }
        cmd
    }

    /// The command that makes the held spare `spare`, its VMM running as `uid`: its jail made
    /// and its VMM started ahead of the scan that takes it (`cella-vmm scan --jailed
    /// --jail-hold`).
    pub fn hold_command(&self, spare: &str, uid: u32) -> Command {
        let mut cmd = self.base_command(uid, self.vm_cpu_percent);
        cmd.args(["--jail-hold", spare]);
        cmd
    }

    /// Starts the scan.
    pub fn start(&self, spec: &ScanSpec<'_>) -> Result<RunningScan, LaunchError> {
        let mut cmd = self.command(spec);
        cmd.env(cella_vmm::scan::FINGERPRINT_KEY_ENV, spec.fingerprint_key);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        crate::signal::terminate_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| LaunchError::Spawn(self.vmm.clone(), e))?;
        let pid = child.id().unwrap_or(0);
        Ok(RunningScan { child, pid, sarif_out: spec.sarif_out.to_owned() })
    }
}

/// Why the worker stopped a VM before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    ShuttingDown,
    LeaseLost,
}

impl RunningScan {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Asks the VMM to stop (SIGTERM): it stops the vCPU, scrubs, reports and exits.
    pub fn stop(&self) {
        self.stopper().stop();
    }

    /// A handle that can stop the VMM while [`RunningScan::wait`] runs.
    pub fn stopper(&self) -> Stopper {
        Stopper { pid: self.pid }
    }

    /// Waits for the VMM and reads its report. If it has not exited `grace` after `stop`, it
    /// is killed.
    pub async fn wait(mut self) -> Finished {
        let mut stdout = self.child.stdout.take();
        let mut stderr = self.child.stderr.take();
        let read_out = async {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut buf).await;
            }
            buf
        };
        let read_err = async {
            let mut tail = Vec::new();
            let mut chunk = [0u8; 8192];
            if let Some(s) = stderr.as_mut() {
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&chunk[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
            }
            tail
        };
        let (out, err, status) = tokio::join!(read_out, read_err, self.child.wait());
        let report = ScanReport::from_stdout(&String::from_utf8_lossy(&out));
        let stderr = String::from_utf8_lossy(&err[err.len().saturating_sub(STDERR_TAIL)..]).trim().to_owned();
        Finished {
            status: status.ok().and_then(|s| s.code()),
            report,
            stderr,
            sarif: std::fs::read(&self.sarif_out).ok(),
        }
    }
}

/// Stops a running scan's VMM (valid while its `wait` has not returned: the child is not
/// reaped before then, so the pid cannot be reused).
#[derive(Debug, Clone, Copy)]
pub struct Stopper {
    pid: u32,
}

impl Stopper {
    pub fn stop(&self) {
        let _ = crate::signal::terminate(self.pid);
    }
}

/// What a finished `cella-vmm scan` left.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status (`None`: killed by a signal).
    pub status: Option<i32>,
    /// Its `--json` report.
    pub report: Option<ScanReport>,
    /// The tail of its stderr.
    pub stderr: String,
    pub sarif: Option<Vec<u8>>,
}

impl Finished {
    /// The queue outcome. `stopped` says why the worker stopped the VM, if it did.
    pub fn outcome(self, stopped: Option<StopReason>, timeout: Duration) -> Outcome {
        let vm = self.report.as_ref().map(vm_report);
        match stopped {
            Some(StopReason::Cancelled) => return Outcome::Cancelled { vm },
            Some(StopReason::ShuttingDown | StopReason::LeaseLost) => return Outcome::HandedBack { vm },
            None => {}
        }
        let last_line = self.stderr.lines().last().unwrap_or("").to_owned();
        // The reason is stored, audited, answered and printed: whatever the guest (or the
        // artifact, through the guest's messages) put in it, no control character stays raw.
        let failed = |reason: String, retryable: bool| Outcome::Failed {
            reason: crate::error::escape_controls(&reason).into_owned(),
            retryable,
            vm: vm.clone(),
        };
        match self.status {
            Some(0) => {
                let verified = self.report.as_ref().is_some_and(|r| r.scrub.verified_zero);
                match (self.report.and_then(|r| r.summary), self.sarif) {
                    _ if !verified => failed("the VM's memory scrub could not be verified".into(), false),
                    (Some(summary), Some(sarif)) => {
                        Outcome::Succeeded { summary, sarif, vm: vm.unwrap_or_default() }
                    }
                    _ => failed(format!("the scan ended without a summary or SARIF log: {last_line}"), true),
                }
            }
            Some(status::REFUSED) => match self.report.and_then(|r| r.refused) {
                Some(refused) => failed(format!("{} refused: {}", refused.kind, refused.message), false),
                None => failed(format!("artifact refused: {last_line}"), false),
            },
            Some(status::BAD_INPUT) => failed(format!("the scan could not start: {last_line}"), false),
            Some(status::CRASHED) => {
                failed(format!("the scanner VM crashed or broke a device contract: {last_line}"), false)
            }
            Some(status::TIMED_OUT) => {
                failed(format!("the scan ran past its limit of {} s", timeout.as_secs()), false)
            }
            Some(status::SECCOMP) => failed("the VMM was killed by its seccomp filter".into(), false),
            Some(status::STOPPED) => {
                failed("the VMM was stopped by a signal from outside the worker".into(), true)
            }
            Some(code) => failed(format!("the VMM failed (exit status {code}): {last_line}"), true),
            None => failed(format!("the VMM was killed by a signal: {last_line}"), true),
        }
    }
}

/// The parts of the VMM's report kept with the job and in its audit events (exit, timings,
/// scrub evidence).
fn vm_report(report: &ScanReport) -> Value {
    let mut vm = json!({
        "exit": report.exit,
        "launch_us": report.launch_us,
        "run_us": report.run_us,
        "built_ahead": report.built_ahead,
        "scan_ms": report.scan_ms,
        "scrub": report.scrub,
        "artifact_bytes": report.artifact_bytes,
    });
    if let Some(ms) = report.in_vm_ms {
        vm["in_vm_ms"] = json!(ms);
    }
    if let Some(version) = &report.engine_version {
        vm["engine_version"] = json!(version);
    }
    vm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report of a scan that completed with a verified scrub, as `cella-vmm scan --json`
    /// prints it (read back through the same type).
    fn report() -> ScanReport {
        let line = json!({
            "exit": {"kind": "exited", "code": 0}, "launch_us": 5000, "run_us": 9000,
            "built_ahead": false, "scan_ms": 14, "artifact": "/a", "artifact_bytes": 10,
            "scrub": {"bytes": 4096, "pages_verified": 1, "verified_zero": true, "released": true,
                      "blocks_after_release": 0, "mem_bytes": 1024, "ranges": 1, "ms": 0.5},
            "summary": {"findings": 1}, "in_vm_ms": 7.5,
        });
        ScanReport::from_stdout(&line.to_string()).expect("a scan report")
    }

    fn finished(status: i32, report: ScanReport) -> Finished {
        Finished {
            status: Some(status),
            report: Some(report),
            stderr: "cella-vmm scan: boom".into(),
            sarif: Some(b"{}".to_vec()),
        }
    }

    fn refused(kind: &str, message: &str) -> ScanReport {
        let refused = cella_proto::ErrorReport { kind: kind.into(), message: message.into() };
        ScanReport { summary: None, refused: Some(refused), ..report() }
    }

    #[test]
    fn a_verified_scan_succeeds_and_keeps_its_timings_and_scrub_with_the_job() {
        match finished(0, report()).outcome(None, Duration::ZERO) {
            Outcome::Succeeded { summary, vm, .. } => {
                assert_eq!(summary, json!({"findings": 1}));
                assert_eq!((vm["launch_us"].as_u64(), vm["in_vm_ms"].as_f64()), (Some(5000), Some(7.5)));
                assert_eq!(vm["scrub"]["verified_zero"], true);
                assert!(vm.get("engine_version").is_none() && vm.get("artifact").is_none(), "{vm}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_scan_without_verified_scrub_fails() {
        let mut r = report();
        r.scrub.verified_zero = false;
        assert!(matches!(
            finished(0, r).outcome(None, Duration::ZERO),
            Outcome::Failed { retryable: false, .. }
        ));
    }

    #[test]
    fn refused_artifacts_fail_with_the_runners_message() {
        let r = refused("archive", "entry `../x` escapes the archive root");
        match finished(3, r).outcome(None, Duration::ZERO) {
            Outcome::Failed { reason, retryable: false, .. } => {
                assert!(reason.contains("`../x`"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_characters_from_the_guest_never_reach_the_reason_raw() {
        let r = refused("archive\u{7}", "entry `../\u{1b}[2J\u{7}x\r` escapes");
        match finished(3, r).outcome(None, Duration::ZERO) {
            Outcome::Failed { reason, .. } => {
                assert_eq!(reason, "archive\\x07 refused: entry `../\\x1b[2J\\x07x\\r` escapes")
            }
            other => panic!("{other:?}"),
        }
        let mut f = finished(243, report());
        f.stderr = "cella-vmm: \u{1b}]0;title\u{7}boom".into();
        match f.outcome(None, Duration::ZERO) {
            Outcome::Failed { reason, .. } => assert!(!reason.contains(['\u{1b}', '\u{7}']), "{reason:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_scan_carries_its_jobs_name_options_and_baseline() {
        let launcher = Launcher::new(&WorkerConfig { jailed: Some(false), ..WorkerConfig::default() }, 100);
        let options = crate::jobs::JobOptions {
            excludes: vec!["vendor/**".into(), "*.min.js".into()],
            baseline: Some("bl_1".into()),
            vcs: Some(crate::jobs::Vcs {
                repository_uri: "https://example.com/acme/app".into(),
                revision_id: Some("abc123".into()),
                branch: Some("main".into()),
            }),
        };
        let spec = ScanSpec {
            job_id: "job_1",
            artifact: Path::new("/data/artifacts/job_1"),
            policy: "secrets,pii",
            compiled_policy: None,
            sarif_out: Path::new("/s"),
            uid: 64_100,
            spare: None,
            fingerprint_key: "k",
            cpu_percent: 100,
            extras: ScanExtras {
                artifact_name: Some("some/dir/config.env"),
                options: Some(&options),
                baseline_file: Some(Path::new("/work/job_1.1.baseline")),
                information_uri: Some("https://cella.example.com/v1/openapi.json"),
            },
        };
        let args: Vec<String> =
            launcher.command(&spec).as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = args.join(" ");
        for part in [
            "--automation-id cella/secrets,pii/",
            "--artifact-name config.env",
            "--information-uri https://cella.example.com/v1/openapi.json",
            "--exclude vendor/** --exclude *.min.js",
            "--vcs-repo https://example.com/acme/app --vcs-revision abc123 --vcs-branch main",
            "--baseline /work/job_1.1.baseline",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
        assert_eq!(artifact_name_for_scan(".."), None);
        assert_eq!(artifact_name_for_scan("a/"), None);
        assert_eq!(artifact_name_for_scan("x\\app.tar.gz"), Some("app.tar.gz"));
    }

    #[test]
    fn a_jailed_scan_runs_under_its_tenants_cpu_quota_and_its_key_stays_off_the_command_line() {
        let config = WorkerConfig { jailed: Some(true), ..WorkerConfig::default() };
        let launcher = Launcher::new(&config, 100);
        let spec = ScanSpec {
            job_id: "job_1",
            artifact: Path::new("/a"),
            policy: "secrets",
            compiled_policy: None,
            sarif_out: Path::new("/s"),
            uid: 64_100,
            spare: None,
            fingerprint_key: "secret-key-hex",
            cpu_percent: 25,
            extras: ScanExtras::default(),
        };
        let line = |cmd: &Command| {
            cmd.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        };
        let scan = line(&launcher.command(&spec));
        assert!(scan.contains("--jailed --jail-uid 64100 --jail-gid 64100 --cpus 0.25"), "{scan}");
        assert!(!scan.contains("secret-key-hex"), "{scan}");
        let hold = line(&launcher.hold_command("spare-1", 64_101));
        assert!(hold.contains("--cpus 1 "), "held spares are made with the default: {hold}");
        // A policy with tenant packs goes compiled, in a file.
        let with_packs = ScanSpec { compiled_policy: Some(Path::new("/w/p.json")), ..spec };
        let scan = line(&launcher.command(&with_packs));
        assert!(scan.contains("--compiled-policy /w/p.json") && !scan.contains("--policy "), "{scan}");
    }

    #[test]
    fn vmm_failures_are_retried_and_cancels_win() {
        assert!(matches!(
            finished(243, report()).outcome(None, Duration::ZERO),
            Outcome::Failed { retryable: true, .. }
        ));
        assert!(matches!(
            finished(244, report()).outcome(Some(StopReason::Cancelled), Duration::ZERO),
            Outcome::Cancelled { .. }
        ));
    }
}
