//! The HTTP API: `app(state)` builds the router (tests call it directly with tower's `oneshot`;
//! `server` serves it over TLS). One router per resource; authentication lives in the
//! extractors of [`auth`]; errors become problem documents in [`crate::error`].

pub mod admin;
pub mod audit;
pub mod auth;
pub mod baselines;
pub mod extract;
pub mod jobs;
pub mod openapi;
pub mod packs;
pub mod sessions;
pub mod upload;
pub mod wait;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;

use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::{problem, ServiceError};
use crate::metrics::Metrics;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub data_dir: DataDir,
    pub metrics: Arc<Metrics>,
    /// The checkpoint signing key: exports cut a checkpoint first, so every exported event is
    /// covered by a signature.
    pub signer: Option<Arc<cella_audit::SigningKey>>,
    /// Job-finished notifications for `GET /v1/jobs/{id}?wait=`.
    pub jobs_done: wait::JobsDone,
    /// The sessions of this host.
    pub sessions: Arc<crate::sessions::SessionManager>,
    /// What each tenant has in flight (requests, uploads), against its quotas.
    pub limits: crate::limits::TenantLimits,
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(jobs::router())
        .merge(baselines::router())
        .merge(sessions::router())
        .merge(packs::router())
        .merge(audit::router())
        .merge(admin::router())
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            problem(StatusCode::NOT_FOUND, "not-found", "no such endpoint; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn(only_health_and_operator_beyond_the_limit))
        .layer(axum::middleware::map_response(close_after_refused_body))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Every answer, problem documents and fallbacks included: HTTPS only from now on (HSTS), no
/// content sniffing, and nothing kept by a cache or proxy (SARIF logs, summaries, audit bundles
/// and session data are one tenant's; the rest is not worth the risk of a mistake).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::STRICT_TRANSPORT_SECURITY, header::HeaderValue::from_static("max-age=31536000"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

/// A request on a connection beyond the server's limit ([`crate::server::BeyondTheLimit`]) is
/// answered 503 with `Retry-After`, unless it is the health check or carries the operator's
/// credential (checked by its handler as always): connections are taken before anyone is
/// known, so a tenant's flood can fill them all, and then the service must still tell its
/// health checks it is alive and let its operator in to stop the flood.
async fn only_health_and_operator_beyond_the_limit(request: Request, next: Next) -> Response {
    let Some(beyond) = request.extensions().get::<crate::server::BeyondTheLimit>().copied() else {
        return next.run(request).await;
    };
    let operator = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim().starts_with(crate::ids::ADMIN_KEY_PREFIX)
        });
    if request.uri().path() == "/healthz" || operator {
        return next.run(request).await;
    }
    ServiceError::Overloaded {
        detail: "the server is at its connection limit; try again shortly".to_owned(),
        retry_after: beyond.retry_after,
    }
    .into_response()
}

/// An error answer closes the connection: the request's body may be unread (an upload refused
/// by its size, a parameter or its key before a byte of it was read), and a client must not
/// send its next request on a connection the server ends. The server reads and drops what the
/// client still sends as it closes (`server::Linger`).
async fn close_after_refused_body(mut response: Response) -> Response {
    if response.status().is_client_error() || response.status().is_server_error() {
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

/// A path id must look like one of ours (`job_…`, `session_…`, `tenant_…`, `worker_…`), or the answer is
/// 404 without touching the database or the audit log.
pub fn known_id(id: &str, prefix: &str) -> Result<(), ServiceError> {
    if crate::ids::is_id(id, prefix) {
        Ok(())
    } else {
        Err(ServiceError::NotFound(format!("{prefix} {id:?}")))
    }
}

/// Liveness: the API answers and reaches its database.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "the API and its database are up"), (status = 503, description = "the database is unreachable")))]
async fn healthz(State(state): State<AppState>) -> Result<Response, ServiceError> {
    sqlx::query("SELECT 1").execute(&state.pool).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}").into_response())
}

/// Prometheus metrics (operators only).
#[utoipa::path(get, path = "/metrics", tag = "admin", security(("admin" = [])),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
              (status = 401, description = "no or bad admin credential")))]
async fn metrics(State(state): State<AppState>, _admin: auth::AdminAuth) -> Result<Response, ServiceError> {
    let text = state.metrics.render(&state.pool).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
