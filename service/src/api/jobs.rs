//! `/v1/jobs`: submit an artifact, read, list, fetch results, cancel.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::auth::TenantAuth;
use super::extract::{ApiQuery, JobId};
use super::upload;
use super::AppState;
use crate::error::ServiceError;
use crate::ids;
use crate::jobs::{self, JobOptions, JobPage, JobView, Submission, Submitted};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/sarif", get(sarif))
        .route("/v1/jobs/{id}/summary", get(summary))
        .route("/v1/jobs/{id}/cancel", post(cancel))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Rule packs, comma-separated: built-in (secrets, pii, licenses) and the tenant's own
    /// (`name`: its latest version now; `name@version`); default: the tenant's default policy,
    /// else the server's. The job records the exact versions.
    policy: Option<String>,
    /// The artifact's file name, for the record (e.g. `app.tar.gz`).
    name: Option<String>,
    /// Files not to scan: gitignore-like globs, comma-separated (`vendor/**,*.min.js`).
    exclude: Option<String>,
    /// A baseline (its id or name, see `/v1/baselines`): its findings are suppressed.
    baseline: Option<String>,
    /// The repository the artifact was taken from (an absolute URI), for the SARIF log.
    vcs_repo: Option<String>,
    /// Its revision (commit id).
    vcs_revision: Option<String>,
    /// Its branch.
    vcs_branch: Option<String>,
    /// Licenses to report at `error`: SPDX identifiers (`AGPL-3.0` also covers its `-only`,
    /// `-or-later` and `+` forms) or prefixes ending in `*`, comma-separated. An expression is
    /// judged as a whole: `MIT OR AGPL-3.0-only` is allowed.
    license_deny: Option<String>,
    /// Licenses to report at `warning` at least, as `license_deny`.
    license_flag: Option<String>,
}

/// A comma-separated query value as its trimmed, non-empty parts.
fn comma_list(value: Option<&str>) -> Vec<String> {
    value
        .map(|v| v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

impl SubmitQuery {
    /// The job's options, checked; a baseline named by its name becomes its id.
    async fn options(&self, state: &AppState, tenant: &str) -> Result<JobOptions, ServiceError> {
        let excludes = comma_list(self.exclude.as_deref());
        let baseline = match self.baseline.as_deref().filter(|b| !b.is_empty()) {
            None => None,
            Some(b) => Some(
                crate::baselines::get(&state.pool, tenant, b)
                    .await
                    .map_err(|e| match e {
                        ServiceError::NotFound(_) => ServiceError::Unprocessable(format!(
                            "no baseline {b:?}: store it first (POST /v1/baselines, `cella baseline push`)"
                        )),
                        other => other,
                    })?
                    .id,
            ),
        };
        let vcs = match (&self.vcs_repo, &self.vcs_revision, &self.vcs_branch) {
            (None, None, None) => None,
            (Some(repo), revision, branch) => Some(jobs::Vcs {
                repository_uri: repo.clone(),
                revision_id: revision.clone(),
                branch: branch.clone(),
            }),
            _ => return Err(ServiceError::Unprocessable("vcs_revision and vcs_branch need vcs_repo".into())),
        };
        let options = JobOptions {
            excludes,
            baseline,
            vcs,
            license_deny: comma_list(self.license_deny.as_deref()),
            license_flag: comma_list(self.license_flag.as_deref()),
        };
        options.check()?;
        Ok(options)
    }
}

const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Submits a scan: the request body is the artifact (tar, tar.gz, zip or a single file).
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security(("api_key" = [])),
    params(SubmitQuery, ("Idempotency-Key" = Option<String>, Header, description = "Repeat a submission safely: the same key and body return the same job")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The artifact"),
    responses(
        (status = 201, description = "Job created", body = JobView),
        (status = 200, description = "Idempotent replay: the job this key created before", body = JobView),
        (status = 400, description = "Bad request", content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", content_type = "application/problem+json"),
        (status = 408, description = "The upload stalled", content_type = "application/problem+json"),
        (status = 413, description = "Artifact too large", content_type = "application/problem+json"),
        (status = 507, description = "The server is out of disk space; nothing was kept: try again later", content_type = "application/problem+json"),
        (status = 422, description = "Unknown or deleted pack, a rule in two packs, or Idempotency-Key reused with a different request", content_type = "application/problem+json")))]
async fn submit(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(query): ApiQuery<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ServiceError> {
    // Resolved before the body is read: a bad name costs no upload.
    let default_policy = &state.config.jobs.default_policy;
    let policy = crate::packs::resolve(&state.pool, auth.tenant(), query.policy.as_deref(), default_policy)
        .await?
        .text();
    let options = query.options(&state, auth.tenant()).await?;
    let name = upload::check_name(query.name)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY);
            Some(
                key.ok_or_else(|| {
                    ServiceError::BadRequest(format!(
                        "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ))
                })?
                .to_owned(),
            )
        }
    };
    let job_id = ids::new_id("job");
    let path = state.data_dir.artifact(&job_id);
    // Named under its final path before the job exists, so a worker never sees a job without
    // its artifact; removed again if the job is not created.
    let stored =
        upload::store(&state, &auth, &headers, body, &path, state.config.jobs.max_artifact_bytes).await?;
    let (bytes, sha256) = (stored.bytes, stored.sha256);
    let sub = Submission {
        job_id,
        policy,
        artifact_name: name,
        artifact_bytes: bytes,
        artifact_sha256: sha256,
        idempotency_key,
        max_attempts: state.config.jobs.max_attempts,
        options,
    };
    // The key is checked again where the job is recorded: revoked during the upload, no job.
    let submitted = jobs::submit(&state.pool, auth.tenant(), auth.key_id(), &auth.actor(), &sub).await;
    drop(stored);
    match submitted {
        Ok(Submitted::Created(job)) => {
            let location = format!("/v1/jobs/{}", job.id);
            Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(job)).into_response())
        }
        Ok(Submitted::Replayed(job)) => {
            let _ = tokio::fs::remove_file(&path).await;
            Ok((StatusCode::OK, Json(job)).into_response())
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
    state: Option<String>,
    /// From a previous page's `next_cursor`.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    limit: Option<u32>,
}

/// Lists the caller's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security(("api_key" = [])), params(ListQuery),
    responses((status = 200, body = JobPage), (status = 400, description = "Bad state or cursor", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn list(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<JobPage>, ServiceError> {
    let page = jobs::list(
        &state.pool,
        auth.tenant(),
        q.state.as_deref(),
        q.cursor.as_deref(),
        q.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// Wait up to this many seconds (at most 60) for the job to end before answering.
    #[param(maximum = 60)]
    wait: Option<u64>,
}

/// One job; with `wait`, answers as soon as the job has ended (or the wait is over).
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("api_key" = [])), params(("id" = String, Path), GetQuery),
    responses((status = 200, body = JobView), (status = 400, description = "Bad wait", content_type = "application/problem+json"), (status = 404, description = "No such job of this tenant", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn get_job(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: JobId,
    ApiQuery(q): ApiQuery<GetQuery>,
) -> Result<Json<JobView>, ServiceError> {
    let wait = q.wait.unwrap_or(0);
    if wait > super::wait::MAX_WAIT_SECS {
        return Err(ServiceError::BadRequest(format!(
            "wait={wait} is more than {} seconds",
            super::wait::MAX_WAIT_SECS
        )));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut waiter = state.jobs_done.subscribe();
    loop {
        let job = jobs::get(&state.pool, auth.tenant(), &id).await?;
        if wait == 0 || job.state.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(job));
        }
        waiter.changed(&id, deadline).await;
    }
}

/// The SARIF 2.1.0 log of a succeeded job.
#[utoipa::path(get, path = "/v1/jobs/{id}/sarif", tag = "jobs", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "SARIF 2.1.0", content_type = "application/sarif+json"),
              (status = 404, description = "No such job, or no result yet", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn sarif(State(state): State<AppState>, auth: TenantAuth, id: JobId) -> Result<Response, ServiceError> {
    let bytes = jobs::sarif(&state.pool, auth.tenant(), &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/sarif+json")], bytes).into_response())
}

/// The findings summary of a succeeded job.
#[utoipa::path(get, path = "/v1/jobs/{id}/summary", tag = "jobs", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Counts by category and rule", body = Object),
              (status = 404, description = "No such job, or no result yet", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn summary(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: JobId,
) -> Result<Json<serde_json::Value>, ServiceError> {
    Ok(Json(jobs::summary(&state.pool, auth.tenant(), &id).await?))
}

/// Cancels a queued or running job (a running job's VM is stopped).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Cancelled, or cancellation requested (`cancel_requested`) for a running job", body = JobView),
              (status = 404, description = "No such job of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "The job has already finished", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn cancel(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: JobId,
) -> Result<Json<JobView>, ServiceError> {
    let job = jobs::cancel(&state.pool, Some(auth.tenant()), &id, &auth.actor()).await?;
    if job.state == jobs::JobState::Cancelled {
        let _ = tokio::fs::remove_file(state.data_dir.artifact(&id)).await;
    }
    Ok(Json(job))
}
