//! `/v1/sessions`: create a session on an artifact, read and list sessions, pause, suspend,
//! resume, connect, exec requests in the guest, add files, terminate.
//!
//! Calls that need the VM (exec, files) answer 409 on a paused or suspended session, saying to
//! resume or connect first: a session that an operator, a tenant or the idle policy put to rest
//! is woken only by an explicit call.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use cella_proto::SessionRequest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::TenantAuth;
use super::extract::{ApiJson, ApiQuery, SessionId};
use super::{upload, AppState};
use crate::config::SESSION_MAX_DURATION_CAP_SECS;
use crate::error::ServiceError;
use crate::sessions::manager::wrong_state;
use crate::sessions::store;
use crate::sessions::vmm::{Attach, Frame, Reply};
use crate::sessions::{SessionPage, SessionParams, SessionView, State as SessionState};
use crate::{files, ids, jobs, quotas, tenants};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(get_session).delete(terminate))
        .route("/v1/sessions/{id}/pause", post(pause))
        .route("/v1/sessions/{id}/suspend", post(suspend))
        .route("/v1/sessions/{id}/resume", post(resume))
        .route("/v1/sessions/{id}/connect", post(connect))
        .route("/v1/sessions/{id}/exec", post(exec))
        .route("/v1/sessions/{id}/files", post(add_file))
}

/// Default and largest `grep` result, in matching lines.
const GREP_DEFAULT_MATCHES: u32 = 100;
/// Default and largest `read`, in bytes.
const READ_DEFAULT_BYTES: u64 = 1 << 20;
const READ_MAX_BYTES: u64 = 16 << 20;
/// The largest file `files` adds (one protocol frame, held in memory on its way).
const ADD_MAX_BYTES: u64 = 64 << 20;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// Seconds the session may live, running and suspended (at most 28800, 8 h; default: the
    /// server's `sessions.max_duration_secs`).
    #[param(maximum = 28800)]
    max_duration: Option<u64>,
    /// Seconds without exec or connect after which it is suspended (0: never; default: the
    /// server's `sessions.default_idle_suspend_secs`).
    idle_suspend: Option<u64>,
    /// What `read` returns: `deny`, `redact` (findings masked; default) or `allow`.
    read_policy: Option<String>,
    /// Guest memory in MiB (16-8192; default: the server's `sessions.mem_mib`).
    mem_mib: Option<u32>,
    /// The artifact's file name, for the record (e.g. `app.tar.gz`).
    name: Option<String>,
}

/// Creates a session: the request body is the artifact (tar, tar.gz, zip or a single file),
/// which the session's VM loads and indexes once. Answers when the VM is running (or has
/// failed to start: then `state` is `failed` and `error` says why).
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", security(("api_key" = [])), params(CreateQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The artifact"),
    responses(
        (status = 201, description = "Session created (running, or failed with the reason)", body = SessionView),
        (status = 400, description = "Bad request", content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", content_type = "application/problem+json"),
        (status = 408, description = "The upload stalled", content_type = "application/problem+json"),
        (status = 409, description = "The tenant holds sessions.max_per_tenant live sessions already", content_type = "application/problem+json"),
        (status = 413, description = "Artifact too large", content_type = "application/problem+json"),
        (status = 507, description = "The server is out of disk space; nothing was kept: try again later", content_type = "application/problem+json"),
        (status = 422, description = "max_duration, idle_suspend, read_policy or mem_mib out of range", content_type = "application/problem+json")))]
async fn create(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<CreateQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ServiceError> {
    let params = SessionParams::validate(
        &state.config.sessions,
        q.max_duration,
        q.idle_suspend,
        q.read_policy.as_deref(),
        q.mem_mib,
    )?;
    let name = upload::check_name(q.name)?;
    // The quotas first, so a tenant at its limit learns it before it sends the artifact (the
    // row's insert checks them again, under the tenant's lock).
    let usage = quotas::usage(&state.pool, auth.tenant()).await?;
    store::check_session_quotas(
        &usage,
        params.mem_mib,
        auth.quotas.live_sessions,
        auth.quotas.session_mem_mib,
    )?;
    let admitted = upload::admit(&state, &auth, &headers, state.config.jobs.max_artifact_bytes).await?;
    let id = ids::new_id("session");
    let paths = state.sessions.paths(&id);
    files::create_private_dir(&paths.dir)
        .map_err(|e| ServiceError::file("creating the session's folder", &e))?;
    let stored = match upload::store_admitted(&state, admitted, body, &paths.artifact).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&paths.dir).await;
            return Err(e);
        }
    };
    let created = state
        .sessions
        .create(
            &id,
            &auth.caller,
            &auth.quotas,
            &auth.actor(),
            name.as_deref(),
            stored.bytes,
            stored.sha256,
            &params,
        )
        .await;
    drop(stored);
    match created {
        Ok(s) => {
            let location = format!("/v1/sessions/{id}");
            Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(s.view())).into_response())
        }
        Err(e) => {
            if !store::exists(&state.pool, &id).await.unwrap_or(true) {
                let _ = tokio::fs::remove_dir_all(&paths.dir).await;
            }
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only sessions in this state.
    state: Option<String>,
    /// From a previous page's `next_cursor`.
    cursor: Option<String>,
    /// Page size, 1-200 (default 50).
    limit: Option<u32>,
}

/// Lists the caller's sessions, newest first.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", security(("api_key" = [])), params(ListQuery),
    responses((status = 200, body = SessionPage), (status = 400, description = "Bad state or cursor", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn list(
    State(state): State<AppState>,
    auth: TenantAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<SessionPage>, ServiceError> {
    let page = store::list(
        &state.pool,
        auth.tenant(),
        q.state.as_deref(),
        q.cursor.as_deref(),
        q.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(page))
}

/// One session.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, body = SessionView), (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn get_session(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
) -> Result<Json<SessionView>, ServiceError> {
    Ok(Json(store::get(&state.pool, Some(auth.tenant()), &id).await?.view()))
}

/// Pauses a running session: its vCPUs stop, its memory stays (a paused session uses no CPU).
/// Pausing a paused session changes nothing.
#[utoipa::path(post, path = "/v1/sessions/{id}/pause", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Paused", body = SessionView),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Not running (the detail says what to do)", content_type = "application/problem+json"),
              (status = 502, description = "The VM did not pause (the detail says its state)", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn pause(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
) -> Result<Json<SessionView>, ServiceError> {
    Ok(Json(state.sessions.pause(auth.tenant(), &id, &auth.actor()).await?.view()))
}

/// Suspends a running or paused session: snapshot to disk, then its VMM stops (memory scrubbed)
/// and frees its RAM. If the snapshot fails (a full disk) the session keeps running.
#[utoipa::path(post, path = "/v1/sessions/{id}/suspend", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Suspended (`snapshot_bytes` on disk)", body = SessionView),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Not running or paused", content_type = "application/problem+json"),
              (status = 502, description = "The snapshot failed; the session keeps running", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn suspend(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
) -> Result<Json<SessionView>, ServiceError> {
    Ok(Json(state.sessions.suspend(auth.tenant(), &id, &auth.actor()).await?.view()))
}

/// Resumes a paused session, or restores a suspended one on a new VMM (its index and files as
/// they were). Resuming a running session changes nothing.
#[utoipa::path(post, path = "/v1/sessions/{id}/resume", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Running", body = SessionView),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Terminated, failed, or in the middle of another step", content_type = "application/problem+json"),
              (status = 502, description = "The VM did not resume (the detail says its state)", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn resume(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
) -> Result<Json<SessionView>, ServiceError> {
    memory_to_restore(&state, &auth, &id).await?;
    Ok(Json(state.sessions.resume(auth.tenant(), &id, &auth.actor()).await?.view()))
}

/// A suspended session's memory comes back when it is restored: it must fit the tenant's
/// session memory quota again.
async fn memory_to_restore(state: &AppState, auth: &TenantAuth, id: &str) -> Result<(), ServiceError> {
    let s = store::get(&state.pool, Some(auth.tenant()), id).await?;
    if s.state == SessionState::Suspended {
        let usage = quotas::usage(&state.pool, auth.tenant()).await?;
        store::check_session_memory(&usage, s.mem_mib.max(0) as u32, auth.quotas.session_mem_mib)?;
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConnectQuery {
    /// Move the deadline to now + this many seconds if that is later (never earlier; never past
    /// creation + the maximum duration).
    #[param(maximum = 28800)]
    extend: Option<u64>,
}

/// Connects to a session: resumes or restores it if needed, marks it active, and optionally
/// extends its deadline. The deadline never moves backwards.
#[utoipa::path(post, path = "/v1/sessions/{id}/connect", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path), ConnectQuery),
    responses((status = 200, description = "Running", body = SessionView),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Terminated, failed, or in the middle of another step", content_type = "application/problem+json"),
              (status = 400, description = "Bad query string (extend is a number of seconds)", content_type = "application/problem+json"),
              (status = 422, description = "extend out of range", content_type = "application/problem+json"),
              (status = 502, description = "The VM did not resume", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn connect(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
    ApiQuery(q): ApiQuery<ConnectQuery>,
) -> Result<Json<SessionView>, ServiceError> {
    if let Some(extend) = q.extend.filter(|e| *e > SESSION_MAX_DURATION_CAP_SECS) {
        return Err(ServiceError::Unprocessable(format!(
            "extend={extend} is more than {SESSION_MAX_DURATION_CAP_SECS} seconds (8 h), the longest a session lives"
        )));
    }
    memory_to_restore(&state, &auth, &id).await?;
    Ok(Json(state.sessions.connect(auth.tenant(), &id, &auth.actor(), q.extend).await?.view()))
}

/// Terminates a session: its VMM stops (memory scrubbed), its artifact and snapshot are deleted.
/// Terminating a terminated session changes nothing.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "Terminated", body = SessionView),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn terminate(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
) -> Result<Json<SessionView>, ServiceError> {
    Ok(Json(state.sessions.terminate(auth.tenant(), &id, &auth.actor()).await?.view()))
}

/// A request to a session's guest (`cella_proto::SessionRequest`, with the optional fields
/// filled in by the service). `add` is `POST /v1/sessions/{id}/files`; `stop` is `DELETE`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecRequest {
    /// Scan every indexed file with rule packs (comma-separated, built-in and the tenant's own
    /// `name` or `name@version`, as for jobs; default: the tenant's default policy, else the
    /// server's).
    Scan { policy_name: Option<String> },
    /// An ad-hoc regex over the indexed text files.
    Grep {
        pattern: String,
        /// At most this many matching lines (1-10000, default 100).
        max_matches: Option<u32>,
        /// Only files whose path starts with this.
        path_prefix: Option<String>,
    },
    /// The session's counters (`index_id` is the same for its whole life: the index is built once).
    Stats,
    /// A file's bytes, as the session's read policy allows (`redact`: the default policy's
    /// findings masked).
    Read {
        path: String,
        /// At most this many bytes (default 1 MiB, at most 16 MiB).
        max_bytes: Option<u64>,
    },
}

/// The guest's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecReply {
    /// The result, tagged by `op` (`cella_proto::SessionResult`).
    #[schema(value_type = Object)]
    pub result: Value,
    /// `scan`: the SARIF 2.1.0 log.
    #[schema(value_type = Option<Object>)]
    pub sarif: Option<Value>,
    /// `scan`: the findings summary.
    #[schema(value_type = Option<Object>)]
    pub summary: Option<Value>,
    /// `read`: the bytes, base64.
    pub data_base64: Option<String>,
}

impl ExecReply {
    fn from_reply(reply: Reply) -> Self {
        let mut out = ExecReply { result: reply.response, sarif: None, summary: None, data_base64: None };
        let json_or_b64 = |bytes: &[u8]| {
            serde_json::from_slice(bytes).unwrap_or_else(
                |_| json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) }),
            )
        };
        for frame in reply.frames {
            match frame {
                Frame::Sarif(b) => out.sarif = Some(json_or_b64(&b)),
                Frame::Summary(b) => out.summary = Some(json_or_b64(&b)),
                Frame::Data(b) => out.data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(b)),
            }
        }
        out
    }
}

/// The compiled policy of `packs` (validated names), for the guest.
fn compiled_policy(packs: &str) -> Result<Vec<u8>, ServiceError> {
    let names: Vec<&str> = packs.split(',').collect();
    cella_policies::rules::load_packs(&names).map(|p| p.into_bytes()).map_err(|e| {
        ServiceError::Internal(format!("compiling policy {packs}: {}", crate::error::error_chain(&e)))
    })
}

/// Runs one request in a running session's guest: `scan` (the service attaches the compiled
/// rule packs), `grep`, `stats` or `read`. A paused or suspended session answers 409: resume or
/// connect first. Each call is recorded in the audit log (`session.exec`).
#[utoipa::path(post, path = "/v1/sessions/{id}/exec", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path)),
    request_body(content = ExecRequest, description = "The request, tagged by `op`"),
    responses((status = 200, description = "The guest's answer", body = ExecReply),
              (status = 400, description = "Malformed JSON", content_type = "application/problem+json"),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Not running: resume or connect first", content_type = "application/problem+json"),
              (status = 422, description = "A bad request, or the guest refused it (the detail says why)", content_type = "application/problem+json"),
              (status = 502, description = "The VM failed to answer", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn exec(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<ExecReply>, ServiceError> {
    match body.get("op").and_then(Value::as_str) {
        Some("add") => {
            return Err(ServiceError::Unprocessable(format!(
                "add files with POST /v1/sessions/{id}/files?name=NAME and the file as the body"
            )))
        }
        Some("stop") => {
            return Err(ServiceError::Unprocessable(format!("end a session with DELETE /v1/sessions/{id}")))
        }
        _ => {}
    }
    let request: ExecRequest = serde_json::from_value(body)
        .map_err(|e| ServiceError::Unprocessable(format!("not a session request: {e}")))?;
    let default_policy = &state.config.jobs.default_policy;
    // What `read` masks and `grep` searches around under `redact` and `deny`: always the
    // server's default packs, never a policy the request chooses.
    let masking_policy = || compiled_policy(&jobs::parse_policy(None, default_policy)?);
    let (request, attach, audit) = match request {
        ExecRequest::Scan { policy_name } => {
            let tenant = auth.tenant();
            let (packs, policy) =
                crate::packs::session_policy(&state.pool, tenant, policy_name.as_deref(), default_policy)
                    .await?;
            let audit = json!({ "op": "scan", "policy": packs });
            let fingerprint_key = tenants::fingerprint_key(&state.pool, auth.tenant()).await?;
            let request = SessionRequest::Scan { policy_name: packs, fingerprint_key, excludes: Vec::new() };
            (request, Some(Attach::Policy(policy)), audit)
        }
        ExecRequest::Grep { pattern, max_matches, path_prefix } => {
            if pattern.is_empty() || pattern.len() > cella_proto::GREP_MAX_PATTERN {
                return Err(ServiceError::Unprocessable(format!(
                    "pattern must be 1-{} bytes",
                    cella_proto::GREP_MAX_PATTERN
                )));
            }
            let max_matches = max_matches.unwrap_or(GREP_DEFAULT_MATCHES);
            if max_matches == 0 || max_matches > cella_proto::GREP_MAX_MATCHES {
                return Err(ServiceError::Unprocessable(format!(
                    "max_matches must be 1-{}",
                    cella_proto::GREP_MAX_MATCHES
                )));
            }
            let audit = json!({ "op": "grep", "pattern": pattern, "max_matches": max_matches, "path_prefix": path_prefix });
            let request = SessionRequest::Grep { pattern, max_matches, path_prefix };
            (request, Some(Attach::Policy(masking_policy()?)), audit)
        }
        ExecRequest::Stats => (SessionRequest::Stats, None, json!({ "op": "stats" })),
        ExecRequest::Read { path, max_bytes } => {
            let max_bytes = max_bytes.unwrap_or(READ_DEFAULT_BYTES);
            if max_bytes == 0 || max_bytes > READ_MAX_BYTES {
                return Err(ServiceError::Unprocessable(format!("max_bytes must be 1-{READ_MAX_BYTES}")));
            }
            let audit = json!({ "op": "read", "path": path, "max_bytes": max_bytes });
            (SessionRequest::Read { path, max_bytes }, Some(Attach::Policy(masking_policy()?)), audit)
        }
    };
    let reply = state.sessions.exec(auth.tenant(), &id, &auth.actor(), request, attach, audit).await?;
    Ok(Json(ExecReply::from_reply(reply)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// The folder name its paths go under in the index (`name/…`): 1-255 characters, no `/`.
    name: String,
}

/// Adds a file or archive (tar, tar.gz, zip or a single file; the body) to a running session's
/// index, under `name/`. A paused or suspended session answers 409: resume or connect first.
#[utoipa::path(post, path = "/v1/sessions/{id}/files", tag = "sessions", security(("api_key" = [])), params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file or archive"),
    responses((status = 200, description = "Added (the result says how many files)", body = ExecReply),
              (status = 400, description = "Bad query string (name is required)", content_type = "application/problem+json"),
              (status = 404, description = "No such session of this tenant", content_type = "application/problem+json"),
              (status = 409, description = "Not running: resume or connect first", content_type = "application/problem+json"),
              (status = 413, description = "Larger than 64 MiB", content_type = "application/problem+json"),
              (status = 507, description = "The server is out of disk space; nothing was kept: try again later", content_type = "application/problem+json"),
              (status = 422, description = "A bad name, or the guest refused the content", content_type = "application/problem+json"),
              (status = 401, description = "No or bad API key", content_type = "application/problem+json")))]
async fn add_file(
    State(state): State<AppState>,
    auth: TenantAuth,
    id: SessionId,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ExecReply>, ServiceError> {
    let name = q.name;
    if name.is_empty()
        || name.len() > upload::MAX_NAME
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(ServiceError::Unprocessable(format!(
            "name {name:?} must be 1-{} printable characters without `/` (the folder its files go under)",
            upload::MAX_NAME
        )));
    }
    let s = store::get(&state.pool, Some(auth.tenant()), &id).await?;
    if s.state != SessionState::Running {
        return Err(wrong_state(&s, "add files to"));
    }
    // Not in the session's folder: a jailed VMM owns that while it runs.
    let path = state.data_dir.work().join(format!("{id}-add-{}", ids::hex(&ids::random_bytes::<8>())));
    let limit = ADD_MAX_BYTES.min(state.config.jobs.max_artifact_bytes);
    let stored = upload::store(&state, &auth, &headers, body, &path, limit).await?;
    let audit = json!({
        "op": "add",
        "name": name,
        "bytes": stored.bytes,
        "sha256": ids::hex(&stored.sha256),
    });
    let request = SessionRequest::Add { name };
    // A key revoked while the file was uploading adds nothing.
    let mut tx = state.pool.begin().await?;
    if let Err(e) = tenants::recheck_key(&mut tx, auth.key_id()).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e);
    }
    tx.rollback().await?;
    // Streamed from the file to the guest: the body is never held in memory.
    let reply = state
        .sessions
        .exec(auth.tenant(), &id, &auth.actor(), request, Some(Attach::File(path.clone())), audit)
        .await;
    let _ = tokio::fs::remove_file(&path).await;
    drop(stored);
    Ok(Json(ExecReply::from_reply(reply?)))
}
