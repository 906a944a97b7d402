//! `GET /v1/audit/export`: a tenant's own audit log as an offline-verifiable bundle
//! (`cella audit verify`). Operators export any chain through the admin API.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cella_audit::export::{self, ExportError, ExportRequest};
use cella_audit::{Chain, TenantId};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::auth::TenantAuth;
use super::extract::ApiQuery;
use super::AppState;
use crate::error::ServiceError;

/// The most events one export request returns (the bundle is assembled in memory).
pub const MAX_EXPORT_EVENTS: u64 = 250_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit/export", get(tenant_export))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// First event: a sequence number, or an RFC 3339 time.
    pub from: Option<String>,
    /// Last event: a sequence number, or an RFC 3339 time.
    pub to: Option<String>,
    /// Also include `ocsf.jsonl` (OCSF API Activity, for SIEMs).
    pub ocsf: Option<bool>,
}

/// A bound given as a seq or a time.
enum Bound {
    Seq(u64),
    Time(OffsetDateTime),
}

fn parse_bound(name: &str, value: Option<&str>) -> Result<Option<Bound>, ServiceError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else { return Ok(None) };
    if let Ok(seq) = v.parse::<u64>() {
        return Ok(Some(Bound::Seq(seq)));
    }
    OffsetDateTime::parse(v, &Rfc3339).map(|t| Some(Bound::Time(t))).map_err(|_| {
        ServiceError::BadRequest(format!("{name}={v:?} is neither a sequence number nor an RFC 3339 time"))
    })
}

/// Builds the bundle for `chain` and the requested range.
pub async fn export_bundle(
    state: &AppState,
    chain: Chain,
    q: &ExportQuery,
) -> Result<Response, ServiceError> {
    let from = parse_bound("from", q.from.as_deref())?;
    let to = parse_bound("to", q.to.as_deref())?;
    let any_time = matches!(from, Some(Bound::Time(_))) || matches!(to, Some(Bound::Time(_)));
    let (from, to) = match (from, to) {
        (from, to) if any_time => {
            let as_time = |b: &Option<Bound>, default: OffsetDateTime| match b {
                Some(Bound::Time(t)) => Ok(*t),
                None => Ok(default),
                Some(Bound::Seq(_)) => Err(ServiceError::BadRequest(
                    "give from and to both as times or both as sequence numbers".into(),
                )),
            };
            let lo = as_time(&from, OffsetDateTime::UNIX_EPOCH)?;
            let hi = as_time(&to, OffsetDateTime::now_utc())?;
            match export::seq_range_for_times(&state.pool, &chain, lo, hi).await.map_err(export_error)? {
                Some((a, b)) => (Some(a), Some(b)),
                None => {
                    return Err(ServiceError::NotFound(format!("audit events of {chain} in that time range")))
                }
            }
        }
        (f, t) => (
            f.map(|b| if let Bound::Seq(s) = b { s } else { 0 }),
            t.map(|b| if let Bound::Seq(s) = b { s } else { 0 }),
        ),
    };
    // The bundle is built in memory: one request exports at most MAX_EXPORT_EVENTS events.
    let head: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit_heads WHERE chain = $1")
        .bind(chain.key())
        .fetch_optional(&state.pool)
        .await?;
    let head = u64::try_from(head.unwrap_or(0)).unwrap_or(0);
    let (first, last) = (from.unwrap_or(1).max(1), to.unwrap_or(head).min(head));
    if last >= first && last - first + 1 > MAX_EXPORT_EVENTS {
        return Err(ServiceError::Unprocessable(format!(
            "{chain} has {} events in seq {first}..{last}; one export holds at most {MAX_EXPORT_EVENTS}: \
             ask for a range with from= and to= (e.g. from={first}&to={})",
            last - first + 1,
            first + MAX_EXPORT_EVENTS - 1
        )));
    }
    if let Some(key) = &state.signer {
        cella_audit::store::cut_checkpoint(
            &state.pool,
            &chain,
            key,
            cella_audit::CheckpointPolicy::default(),
            true,
        )
        .await?;
    }
    let request = ExportRequest { chain: chain.clone(), from, to, ocsf: q.ocsf.unwrap_or(false) };
    let mut bundle = Vec::new();
    let manifest = export::export(&state.pool, &request, &mut bundle).await.map_err(export_error)?;
    let file = format!(
        "cella-audit-{}-{}-{}.tar",
        chain.key().replace(':', "-"),
        manifest.range.from,
        manifest.range.to
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
        ],
        bundle,
    )
        .into_response())
}

fn export_error(e: ExportError) -> ServiceError {
    match e {
        ExportError::NoEvents(what) => ServiceError::NotFound(format!("audit events of {what}")),
        e @ ExportError::EmptyRange { .. } => ServiceError::Unprocessable(e.to_string()),
        ExportError::Db(db) => db.into(),
        other => ServiceError::Internal(format!("audit export: {other}")),
    }
}

/// The caller's own audit log as a bundle (tar) that `cella audit verify` checks offline.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", security(("api_key" = [])), params(ExportQuery),
    responses((status = 200, description = "The bundle", content_type = "application/x-tar"),
              (status = 400, description = "Bad range", content_type = "application/problem+json"),
              (status = 404, description = "No events in the range", content_type = "application/problem+json"),
              (status = 422, description = "The range holds more events than one export may", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn tenant_export(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ServiceError> {
    let tenant = TenantId::new(auth.tenant()).map_err(|e| ServiceError::Internal(e.to_string()))?;
    export_bundle(&state, Chain::Tenant(tenant), &q).await
}
