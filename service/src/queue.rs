//! The worker's side of the job queue in PostgreSQL: fair leasing with `FOR UPDATE SKIP
//! LOCKED`, heartbeats, fenced results, retries with backoff, and the rescue of expired leases.
//!
//! Fencing: a lease is `(job id, attempt, worker id)`. Every write a worker makes about a job
//! requires that the job is still `running` under exactly that lease, so a worker that lost its
//! lease (it stalled, the lease expired, another worker took the job) cannot write a result.

use std::time::Duration;

use cella_audit::Actor;
use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use crate::audit_log::tenant_event;
use crate::error::ServiceError;
use crate::jobs::{JobState, CHANNEL_DONE, CHANNEL_JOBS};

/// A job leased by one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub tenant_id: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: String,
    pub policy: String,
    /// The tenant's fingerprint key, hex (handed to the scan VM, see `migrations/0005`).
    pub fingerprint_key: String,
    /// The tenant's own CPU quota per VM (percent of one CPU), if it has one.
    pub vm_cpu_percent: Option<u32>,
    /// The artifact's name as the tenant gave it.
    pub artifact_name: Option<String>,
    /// What the job asks of its scan besides the packs.
    pub options: crate::jobs::JobOptions,
    /// The fingerprints of its baseline (32 bytes each), if it names one.
    pub baseline: Option<Vec<u8>>,
}

impl Lease {
    fn actor(&self) -> Actor {
        Actor::System(self.worker_id.clone())
    }
}

/// How a leased job ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The scan ran: its summary, SARIF log and VM report.
    Succeeded { summary: Value, sarif: Vec<u8>, vm: Value },
    /// It failed; `retryable` failures are leased again after a backoff until `max_attempts`.
    Failed { reason: String, retryable: bool, vm: Option<Value> },
    /// Its VM was stopped because the job was cancelled.
    Cancelled { vm: Option<Value> },
    /// The worker is shutting down and gives the job back to the queue.
    HandedBack { vm: Option<Value> },
}

/// The job's lease was lost: its result was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job {0} is no longer leased by this worker (attempt {1}); its result was discarded")]
    LeaseLost(String, i32),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        QueueError::Service(e.into())
    }
}

/// What a job's `job.succeeded` event records, so a reviewer can tie a SARIF log to it
/// (`cella audit verify --sarif FILE --job ID`): the artifact (name, size, SHA-256), every pack
/// (name, version, SHA-256 of its text; see [`crate::packs::evidence`]), the engine's and Cella's
/// versions, the SARIF log's SHA-256, and the counts of findings and suppressed findings.
fn evidence(
    lease: &Lease,
    findings: i64,
    artifact: Value,
    packs: Vec<Value>,
    summary: &Value,
    sarif: &[u8],
    vm: &Value,
) -> Value {
    json!({
        "attempt": lease.attempt,
        "findings": findings,
        "suppressed": summary.get("suppressed").cloned().unwrap_or(Value::Null),
        "artifact": artifact,
        "packs": packs,
        "engine_version": vm.get("engine_version").cloned().unwrap_or(Value::Null),
        // The template the job's VM was restored from (`cella-vmm template`'s id), if any.
        "template": vm.get("template").cloned().unwrap_or(Value::Null),
        "cella_version": env!("CARGO_PKG_VERSION"),
        "sarif_sha256": crate::ids::hex(ring::digest::digest(&ring::digest::SHA256, sarif).as_ref()),
    })
}

/// Retry delay after failed attempt `attempt` (1-based): 1 s, 2 s, 4 s, … up to a minute.
pub fn backoff(attempt: i32) -> Duration {
    Duration::from_secs(1u64 << attempt.clamp(1, 7).saturating_sub(1)).min(Duration::from_secs(60))
}

/// Leases the next job: the oldest ready job of the tenant that was served longest ago among
/// tenants below their concurrency cap (round robin). Locking the tenant's row as well makes
/// the cap exact across workers: two workers never lease for one tenant at the same moment.
pub async fn lease(
    pool: &PgPool,
    worker_id: &str,
    lease_for: Duration,
) -> Result<Option<Lease>, ServiceError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT j.id, j.tenant_id, j.policy, j.max_attempts, t.fingerprint_key, t.quota_vm_cpu_percent,
                j.artifact_name, j.excludes, j.baseline_id, j.vcs,
                -- A job's own license policy, else its tenant's.
                CASE WHEN cardinality(j.license_deny) + cardinality(j.license_flag) = 0
                     THEN t.license_deny ELSE j.license_deny END AS license_deny,
                CASE WHEN cardinality(j.license_deny) + cardinality(j.license_flag) = 0
                     THEN t.license_flag ELSE j.license_flag END AS license_flag,
                (SELECT b.fingerprints FROM baselines b WHERE b.id = j.baseline_id) AS baseline
         FROM jobs j JOIN tenants t ON t.id = j.tenant_id
         WHERE j.state = 'queued' AND j.run_after <= now() AND NOT t.suspended
           AND (SELECT count(*) FROM jobs r WHERE r.tenant_id = j.tenant_id AND r.state = 'running') < t.max_concurrent
         ORDER BY t.last_dequeued_at NULLS FIRST, j.created_at, j.id
         LIMIT 1
         FOR UPDATE OF j, t SKIP LOCKED",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let job_id: String = row.try_get("id")?;
    let tenant_id: String = row.try_get("tenant_id")?;
    let attempt: i32 = sqlx::query_scalar(
        "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = $2,
                lease_expires_at = now() + make_interval(secs => $3), started_at = coalesce(started_at, now()),
                vm_pid = NULL, updated_at = now()
         WHERE id = $1 RETURNING attempt",
    )
    .bind(&job_id)
    .bind(worker_id)
    .bind(lease_for.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE tenants SET last_dequeued_at = clock_timestamp() WHERE id = $1")
        .bind(&tenant_id)
        .execute(&mut *tx)
        .await?;
    let lease = Lease {
        job_id,
        tenant_id,
        attempt,
        max_attempts: row.try_get("max_attempts")?,
        worker_id: worker_id.to_owned(),
        policy: row.try_get("policy")?,
        fingerprint_key: crate::ids::hex(row.try_get::<&[u8], _>("fingerprint_key")?),
        vm_cpu_percent: row
            .try_get::<Option<i32>, _>("quota_vm_cpu_percent")?
            .and_then(|p| u32::try_from(p).ok()),
        artifact_name: row.try_get("artifact_name")?,
        options: crate::jobs::JobOptions {
            excludes: row.try_get("excludes")?,
            baseline: row.try_get("baseline_id")?,
            vcs: row.try_get::<Option<sqlx::types::Json<crate::jobs::Vcs>>, _>("vcs")?.map(|v| v.0),
            license_deny: row.try_get("license_deny")?,
            license_flag: row.try_get("license_flag")?,
        },
        baseline: row.try_get("baseline")?,
    };
    tenant_event(
        &mut tx,
        &lease.tenant_id,
        &lease.actor(),
        "job.leased",
        ("job", &lease.job_id),
        json!({ "attempt": attempt, "worker": worker_id }),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(lease))
}

/// Extends the lease. `Ok(Some(cancel_requested))` while it is held; `Ok(None)` once lost.
pub async fn heartbeat(
    pool: &PgPool,
    lease: &Lease,
    lease_for: Duration,
) -> Result<Option<bool>, ServiceError> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND state = 'running'
         RETURNING cancel_requested",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(lease_for.as_secs_f64())
    .fetch_optional(pool)
    .await?)
}

/// Records that the job's VM started (its process id and memory), fenced.
pub async fn vm_started(
    pool: &PgPool,
    lease: &Lease,
    pid: u32,
    mem_mib: u32,
    jailed: bool,
) -> Result<(), QueueError> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE jobs SET vm_pid = $4, mem_mib = $5, updated_at = now()
         WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND state = 'running'",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .bind(i32::try_from(pid).unwrap_or(-1))
    .bind(i32::try_from(mem_mib).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(QueueError::LeaseLost(lease.job_id.clone(), lease.attempt));
    }
    tenant_event(
        &mut tx,
        &lease.tenant_id,
        &lease.actor(),
        "job.vm_started",
        ("job", &lease.job_id),
        json!({ "attempt": lease.attempt, "pid": pid, "mem_mib": mem_mib, "jailed": jailed }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records how the job ended, if this worker still holds its lease; with the scrub evidence
/// and the outcome as audit events in the same transaction.
pub async fn finish(pool: &PgPool, lease: &Lease, outcome: &Outcome) -> Result<JobState, QueueError> {
    let mut tx = pool.begin().await?;
    let held = sqlx::query(
        "SELECT artifact_name, artifact_bytes, artifact_sha256 FROM jobs
         WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND state = 'running' FOR UPDATE",
    )
    .bind(&lease.job_id)
    .bind(&lease.worker_id)
    .bind(lease.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(held) = held else {
        return Err(QueueError::LeaseLost(lease.job_id.clone(), lease.attempt));
    };
    let actor = lease.actor();
    let job = ("job", lease.job_id.as_str());
    let vm = match outcome {
        Outcome::Succeeded { vm, .. } => Some(vm),
        Outcome::Failed { vm, .. } | Outcome::Cancelled { vm } | Outcome::HandedBack { vm } => vm.as_ref(),
    };
    if let Some(scrub) = vm.and_then(|vm| vm.get("scrub")).filter(|s| !s.is_null()) {
        tenant_event(
            &mut tx,
            &lease.tenant_id,
            &actor,
            "job.scrubbed",
            job,
            json!({ "attempt": lease.attempt, "scrub": scrub }),
        )
        .await?;
    }
    let state = match outcome {
        Outcome::Succeeded { summary, sarif, vm } => {
            let findings = summary.get("findings").and_then(Value::as_i64).unwrap_or(0);
            sqlx::query(
                "UPDATE jobs SET state = 'succeeded', summary = $2, sarif = $3, vm = $4, findings = $5, error = NULL,
                        lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
                 WHERE id = $1",
            )
            .bind(&lease.job_id)
            .bind(summary)
            .bind(sarif)
            .bind(vm)
            .bind(i32::try_from(findings).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
            let artifact = json!({
                "name": held.try_get::<Option<String>, _>("artifact_name")?,
                "bytes": held.try_get::<i64, _>("artifact_bytes")?,
                "sha256": crate::ids::hex(held.try_get::<&[u8], _>("artifact_sha256")?),
            });
            let packs = crate::packs::evidence(&mut tx, &lease.tenant_id, &lease.policy).await?;
            let details = evidence(lease, findings, artifact, packs, summary, sarif, vm);
            tenant_event(&mut tx, &lease.tenant_id, &actor, "job.succeeded", job, details).await?;
            JobState::Succeeded
        }
        Outcome::Failed { reason, retryable, vm } if *retryable && lease.attempt < lease.max_attempts => {
            let delay = backoff(lease.attempt);
            requeue(&mut tx, &lease.job_id, reason, vm.as_ref(), delay).await?;
            tenant_event(
                &mut tx,
                &lease.tenant_id,
                &actor,
                "job.retry_scheduled",
                job,
                json!({ "attempt": lease.attempt, "reason": reason, "retry_in_secs": delay.as_secs() }),
            )
            .await?;
            JobState::Queued
        }
        Outcome::Failed { reason, vm, .. } => {
            terminal(&mut tx, &lease.job_id, JobState::Failed, reason, vm.as_ref()).await?;
            tenant_event(
                &mut tx,
                &lease.tenant_id,
                &actor,
                "job.failed",
                job,
                json!({ "attempt": lease.attempt, "reason": reason }),
            )
            .await?;
            JobState::Failed
        }
        Outcome::Cancelled { vm } => {
            terminal(
                &mut tx,
                &lease.job_id,
                JobState::Cancelled,
                "cancelled while running; its VM was stopped",
                vm.as_ref(),
            )
            .await?;
            tenant_event(
                &mut tx,
                &lease.tenant_id,
                &actor,
                "job.cancelled",
                job,
                json!({ "attempt": lease.attempt, "was": "running" }),
            )
            .await?;
            JobState::Cancelled
        }
        Outcome::HandedBack { vm } => {
            requeue(
                &mut tx,
                &lease.job_id,
                "handed back by a worker that was shutting down",
                vm.as_ref(),
                Duration::ZERO,
            )
            .await?;
            tenant_event(
                &mut tx,
                &lease.tenant_id,
                &actor,
                "job.handed_back",
                job,
                json!({ "attempt": lease.attempt }),
            )
            .await?;
            JobState::Queued
        }
    };
    if state == JobState::Queued {
        sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL_JOBS).execute(&mut *tx).await?;
    } else {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL_DONE)
            .bind(&lease.job_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(state)
}

async fn requeue(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: &str,
    reason: &str,
    vm: Option<&Value>,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET state = 'queued', error = $2, vm = coalesce($3, vm), lease_owner = NULL, lease_expires_at = NULL,
                vm_pid = NULL, run_after = now() + make_interval(secs => $4), updated_at = now()
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(reason)
    .bind(vm)
    .bind(delay.as_secs_f64())
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn terminal(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: &str,
    state: JobState,
    reason: &str,
    vm: Option<&Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET state = $2, error = $3, vm = coalesce($4, vm), lease_owner = NULL, lease_expires_at = NULL,
                finished_at = now(), updated_at = now()
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(state)
    .bind(reason)
    .bind(vm)
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// Takes back every running job whose lease has expired (its worker died or stalled): queued
/// again, or failed once it has used all its attempts, or cancelled if that was asked. Returns
/// how many were rescued. Any worker (and `cella serve`) runs this periodically.
pub async fn rescue_expired(pool: &PgPool, rescuer: &str) -> Result<u64, ServiceError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, tenant_id, attempt, max_attempts, lease_owner, cancel_requested FROM jobs
         WHERE state = 'running' AND lease_expires_at < now()
         ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    let actor = Actor::System(rescuer.to_owned());
    for row in &rows {
        let id: String = row.try_get("id")?;
        let tenant: String = row.try_get("tenant_id")?;
        let attempt: i32 = row.try_get("attempt")?;
        let owner: Option<String> = row.try_get("lease_owner")?;
        let reason = format!(
            "the lease of attempt {attempt} expired (worker {} stopped heartbeating)",
            owner.as_deref().unwrap_or("?")
        );
        let (action, state) = if row.try_get::<bool, _>("cancel_requested")? {
            terminal(&mut tx, &id, JobState::Cancelled, &reason, None).await?;
            ("job.cancelled", JobState::Cancelled)
        } else if attempt >= row.try_get::<i32, _>("max_attempts")? {
            terminal(&mut tx, &id, JobState::Failed, &reason, None).await?;
            ("job.failed", JobState::Failed)
        } else {
            requeue(&mut tx, &id, &reason, None, Duration::ZERO).await?;
            ("job.lease_expired", JobState::Queued)
        };
        if state != JobState::Queued {
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL_DONE).bind(&id).execute(&mut *tx).await?;
        }
        tenant_event(
            &mut tx,
            &tenant,
            &actor,
            action,
            ("job", &id),
            json!({ "attempt": attempt, "worker": owner, "reason": reason, "state": state }),
        )
        .await?;
    }
    if !rows.is_empty() {
        sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL_JOBS).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// How many jobs are queued, and how long the oldest ready one has waited.
pub async fn depth(pool: &PgPool) -> Result<(i64, f64), ServiceError> {
    let row = sqlx::query(
        "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age
         FROM jobs WHERE state = 'queued'",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("n")?, row.try_get("age")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(50), Duration::from_secs(60));
    }
}
