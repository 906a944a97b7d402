//! `GET /v1/audit/export`: a tenant's own audit log as an offline-verifiable bundle
//! (`cella audit verify`). Operators export any chain through the admin API.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use cella_audit::export::{self, Export, ExportError, ExportRequest, Exported};
use cella_audit::{Chain, TenantId};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::task::JoinHandle;

use super::auth::TenantAuth;
use super::extract::ApiQuery;
use super::AppState;
use crate::error::ServiceError;

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

/// Answers with the bundle for `chain` and the requested range, streamed: range problems are
/// problem documents; once the range is checked the bundle is written while it is read from the
/// database (`cella_audit::export`), in bounded memory whatever the chain's length.
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
    // Range errors become problem documents here; after this the response streams.
    let export = Export::begin(&state.pool, &request).await.map_err(export_error)?;
    let range = export.range();
    let file = format!("cella-audit-{}-{}-{}.tar", chain.key().replace(':', "-"), range.from, range.to);
    let (writer, reader) = tokio::io::duplex(STREAM_BUFFER);
    let what = chain.key();
    let task = tokio::spawn(async move {
        let result = export.write_to(writer).await;
        if let Err(e) = &result {
            // The status line is sent: the client learns of it only by the aborted transfer.
            eprintln!("cella serve: audit export of {what} abandoned mid-stream: {}", error_chain(e));
        }
        result
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
        ],
        Body::from_stream(export_body(reader, task)),
    )
        .into_response())
}

/// Bytes buffered between the export task and the response body.
const STREAM_BUFFER: usize = 256 * 1024;

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The response body: what the export task writes, then — if the task failed — an error, which
/// makes hyper abort the transfer instead of ending it cleanly (a client must not mistake a cut
/// bundle for a whole one). Dropping the body (client gone) closes the pipe, so the task's next
/// write fails and it rolls back its snapshot.
fn export_body(
    reader: DuplexStream,
    task: JoinHandle<Result<Exported, ExportError>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some((reader, task)), |state| async move {
        let (mut reader, task) = state?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match reader.read_buf(&mut buf).await {
            Ok(0) => match task.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some((Err(std::io::Error::other(format!("audit export failed: {e}"))), None)),
                Err(e) => Some((Err(std::io::Error::other(format!("audit export task failed: {e}"))), None)),
            },
            Ok(_) => Some((Ok(buf.freeze()), Some((reader, task)))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

fn export_error(e: ExportError) -> ServiceError {
    match e {
        ExportError::NoEvents(what) => ServiceError::NotFound(format!("audit events of {what}")),
        e @ ExportError::EmptyRange { .. } => ServiceError::Unprocessable(e.to_string()),
        ExportError::Db(db) => db.into(),
        ExportError::Store(store) => store.into(),
        other => ServiceError::Internal(format!("audit export: {other}")),
    }
}

/// The caller's own audit log as a bundle (tar) that `cella audit verify` checks offline.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", security(("api_key" = [])), params(ExportQuery),
    responses((status = 200, description = "The bundle", content_type = "application/x-tar"),
              (status = 400, description = "Bad range", content_type = "application/problem+json"),
              (status = 404, description = "No events in the range", content_type = "application/problem+json"),
              (status = 422, description = "The seq range lies outside the chain", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn tenant_export(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ServiceError> {
    let tenant = TenantId::new(auth.tenant()).map_err(|e| ServiceError::Internal(e.to_string()))?;
    export_bundle(&state, Chain::Tenant(tenant), &q).await
}
