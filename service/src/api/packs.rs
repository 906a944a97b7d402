//! `/v1/packs`: a tenant's own rule packs (upload, list, read, delete) and `/v1/tenant/…`: its
//! default policy and what a policy resolves to. See [`crate::packs`].

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;

use super::auth::TenantAuth;
use super::extract::{ApiJson, ApiQuery};
use super::AppState;
use crate::error::ServiceError;
use crate::license_policy::LicensePolicyView;
use crate::packs::{
    self, DefaultPolicy, Deleted, PackHistory, PackList, PackVersion, PackVersionDetail, ResolvedPolicy,
    Upload,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/packs", post(create).get(list))
        .route("/v1/packs/{name}", get(history).delete(delete_pack))
        .route("/v1/packs/{name}/versions/{version}", get(get_version).delete(delete_version))
        .route("/v1/tenant/default-policy", get(get_default).put(set_default))
        .route("/v1/tenant/license-policy", get(get_license_policy).put(set_license_policy))
        .route("/v1/tenant/policy", get(check_policy))
}

const PROBLEM: &str = "application/problem+json";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// The pack's name (1-64 lowercase letters, digits, '-', '_'); default: a Cella pack's
    /// `[pack] name` (a gitleaks configuration must be named)
    name: Option<String>,
    /// `cella` or `gitleaks`; default: guessed from the content (`[pack]` → cella)
    format: Option<String>,
}

/// Uploads a new version of a rule pack (the body: Cella's pack TOML, or a gitleaks
/// configuration, converted). Versions of one name count up from 1. Audited (`pack.created`).
#[utoipa::path(post, path = "/v1/packs", tag = "packs", security(("api_key" = [])), params(CreateQuery),
    request_body(content = String, content_type = "text/plain", description = "The pack file (TOML)"),
    responses(
        (status = 201, description = "Stored: its name, version, SHA-256 and rules", body = PackVersion),
        (status = 400, description = "Bad query string, or the body broke off", content_type = PROBLEM),
        (status = 401, description = "No or bad API key", content_type = PROBLEM),
        (status = 409, description = "Over the tenant's packs or pack_compiled_bytes quota", content_type = PROBLEM),
        (status = 422, description = "The pack is refused: the detail says what and where (line, column)", content_type = PROBLEM)))]
async fn create(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(query): ApiQuery<CreateQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ServiceError> {
    let limit = packs::limits().max_bytes;
    let too_large = || {
        ServiceError::Unprocessable(format!(
            "the pack is refused: it is larger than the limit of {limit} bytes: split it into smaller packs"
        ))
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ServiceError::BadRequest(format!("the pack's upload broke off: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let upload = Upload { name: query.name.as_deref(), format: query.format.as_deref(), body: &bytes };
    let version =
        packs::create(&state.pool, auth.tenant(), auth.key_id(), &auth.actor(), &auth.quotas, upload).await?;
    let location = format!("/v1/packs/{}/versions/{}", version.name, version.version);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(version)).into_response())
}

/// The tenant's packs that have a live version: the latest (what `name` alone selects) and all.
#[utoipa::path(get, path = "/v1/packs", tag = "packs", security(("api_key" = [])),
    responses((status = 200, body = PackList), (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn list(State(state): State<AppState>, auth: TenantAuth) -> Result<Json<PackList>, ServiceError> {
    Ok(Json(packs::list(&state.pool, auth.tenant()).await?))
}

/// Every version a pack had, deleted ones too.
#[utoipa::path(get, path = "/v1/packs/{name}", tag = "packs", security(("api_key" = [])), params(("name" = String, Path)),
    responses((status = 200, body = PackHistory), (status = 404, description = "The tenant has no pack of this name", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn history(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path(name): Path<String>,
) -> Result<Json<PackHistory>, ServiceError> {
    Ok(Json(packs::history(&state.pool, auth.tenant(), &name).await?))
}

fn version_number(name: &str, version: &str) -> Result<i32, ServiceError> {
    version.parse::<i32>().ok().filter(|v| *v >= 1).ok_or_else(|| {
        ServiceError::NotFound(format!(
            "pack {:?} (versions are numbers from 1)",
            format!("{name}@{version}")
        ))
    })
}

/// One version of a pack: the text as uploaded and its Cella TOML.
#[utoipa::path(get, path = "/v1/packs/{name}/versions/{version}", tag = "packs", security(("api_key" = [])),
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = PackVersionDetail), (status = 404, description = "No such version of this tenant's pack", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn get_version(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<PackVersionDetail>, ServiceError> {
    let v = version_number(&name, &version)?;
    Ok(Json(packs::version(&state.pool, auth.tenant(), &name, v).await?))
}

/// Deletes every live version of a pack (kept for the record; no longer selectable; queued jobs
/// that name one fail). Audited (`pack.deleted`).
#[utoipa::path(delete, path = "/v1/packs/{name}", tag = "packs", security(("api_key" = [])), params(("name" = String, Path)),
    responses((status = 200, description = "The versions deleted", body = Deleted),
              (status = 404, description = "No live version of this tenant's pack", content_type = PROBLEM),
              (status = 409, description = "The tenant's default policy needs it: change that first", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn delete_pack(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ServiceError> {
    Ok(Json(packs::delete(&state.pool, auth.tenant(), &name, None, &auth.actor()).await?))
}

/// Deletes one version of a pack. Audited (`pack.deleted`).
#[utoipa::path(delete, path = "/v1/packs/{name}/versions/{version}", tag = "packs", security(("api_key" = [])),
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, description = "The version deleted", body = Deleted),
              (status = 404, description = "No such live version of this tenant's pack", content_type = PROBLEM),
              (status = 409, description = "The tenant's default policy needs it: change that first", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn delete_version(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Deleted>, ServiceError> {
    let v = version_number(&name, &version)?;
    Ok(Json(packs::delete(&state.pool, auth.tenant(), &name, Some(v), &auth.actor()).await?))
}

/// The tenant's default policy (what its jobs and session scans without `policy` run).
#[utoipa::path(get, path = "/v1/tenant/default-policy", tag = "packs", security(("api_key" = [])),
    responses((status = 200, body = DefaultPolicy),
              (status = 422, description = "The default policy no longer resolves (the detail says why)", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn get_default(
    State(state): State<AppState>,
    auth: TenantAuth,
) -> Result<Json<DefaultPolicy>, ServiceError> {
    Ok(Json(packs::default_policy(&state.pool, auth.tenant(), &state.config.jobs.default_policy).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDefaultPolicy {
    /// Built-in packs and the tenant's (`name`: the latest version when a job is submitted;
    /// `name@version`), comma-separated; null: the server's default.
    pub policy: Option<String>,
}

/// Sets the tenant's default policy (it must resolve now). Audited
/// (`tenant.default_policy_changed`).
#[utoipa::path(put, path = "/v1/tenant/default-policy", tag = "packs", security(("api_key" = [])), request_body = SetDefaultPolicy,
    responses((status = 200, body = DefaultPolicy),
              (status = 400, description = "Malformed JSON", content_type = PROBLEM),
              (status = 422, description = "Wrong fields, or a pack that does not exist or a rule in two packs", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn set_default(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiJson(body): ApiJson<SetDefaultPolicy>,
) -> Result<Json<DefaultPolicy>, ServiceError> {
    let server_default = &state.config.jobs.default_policy;
    let policy = body.policy.as_deref();
    Ok(Json(
        packs::set_default_policy(&state.pool, auth.tenant(), &auth.actor(), policy, server_default).await?,
    ))
}

/// The tenant's license policy: what its jobs that give none of their own report at `error`
/// (`deny`) and at `warning` at least (`flag`).
#[utoipa::path(get, path = "/v1/tenant/license-policy", tag = "packs", security(("api_key" = [])),
    responses((status = 200, body = LicensePolicyView),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn get_license_policy(
    State(state): State<AppState>,
    auth: TenantAuth,
) -> Result<Json<LicensePolicyView>, ServiceError> {
    Ok(Json(crate::license_policy::get(&state.pool, auth.tenant()).await?))
}

/// Sets the tenant's license policy (empty lists: none). Applied to each job that gives none
/// when it is leased. Audited (`tenant.license_policy_changed`).
#[utoipa::path(put, path = "/v1/tenant/license-policy", tag = "packs", security(("api_key" = [])),
    request_body = LicensePolicyView,
    responses((status = 200, body = LicensePolicyView),
              (status = 400, description = "Malformed JSON", content_type = PROBLEM),
              (status = 422, description = "Wrong fields, or an entry that is not a license identifier or a prefix", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn set_license_policy(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiJson(body): ApiJson<LicensePolicyView>,
) -> Result<Json<LicensePolicyView>, ServiceError> {
    Ok(Json(crate::license_policy::set(&state.pool, auth.tenant(), &auth.actor(), body).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PolicyQuery {
    /// As for `POST /v1/jobs`; none: the tenant's default policy, else the server's
    policy: Option<String>,
}

/// What a job submitted with this `policy` would run: built-in packs and exact versions of the
/// tenant's (the check `cella scan` makes before it uploads anything).
#[utoipa::path(get, path = "/v1/tenant/policy", tag = "packs", security(("api_key" = [])), params(PolicyQuery),
    responses((status = 200, body = ResolvedPolicy),
              (status = 400, description = "Bad query string", content_type = PROBLEM),
              (status = 422, description = "An unknown or deleted pack, or a rule in two packs (the detail names it)", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn check_policy(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<PolicyQuery>,
) -> Result<Json<ResolvedPolicy>, ServiceError> {
    let server_default = &state.config.jobs.default_policy;
    Ok(Json(packs::resolve(&state.pool, auth.tenant(), q.policy.as_deref(), server_default).await?))
}
