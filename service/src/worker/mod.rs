//! `cella worker`: leases jobs from PostgreSQL, runs each in its own microVM (through
//! `cella-jailer` when jailed), heartbeats the lease, and records the result, the scrub evidence
//! and an audit event for every transition. SIGTERM drains: no new leases, running jobs get a
//! grace period to finish, then their VMs are stopped and the jobs handed back.

pub mod launch;
pub mod registry;
pub mod spare_pool;
pub mod supervise;
pub mod template;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::{error_chain, QuietLog, ServiceError};
use crate::jobs::{JobState, CHANNEL_CANCEL, CHANNEL_JOBS};
use crate::metrics::Metrics;
use crate::queue::{self, Lease, Outcome, QueueError};
use cella_host::job::SerializedPolicy;
use launch::{Finished, Launcher};
use spare_pool::SparePool;

/// How often a worker heartbeats its own row (and learns whether to drain).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// The polling fallback when no NOTIFY arrives.
const POLL: Duration = Duration::from_secs(1);
/// How long results are retried while the database is away before they are given up.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(120);
/// What failed jobs' VMMs said reaches the log at 20 lines at once, then one a second.
static VMM_WORDS: crate::logging::GuestWords = crate::logging::GuestWords::new(20, Duration::from_secs(1));

/// Everything a worker needs.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub id: String,
    pub concurrency: u32,
    pub lease_for: Duration,
    pub timeout: Duration,
    /// How long running jobs may take to finish after SIGTERM before they are handed back.
    pub drain_grace: Duration,
    pub launcher: Launcher,
    /// One spare VMM per slot, started ahead.
    pub spares: Arc<SparePool>,
    pub data_dir: DataDir,
    pub metrics: Arc<Metrics>,
    /// What SARIF logs name as the tool's `informationUri` (see [`Config::information_uri`]).
    pub information_uri: String,
    /// The built-in packs of jobs that name none: the worker's template holds their engine.
    pub default_policy: String,
    /// Whether spares are restored from a template (`worker.templates`).
    pub templates: bool,
}

type CancelMap = Arc<Mutex<HashMap<String, watch::Sender<bool>>>>;

impl Worker {
    pub fn new(pool: PgPool, config: &Config, data_dir: DataDir, metrics: Arc<Metrics>) -> Self {
        let launcher = Launcher::new(&config.worker, config.quotas.vm_cpu_percent);
        Self {
            pool,
            id: crate::ids::new_id("worker"),
            concurrency: config.worker.concurrency.max(1),
            lease_for: config.jobs.lease(),
            timeout: Duration::from_secs(config.worker.timeout_secs),
            drain_grace: Duration::from_secs(config.worker.drain_secs),
            spares: SparePool::new(launcher.clone(), data_dir.spares()),
            launcher,
            data_dir,
            metrics,
            information_uri: config.information_uri(),
            default_policy: config.jobs.default_policy.clone(),
            templates: config.worker.templates,
        }
    }

    /// Makes the template the slots' spares are restored from; without one they boot the image.
    async fn make_template(&self) {
        let recipe = template::TemplateRecipe {
            policy: self.default_policy.clone(),
            spares_dir: self.data_dir.spares(),
            uid: self.spares.uid(0),
        };
        let launcher = self.launcher.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || launcher.make_template(recipe)).await {
            tracing::error!(error = %e, "no template (its maker panicked); spares boot the scanner image");
        }
    }

    /// Runs until `shutdown` turns true, then drains.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServiceError> {
        let hostname =
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
        registry::register(&self.pool, &self.id, &hostname, std::process::id(), self.concurrency).await?;
        tracing::info!(
            worker = %self.id,
            host = %hostname,
            slots = self.concurrency,
            vmm = %self.launcher.vmm().display(),
            jailed = self.launcher.jailed(),
            "worker started"
        );
        // SARIF logs a killed worker left (of job attempts no worker runs any more).
        match crate::janitor::sweep(&self.pool, &self.data_dir, crate::janitor::Moment::Running).await {
            Ok(s) if s.work > 0 => {
                tracing::info!(files = s.work, "removed SARIF logs left by an earlier run")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dir = %self.data_dir.work().display(), error = %e, "cannot sweep the work folder")
            }
        }
        self.spares.sweep_orphans().await;
        if self.templates {
            self.make_template().await;
        }
        for slot in 0..self.concurrency {
            self.spares.refill(slot);
        }
        let wake = Arc::new(Notify::new());
        let cancels: CancelMap = Arc::default();
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone(), cancels.clone()));
        let (hand_back_tx, hand_back_rx) = watch::channel(false);
        let me = Arc::new(self);
        let mut tasks = JoinSet::new();
        let mut free: Vec<u32> = (0..me.concurrency).rev().collect();
        let mut draining = false;
        let mut quiet = QuietLog::new("cella worker");
        let mut last_beat = Instant::now() - HEARTBEAT;
        let mut last_rescue = Instant::now() - me.lease_for;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_beat.elapsed() >= HEARTBEAT {
                match registry::heartbeat(&me.pool, &me.id, tasks.len()).await {
                    Ok(d) => {
                        if d != draining {
                            tracing::info!(
                                worker = %me.id,
                                "{}",
                                if d { "draining" } else { "taking jobs again" }
                            );
                        }
                        draining = d;
                    }
                    Err(e) => quiet.log("heartbeat", &e),
                }
                last_beat = Instant::now();
            }
            if last_rescue.elapsed() >= me.lease_for / 2 {
                match queue::rescue_expired(&me.pool, &me.id).await {
                    Ok(n) if n > 0 => tracing::warn!(jobs = n, "took back jobs whose lease expired"),
                    Ok(_) => {}
                    Err(e) => quiet.log("rescuing expired leases", &e),
                }
                last_rescue = Instant::now();
            }
            while !draining && !free.is_empty() {
                match queue::lease(&me.pool, &me.id, me.lease_for).await {
                    Ok(Some(lease)) => {
                        let slot = free.pop().unwrap_or(0);
                        let (cancel_tx, cancel_rx) = watch::channel(false);
                        cancels
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(lease.job_id.clone(), cancel_tx);
                        let me = me.clone();
                        let cancels = cancels.clone();
                        let hand_back = hand_back_rx.clone();
                        tasks.spawn(async move {
                            me.run_job(&lease, slot, cancel_rx, hand_back).await;
                            cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease.job_id);
                            slot
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        quiet.log("leasing", &e);
                        break;
                    }
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                Some(done) = tasks.join_next() => {
                    if let Ok(slot) = done { free.push(slot) }
                }
                _ = shutdown.changed() => {}
            }
        }
        // Drain: running jobs get a grace period, then are stopped and handed back.
        if !tasks.is_empty() {
            tracing::info!(
                running = tasks.len(),
                grace_secs = me.drain_grace.as_secs(),
                "draining the running jobs"
            );
        }
        let deadline = tokio::time::Instant::now() + me.drain_grace;
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = hand_back_tx.send(true);
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        listener.abort();
        me.spares.close().await;
        // No spare reads the templates any more: their folders go with the shelf.
        me.launcher.shelf().close();
        registry::stopped(&me.pool, &me.id).await?;
        tracing::info!(worker = %me.id, "worker stopped");
        Ok(())
    }

    /// Runs one leased job to a recorded result.
    async fn run_job(
        &self,
        lease: &Lease,
        slot: u32,
        mut cancel: watch::Receiver<bool>,
        mut hand_back: watch::Receiver<bool>,
    ) {
        let started = Instant::now();
        tracing::info!(
            job = %lease.job_id,
            tenant = %lease.tenant_id,
            attempt = lease.attempt,
            max_attempts = lease.max_attempts,
            slot,
            "job running"
        );
        let artifact = self.data_dir.artifact(&lease.job_id);
        let outcome = match self.policy(lease).await {
            Err(failed) => failed,
            Ok(policy) => match std::fs::File::open(&artifact) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Failed {
                    reason: format!("the artifact of job {} is missing on this host", lease.job_id),
                    retryable: false,
                    vm: None,
                },
                Err(e) => Outcome::Failed {
                    reason: format!("cannot open the artifact of job {}: {e}", lease.job_id),
                    retryable: true,
                    vm: None,
                },
                Ok(file) => self.scan(lease, slot, file, policy, &mut cancel, &mut hand_back).await,
            },
        };
        if let Outcome::Succeeded { vm, .. } | Outcome::Failed { vm: Some(vm), .. } = &outcome {
            if let Some(us) = vm["launch_us"].as_f64() {
                self.metrics.vm_launch.observe(us / 1e6);
            }
            if let Some(ms) = vm["scrub"]["ms"].as_f64() {
                self.metrics.scrub.observe(ms / 1e3);
            }
        }
        let state = self.record(lease, &outcome).await;
        self.metrics.job_run.observe(started.elapsed().as_secs_f64());
        if let Some(state) = state {
            log_state_change(lease, state, &outcome, started.elapsed());
        }
        if state.is_some_and(JobState::is_final) {
            let _ = std::fs::remove_file(&artifact);
        }
    }

    /// The job's serialized policy: its built-in packs by name, or, when it has tenant packs,
    /// compiled from the versions it recorded. A pack version deleted since the job was queued
    /// fails the job for good, the database being away for now.
    async fn policy(&self, lease: &Lease) -> Result<Arc<SerializedPolicy>, Outcome> {
        let failed = |reason: String, retryable: bool| Outcome::Failed { reason, retryable, vm: None };
        match crate::packs::compiled_policy(&self.pool, &lease.tenant_id, &lease.policy).await {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => self.launcher.builtin_policy(&lease.policy).map_err(|e| failed(e, false)),
            Err(e) => Err(failed(error_chain(&e), e.retryable())),
        }
    }

    /// Runs the scan in the slot's spare (or one made for it) while heartbeating the lease;
    /// stops the VM on cancel, lost lease or hand-back.
    async fn scan(
        &self,
        lease: &Lease,
        slot: u32,
        artifact: std::fs::File,
        policy: Arc<SerializedPolicy>,
        cancel: &mut watch::Receiver<bool>,
        hand_back: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let cpu_percent = lease.vm_cpu_percent.unwrap_or(self.launcher.default_cpu_percent());
        let key = template::PolicyKey::of_job(&lease.tenant_id, &lease.policy, &policy);
        let taken = self.spares.take(slot, cpu_percent, &key).await;
        self.spares.refill(slot);
        if self.templates {
            self.spares.want_template(&key, &lease.policy, &policy);
        }
        // A reason is tenant-facing: what went wrong on the host is logged here, not told.
        let host_failure = |what: &str, e: &dyn std::error::Error| {
            tracing::error!(job = %lease.job_id, error = %error_chain(e), "{what}");
            Outcome::Failed {
                reason: format!("{what} (a host problem; the job is retried)"),
                retryable: true,
                vm: None,
            }
        };
        let (spare, template) = match taken {
            Ok((taken, _)) => (taken.spare, taken.template.map(|t| t.id)),
            Err(e) => return host_failure("the scan's VM could not be started", &e),
        };
        let artifact_bytes = artifact.metadata().map(|m| m.len()).unwrap_or(0);
        let frames = launch::job_frames(lease, policy, artifact_bytes, &self.information_uri);
        let api = spare.api().clone();
        let signals = spare.signals();
        let jailed = self.launcher.jailed();
        if let Err(e) =
            queue::vm_started(&self.pool, lease, spare.pid(), self.launcher.mem_mib(), jailed).await
        {
            tracing::warn!(job = %lease.job_id, error = %e, "cannot record the VM's start; handing the job back");
            drop(artifact);
            let _ = tokio::task::spawn_blocking(move || drop(spare)).await;
            return Outcome::HandedBack { vm: None };
        }
        let run = tokio::task::spawn_blocking(move || {
            let launched = Instant::now();
            let run = spare.run_job(&artifact, &frames);
            let scan_ms = launched.elapsed().as_millis() as u64;
            // A spare that refused its launch is stopped (dropping it does); one that ran ends
            // once it has answered `finish`.
            let (status, stderr) = match &run {
                Ok(_) => spare.wait().map(|end| (end.status.code(), end.stderr)).unwrap_or_default(),
                Err(_) => (None, String::new()),
            };
            (run, status, stderr, scan_ms)
        });
        let vm = SpareHandle { api, signals, job_id: lease.job_id.clone() };
        let keeper = JobLease { pool: &self.pool, lease, lease_for: self.lease_for };
        let beat = self.lease_for / 3;
        let supervised =
            supervise::supervise(run, &vm, &keeper, cancel, hand_back, beat, self.launcher.timeout()).await;
        let (run, status, stderr, scan_ms) =
            supervised.result.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let (stopped, killed) = (supervised.stopped, supervised.killed);
        let failed_words = (!stderr.is_empty()).then(|| stderr.clone());
        let finished = match run {
            Ok(run) => {
                Finished { job: run.job, vm: run.vm, status, stderr, scan_ms, artifact_bytes, template }
            }
            Err(e) => return host_failure("the scan's VM refused its launch", &e),
        };
        let outcome = if killed {
            let vm = None;
            Outcome::Failed {
                reason: "the scan's VM did not end within its time limit and was killed".into(),
                retryable: false,
                vm,
            }
        } else {
            finished.outcome(stopped, self.launcher.timeout())
        };
        if let (Outcome::Failed { .. }, Some(words)) = (&outcome, failed_words) {
            // The tail of what the VMM, the jailer and the guest's console said: escaped, and
            // rate-limited (a guest chooses these words, and can fail on purpose job after job).
            for line in words.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev() {
                if let Some(left_out) = VMM_WORDS.admit(Instant::now()) {
                    let said = crate::error::escape_controls(line);
                    tracing::warn!(job = %lease.job_id, said = %said, left_out, "the failed job's VMM said");
                }
            }
        }
        outcome
    }

    /// Records the outcome, retrying while the database is away. Returns the job's new state.
    async fn record(&self, lease: &Lease, outcome: &Outcome) -> Option<JobState> {
        let give_up = Instant::now() + FINISH_RETRY_FOR;
        let mut quiet = QuietLog::new("cella worker");
        loop {
            match queue::finish(&self.pool, lease, outcome).await {
                Ok(state) => return Some(state),
                Err(QueueError::LeaseLost(..)) => {
                    tracing::warn!(
                        job = %lease.job_id,
                        attempt = lease.attempt,
                        "lease lost; the attempt's result is discarded"
                    );
                    return None;
                }
                Err(QueueError::Service(e)) if Instant::now() < give_up => {
                    quiet.log(&format!("recording job {}", lease.job_id), &e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(QueueError::Service(e)) => {
                    tracing::error!(job = %lease.job_id, error = %e, "giving up recording the job's result");
                    return None;
                }
            }
        }
    }
}

/// LISTENs for new jobs (wakes the lease loop) and cancellations (stops that job's VM).
async fn listen(pool: PgPool, wake: Arc<Notify>, cancels: CancelMap) {
    let gap_wake = wake.clone();
    crate::notify::listen_forever(
        pool,
        "cella worker",
        &[CHANNEL_JOBS, CHANNEL_CANCEL],
        |n| {
            if n.channel() == CHANNEL_CANCEL {
                if let Some(tx) = cancels.lock().unwrap_or_else(|p| p.into_inner()).get(n.payload()) {
                    let _ = tx.send(true);
                }
            } else {
                wake.notify_one();
            }
        },
        // Missed notifications: the lease loop polls anyway; heartbeats carry cancellations.
        || gap_wake.notify_one(),
    )
    .await;
}

/// A job's spare VMM, as its control loop reaches it.
struct SpareHandle {
    api: cella_host::client::ControlClient,
    signals: cella_host::spare::SpareSignals,
    job_id: String,
}

impl supervise::VmHandle for SpareHandle {
    /// The VM stops and is scrubbed; the job channel then ends, and `finish` returns the
    /// stopped VM's report. A VM not started yet is stopped by a signal (through a pidfd: never
    /// a recycled pid).
    fn request_stop(&self) {
        let (api, signals) = (self.api.clone(), self.signals.clone());
        tokio::task::spawn_blocking(move || {
            if api.stop().is_err() {
                signals.send(libc::SIGTERM);
            }
        });
    }

    fn kill(&self) {
        tracing::warn!(job = %self.job_id, "the job's VMM did not end after its time limit; killing it");
        self.signals.send(libc::SIGKILL);
    }
}

/// A job's lease in the queue, as its control loop renews it.
struct JobLease<'a> {
    pool: &'a PgPool,
    lease: &'a Lease,
    lease_for: Duration,
}

impl supervise::LeaseKeeper for JobLease<'_> {
    async fn renew(&self) -> supervise::Beat {
        use supervise::Beat;
        match queue::heartbeat(self.pool, self.lease, self.lease_for).await {
            Ok(Some(true)) => Beat::CancelAsked,
            Ok(Some(false)) => Beat::Held,
            Ok(None) => Beat::Lost,
            Err(_) => Beat::Unknown,
        }
    }
}

/// One server-log line per recorded job state change: the state, the time the attempt took
/// and, for a failure, the reason (already escaped: it can hold the guest's or the artifact's
/// words, and is bounded).
fn log_state_change(lease: &Lease, state: JobState, outcome: &Outcome, took: Duration) {
    let reason = match outcome {
        Outcome::Failed { reason, .. } => Some(reason.as_str()),
        Outcome::HandedBack { .. } => Some("handed back by a worker shutting down"),
        _ => None,
    };
    tracing::info!(
        job = %lease.job_id,
        tenant = %lease.tenant_id,
        attempt = lease.attempt,
        took_ms = took.as_millis() as u64,
        reason,
        "job {state}"
    );
}
