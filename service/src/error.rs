//! The service's errors and the one place they become HTTP responses: RFC 9457
//! `application/problem+json`, with internal details only in the server's log.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Text that an artifact or a guest may have chosen, with its control characters escaped
/// (`\x1b`, `\r`, …): used wherever such text reaches a stored reason, an answer, a log line
/// or a terminal (see [`cella_proto::text::escape_controls`]).
pub use cella_proto::text::escape_controls;

/// An error and its sources on one line: `outer: inner: innermost`, control characters escaped.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    escape_controls(&msg).into_owned()
}

/// A log line that repeats (the database being away) is printed at most every 10 s.
#[derive(Debug)]
pub struct QuietLog {
    who: &'static str,
    last: Option<std::time::Instant>,
}

impl QuietLog {
    pub fn new(who: &'static str) -> Self {
        Self { who, last: None }
    }

    pub fn log(&mut self, what: &str, err: &dyn std::fmt::Display) {
        if self.last.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10)) {
            tracing::warn!(who = self.who, error = %escape_controls(&err.to_string()), "{what}");
            self.last = Some(std::time::Instant::now());
        }
    }
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("missing or malformed Authorization header: send `Authorization: Bearer <API key>`")]
    Unauthenticated,
    #[error("the API key is not valid (unknown or revoked)")]
    BadKey,
    #[error("tenant {0} is suspended; ask your operator")]
    TenantSuspended(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the artifact is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Timeout(String),
    /// A session's VM did not do what was asked (the message says what state it is left in).
    #[error("{0}")]
    Vm(String),
    #[error("the database is unavailable; try again")]
    Unavailable(#[source] sqlx::Error),
    /// A per-tenant (or per-session) limit on how much or how fast: try again later.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after: std::time::Duration },
    /// The server as a whole is at a limit (connections, uploads): try again later.
    #[error("{detail}")]
    Overloaded { detail: String, retry_after: std::time::Duration },
    /// The server's disk (or its database's) is full: nothing was kept.
    #[error("the server is out of disk space ({0}); nothing was kept: try again later, and tell the server's operator if it goes on")]
    InsufficientStorage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// PostgreSQL's SQLSTATE for a full disk (`disk_full`).
const PG_DISK_FULL: &str = "53100";
/// SQLSTATEs of a request that may well succeed when sent again: a transaction chosen as a
/// deadlock's victim or failed for serialization, too many connections, a server starting up or
/// shutting down (an administrator's or a crash's restart).
const PG_UNAVAILABLE: &[&str] = &["40001", "40P01", "53300", "57P01", "57P02", "57P03"];

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
        match (&e, code.as_deref()) {
            (_, Some(PG_DISK_FULL)) => {
                ServiceError::InsufficientStorage("its database's disk is full".to_owned())
            }
            (_, Some(code)) if PG_UNAVAILABLE.contains(&code) => ServiceError::Unavailable(e),
            (
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_),
                _,
            ) => ServiceError::Unavailable(e),
            _ => ServiceError::Internal(format!("database: {e}")),
        }
    }
}

impl From<cella_audit::store::StoreError> for ServiceError {
    fn from(e: cella_audit::store::StoreError) -> Self {
        match e {
            cella_audit::store::StoreError::Db(db) => db.into(),
            other => ServiceError::Internal(format!("audit: {other}")),
        }
    }
}

/// Whether `e` says the disk (or the user's quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl ServiceError {
    /// `doing` (`storing the upload`) failed on `path` with `e`: a full disk is
    /// [`ServiceError::InsufficientStorage`] (507, the path only in the log), anything else
    /// internal (500, details in the log).
    pub fn io(doing: &'static str, path: &std::path::Path, e: &std::io::Error) -> Self {
        if is_disk_full(e) {
            tracing::error!(path = %escape_controls(&path.display().to_string()), error = %e, "{doing}: the disk is full");
            ServiceError::InsufficientStorage(doing.to_owned())
        } else {
            ServiceError::Internal(format!("{doing}: {}: {e}", path.display()))
        }
    }

    /// [`ServiceError::io`] for a [`crate::files::FileError`].
    pub fn file(doing: &'static str, e: &crate::files::FileError) -> Self {
        Self::io(doing, &e.path, &e.source)
    }
}

impl ServiceError {
    /// How long a client should wait before it tries again, for the answers that say so.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ServiceError::TooManyRequests { retry_after, .. }
            | ServiceError::Overloaded { retry_after, .. } => Some(*retry_after),
            ServiceError::Unavailable(_) => Some(std::time::Duration::from_secs(5)),
            _ => None,
        }
    }

    /// The HTTP status and the problem type's short name.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ServiceError::Unauthenticated | ServiceError::BadKey => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            ServiceError::TenantSuspended(_) => (StatusCode::FORBIDDEN, "tenant-suspended"),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ServiceError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ServiceError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ServiceError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            ServiceError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ServiceError::Vm(_) => (StatusCode::BAD_GATEWAY, "vm-error"),
            ServiceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ServiceError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too-many-requests"),
            ServiceError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ServiceError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient-storage")
            }
            ServiceError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// A problem document (RFC 9457) for `status` with `detail`.
pub fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("https://cella.dev/problems/{kind}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status();
        let detail = match &self {
            ServiceError::Internal(_) => {
                tracing::error!(error = %escape_controls(&self.to_string()), "internal error answering a request");
                "internal error; the server's log has the details".to_owned()
            }
            ServiceError::Unavailable(e) => {
                tracing::warn!(error = %escape_controls(&e.to_string()), "the database is unavailable");
                self.to_string()
            }
            _ => self.to_string(),
        };
        let mut response = problem(status, kind, &escape_controls(&detail));
        if let Some(after) = self.retry_after() {
            // Whole seconds, at least one (RFC 9110 delay-seconds).
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
        }
        response
    }
}
