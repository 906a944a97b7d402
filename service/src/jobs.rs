//! Jobs as tenants see them: submission (with idempotency), reading, listing with cursor
//! pagination, results, and cancellation. The worker's side of the queue is in [`crate::queue`].

use cella_audit::Actor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use crate::audit_log::tenant_event;
use crate::error::ServiceError;
use crate::ids;

/// NOTIFY channel: a job became ready to lease.
pub const CHANNEL_JOBS: &str = "cella_jobs";
/// NOTIFY channel: a job reached a final state (payload: its id).
pub const CHANNEL_DONE: &str = "cella_job_done";
/// NOTIFY channel: a running job was asked to stop (payload: its id).
pub const CHANNEL_CANCEL: &str = "cella_cancel";

/// A job's state: `queued → running → succeeded | failed | cancelled`; a
/// running job whose attempt fails or whose worker goes away is queued again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    /// Its name, as stored and as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended (nothing changes it any more).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// "job J has already …" for a finished job.
    fn finished_verb(self) -> &'static str {
        match self {
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            _ => "been cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a job state; the message lists the states.
#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?}: use one of queued, running, succeeded, failed, cancelled")]
pub struct UnknownJobState(pub String);

impl std::str::FromStr for JobState {
    type Err = UnknownJobState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownJobState(s.to_owned()))
    }
}

impl sqlx::Type<sqlx::Postgres> for JobState {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for JobState {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(<&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?.parse()?)
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for JobState {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    /// The rule packs applied.
    pub policy: Vec<String>,
    pub artifact: ArtifactView,
    /// Leases so far (a retried job has more than one).
    pub attempt: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    /// Why it failed (or was cancelled).
    pub error: Option<String>,
    /// Number of findings, once succeeded.
    pub findings: Option<i32>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<String>,
    /// Files left out, the baseline, the repository (when the job asked for them).
    pub options: JobOptions,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ArtifactView {
    pub name: Option<String>,
    pub bytes: i64,
    /// SHA-256 of the artifact, hex.
    pub sha256: String,
}

/// A page of jobs.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

const JOB_COLUMNS: &str =
    "id, state, policy, artifact_name, artifact_bytes, artifact_sha256, attempt, max_attempts,
     cancel_requested, error, findings, created_at, started_at, finished_at, excludes, baseline_id, vcs,
     license_deny, license_flag";

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn job_from_row(row: &PgRow) -> Result<JobView, sqlx::Error> {
    let policy: String = row.try_get("policy")?;
    Ok(JobView {
        id: row.try_get("id")?,
        state: row.try_get("state")?,
        policy: policy.split(',').map(str::to_owned).collect(),
        artifact: ArtifactView {
            name: row.try_get("artifact_name")?,
            bytes: row.try_get("artifact_bytes")?,
            sha256: ids::hex(row.try_get::<&[u8], _>("artifact_sha256")?),
        },
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        cancel_requested: row.try_get("cancel_requested")?,
        error: row.try_get("error")?,
        findings: row.try_get("findings")?,
        created_at: rfc3339(row.try_get("created_at")?),
        started_at: row.try_get::<Option<OffsetDateTime>, _>("started_at")?.map(rfc3339),
        finished_at: row.try_get::<Option<OffsetDateTime>, _>("finished_at")?.map(rfc3339),
        options: JobOptions {
            excludes: row.try_get("excludes")?,
            baseline: row.try_get("baseline_id")?,
            vcs: row.try_get::<Option<sqlx::types::Json<Vcs>>, _>("vcs")?.map(|v| v.0),
            license_deny: row.try_get("license_deny")?,
            license_flag: row.try_get("license_flag")?,
        },
    })
}

/// Checks a comma-separated list of rule packs against the built-in ones; `None` or empty means
/// the default. Unknown packs are refused by name (422).
pub fn parse_policy(requested: Option<&str>, default: &str) -> Result<String, ServiceError> {
    let text = requested.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(default);
    let mut packs: Vec<&str> = Vec::new();
    for name in text.split(',').map(str::trim) {
        if !cella_policies::rules::BUILTIN_PACKS.iter().any(|(known, _)| *known == name) {
            let known: Vec<&str> = cella_policies::rules::BUILTIN_PACKS.iter().map(|(n, _)| *n).collect();
            return Err(ServiceError::Unprocessable(format!(
                "unknown policy {name:?}: the rule packs are {}",
                known.join(", ")
            )));
        }
        if !packs.contains(&name) {
            packs.push(name);
        }
    }
    Ok(packs.join(","))
}

/// A validated submission whose artifact is already on disk at `artifact_tmp`.
#[derive(Debug)]
pub struct Submission {
    pub job_id: String,
    pub policy: String,
    pub artifact_name: Option<String>,
    pub artifact_bytes: u64,
    pub artifact_sha256: [u8; 32],
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
    /// What the job asks of its scan besides the packs.
    pub options: JobOptions,
}

/// A job's scan options: files left out, a baseline of known findings, and where the artifact
/// came from (for the SARIF log's `versionControlProvenance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobOptions {
    /// Gitignore-like globs of files not to scan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
    /// The id of the baseline whose findings the scan suppresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// The repository the artifact was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcs: Option<Vcs>,
    /// Licenses (SPDX identifiers, or prefixes ending in `*`) reported at `error`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub license_deny: Vec<String>,
    /// Licenses reported at `warning` at least.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub license_flag: Vec<String>,
}

/// Where an artifact came from: its repository, revision and branch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vcs {
    pub repository_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// The most excludes one job may carry.
pub const MAX_EXCLUDES: usize = 256;

impl JobOptions {
    /// Checks the options a tenant sent: every glob compiles (the scan would refuse it), the
    /// repository is an absolute `https://`, `http://` or `ssh://` URI, and no text holds
    /// control characters or is too long.
    pub fn check(&self) -> Result<(), ServiceError> {
        if self.excludes.len() > MAX_EXCLUDES {
            return Err(ServiceError::Unprocessable(format!("at most {MAX_EXCLUDES} excludes per job")));
        }
        for glob in &self.excludes {
            if glob.len() > 1024 || glob.chars().any(char::is_control) {
                return Err(ServiceError::Unprocessable(format!(
                    "exclude {glob:?} is too long or holds a control character"
                )));
            }
            cella_scan::glob_to_regex(glob).map_err(|e| {
                ServiceError::Unprocessable(format!("exclude {glob:?} is not a glob Cella reads: {e}"))
            })?;
        }
        if let Some(vcs) = &self.vcs {
            let text = |what: &str, v: &str| {
                if v.is_empty() || v.len() > 1024 || v.chars().any(char::is_control) {
                    Err(ServiceError::Unprocessable(format!("{what} must be 1-1024 printable characters")))
                } else {
                    Ok(())
                }
            };
            text("vcs_repo", &vcs.repository_uri)?;
            if !["https://", "http://", "ssh://"].iter().any(|p| vcs.repository_uri.starts_with(p)) {
                return Err(ServiceError::Unprocessable(
                    "vcs_repo must be an absolute URI (https://…, http://… or ssh://…)".into(),
                ));
            }
            vcs.revision_id.as_deref().map_or(Ok(()), |r| text("vcs_revision", r))?;
            vcs.branch.as_deref().map_or(Ok(()), |b| text("vcs_branch", b))?;
        }
        cella_scan::spdx::LicensePolicy::new(&self.license_deny, &self.license_flag)
            .map_err(|e| ServiceError::Unprocessable(format!("license_deny/license_flag: {e}")))?;
        Ok(())
    }
}

impl Submission {
    /// What "the same body" means for Idempotency-Key: the artifact's hash, its name and the policy.
    fn request_hash(&self) -> [u8; 32] {
        let mut bytes = self.artifact_sha256.to_vec();
        bytes.extend_from_slice(self.policy.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(self.artifact_name.as_deref().unwrap_or("").as_bytes());
        if self.options != JobOptions::default() {
            bytes.push(0);
            bytes.extend_from_slice(serde_json::to_string(&self.options).unwrap_or_default().as_bytes());
        }
        ids::sha256(&bytes)
    }
}

/// What [`submit`] did.
#[derive(Debug)]
pub enum Submitted {
    /// A new job (its artifact must be kept).
    Created(JobView),
    /// The Idempotency-Key was used before with the same request: that job.
    Replayed(JobView),
}

/// Inserts the job and its `job.submitted` event in one transaction, and wakes the workers.
pub async fn submit(
    pool: &PgPool,
    caller_tenant: &str,
    key_id: &str,
    actor: &Actor,
    sub: &Submission,
) -> Result<Submitted, ServiceError> {
    let request_hash = sub.request_hash();
    let mut tx = pool.begin().await?;
    crate::tenants::recheck_key(&mut tx, key_id).await?;
    let row = sqlx::query(&format!(
        "INSERT INTO jobs (id, tenant_id, policy, artifact_name, artifact_bytes, artifact_sha256, submitted_by,
                           idempotency_key, request_hash, max_attempts, excludes, baseline_id, vcs,
                           license_deny, license_flag)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(&sub.job_id)
    .bind(caller_tenant)
    .bind(&sub.policy)
    .bind(&sub.artifact_name)
    .bind(i64::try_from(sub.artifact_bytes).unwrap_or(i64::MAX))
    .bind(&sub.artifact_sha256[..])
    .bind(actor_id(actor))
    .bind(&sub.idempotency_key)
    .bind(&request_hash[..])
    .bind(i32::try_from(sub.max_attempts.max(1)).unwrap_or(3))
    .bind(&sub.options.excludes)
    .bind(&sub.options.baseline)
    .bind(sub.options.vcs.as_ref().map(sqlx::types::Json))
    .bind(&sub.options.license_deny)
    .bind(&sub.options.license_flag)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        // The key was used before: same request → that job; different request → 422.
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2"
        ))
        .bind(caller_tenant)
        .bind(&sub.idempotency_key)
        .fetch_one(&mut *tx)
        .await?;
        let previous: Vec<u8> = row.try_get("request_hash")?;
        if previous != request_hash {
            return Err(ServiceError::Unprocessable(
                "this Idempotency-Key was already used with a different request (artifact, name or policy); \
                 use a new key for a new job"
                    .to_owned(),
            ));
        }
        return Ok(Submitted::Replayed(job_from_row(&row)?));
    };
    let job = job_from_row(&row)?;
    tenant_event(
        &mut tx,
        caller_tenant,
        actor,
        "job.submitted",
        ("job", &job.id),
        json!({
            "policy": sub.policy,
            "artifact_bytes": sub.artifact_bytes,
            "artifact_sha256": job.artifact.sha256,
            "excludes": sub.options.excludes,
            "baseline": sub.options.baseline,
        }),
    )
    .await?;
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL_JOBS).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::info!(
        job = %job.id,
        tenant = %caller_tenant,
        policy = %sub.policy,
        artifact_bytes = sub.artifact_bytes,
        "job queued"
    );
    Ok(Submitted::Created(job))
}

pub(crate) fn actor_id(actor: &Actor) -> String {
    match actor {
        Actor::ApiKey(id) | Actor::Admin(id) | Actor::System(id) => id.clone(),
    }
}

/// The job `id` of `tenant` (404 for another tenant's job or an unknown id).
pub async fn get(pool: &PgPool, tenant: &str, id: &str) -> Result<JobView, ServiceError> {
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"))
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(job_from_row(&row)?)
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("job {id}"))
}

/// A page of `tenant`'s jobs, newest first, optionally in one state.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    state: Option<&str>,
    cursor: Option<&str>,
    limit: u32,
) -> Result<JobPage, ServiceError> {
    let state: Option<JobState> =
        state.map(str::parse::<JobState>).transpose().map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    let (after_time, after_id) = cursor_position(cursor, "job")?;
    let limit = limit.clamp(1, 200);
    let rows = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC LIMIT $5"
    ))
    .bind(tenant)
    .bind(state)
    .bind(after_time)
    .bind(after_id)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut last_time = None;
    for row in rows.iter().take(limit as usize) {
        jobs.push(job_from_row(row)?);
        last_time = Some(row.try_get::<OffsetDateTime, _>("created_at")?);
    }
    let next_cursor = match (rows.len() > limit as usize, last_time, jobs.last()) {
        (true, Some(t), Some(job)) => Some(make_cursor(t, &job.id)),
        _ => None,
    };
    Ok(JobPage { jobs, next_cursor })
}

pub(crate) fn make_cursor(time: OffsetDateTime, id: &str) -> String {
    format!("{}.{id}", time.unix_timestamp_nanos() / 1000)
}

/// Where a page starts: the (created_at, id) after which to list, from a cursor of `prefix`
/// ids (none: the first page); a cursor this server did not issue is a 400.
pub(crate) fn cursor_position(
    cursor: Option<&str>,
    prefix: &str,
) -> Result<(Option<OffsetDateTime>, Option<String>), ServiceError> {
    match cursor {
        Some(c) => {
            let (time, id) = parse_cursor(c, prefix).ok_or_else(|| {
                ServiceError::BadRequest(format!("cursor {c:?} is not one this server issued"))
            })?;
            Ok((Some(time), Some(id)))
        }
        None => Ok((None, None)),
    }
}

/// A cursor from [`make_cursor`] for ids with `prefix` (`job`, `session`).
pub(crate) fn parse_cursor(cursor: &str, prefix: &str) -> Option<(OffsetDateTime, String)> {
    let (micros, id) = cursor.split_once('.')?;
    let micros: i128 = micros.parse().ok()?;
    let time = OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1000)?).ok()?;
    ids::is_id(id, prefix).then(|| (time, id.to_owned()))
}

/// A finished job's SARIF log (404 until the job has succeeded).
pub async fn sarif(pool: &PgPool, tenant: &str, id: &str) -> Result<Vec<u8>, ServiceError> {
    result_column(pool, tenant, id, "sarif").await
}

/// A finished job's summary.
pub async fn summary(pool: &PgPool, tenant: &str, id: &str) -> Result<Value, ServiceError> {
    let bytes = result_column(pool, tenant, id, "convert_to(summary::text, 'UTF8')").await?;
    serde_json::from_slice(&bytes).map_err(|e| ServiceError::Internal(format!("stored summary of {id}: {e}")))
}

async fn result_column(pool: &PgPool, tenant: &str, id: &str, column: &str) -> Result<Vec<u8>, ServiceError> {
    let row =
        sqlx::query(&format!("SELECT state, {column} AS result FROM jobs WHERE id = $1 AND tenant_id = $2"))
            .bind(id)
            .bind(tenant)
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| not_found(id))?;
    let state: JobState = row.try_get("state")?;
    match row.try_get::<Option<Vec<u8>>, _>("result")? {
        Some(bytes) if state == JobState::Succeeded => Ok(bytes),
        _ => Err(ServiceError::NotFound(format!(
            "the result of job {id} (it is {state}; results exist once it has succeeded)"
        ))),
    }
}

/// Cancels a job: a queued one at once; a running one by asking its worker to stop the VM
/// (the worker records `cancelled`). Finished jobs answer 409.
pub async fn cancel(
    pool: &PgPool,
    tenant: Option<&str>,
    id: &str,
    actor: &Actor,
) -> Result<JobView, ServiceError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT tenant_id, state FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2) FOR UPDATE",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| not_found(id))?;
    let tenant_id: String = row.try_get("tenant_id")?;
    let state: JobState = row.try_get("state")?;
    // The action, named the same on the operator's chain as on the tenant's.
    let action = match state {
        JobState::Queued => {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', cancel_requested = true, error = 'cancelled before it ran',
                 finished_at = now(), updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tenant_event(
                &mut tx,
                &tenant_id,
                actor,
                "job.cancelled",
                ("job", id),
                json!({ "was": "queued" }),
            )
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL_DONE).bind(id).execute(&mut *tx).await?;
            "job.cancelled"
        }
        JobState::Running => {
            sqlx::query("UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tenant_event(&mut tx, &tenant_id, actor, "job.cancel_requested", ("job", id), json!({})).await?;
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL_CANCEL).bind(id).execute(&mut *tx).await?;
            "job.cancel_requested"
        }
        done => return Err(ServiceError::Conflict(format!("job {id} has already {}", done.finished_verb()))),
    };
    if tenant.is_none() {
        // An operator's cancel is also recorded on the operator chain.
        crate::audit_log::operator_event(&mut tx, Some(&tenant_id), actor, action, ("job", id), json!({}))
            .await?;
    }
    tx.commit().await?;
    if action == "job.cancelled" {
        tracing::info!(job = %id, tenant = %tenant_id, "job cancelled before it ran");
    }
    get(pool, &tenant_id, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_round_trip_by_name_and_only_the_last_three_are_final() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        let finals: Vec<&str> =
            JobState::ALL.into_iter().filter(|s| s.is_final()).map(JobState::as_str).collect();
        assert_eq!(finals, ["succeeded", "failed", "cancelled"]);
        let err = "done".parse::<JobState>().unwrap_err().to_string();
        assert_eq!(err, "unknown state \"done\": use one of queued, running, succeeded, failed, cancelled");
    }

    #[test]
    fn policy_defaults_dedups_and_names_unknown_packs() {
        assert_eq!(parse_policy(None, "secrets,pii").unwrap(), "secrets,pii");
        assert_eq!(parse_policy(Some("pii, pii,secrets"), "x").unwrap(), "pii,secrets");
        let err = parse_policy(Some("secrets,gdpr"), "secrets").unwrap_err();
        assert!(matches!(err, ServiceError::Unprocessable(_)));
        assert!(err.to_string().contains("\"gdpr\""), "{err}");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let id = ids::new_id("job");
        let c = make_cursor(t, &id);
        assert_eq!(parse_cursor(&c, "job"), Some((t, id)));
        assert_eq!(parse_cursor(&c, "session"), None);
        assert_eq!(parse_cursor("12.job_'; DROP TABLE jobs", "job"), None);
        assert_eq!(parse_cursor("x", "job"), None);
    }
}
