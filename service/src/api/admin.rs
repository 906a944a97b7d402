//! `/v1/admin`: the operators' API (admin credential). Tenants and their keys, workers and
//! their VMs, any job, any tenant's audit log. Every action is itself audited on the operator
//! chain (and on the tenant's chain when it concerns one).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cella_audit::{Chain, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;

use super::audit::{export_bundle, ExportQuery};
use super::auth::AdminAuth;
use super::extract::{ApiJson, ApiQuery, TenantId as TenantPath};
use super::{known_id, AppState};
use crate::audit_log::operator_event;
use crate::error::ServiceError;
use crate::jobs::{self, JobView};
use crate::quotas::{self, QuotaOverrides, QuotaView};
use crate::tenants::{self, KeyInfo, NewKey, Tenant};
use crate::worker::registry::{self, WorkerView};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/admin/tenants/{id}/suspend", post(suspend))
        .route("/v1/admin/tenants/{id}/reinstate", post(reinstate))
        .route("/v1/admin/tenants/{id}/keys", post(create_key).get(list_keys))
        .route("/v1/admin/tenants/{id}/keys/rotate", post(rotate_keys))
        .route("/v1/admin/tenants/{id}/keys/revoke", post(revoke_all_keys))
        .route("/v1/admin/tenants/{id}/keys/{key_id}/revoke", post(revoke_key))
        .route("/v1/admin/tenants/{id}/quotas", get(get_quotas).put(set_quotas))
        .route("/v1/admin/workers", get(list_workers))
        .route("/v1/admin/workers/{id}/drain", post(drain))
        .route("/v1/admin/workers/{id}/undrain", post(undrain))
        .route("/v1/admin/vms", get(list_vms))
        .route("/v1/admin/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/admin/audit/export", get(audit_export))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1-64 letters, digits, '-', '_' or '.'; unique.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    /// The most of its jobs that run at once (default from configuration).
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedTenant {
    pub tenant: Tenant,
    /// Its first API key (shown only now).
    pub key: NewKey,
}

const PROBLEM: &str = "application/problem+json";

/// Creates a tenant and its first API key.
#[utoipa::path(post, path = "/v1/admin/tenants", tag = "admin", security(("admin" = [])), request_body = CreateTenant,
    responses((status = 201, body = CreatedTenant), (status = 400, description = "Malformed JSON or bad name", content_type = PROBLEM),
              (status = 409, description = "Name taken", content_type = PROBLEM), (status = 422, description = "Wrong fields", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn create_tenant(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<Response, ServiceError> {
    let max = body.max_concurrent.unwrap_or(state.config.jobs.tenant_max_concurrent);
    let (tenant, key) = tenants::create_tenant(&state.pool, &body.name, max, &admin.actor()).await?;
    Ok((StatusCode::CREATED, Json(CreatedTenant { tenant, key })).into_response())
}

/// Every tenant.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "admin", security(("admin" = [])),
    responses((status = 200, body = Vec<Tenant>), (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn list_tenants(
    State(state): State<AppState>,
    _admin: AdminAuth,
) -> Result<Json<Vec<Tenant>>, ServiceError> {
    Ok(Json(tenants::list(&state.pool).await?))
}

/// Suspends a tenant: its keys answer 403, its queued jobs wait.
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/suspend", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Tenant), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn suspend(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: TenantPath,
) -> Result<Json<Tenant>, ServiceError> {
    Ok(Json(tenants::set_suspended(&state.pool, &id, true, &admin.actor()).await?))
}

/// Reinstates a suspended tenant.
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/reinstate", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Tenant), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn reinstate(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: TenantPath,
) -> Result<Json<Tenant>, ServiceError> {
    Ok(Json(tenants::set_suspended(&state.pool, &id, false, &admin.actor()).await?))
}

/// A tenant's quotas: its own values, those in force (its own, else the server's defaults) and
/// what it holds now.
#[utoipa::path(get, path = "/v1/admin/tenants/{id}/quotas", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = QuotaView), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn get_quotas(
    State(state): State<AppState>,
    _admin: AdminAuth,
    id: TenantPath,
) -> Result<Json<QuotaView>, ServiceError> {
    Ok(Json(quotas::view(&state.pool, &state.config, &id).await?))
}

/// Sets a tenant's quotas: every field (null or absent: back to the server's default).
/// Audited on the operator's chain and the tenant's (`tenant.quotas_changed`, before and after).
#[utoipa::path(put, path = "/v1/admin/tenants/{id}/quotas", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    request_body = QuotaOverrides,
    responses((status = 200, body = QuotaView), (status = 400, description = "Malformed JSON", content_type = PROBLEM),
              (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 422, description = "A value out of range, or an unknown field", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn set_quotas(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: TenantPath,
    ApiJson(body): ApiJson<QuotaOverrides>,
) -> Result<Json<QuotaView>, ServiceError> {
    Ok(Json(quotas::set(&state.pool, &state.config, &id, &body, &admin.actor()).await?))
}

/// A tenant's API keys, newest first: ids and when they were made and revoked (the keys
/// themselves are never stored).
#[utoipa::path(get, path = "/v1/admin/tenants/{id}/keys", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Vec<KeyInfo>), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn list_keys(
    State(state): State<AppState>,
    _admin: AdminAuth,
    id: TenantPath,
) -> Result<Json<Vec<KeyInfo>>, ServiceError> {
    Ok(Json(tenants::list_keys(&state.pool, &id).await?))
}

/// A new API key for a tenant (its other keys stay valid).
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/keys", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 201, body = NewKey), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn create_key(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: TenantPath,
) -> Result<Response, ServiceError> {
    let key = tenants::create_key(&state.pool, &id, &admin.actor()).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

/// Rotates a tenant's keys: revokes all of them and issues one new key.
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/keys/rotate", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 201, body = NewKey), (status = 404, description = "No such tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn rotate_keys(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(id): Path<String>,
) -> Result<Response, ServiceError> {
    let key = tenants::create_key(&state.pool, &id, &admin.actor()).await?;
    let old = tenants::active_keys(&state.pool, &id).await?.into_iter().filter(|k| *k != key.key_id);
    for old in old {
        tenants::revoke_keys(&state.pool, &id, Some(&old), &admin.actor()).await?;
    }
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revoked {
    pub revoked: u64,
}

/// Revokes all of a tenant's keys.
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/keys/revoke", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Revoked), (status = 404, description = "No active keys", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn revoke_all_keys(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: TenantPath,
) -> Result<Json<Revoked>, ServiceError> {
    Ok(Json(Revoked { revoked: tenants::revoke_keys(&state.pool, &id, None, &admin.actor()).await? }))
}

/// Revokes one key.
#[utoipa::path(post, path = "/v1/admin/tenants/{id}/keys/{key_id}/revoke", tag = "admin", security(("admin" = [])),
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 200, body = Revoked), (status = 404, description = "No such active key", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn revoke_key(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Json<Revoked>, ServiceError> {
    known_id(&id, "tenant")?;
    known_id(&key_id, "key")?;
    Ok(Json(Revoked {
        revoked: tenants::revoke_keys(&state.pool, &id, Some(&key_id), &admin.actor()).await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WorkersQuery {
    /// Also list stopped workers.
    all: Option<bool>,
}

/// Workers (live ones unless `all`).
#[utoipa::path(get, path = "/v1/admin/workers", tag = "admin", security(("admin" = [])), params(WorkersQuery),
    responses((status = 200, body = Vec<WorkerView>), (status = 400, description = "Bad query string", content_type = PROBLEM), (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn list_workers(
    State(state): State<AppState>,
    _admin: AdminAuth,
    ApiQuery(q): ApiQuery<WorkersQuery>,
) -> Result<Json<Vec<WorkerView>>, ServiceError> {
    Ok(Json(registry::list(&state.pool, q.all.unwrap_or(false)).await?))
}

async fn set_draining(
    state: &AppState,
    admin: &AdminAuth,
    id: &str,
    draining: bool,
) -> Result<Json<WorkerView>, ServiceError> {
    known_id(id, "worker")?;
    let mut tx = state.pool.begin().await?;
    let action = if draining { "worker.drained" } else { "worker.undrained" };
    operator_event(&mut tx, None, &admin.actor(), action, ("worker", id), json!({})).await?;
    registry::set_draining(&mut tx, id, draining).await?;
    tx.commit().await?;
    let view = registry::list(&state.pool, false).await?.into_iter().find(|w| w.id == id);
    view.map(Json).ok_or_else(|| ServiceError::NotFound(format!("running worker {id}")))
}

/// Drains a worker: it leases nothing more; its running jobs finish.
#[utoipa::path(post, path = "/v1/admin/workers/{id}/drain", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = WorkerView), (status = 404, description = "No such worker", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn drain(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<WorkerView>, ServiceError> {
    set_draining(&state, &admin, &id, true).await
}

/// Lets a drained worker take jobs again.
#[utoipa::path(post, path = "/v1/admin/workers/{id}/undrain", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = WorkerView), (status = 404, description = "No such worker", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn undrain(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<WorkerView>, ServiceError> {
    set_draining(&state, &admin, &id, false).await
}

/// A running VM.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VmView {
    pub job_id: String,
    pub tenant_id: String,
    pub worker_id: Option<String>,
    pub attempt: i32,
    /// The VMM's process id on the worker's host.
    pub pid: Option<i32>,
    pub mem_mib: Option<i32>,
    pub age_secs: f64,
}

/// Running VMs (one per running job) across all workers.
#[utoipa::path(get, path = "/v1/admin/vms", tag = "admin", security(("admin" = [])),
    responses((status = 200, body = Vec<VmView>), (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn list_vms(
    State(state): State<AppState>,
    _admin: AdminAuth,
) -> Result<Json<Vec<VmView>>, ServiceError> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, lease_owner, attempt, vm_pid, mem_mib,
                extract(epoch FROM now() - coalesce(started_at, updated_at))::float8 AS age
         FROM jobs WHERE state = 'running' ORDER BY started_at",
    )
    .fetch_all(&state.pool)
    .await?;
    let vms = rows
        .iter()
        .map(|r| {
            Ok(VmView {
                job_id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                worker_id: r.try_get("lease_owner")?,
                attempt: r.try_get("attempt")?,
                pid: r.try_get("vm_pid")?,
                mem_mib: r.try_get("mem_mib")?,
                age_secs: r.try_get("age")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(vms))
}

/// Cancels any tenant's job.
#[utoipa::path(post, path = "/v1/admin/jobs/{id}/cancel", tag = "admin", security(("admin" = [])), params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, description = "No such job", content_type = PROBLEM),
              (status = 409, description = "Already finished", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn cancel_job(
    State(state): State<AppState>,
    admin: AdminAuth,
    id: super::extract::JobId,
) -> Result<Json<JobView>, ServiceError> {
    let job = jobs::cancel(&state.pool, None, &id, &admin.actor()).await?;
    if job.state == jobs::JobState::Cancelled {
        let _ = tokio::fs::remove_file(state.data_dir.artifact(&id)).await;
    }
    Ok(Json(job))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminExportQuery {
    /// The tenant id, or `operator` for the operator chain.
    pub tenant: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub ocsf: Option<bool>,
}

/// Any tenant's audit log (or the operator chain) as a bundle.
#[utoipa::path(get, path = "/v1/admin/audit/export", tag = "admin", security(("admin" = [])), params(AdminExportQuery),
    responses((status = 200, description = "The bundle", content_type = "application/x-tar"),
              (status = 400, description = "Bad tenant or range", content_type = PROBLEM),
              (status = 404, description = "No events", content_type = PROBLEM),
              (status = 422, description = "The seq range lies outside the chain, or beyond its newest signed checkpoint", content_type = PROBLEM),
              (status = 401, description = "No or bad admin credential", content_type = PROBLEM)))]
async fn audit_export(
    State(state): State<AppState>,
    admin: AdminAuth,
    ApiQuery(q): ApiQuery<AdminExportQuery>,
) -> Result<Response, ServiceError> {
    let chain = if q.tenant == "operator" {
        Chain::Operator
    } else {
        Chain::Tenant(TenantId::new(q.tenant.clone()).map_err(|e| ServiceError::BadRequest(e.to_string()))?)
    };
    let mut tx = state.pool.begin().await?;
    operator_event(
        &mut tx,
        chain.tenant().map(|t| t.as_str()),
        &admin.actor(),
        "audit.exported",
        ("audit_chain", &chain.key()),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    let query = ExportQuery { from: q.from, to: q.to, ocsf: q.ocsf };
    export_bundle(&state, chain, &query).await
}
