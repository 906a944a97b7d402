//! `GET /v1/audit/export`: a tenant's own audit log as an offline-verifiable bundle
//! (`cella audit verify`); `GET /v1/audit/keys`: the public keys that sign its checkpoints, which
//! `cella audit download` saves next to the bundle and shows the fingerprint of (a reviewer
//! compares it with the one the operator gives out of band). Operators export any chain through
//! the admin API.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use cella_audit::event::format_time;
use cella_audit::export::{self, Export, ExportError, ExportRequest, Exported};
use cella_audit::{Chain, TenantId};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::task::JoinHandle;

use super::auth::TenantAuth;
use super::extract::ApiQuery;
use super::AppState;
use crate::error::ServiceError;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit/export", get(tenant_export)).route("/v1/audit/keys", get(keys))
}

/// One key that signs (or signed, before a rotation) the audit log's checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditKeyView {
    /// The id checkpoints name it by.
    pub id: String,
    /// Always `ed25519`.
    pub algorithm: String,
    /// The 32-byte public key, hex.
    pub public_key: String,
    /// `SHA256:` and the unpadded base64 of SHA-256 of the key bytes; compare it with the one
    /// your operator gives you.
    pub fingerprint: String,
    /// The public key file, as `cella audit verify --trusted-key FILE` reads it.
    pub public_key_file: String,
    /// When it became the signing key (RFC 3339).
    pub activated_at: String,
    /// When a rotation retired it (RFC 3339).
    pub retired_at: Option<String>,
    /// Whether new checkpoints are signed with it.
    pub current: bool,
}

/// `GET /v1/audit/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditKeys {
    /// Every key, oldest first.
    pub keys: Vec<AuditKeyView>,
}

/// The public keys of the audit log's checkpoints, oldest first: what `cella audit verify
/// --trusted-key` needs. Fetched over the same connection as the bundle, they guard against a
/// bundle changed later; against the server itself, compare the fingerprint with the one your
/// operator gives you.
#[utoipa::path(get, path = "/v1/audit/keys", tag = "audit", security(("api_key" = [])),
    responses((status = 200, body = AuditKeys),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn keys(State(state): State<AppState>, _auth: TenantAuth) -> Result<Json<AuditKeys>, ServiceError> {
    let records = cella_audit::store::keys(&mut *state.pool.acquire().await?).await?;
    let keys = records
        .into_iter()
        .map(|r| AuditKeyView {
            id: r.key.id.clone(),
            algorithm: "ed25519".to_owned(),
            public_key: cella_audit::hash::to_hex(&r.key.key),
            fingerprint: r.key.fingerprint(),
            public_key_file: r.key.to_file_text(),
            activated_at: format_time(r.activated_at),
            retired_at: r.retired_at.map(format_time),
            current: r.retired_at.is_none(),
        })
        .collect();
    Ok(Json(AuditKeys { keys }))
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
    let request = export_request(state, chain, q).await?;
    stream_bundle(state, &request).await
}

/// The export `q` asks for, with every event in it covered by a signed checkpoint: the query's
/// bounds as seqs, and a checkpoint cut first (with the service's signer), up to which the range
/// is clamped. Events appended after the cut stay out of the bundle, so it verifies whatever is
/// appended meanwhile.
pub async fn export_request(
    state: &AppState,
    chain: Chain,
    q: &ExportQuery,
) -> Result<ExportRequest, ServiceError> {
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
    let mut to = to;
    if let Some(key) = &state.signer {
        let policy = cella_audit::CheckpointPolicy::default();
        cella_audit::store::cut_checkpoint(&state.pool, &chain, key, policy, true).await?;
        // Without `to` the export stops at the newest checkpoint anyway; a `to` past the head
        // means the head, which is what the cut covered, even if events were appended since.
        let covered = cella_audit::store::covered(&mut *state.pool.acquire().await?, &chain).await?;
        to = to.map(|t| t.min(covered));
    }
    Ok(ExportRequest { chain, from, to, ocsf: q.ocsf.unwrap_or(false) })
}

/// Streams the bundle of `request` (see [`export_bundle`]).
pub async fn stream_bundle(state: &AppState, request: &ExportRequest) -> Result<Response, ServiceError> {
    let chain = request.chain.clone();
    // Range errors become problem documents here; after this the response streams.
    let export = Export::begin(&state.pool, request).await.map_err(export_error)?;
    let range = export.range();
    let file = format!("cella-audit-{}-{}-{}.tar", chain.key().replace(':', "-"), range.from, range.to);
    let (writer, reader) = tokio::io::duplex(STREAM_BUFFER);
    let what = chain.key();
    let task = tokio::spawn(async move {
        let result = export.write_to(writer).await;
        if let Err(e) = &result {
            // The status line is sent: the client learns of it only by the aborted transfer.
            tracing::warn!(chain = %what, error = %error_chain(e), "audit export abandoned mid-stream");
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
        e @ (ExportError::EmptyRange { .. }
        | ExportError::NotCovered { .. }
        | ExportError::NoCheckpoint { .. }) => ServiceError::Unprocessable(e.to_string()),
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
              (status = 422, description = "The seq range lies outside the chain, or beyond its newest signed checkpoint", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn tenant_export(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ServiceError> {
    let tenant = TenantId::new(auth.tenant()).map_err(|e| ServiceError::Internal(e.to_string()))?;
    export_bundle(&state, Chain::Tenant(tenant), &q).await
}
