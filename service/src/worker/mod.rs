//! `cella worker`: leases jobs from PostgreSQL, runs each in its own microVM (through
//! `cella-jailer` when jailed), heartbeats the lease, and records the result, the scrub evidence
//! and an audit event for every transition. SIGTERM drains: no new leases, running jobs get a
//! grace period to finish, then their VMs are stopped and the jobs handed back.

pub mod launch;
pub mod registry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::{error_chain, QuietLog, ServiceError};
use crate::held_spares::HeldSpares;
use crate::jobs::{JobState, CHANNEL_CANCEL, CHANNEL_JOBS};
use crate::metrics::Metrics;
use crate::queue::{self, Lease, Outcome, QueueError};
use launch::{Launcher, ScanExtras, ScanSpec, StopReason};

/// How often a worker heartbeats its own row (and learns whether to drain).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// The polling fallback when no NOTIFY arrives.
const POLL: Duration = Duration::from_secs(1);
/// How long results are retried while the database is away before they are given up.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(120);

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
    /// Held spares for jailed launches (none when VMMs run unjailed).
    pub spares: Option<Arc<HeldSpares>>,
    pub data_dir: DataDir,
    pub metrics: Arc<Metrics>,
    /// What SARIF logs name as the tool's `informationUri` (see [`Config::information_uri`]).
    pub information_uri: String,
}

type CancelMap = Arc<Mutex<HashMap<String, watch::Sender<bool>>>>;

/// Writes a job attempt's baseline (fingerprints, 32 bytes each) as a baseline file in `work/`.
fn write_baseline(data_dir: &DataDir, lease: &Lease, payload: &[u8]) -> Result<std::path::PathBuf, String> {
    let set = cella_scan::FingerprintSet::from_wire(payload)
        .ok_or_else(|| format!("the baseline of job {} holds a partial fingerprint", lease.job_id))?;
    let path = data_dir.work().join(crate::janitor::baseline_name(&lease.job_id, lease.attempt));
    cella_policies::baseline::Baseline::new(set).write(&path).map_err(|e| error_chain(&e))?;
    Ok(path)
}

impl Worker {
    pub fn new(pool: PgPool, config: &Config, data_dir: DataDir, metrics: Arc<Metrics>) -> Self {
        Self {
            pool,
            id: crate::ids::new_id("worker"),
            concurrency: config.worker.concurrency.max(1),
            lease_for: config.jobs.lease(),
            timeout: Duration::from_secs(config.worker.timeout_secs),
            drain_grace: Duration::from_secs(config.worker.drain_secs),
            launcher: Launcher::new(&config.worker, config.quotas.vm_cpu_percent),
            spares: config.worker.is_jailed().then(|| {
                let launcher = Launcher::new(&config.worker, config.quotas.vm_cpu_percent);
                // The jailer refuses a symlinked exec-file; the jailed launch names the real file too.
                let vmm = std::fs::canonicalize(launcher.vmm()).unwrap_or_else(|_| launcher.vmm().to_owned());
                let base = config.worker.jail_uid_base;
                HeldSpares::new(vmm, base, Box::new(move |id, uid| launcher.hold_command(id, uid)))
            }),
            data_dir,
            metrics,
            information_uri: config.information_uri(),
        }
    }

    /// Runs until `shutdown` turns true, then drains.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServiceError> {
        let hostname =
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
        registry::register(&self.pool, &self.id, &hostname, std::process::id(), self.concurrency).await?;
        eprintln!(
            "cella worker: {} on {hostname}: {} slot(s), VMM {}{}",
            self.id,
            self.concurrency,
            self.launcher.vmm().display(),
            if self.launcher.jailed() { ", jailed" } else { "" }
        );
        // SARIF logs a killed worker left (of job attempts no worker runs any more).
        match crate::janitor::sweep(&self.pool, &self.data_dir, crate::janitor::Moment::Running).await {
            Ok(s) if s.work > 0 => {
                eprintln!("cella worker: removed {} SARIF log(s) left by an earlier run", s.work)
            }
            Ok(_) => {}
            Err(e) => eprintln!("cella worker: sweeping {}: {e}", self.data_dir.work().display()),
        }
        if let Some(spares) = &self.spares {
            spares.sweep_orphans().await;
            for slot in 0..self.concurrency {
                spares.refill(slot);
            }
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
                            eprintln!(
                                "cella worker: {} {}",
                                me.id,
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
                    Ok(n) if n > 0 => eprintln!("cella worker: took back {n} job(s) whose lease expired"),
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
            eprintln!(
                "cella worker: draining {} running job(s) (up to {} s)",
                tasks.len(),
                me.drain_grace.as_secs()
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
        if let Some(spares) = &me.spares {
            spares.close().await;
        }
        registry::stopped(&me.pool, &me.id).await?;
        eprintln!("cella worker: {} stopped", me.id);
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
        eprintln!(
            "cella worker: job {} of {}: running (attempt {}/{}, slot {slot})",
            lease.job_id, lease.tenant_id, lease.attempt, lease.max_attempts
        );
        let artifact = self.data_dir.artifact(&lease.job_id);
        let sarif_out = self.data_dir.work().join(crate::janitor::sarif_name(&lease.job_id, lease.attempt));
        // The baseline goes to the scan as a file of its own (`cella-vmm scan --baseline`).
        let baseline_file = match &lease.baseline {
            Some(payload) => match write_baseline(&self.data_dir, lease, payload) {
                Ok(path) => Some(path),
                Err(reason) => {
                    let outcome = Outcome::Failed { reason, retryable: true, vm: None };
                    self.record(lease, &outcome).await;
                    return;
                }
            },
            None => None,
        };
        let policy_file =
            self.data_dir.work().join(format!("{}.{}.policy.json", lease.job_id, lease.attempt));
        let compiled = self.write_policy(lease, &policy_file).await;
        let spec = ScanSpec {
            job_id: &lease.job_id,
            artifact: &artifact,
            policy: &lease.policy,
            compiled_policy: compiled
                .as_ref()
                .ok()
                .and_then(|written| written.then_some(policy_file.as_path())),
            sarif_out: &sarif_out,
            uid: HeldSpares::uids(self.launcher.jail_uid_base(), slot)[0],
            spare: None,
            fingerprint_key: &lease.fingerprint_key,
            cpu_percent: lease.vm_cpu_percent.unwrap_or(self.launcher.default_cpu_percent()),
            extras: ScanExtras {
                artifact_name: lease.artifact_name.as_deref(),
                options: Some(&lease.options),
                baseline_file: baseline_file.as_deref(),
                information_uri: Some(&self.information_uri),
            },
        };
        let outcome = if let Err(failed) = compiled {
            failed
        } else if !artifact.exists() {
            Outcome::Failed {
                reason: format!("the artifact of job {} is missing on this host", lease.job_id),
                retryable: false,
                vm: None,
            }
        } else {
            // Held spares are made with the default CPU quota: a tenant with its own makes its jail.
            let (spare, uid) = match &self.spares {
                Some(spares) if spec.cpu_percent == self.launcher.default_cpu_percent() => {
                    spares.launch(slot)
                }
                _ => (None, spec.uid),
            };
            let started = self.launcher.start(&ScanSpec { spare: spare.as_deref(), uid, ..spec });
            if let Some(spares) = &self.spares {
                spares.refill(slot);
            }
            let outcome = match started {
                Err(e) => Outcome::Failed { reason: error_chain(&e), retryable: true, vm: None },
                Ok(scan) => self.supervise(lease, scan, &mut cancel, &mut hand_back).await,
            };
            if let Some(spares) = &self.spares {
                let vm = match &outcome {
                    Outcome::Succeeded { vm, .. } => Some(vm),
                    Outcome::Failed { vm, .. } | Outcome::Cancelled { vm } | Outcome::HandedBack { vm } => {
                        vm.as_ref()
                    }
                };
                let ran_in_spare = vm.filter(|_| spare.is_some()).map(|vm| vm["built_ahead"] == true);
                spares.finished(slot, ran_in_spare);
            }
            outcome
        };
        let _ = std::fs::remove_file(&sarif_out);
        let _ = std::fs::remove_file(&policy_file);
        if let Some(file) = &baseline_file {
            let _ = std::fs::remove_file(file);
        }
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

    /// Writes the job's compiled policy to `file` when it has tenant packs (`Ok(true)`; built-in
    /// packs alone go by name: `Ok(false)`). A pack version deleted since the job was queued
    /// fails the job for good, the database being away for now.
    async fn write_policy(&self, lease: &Lease, file: &std::path::Path) -> Result<bool, Outcome> {
        let failed = |reason: String, retryable: bool| Outcome::Failed { reason, retryable, vm: None };
        match crate::packs::compiled_policy(&self.pool, &lease.tenant_id, &lease.policy).await {
            Ok(None) => Ok(false),
            Ok(Some(bytes)) => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                // Scratch for this attempt (removed when it ends): written, not synced.
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(file)
                    .and_then(|mut f| f.write_all(&bytes));
                match written {
                    Ok(()) => Ok(true),
                    Err(e) => Err(failed(format!("writing the job's policy {}: {e}", file.display()), true)),
                }
            }
            Err(e) => Err(failed(error_chain(&e), e.retryable())),
        }
    }

    /// Waits for the VM while heartbeating the lease; stops the VM on cancel, lost lease or
    /// hand-back.
    async fn supervise(
        &self,
        lease: &Lease,
        scan: launch::RunningScan,
        cancel: &mut watch::Receiver<bool>,
        hand_back: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let pid = scan.pid();
        if let Err(e) =
            queue::vm_started(&self.pool, lease, pid, self.launcher.mem_mib(), self.launcher.jailed()).await
        {
            eprintln!("cella worker: {}: {e}", lease.job_id);
            scan.stop();
            return scan.wait().await.outcome(Some(StopReason::LeaseLost), self.timeout);
        }
        let stopper = scan.stopper();
        let wait = scan.wait();
        tokio::pin!(wait);
        let mut stopped: Option<StopReason> = None;
        let mut beat = tokio::time::interval(self.lease_for / 3);
        beat.tick().await;
        let finished = loop {
            tokio::select! {
                finished = &mut wait => break finished,
                _ = beat.tick() => match queue::heartbeat(&self.pool, lease, self.lease_for).await {
                    Ok(Some(true)) if stopped.is_none() => stopped = Some(StopReason::Cancelled),
                    Ok(None) if stopped.is_none() => stopped = Some(StopReason::LeaseLost),
                    _ => {}
                },
                Ok(()) = cancel.changed(), if stopped.is_none() => stopped = Some(StopReason::Cancelled),
                Ok(()) = hand_back.changed(), if stopped.is_none() => stopped = Some(StopReason::ShuttingDown),
            }
            if stopped.is_some() {
                stopper.stop();
            }
        };
        finished.outcome(stopped, self.timeout)
    }

    /// Records the outcome, retrying while the database is away. Returns the job's new state.
    async fn record(&self, lease: &Lease, outcome: &Outcome) -> Option<JobState> {
        let give_up = Instant::now() + FINISH_RETRY_FOR;
        let mut quiet = QuietLog::new("cella worker");
        loop {
            match queue::finish(&self.pool, lease, outcome).await {
                Ok(state) => return Some(state),
                Err(QueueError::LeaseLost(..)) => {
                    eprintln!(
                        "cella worker: job {} attempt {}: lease lost; result discarded",
                        lease.job_id, lease.attempt
                    );
                    return None;
                }
                Err(QueueError::Service(e)) if Instant::now() < give_up => {
                    quiet.log(&format!("recording job {}", lease.job_id), &e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(QueueError::Service(e)) => {
                    eprintln!("cella worker: job {}: giving up recording its result: {e}", lease.job_id);
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

/// One server-log line per recorded job state change: the state, the time the attempt took
/// and, for a failure, the reason (already escaped: it can hold the guest's or the artifact's
/// words, and is bounded).
fn log_state_change(lease: &Lease, state: JobState, outcome: &Outcome, took: Duration) {
    let why = match outcome {
        Outcome::Failed { reason, .. } => format!(": {reason}"),
        Outcome::HandedBack { .. } => ": handed back by a worker shutting down".to_owned(),
        _ => String::new(),
    };
    eprintln!(
        "cella worker: job {} of {}: {state} after {} ms (attempt {}){why}",
        lease.job_id,
        lease.tenant_id,
        took.as_millis(),
        lease.attempt
    );
}
