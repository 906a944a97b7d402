//! One artifact scanned in one microVM: the artifact attached read-only as virtio-blk, the job
//! and the compiled policy handed over vsock by a [`JobServer`], results collected, VM torn
//! down and scrubbed. Used by `cella-vmm scan` and its benchmark.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_proto::{Job, SarifContext, BASELINE_ENTRY_LEN};

use std::os::unix::net::UnixStream;

use crate::builder::HostEnds;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::vsock::Vsock;
use crate::job::{JobError, JobFrames, JobReport, SerializedPolicy};
use crate::rpc_interface::Prepared;
use crate::template::{TemplateError, TemplateVm};
use crate::{BuildError, Prebuilt, RunError, RunReport, VmConfig};

/// What to scan and how.
#[derive(Clone, Debug)]
pub struct ScanRequest {
    pub image: PathBuf,
    /// Restore the VM from this template (`cella-vmm template`) instead of booting `image`.
    pub template: Option<PathBuf>,
    pub artifact: PathBuf,
    /// The serialized policy (from `cella_policies::rules`).
    pub policy: Vec<u8>,
    pub mem_mib: u64,
    pub timeout: Duration,
    pub launch_start: Instant,
    /// Set to stop the VM from outside (it is still scrubbed, and ends as `stopped`).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The key of the findings' fingerprints, 64 hex digits (see [`fingerprint_key`]).
    pub fingerprint_key: String,
    /// What the job says beyond the artifact and the policy.
    pub options: JobOptions,
}

/// The parts of a job that shape its results rather than its VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// The artifact's name for the runner (format detection, a plain file's path in the
    /// results); the file's own name ([`artifact_name`]) if `None`.
    pub artifact_name: Option<String>,
    /// Gitignore-like globs of files not to scan (checked with `cella_scan::glob_to_regex`).
    pub excludes: Vec<String>,
    /// The baseline frame's payload: `cellaLocation/v1` fingerprints, 32 bytes each (see
    /// `cella_policies::baseline::Baseline::wire_payload`).
    pub baseline: Option<Vec<u8>>,
    /// What the SARIF run says about itself.
    pub sarif: SarifContext,
    /// Licenses reported at `error` (denied) or `warning` (flagged).
    pub license_policy: cella_proto::LicensePolicy,
}

impl ScanRequest {
    /// The job message for this request's artifact of `artifact_bytes` bytes.
    pub fn job(&self, artifact_bytes: u64) -> Job {
        let o = &self.options;
        Job {
            artifact_name: o.artifact_name.clone().unwrap_or_else(|| artifact_name(&self.artifact)),
            artifact_size: artifact_bytes,
            fingerprint_key: self.fingerprint_key.clone(),
            excludes: o.excludes.clone(),
            baseline: o.baseline.as_ref().map(|b| (b.len() / BASELINE_ENTRY_LEN) as u32),
            sarif: o.sarif.clone(),
            policy_preloaded: false,
            license_policy: o.license_policy.clone(),
        }
    }
}

/// The environment variable that carries a scan's fingerprint key (64 hex digits): the
/// service sets the tenant's. Passed in the environment, which only the process's owner can
/// read, rather than on the command line, which every local user can.
pub const FINGERPRINT_KEY_ENV: &str = "CELLA_FINGERPRINT_KEY";

/// The fingerprint key for this scan: [`FINGERPRINT_KEY_ENV`] if it is set, else a fresh
/// random key (fingerprints then deduplicate findings within this scan only).
pub fn fingerprint_key() -> Result<String, String> {
    match std::env::var(FINGERPRINT_KEY_ENV) {
        Ok(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        Ok(_) => Err(format!("{FINGERPRINT_KEY_ENV} must be 64 hex digits (a 32-byte key)")),
        Err(_) => {
            let mut key = [0u8; 32];
            // SAFETY: getrandom writes at most `key.len()` bytes into the buffer it is given,
            // which is valid for writes of that length.
            let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
            if n != key.len() as isize {
                return Err(format!(
                    "cannot read random bytes for the fingerprint key: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(key.iter().map(|b| format!("{b:02x}")).collect())
        }
    }
}

/// Why the scan did not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read artifact {path}")]
    Artifact { path: PathBuf, source: std::io::Error },
    #[error("artifact {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot set up the job channel")]
    Job(#[from] JobError),
    #[error("cannot build the VM")]
    Build(#[from] BuildError),
    #[error("cannot restore the VM from its template")]
    Template(#[from] TemplateError),
    #[error("the VM failed")]
    Run(#[from] RunError),
}

impl ScanError {
    /// Whether the request was at fault.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ScanError::Artifact { .. } | ScanError::NotAFile { .. } => true,
            ScanError::Build(e) => e.is_bad_input(),
            ScanError::Template(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// How a scan went: the VM's report, and the job's result (or why there is none).
#[derive(Debug)]
pub struct ScanRun {
    pub vm: RunReport,
    pub job: Result<JobReport, JobError>,
    /// Artifact size in bytes.
    pub artifact_bytes: u64,
    /// From starting the VM to having the results, in ms.
    pub scan_ms: u64,
}

/// Checks that the artifact is a regular file; returns its size in bytes.
pub fn check_artifact(path: &Path) -> Result<u64, ScanError> {
    let meta =
        std::fs::metadata(path).map_err(|source| ScanError::Artifact { path: path.to_owned(), source })?;
    if !meta.is_file() {
        return Err(ScanError::NotAFile { path: path.to_owned() });
    }
    Ok(meta.len())
}

/// The artifact's file name, which the runner uses for format detection and SARIF paths unless
/// the job names it otherwise ([`JobOptions::artifact_name`]).
pub fn artifact_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "artifact".into())
}

/// Runs one scan to its end; console output of the runner goes to `console`. The job channel is
/// a socket pair: the VM's vsock device gets one end for the runner's connection to
/// [`cella_proto::JOB_PORT`], a thread here serves the job on the other; no socket file.
pub fn run(request: &ScanRequest, console: Box<dyn std::io::Write + Send>) -> Result<ScanRun, ScanError> {
    let artifact = &request.artifact;
    let artifact_bytes = check_artifact(artifact)?;
    let config = VmConfig {
        mem_mib: request.mem_mib,
        timeout: Some(request.timeout),
        launch_start: request.launch_start,
        cancel: request.cancel.clone(),
        ..VmConfig::new(request.image.clone(), vec!["scan".into()])
    };
    let prepared = match &request.template {
        Some(dir) => Prepared::Template(Box::new(TemplateVm::load(dir)?)),
        None => Prepared::Cold(Box::new(Prebuilt::new(&config)?)),
    };
    let (host_end, vm_end) =
        UnixStream::pair().map_err(|source| JobError::Io { stage: "connected", source })?;
    let disk =
        Block::open(artifact).map_err(|source| ScanError::Artifact { path: artifact.clone(), source })?;
    let vsock = Vsock::with_channels(vec![(cella_proto::JOB_PORT, vm_end)])
        .map_err(|source| JobError::Io { stage: "connected", source })?;
    let ends = HostEnds { disk: Some(disk), vsock: Some(vsock) };
    let vm = match prepared {
        Prepared::Cold(prebuilt) => prebuilt.finish_with(&config, ends, console)?,
        Prepared::Template(template) => template.finish(&config, ends, console)?,
    };
    let job = request.job(artifact_bytes);
    let started = Instant::now();
    let frames = JobFrames {
        job,
        policy: Arc::new(SerializedPolicy::new(request.policy.clone())),
        baseline: request.options.baseline.clone(),
    };
    let timeout = request.timeout;
    let serving = std::thread::spawn(move || crate::job::serve_channel(host_end, &frames, timeout));
    // The VM's end of the channel closes with its devices when the run ends, which ends the
    // serving thread's wait.
    let run = vm.run();
    let job = serving.join().unwrap_or(Err(JobError::VmGone { stage: "answered" }));
    let scan_ms = started.elapsed().as_millis() as u64;
    Ok(ScanRun { vm: run?, job, artifact_bytes, scan_ms })
}
