//! What the data folder and the database must not keep: files a crashed process left
//! (workers' SARIF logs in `work/`, files on their way into a session, artifacts of jobs that
//! ended or were never created, half-written keys and certificates), and jobs and sessions that
//! ended longer ago than the retention (`jobs.retention_days`), each purge recorded on its
//! tenant's audit chain.
//!
//! A file is removed only when no running job can own it, whichever process runs that job: a
//! SARIF log `work/<job>.<attempt>.sarif` (or a compiled policy `<job>.<attempt>.policy.json`)
//! stays while its job runs that attempt (a `cella worker` sharing the data folder may be using
//! it); an artifact stays while its job is
//! queued or running. `cella serve` sweeps when it starts (then no upload of its own is under
//! way, so uploads it never finished and artifacts without a job go too) and with every purge;
//! `cella worker` sweeps when it starts. Only `cella serve` purges: one purger is enough, and
//! two (several hosts) never purge one job twice (`FOR UPDATE SKIP LOCKED`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cella_audit::Actor;
use serde_json::json;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::audit_log::tenant_event;
use crate::data_dir::DataDir;
use crate::error::{QuietLog, ServiceError};

/// How often `cella serve` purges and sweeps.
const EVERY: Duration = Duration::from_secs(3600);
/// Jobs purged per transaction (one audit event per tenant per batch).
const BATCH: i64 = 500;

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// SARIF logs and files on their way into a session from `work/`; at start, half-written
    /// keys and certificates.
    pub work: usize,
    /// Artifacts of jobs that ended, or (at start) that were never created.
    pub artifacts: usize,
}

/// When a sweep runs, which decides what may be under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// `cella serve` is starting: none of its uploads or session adds is under way.
    ServeStart,
    /// `cella worker` is starting, or `serve` runs: uploads and adds may be under way.
    Running,
}

/// A worker's SARIF log name, `<job id>.<attempt>.sarif`.
pub fn sarif_name(job_id: &str, attempt: i32) -> String {
    format!("{job_id}.{attempt}.sarif")
}

/// The name of the baseline file a worker hands a job's attempt, `<job id>.<attempt>.baseline`.
pub fn baseline_name(job_id: &str, attempt: i32) -> String {
    format!("{job_id}.{attempt}.baseline")
}

/// The job and attempt of a worker's file in `work/`: a SARIF log, a job's compiled policy
/// (`<job id>.<attempt>.policy.json`, see `worker::Worker::write_policy`) or its baseline.
fn parse_sarif_name(name: &str) -> Option<(&str, i32)> {
    let stem = name
        .strip_suffix(".sarif")
        .or_else(|| name.strip_suffix(".policy.json"))
        .or_else(|| name.strip_suffix(".baseline"))?;
    let (job, attempt) = stem.rsplit_once('.')?;
    crate::ids::is_id(job, "job").then_some(())?;
    Some((job, attempt.parse().ok()?))
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Removes what no running job or request can own (see the module's documentation).
pub async fn sweep(pool: &PgPool, data_dir: &DataDir, moment: Moment) -> Result<Swept, ServiceError> {
    let mut swept = Swept::default();
    // The data folder and tls/: keys and certificates a start killed while writing them left
    // half-written (only serve writes them, and only while it starts).
    if moment == Moment::ServeStart {
        swept.work += crate::files::remove_stale_temporaries(data_dir.root());
        swept.work += crate::files::remove_stale_temporaries(&data_dir.root().join("tls"));
    }
    // work/: SARIF logs of job attempts that are not running; at serve's start, anything else
    // (files on their way into a session, `.part` files of those).
    let work = data_dir.work();
    let names = names_in(&work);
    let jobs: Vec<String> =
        names.iter().filter_map(|n| parse_sarif_name(n)).map(|(job, _)| job.to_owned()).collect();
    let running: HashSet<(String, i32)> =
        sqlx::query("SELECT id, attempt FROM jobs WHERE id = ANY($1) AND state = 'running'")
            .bind(&jobs)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("attempt")?)))
            .collect::<Result<_, sqlx::Error>>()?;
    for name in &names {
        let leftover = match parse_sarif_name(name) {
            Some((job, attempt)) => !running.contains(&(job.to_owned(), attempt)),
            None => moment == Moment::ServeStart,
        };
        if leftover && remove(&work.join(name)) {
            swept.work += 1;
        }
    }
    // artifacts/: those of jobs that ended; at serve's start, also those without a job (an
    // upload is named under its final path just before its job is inserted) and uploads that
    // never finished (`<job>.part`).
    let artifacts = data_dir.artifacts();
    let names = names_in(&artifacts);
    let ids: Vec<&str> = names.iter().map(String::as_str).filter(|n| crate::ids::is_id(n, "job")).collect();
    let states: HashMap<String, crate::jobs::JobState> =
        sqlx::query("SELECT id, state FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("state")?)))
            .collect::<Result<_, sqlx::Error>>()?;
    for name in &names {
        let leftover = match states.get(name) {
            Some(state) => state.is_final(),
            None if crate::ids::is_id(name, "job") => moment == Moment::ServeStart,
            None => moment == Moment::ServeStart && name.ends_with(".part"),
        };
        if leftover && remove(&artifacts.join(name)) {
            swept.artifacts += 1;
        }
    }
    Ok(swept)
}

fn remove(path: &std::path::Path) -> bool {
    std::fs::remove_file(path).is_ok()
}

/// What a purge removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purged {
    /// The purged jobs, per tenant.
    pub jobs: HashMap<String, Vec<String>>,
    /// The purged sessions, per tenant.
    pub sessions: HashMap<String, Vec<String>>,
}

impl Purged {
    /// Jobs and sessions purged.
    pub fn count(&self) -> usize {
        self.jobs.values().chain(self.sessions.values()).map(Vec::len).sum()
    }
}

/// What a purge deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Finished jobs: their rows hold their SARIF logs and summaries.
    Jobs,
    /// Ended sessions (terminated or failed): their files went when they ended.
    Sessions,
}

impl Kind {
    /// Up to `$2` rows that ended more than `$1` days ago, locked.
    fn select(self) -> &'static str {
        match self {
            Kind::Jobs => {
                "SELECT id, tenant_id FROM jobs
                 WHERE state IN ('succeeded', 'failed', 'cancelled')
                   AND coalesce(finished_at, updated_at) < now() - make_interval(days => $1)
                 ORDER BY tenant_id, coalesce(finished_at, updated_at), id
                 LIMIT $2 FOR UPDATE SKIP LOCKED"
            }
            Kind::Sessions => {
                "SELECT id, tenant_id FROM sessions
                 WHERE state IN ('terminated', 'failed')
                   AND coalesce(terminated_at, updated_at) < now() - make_interval(days => $1)
                 ORDER BY tenant_id, coalesce(terminated_at, updated_at), id
                 LIMIT $2 FOR UPDATE SKIP LOCKED"
            }
        }
    }

    fn delete(self) -> &'static str {
        match self {
            Kind::Jobs => "DELETE FROM jobs WHERE id = ANY($1)",
            Kind::Sessions => "DELETE FROM sessions WHERE id = ANY($1)",
        }
    }

    /// The audit action, and the details key of the ids.
    fn action(self) -> (&'static str, &'static str) {
        match self {
            Kind::Jobs => ("job.purged", "jobs"),
            Kind::Sessions => ("session.purged", "sessions"),
        }
    }
}

/// Deletes the jobs that ended more than `retention_days` ago (0: none ever), with their SARIF
/// log, summary and any file of theirs left on this host, and the sessions that ended as long
/// ago. Each batch's jobs (sessions) of one tenant are one `job.purged` (`session.purged`)
/// event on that tenant's chain (their ids, how many, the retention), in the transaction that
/// deletes them; the audit events about them stay.
pub async fn purge_expired(
    pool: &PgPool,
    data_dir: &DataDir,
    retention_days: u32,
) -> Result<Purged, ServiceError> {
    let mut purged = Purged::default();
    if retention_days == 0 {
        return Ok(purged);
    }
    purged.jobs = purge(pool, Kind::Jobs, retention_days, |id| remove_files_of(data_dir, id)).await?;
    purged.sessions = purge(pool, Kind::Sessions, retention_days, |_| {}).await?;
    Ok(purged)
}

/// Purges `kind` in batches; `after` runs for each id once its deletion has committed.
async fn purge(
    pool: &PgPool,
    kind: Kind,
    retention_days: u32,
    after: impl Fn(&str),
) -> Result<HashMap<String, Vec<String>>, ServiceError> {
    let actor = Actor::System("retention".to_owned());
    let (action, key) = kind.action();
    let mut purged: HashMap<String, Vec<String>> = HashMap::new();
    loop {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(kind.select())
            .bind(i32::try_from(retention_days).unwrap_or(i32::MAX))
            .bind(BATCH)
            .fetch_all(&mut *tx)
            .await?;
        let mut batch: HashMap<String, Vec<String>> = HashMap::new();
        for row in &rows {
            batch.entry(row.try_get("tenant_id")?).or_default().push(row.try_get("id")?);
        }
        let mut tenants: Vec<_> = batch.iter().collect();
        tenants.sort();
        for (tenant, ids) in tenants {
            sqlx::query(kind.delete()).bind(ids).execute(&mut *tx).await?;
            tenant_event(
                &mut tx,
                tenant,
                &actor,
                action,
                ("tenant", tenant),
                json!({ key: ids, "count": ids.len(), "retention_days": retention_days }),
            )
            .await?;
        }
        tx.commit().await?;
        for id in batch.values().flatten() {
            after(id);
        }
        let done = (rows.len() as i64) < BATCH;
        for (tenant, ids) in batch {
            purged.entry(tenant).or_default().extend(ids);
        }
        if done {
            return Ok(purged);
        }
    }
}

/// A purged job's files on this host: its artifact and its SARIF logs.
fn remove_files_of(data_dir: &DataDir, job_id: &str) {
    let _ = std::fs::remove_file(data_dir.artifact(job_id));
    let work = data_dir.work();
    for name in names_in(&work) {
        if parse_sarif_name(&name).is_some_and(|(job, _)| job == job_id) {
            let _ = std::fs::remove_file(work.join(name));
        }
    }
}

/// `cella serve`'s janitor: purges and sweeps now and every hour, until `shutdown`.
pub async fn run(pool: PgPool, data_dir: DataDir, retention_days: u32, mut shutdown: watch::Receiver<bool>) {
    let mut quiet = QuietLog::new("cella serve");
    loop {
        match purge_expired(&pool, &data_dir, retention_days).await {
            Ok(p) if p.count() > 0 => tracing::info!(
                jobs = p.jobs.values().map(Vec::len).sum::<usize>(),
                sessions = p.sessions.values().map(Vec::len).sum::<usize>(),
                retention_days,
                "purged jobs and sessions past their retention"
            ),
            Ok(_) => {}
            Err(e) => quiet.log("purging expired jobs", &e),
        }
        match sweep(&pool, &data_dir, Moment::Running).await {
            Ok(s) if s != Swept::default() => {
                tracing::info!(scratch_files = s.work, artifacts = s.artifacts, "removed files no job needs")
            }
            Ok(_) => {}
            Err(e) => quiet.log("sweeping the data folder", &e),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sarif_names_round_trip_and_others_are_not_sarif_logs() {
        let job = crate::ids::new_id("job");
        assert_eq!(parse_sarif_name(&sarif_name(&job, 3)), Some((job.as_str(), 3)));
        assert_eq!(parse_sarif_name(&format!("{job}.2.policy.json")), Some((job.as_str(), 2)));
        assert_eq!(parse_sarif_name(&baseline_name(&job, 2)), Some((job.as_str(), 2)));
        assert_eq!(parse_sarif_name("session_ab-add-12"), None);
        assert_eq!(parse_sarif_name("x.1.sarif"), None);
        assert_eq!(parse_sarif_name(&format!("{job}.sarif")), None);
    }
}
