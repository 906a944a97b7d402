//! `/v1/baselines`: a tenant's baselines of known findings, which jobs name to report only new
//! ones (see [`crate::baselines`]).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cella_policies::baseline::Baseline;
use serde::Deserialize;

use super::auth::TenantAuth;
use super::extract::ApiQuery;
use super::AppState;
use crate::baselines::{self, BaselineView};
use crate::error::ServiceError;

/// The largest baseline body accepted (a baseline file or a SARIF log).
pub const MAX_BASELINE_BYTES: usize = 32 << 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/baselines", post(create).get(list))
        .route("/v1/baselines/{id}", get(show).delete(delete))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BASELINE_BYTES))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// A name jobs can use instead of its id (1-64 letters, digits, `.`, `_`, `-`).
    name: Option<String>,
}

const PROBLEM: &str = "application/problem+json";

/// Stores a baseline: the body is a Cella baseline file (`cella-baseline/1`) or the SARIF log of
/// an earlier Cella scan (its results' `cellaLocation/v1` fingerprints are kept). The same
/// fingerprints stored again answer the baseline already kept (200).
#[utoipa::path(post, path = "/v1/baselines", tag = "baselines", security(("api_key" = [])), params(CreateQuery),
    request_body(content = Vec<u8>, content_type = "application/json", description = "A baseline file or a SARIF log"),
    responses((status = 201, body = BaselineView), (status = 200, description = "Stored before", body = BaselineView),
              (status = 409, description = "The name is taken", content_type = PROBLEM),
              (status = 413, description = "Larger than 32 MiB", content_type = PROBLEM),
              (status = 422, description = "Not a baseline file or a Cella SARIF log (the detail says why), or a bad name", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn create(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<CreateQuery>,
    body: Bytes,
) -> Result<Response, ServiceError> {
    let baseline =
        Baseline::parse(&body).map_err(|e| ServiceError::Unprocessable(crate::error::error_chain(&e)))?;
    let name = q.name.filter(|n| !n.is_empty());
    let (view, created) =
        baselines::create(&state.pool, auth.tenant(), &auth.actor(), name.as_deref(), &baseline).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view)).into_response())
}

/// The tenant's baselines, newest first.
#[utoipa::path(get, path = "/v1/baselines", tag = "baselines", security(("api_key" = [])),
    responses((status = 200, body = Vec<BaselineView>), (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn list(
    State(state): State<AppState>,
    auth: TenantAuth,
) -> Result<Json<Vec<BaselineView>>, ServiceError> {
    Ok(Json(baselines::list(&state.pool, auth.tenant()).await?))
}

/// A baseline (by id or name) as a baseline file.
#[utoipa::path(get, path = "/v1/baselines/{id}", tag = "baselines", security(("api_key" = [])), params(("id" = String, Path, description = "Its id or name")),
    responses((status = 200, description = "The baseline file (cella-baseline/1)", content_type = "application/json"),
              (status = 404, description = "No such baseline of this tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn show(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path(id): Path<String>,
) -> Result<Response, ServiceError> {
    let text = baselines::file_text(&state.pool, auth.tenant(), &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

/// Deletes a baseline (by id or name): new jobs cannot name it; jobs queued with it keep it.
#[utoipa::path(delete, path = "/v1/baselines/{id}", tag = "baselines", security(("api_key" = [])), params(("id" = String, Path, description = "Its id or name")),
    responses((status = 200, body = BaselineView), (status = 404, description = "No such baseline of this tenant", content_type = PROBLEM),
              (status = 401, description = "No or bad API key", content_type = PROBLEM)))]
async fn delete(
    State(state): State<AppState>,
    auth: TenantAuth,
    Path(id): Path<String>,
) -> Result<Json<BaselineView>, ServiceError> {
    Ok(Json(baselines::delete(&state.pool, auth.tenant(), &id, &auth.actor()).await?))
}
