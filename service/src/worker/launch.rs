//! Running one scan in a spare VMM ([`cella_host::spare`]): the job's frames are made here
//! (policy, baseline, SARIF context), the artifact and the VM's end of the job channel are
//! handed to the spare with `PUT /vm`, the job is served on the other end, and the outcome is
//! read from typed results: the runner's answer, the VM's final report and the jailer's status.
//! Nothing is parsed from a process's output and no command line carries the job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cella_host::client::ControlError;
use cella_host::job::{JobError, JobFrames, JobReport, ScanOutcome, SerializedPolicy};
use cella_host::scan_report::ScanReport;
use cella_host::spare::{SpareJail, SpareOptions};
use cella_host::{GuestExit, RunReport};
use cella_proto::{Job, SarifContext, BASELINE_ENTRY_LEN};
use serde_json::{json, Value};

use crate::config::WorkerConfig;
use crate::queue::{Lease, Outcome};

use super::template::{Shelf, TemplateRecipe, WorkerTemplate};

/// The memory a jailed VMM may use beyond its guest's.
const VMM_OVERHEAD_MIB: u64 = 32;
/// The most tasks (threads) a jailed VMM may have.
const PIDS_MAX: u32 = 16;

/// Why a scan could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0} does not exist: {1}")]
    Missing(PathBuf, &'static str),
}

/// What every scan of this worker shares: the VMM, its image, memory and time limit, and
/// whether it is jailed.
#[derive(Debug, Clone)]
pub struct Launcher {
    vmm: PathBuf,
    config: WorkerConfig,
    vm_cpu_percent: u32,
    /// Built-in policies serialized once, by their names.
    builtin_policies: Arc<Mutex<HashMap<String, Arc<SerializedPolicy>>>>,
    /// The templates spares are restored from, once made.
    shelf: Arc<Mutex<Shelf>>,
    /// How to make the default template again (when the image changes); held while it is
    /// being made.
    recipe: Arc<Mutex<Option<TemplateRecipe>>>,
}

/// The default `cella-vmm`: next to the running `cella`.
pub fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("cella-vmm")))
        .unwrap_or_else(|| PathBuf::from("cella-vmm"))
}

/// The name the scan gives a tenant-named artifact (format detection, a plain file's path in
/// the results): its last path part, if that is a usable file name; else none.
fn artifact_name_for_scan(name: &str) -> Option<&str> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name).trim();
    let usable = !last.is_empty()
        && last != "."
        && last != ".."
        && last.len() <= 255
        && !last.chars().any(char::is_control);
    usable.then_some(last)
}

impl Launcher {
    /// `vm_cpu_percent`: the CPU quota of a VMM whose tenant has no quota of its own (spares
    /// are made with it).
    pub fn new(config: &WorkerConfig, vm_cpu_percent: u32) -> Self {
        let vmm = config.vmm.clone().unwrap_or_else(default_vmm);
        // The jailer refuses a symlinked exec-file.
        let vmm = std::fs::canonicalize(&vmm).unwrap_or(vmm);
        Self {
            vmm,
            config: config.clone(),
            vm_cpu_percent,
            builtin_policies: Arc::default(),
            shelf: Arc::new(Mutex::new(Shelf::new(config.policy_templates as usize))),
            recipe: Arc::default(),
        }
    }

    /// Makes the worker's default template from `recipe` (blocking), and again by the same
    /// recipe whenever the image changes (see [`Launcher::refresh_template`]).
    pub fn make_template(&self, recipe: TemplateRecipe) {
        let mut held = self.recipe.lock().unwrap_or_else(|p| p.into_inner());
        super::template::make(self, &recipe);
        *held = Some(recipe);
    }

    /// Makes the default template again if the scanner image changed since it was made
    /// (blocking; one caller makes it, the others wait for it).
    pub fn refresh_template(&self) {
        let held = self.recipe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(recipe) = held.as_ref() {
            if self.template().is_some_and(|t| t.is_stale()) {
                tracing::info!("the scanner image changed; making the template again");
                super::template::make(self, recipe);
            }
        }
    }

    /// The worker's templates.
    pub fn shelf(&self) -> std::sync::MutexGuard<'_, Shelf> {
        self.shelf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The default template, if there is one.
    pub fn template(&self) -> Option<WorkerTemplate> {
        self.shelf().default_template().cloned()
    }

    /// The scanner image: the configured one, or the one `scripts/setup.sh` built.
    pub fn scanner_image(&self) -> PathBuf {
        self.config.scanner_image.clone().unwrap_or_else(|| {
            cella_host::images::default_scanner_image().unwrap_or_else(|_| PathBuf::from("cella-scanner"))
        })
    }

    /// The CPU quota spares are made with.
    pub fn default_cpu_percent(&self) -> u32 {
        self.vm_cpu_percent
    }

    /// The `cella-vmm` this launcher runs.
    pub fn vmm(&self) -> &Path {
        &self.vmm
    }

    /// The uid of jailed VMMs of slot 0 (slot N runs as this + N).
    pub fn jail_uid_base(&self) -> u32 {
        self.config.jail_uid_base
    }

    pub fn mem_mib(&self) -> u32 {
        self.config.mem_mib
    }

    pub fn jailed(&self) -> bool {
        self.config.is_jailed()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs.max(1))
    }

    fn jailer(&self) -> PathBuf {
        self.vmm.with_file_name("cella-jailer")
    }

    /// Checks that the binaries exist before any job is leased.
    pub fn check(&self) -> Result<(), LaunchError> {
        if !self.vmm.is_file() {
            return Err(LaunchError::Missing(
                self.vmm.clone(),
                "build it (scripts/setup.sh builds target/release/cella-vmm) or set CELLA_VMM",
            ));
        }
        if self.jailed() && !self.jailer().is_file() {
            return Err(LaunchError::Missing(
                self.jailer(),
                "jailed VMMs need cella-jailer next to cella-vmm; build it, or set CELLA_JAILED=0 (development only)",
            ));
        }
        Ok(())
    }

    /// How to start a spare `id` running as `uid` (when jailed) under `cpu_percent` of a CPU.
    pub fn spare_options(&self, id: &str, uid: u32, cpu_percent: u32) -> SpareOptions {
        let mem_mib = u64::from(self.config.mem_mib);
        let jail = self.jailed().then(|| SpareJail {
            jailer: self.jailer(),
            id: id.to_owned(),
            uid,
            gid: uid,
            chroot_base: None,
            memory_limit_mib: mem_mib + VMM_OVERHEAD_MIB,
            // The VMM's cgroup CPU quota: one tenant's VMs cannot take the others' CPU time.
            cpus: Some(f64::from(cpu_percent.max(1)) / 100.0),
            pids_max: PIDS_MAX,
            from_prepared: None,
        });
        SpareOptions {
            // The caller names the template (and keeps its id with the spare).
            template: None,
            vmm: self.vmm.clone(),
            jail,
            image: self.config.scanner_image.clone(),
            mem_mib,
            timeout: self.timeout(),
            seccomp: None,
            guest_args: Vec::new(),
            run_dir: std::env::temp_dir(),
            // The VMM's and the jailer's messages (and the guest's sanitised console) go into a
            // failed job's reason, escaped, not into this process's log.
            capture_stderr: true,
        }
    }

    /// The serialized policy of built-in packs named in `policy` (`secrets,pii`), made once.
    pub fn builtin_policy(&self, policy: &str) -> Result<Arc<SerializedPolicy>, String> {
        let mut cache = self.builtin_policies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bytes) = cache.get(policy) {
            return Ok(bytes.clone());
        }
        let names: Vec<&str> = policy.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
        let bytes = cella_policies::rules::load_packs(&names)
            .map(|p| Arc::new(SerializedPolicy::new(p.into_bytes())))
            .map_err(|e| crate::error::error_chain(&e))?;
        cache.insert(policy.to_owned(), bytes.clone());
        Ok(bytes)
    }
}

/// The job, policy and baseline frames of `lease`'s scan of an artifact of `artifact_bytes`.
pub fn job_frames(
    lease: &Lease,
    policy: Arc<SerializedPolicy>,
    artifact_bytes: u64,
    information_uri: &str,
) -> JobFrames {
    let options = &lease.options;
    let vcs = options.vcs.as_ref();
    let name = lease.artifact_name.as_deref().and_then(artifact_name_for_scan);
    let job = Job {
        artifact_name: name.unwrap_or(&lease.job_id).to_owned(),
        artifact_size: artifact_bytes,
        fingerprint_key: lease.fingerprint_key.clone(),
        excludes: options.excludes.clone(),
        baseline: lease.baseline.as_ref().map(|b| (b.len() / BASELINE_ENTRY_LEN) as u32),
        sarif: SarifContext {
            information_uri: Some(information_uri.to_owned()),
            // One analysis per policy, so GitHub keeps one set of alerts for each.
            automation_id: Some(format!("cella/{}/", lease.policy)),
            repository_uri: vcs.map(|v| v.repository_uri.clone()),
            revision_id: vcs.and_then(|v| v.revision_id.clone()),
            branch: vcs.and_then(|v| v.branch.clone()),
        },
        policy_preloaded: false,
        license_policy: cella_proto::LicensePolicy {
            deny: options.license_deny.clone(),
            flag: options.license_flag.clone(),
        },
    };
    JobFrames { job, policy, baseline: lease.baseline.clone() }
}

/// Why the worker stopped a VM before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    ShuttingDown,
    LeaseLost,
}

/// What a scan in a spare left.
#[derive(Debug)]
pub struct Finished {
    /// The runner's answer over the job channel.
    pub job: Result<JobReport, JobError>,
    /// The VM's final report (`finish`), or why there is none.
    pub vm: Result<RunReport, ControlError>,
    /// The exit status of the spare's process (`cella-jailer`'s when jailed); `None` if a
    /// signal ended it.
    pub status: Option<i32>,
    /// The tail of its stderr (the VMM's, the jailer's and the guest console's words).
    pub stderr: String,
    /// From the launch to the results, in ms.
    pub scan_ms: u64,
    pub artifact_bytes: u64,
    /// The id of the template the spare's VM was restored from, if it was.
    pub template: Option<String>,
}

impl Finished {
    /// The typed report kept with the job.
    fn report(&self) -> Option<ScanReport> {
        let vm = self.vm.as_ref().ok()?;
        let job = self.job.as_ref().ok();
        Some(ScanReport {
            exit: vm.exit.clone(),
            launch_us: vm.launch_us,
            run_us: vm.run_us,
            built_ahead: vm.built_ahead,
            vcpus: vm.vcpus,
            scan_ms: self.scan_ms,
            scrub: vm.scrub.clone(),
            artifact: String::new(),
            artifact_bytes: self.artifact_bytes,
            in_vm_ms: job.map(|j| j.in_vm.as_secs_f64() * 1e3),
            engine_version: job.map(|j| j.runner_version.clone()),
            template: self.template.clone(),
            policy_preloaded: job.map(|j| j.policy_preloaded),
            sarif: None,
            summary: None,
            fail_on: None,
            refused: None,
            error: None,
        })
    }

    /// The queue outcome. `stopped` says why the worker stopped the VM, if it did.
    pub fn outcome(self, stopped: Option<StopReason>, timeout: Duration) -> Outcome {
        let vm = self.report().as_ref().map(vm_report);
        match stopped {
            Some(StopReason::Cancelled) => return Outcome::Cancelled { vm },
            Some(StopReason::ShuttingDown | StopReason::LeaseLost) => return Outcome::HandedBack { vm },
            None => {}
        }
        // The reason is stored, audited, answered and printed: whatever the guest (or the
        // artifact, through the guest's messages) put in it, no control character stays raw.
        let failed = |reason: String, retryable: bool| Outcome::Failed {
            reason: crate::error::escape_controls(&reason).into_owned(),
            retryable,
            vm: vm.clone(),
        };
        use cella_abi::exit;
        let status = self.status;
        // Reasons are tenant-facing: they name what happened, never a host path or a host
        // process's words (the worker logs those, see `Finished::stderr`).
        let report = match &self.vm {
            Ok(report) => report,
            Err(_) => {
                return match status {
                    Some(s) if s == i32::from(exit::VMM_KILLED_BY_SECCOMP) => {
                        failed("the VMM was killed by its seccomp filter".into(), false)
                    }
                    Some(s) if s == i32::from(exit::VMM_KILLED) => {
                        failed("the VMM was killed by a signal (its memory limit?)".into(), true)
                    }
                    Some(s) if s == i32::from(exit::JAIL_FAILED) => {
                        failed("the VMM's jail could not be made".into(), true)
                    }
                    Some(s) if s == i32::from(exit::STOPPED) => {
                        failed("the VMM was stopped by a signal from outside the worker".into(), true)
                    }
                    None => failed("the VMM was killed by a signal".into(), true),
                    Some(_) => failed("the VMM ended without a report".into(), true),
                };
            }
        };
        if status == Some(i32::from(exit::CLEANUP_FAILED)) {
            return failed("the VM's jail could not be removed completely".into(), true);
        }
        if !report.scrub.verified_zero {
            return failed("the VM's memory scrub could not be verified".into(), false);
        }
        match self.job {
            Ok(job) => match job.outcome {
                ScanOutcome::Completed { sarif, summary } => {
                    match serde_json::from_slice::<Value>(&summary) {
                        Ok(mut summary) => {
                            summary["duration_ms"] = json!(self.scan_ms);
                            Outcome::Succeeded { summary, sarif, vm: vm.unwrap_or_default() }
                        }
                        Err(e) => failed(format!("the runner sent an unreadable summary: {e}"), true),
                    }
                }
                ScanOutcome::Refused(refused) => {
                    failed(format!("{} refused: {}", refused.kind, refused.message), false)
                }
            },
            Err(e) => {
                let why = crate::error::error_chain(&e);
                match &report.exit {
                    GuestExit::Crashed { .. } | GuestExit::DeviceError { .. } => {
                        failed(format!("the scanner VM crashed or broke a device contract: {why}"), false)
                    }
                    GuestExit::TimedOut { .. } => {
                        failed(format!("the scan ran past its limit of {} s", timeout.as_secs()), false)
                    }
                    GuestExit::Stopped => {
                        failed("the VMM was stopped by a signal from outside the worker".into(), true)
                    }
                    GuestExit::VmmFailed { error } => failed(format!("the VMM failed: {error}"), true),
                    GuestExit::Exited { .. } => {
                        failed(format!("the scan ended without a summary or SARIF log: {why}"), true)
                    }
                }
            }
        }
    }
}

/// The parts of the VM's report kept with the job and in its audit events (exit, timings,
/// scrub evidence).
fn vm_report(report: &ScanReport) -> Value {
    let mut vm = json!({
        "exit": report.exit,
        "launch_us": report.launch_us,
        "run_us": report.run_us,
        "built_ahead": report.built_ahead,
        "vcpus": report.vcpus,
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
    if let Some(template) = &report.template {
        vm["template"] = json!(template);
    }
    if let Some(preloaded) = report.policy_preloaded {
        vm["policy_preloaded"] = json!(preloaded);
    }
    vm
}

#[cfg(test)]
mod tests {
    use super::*;
    use cella_host::ScrubReport;

    fn run_report(exit: GuestExit, verified: bool) -> RunReport {
        RunReport {
            exit,
            launch_us: 5000,
            run_us: 9000,
            exits: 3,
            scrub: ScrubReport {
                bytes: 4096,
                pages_verified: 1,
                verified_zero: verified,
                released: true,
                blocks_after_release: 0,
                mem_bytes: 1024,
                ranges: 1,
                ms: 0.5,
            },
            console: Default::default(),
            mem_mib: 128,
            built_ahead: true,
            vcpus: 1,
        }
    }

    fn job(outcome: ScanOutcome) -> Result<JobReport, JobError> {
        Ok(JobReport {
            outcome,
            in_vm: Duration::from_micros(7500),
            runner_version: "0.1.0".into(),
            policy_preloaded: false,
        })
    }

    fn completed() -> ScanOutcome {
        ScanOutcome::Completed { sarif: b"{}".to_vec(), summary: br#"{"findings": 1}"#.to_vec() }
    }

    fn finished(
        job: Result<JobReport, JobError>,
        vm: Result<RunReport, ControlError>,
        status: i32,
    ) -> Finished {
        Finished {
            job,
            vm,
            status: Some(status),
            stderr: String::new(),
            scan_ms: 14,
            artifact_bytes: 10,
            template: None,
        }
    }

    fn reason(outcome: Outcome) -> (String, bool) {
        match outcome {
            Outcome::Failed { reason, retryable, .. } => (reason, retryable),
            other => panic!("{other:?}"),
        }
    }

    fn gone() -> ControlError {
        ControlError::Io { what: "PUT /actions".into(), source: std::io::ErrorKind::ConnectionReset.into() }
    }

    #[test]
    fn a_verified_scan_succeeds_and_keeps_its_timings_and_scrub_with_the_job() {
        let done = finished(job(completed()), Ok(run_report(GuestExit::Exited { code: 0 }, true)), 0);
        match done.outcome(None, Duration::ZERO) {
            Outcome::Succeeded { summary, vm, .. } => {
                assert_eq!(summary, json!({"findings": 1, "duration_ms": 14}));
                assert_eq!((vm["launch_us"].as_u64(), vm["in_vm_ms"].as_f64()), (Some(5000), Some(7.5)));
                assert_eq!(
                    (vm["scrub"]["verified_zero"].as_bool(), vm["built_ahead"].as_bool()),
                    (Some(true), Some(true))
                );
                assert_eq!(vm["engine_version"], "0.1.0");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_scan_without_verified_scrub_fails_for_good() {
        let done = finished(job(completed()), Ok(run_report(GuestExit::Exited { code: 0 }, false)), 0);
        assert_eq!(
            reason(done.outcome(None, Duration::ZERO)),
            ("the VM's memory scrub could not be verified".into(), false)
        );
    }

    #[test]
    fn refused_artifacts_fail_with_the_runners_words_escaped() {
        let refused = cella_proto::ErrorReport {
            kind: "archive\u{7}".into(),
            message: "entry `../\u{1b}[2J\u{7}x\r` escapes".into(),
        };
        let done = finished(
            job(ScanOutcome::Refused(refused)),
            Ok(run_report(GuestExit::Exited { code: 0 }, true)),
            0,
        );
        let (reason, retryable) = reason(done.outcome(None, Duration::ZERO));
        assert_eq!(reason, "archive\\x07 refused: entry `../\\x1b[2J\\x07x\\r` escapes");
        assert!(!retryable);
    }

    #[test]
    fn a_vm_that_ends_without_results_is_named_by_how_it_ended() {
        let no_result = || Err(JobError::VmGone { stage: "said hello" });
        let crashed = GuestExit::Crashed { reason: "triple fault".into(), rip: 0 };
        let (r, retry) =
            reason(finished(no_result(), Ok(run_report(crashed, true)), 0).outcome(None, Duration::ZERO));
        assert!(r.starts_with("the scanner VM crashed") && !retry, "{r}");
        let timed_out = GuestExit::TimedOut { timeout_ms: 3000 };
        let (r, retry) = reason(
            finished(no_result(), Ok(run_report(timed_out, true)), 0).outcome(None, Duration::from_secs(3)),
        );
        assert_eq!((r.as_str(), retry), ("the scan ran past its limit of 3 s", false));
        let (r, retry) = reason(
            finished(no_result(), Ok(run_report(GuestExit::Exited { code: 0 }, true)), 0)
                .outcome(None, Duration::ZERO),
        );
        assert!(r.starts_with("the scan ended without a summary") && retry, "{r}");
    }

    #[test]
    fn a_vmm_gone_without_a_report_is_named_by_the_jailers_status() {
        let seccomp =
            finished(job(completed()), Err(gone()), i32::from(cella_abi::exit::VMM_KILLED_BY_SECCOMP));
        assert_eq!(
            reason(seccomp.outcome(None, Duration::ZERO)),
            ("the VMM was killed by its seccomp filter".into(), false)
        );
        let cleanup = finished(
            job(completed()),
            Ok(run_report(GuestExit::Exited { code: 0 }, true)),
            i32::from(cella_abi::exit::CLEANUP_FAILED),
        );
        let (r, retry) = reason(cleanup.outcome(None, Duration::ZERO));
        assert!(r.contains("could not be removed") && retry, "{r}");
        let killed = Finished {
            status: None,
            ..finished(Err(JobError::VmGone { stage: "said hello" }), Err(gone()), 0)
        };
        let (r, retry) = reason(killed.outcome(None, Duration::ZERO));
        assert!(r.starts_with("the VMM was killed by a signal") && retry, "{r}");
    }

    #[test]
    fn what_the_jailer_said_stays_out_of_the_tenants_reason() {
        let mut failed = finished(job(completed()), Err(gone()), i32::from(cella_abi::exit::JAIL_FAILED));
        failed.stderr =
            "cella-jailer: jail x failed: step `mknod` failed on /dev/shm/cella-jailer/x\n".into();
        let (r, retry) = reason(failed.outcome(None, Duration::ZERO));
        assert_eq!((r.as_str(), retry), ("the VMM's jail could not be made", true));
        let mut gone_quiet = finished(job(completed()), Err(gone()), 9);
        gone_quiet.stderr = "/tmp/spare-1-2/api.sock: connection refused".into();
        let (r, _) = reason(gone_quiet.outcome(None, Duration::ZERO));
        assert_eq!(r, "the VMM ended without a report");
    }

    #[test]
    fn cancels_and_hand_backs_win() {
        let done = || finished(job(completed()), Ok(run_report(GuestExit::Stopped, true)), 0);
        assert!(matches!(
            done().outcome(Some(StopReason::Cancelled), Duration::ZERO),
            Outcome::Cancelled { vm: Some(_) }
        ));
        assert!(matches!(
            done().outcome(Some(StopReason::LeaseLost), Duration::ZERO),
            Outcome::HandedBack { .. }
        ));
    }

    #[test]
    fn a_jailed_spare_runs_under_its_tenants_cpu_quota_with_the_image_and_limits() {
        let config = WorkerConfig { jailed: Some(true), ..WorkerConfig::default() };
        let launcher = Launcher::new(&config, 100);
        let options = launcher.spare_options("spare-1", 64_100, 25);
        let jail = options.jail.expect("jailed");
        assert_eq!((jail.uid, jail.gid, jail.cpus), (64_100, 64_100, Some(0.25)));
        assert_eq!(jail.memory_limit_mib, u64::from(config.mem_mib) + VMM_OVERHEAD_MIB);
        let unjailed = Launcher::new(&WorkerConfig { jailed: Some(false), ..WorkerConfig::default() }, 100);
        assert!(unjailed.spare_options("s", 1, 100).jail.is_none());
    }

    #[test]
    fn artifact_names_are_their_last_usable_part() {
        assert_eq!(artifact_name_for_scan("some/dir/config.env"), Some("config.env"));
        assert_eq!(artifact_name_for_scan(".."), None);
        assert_eq!(artifact_name_for_scan("a/"), None);
        assert_eq!(artifact_name_for_scan("x\\app.tar.gz"), Some("app.tar.gz"));
    }
}
