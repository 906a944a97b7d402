//! Request bodies streamed to disk: artifacts of jobs and sessions, files added to a session.
//! One implementation of the limits (declared and actual size; the tenant's uploads in flight
//! and bytes on disk; an upload that idles, crawls or takes too long), the hashing and the
//! `.part` file that is renamed only when the upload is complete. Nothing is held in memory
//! beyond one chunk.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::auth::TenantAuth;
use super::AppState;
use crate::error::ServiceError;
use crate::limits::{too_many, Pace, Permit, Reservation};
use crate::quotas;

/// The longest artifact or file name accepted.
pub const MAX_NAME: usize = 255;

/// A stored upload. Until it is dropped its bytes stay reserved against the tenant's disk
/// quota: keep it until what records the upload (a job or session row) is committed.
#[derive(Debug)]
pub struct Stored {
    pub bytes: u64,
    pub sha256: [u8; 32],
    _reserved: Reservation,
    _upload: Permit,
}

/// What a tenant over its uploads quota is told to wait.
const UPLOADS_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Checks an optional `name` query parameter (empty means none).
pub fn check_name(name: Option<String>) -> Result<Option<String>, ServiceError> {
    let name = name.filter(|n| !n.is_empty());
    if name.as_ref().is_some_and(|n| n.len() > MAX_NAME || n.chars().any(char::is_control)) {
        return Err(ServiceError::BadRequest(format!(
            "name must be at most {MAX_NAME} printable characters"
        )));
    }
    Ok(name)
}

/// The checks an upload passes before its body is read: the declared size within `limit`, a
/// place among the tenant's uploads in flight, and room on its disk quota for what it declares
/// (each refused at once, so the client need not send the body to learn it).
pub async fn admit(
    state: &AppState,
    auth: &TenantAuth,
    headers: &HeaderMap,
    limit: u64,
) -> Result<Admitted, ServiceError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ServiceError::TooLarge { limit });
    }
    let tenant = auth.tenant();
    let cap = auth.quotas.uploads;
    let upload = state
        .limits
        .uploads
        .try_take(tenant, cap)
        .ok_or_else(|| too_many("uploads", cap, UPLOADS_RETRY_AFTER))?;
    let used = quotas::usage(&state.pool, tenant).await?.disk_bytes;
    let quota = auth.quotas.disk_bytes;
    let room = quota.saturating_sub(used);
    let mut reserved = state.limits.upload_bytes.start(tenant);
    if let Some(n) = declared {
        if !reserved.grow_within(n, room) {
            let in_flight = state.limits.upload_bytes.total(tenant);
            return Err(quotas::exceeded("disk", n, used + in_flight, quota, "bytes"));
        }
    }
    Ok(Admitted { declared, limit, room, used, quota, reserved, upload })
}

/// An upload let in by [`admit`]: its place and its reservation.
#[derive(Debug)]
pub struct Admitted {
    declared: Option<u64>,
    limit: u64,
    room: u64,
    used: u64,
    quota: u64,
    reserved: Reservation,
    upload: Permit,
}

/// Admits the upload ([`admit`]) and streams `body` to `path` ([`store_admitted`]).
pub async fn store(
    state: &AppState,
    auth: &TenantAuth,
    headers: &HeaderMap,
    body: Body,
    path: &Path,
    limit: u64,
) -> Result<Stored, ServiceError> {
    let admitted = admit(state, auth, headers, limit).await?;
    store_admitted(state, admitted, body, path).await
}

/// Streams `body` to `path` (through `path.part`, renamed when complete), refusing more than
/// the limit (or the tenant's room on its disk quota) when it is passed, an empty body, and an
/// upload that idles, crawls or takes too long (`jobs.upload_idle_secs`, `limits.upload_*`).
/// Nothing is left on disk when it fails.
pub async fn store_admitted(
    state: &AppState,
    admitted: Admitted,
    body: Body,
    path: &Path,
) -> Result<Stored, ServiceError> {
    let part = path.with_extension("part");
    let pace = Pace::upload(&state.config.jobs, &state.config.limits);
    let stored = match receive(body, &part, admitted, pace).await {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    if let Err(e) = tokio::fs::rename(&part, path).await {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ServiceError::io(STORING, path, &e));
    }
    Ok(stored)
}

/// What an upload was doing when the disk failed it (a full disk answers 507 saying so).
const STORING: &str = "storing the upload";

/// Streams the body into `path`, hashing it, within the admitted limits and `pace`. A full
/// disk (ENOSPC, EDQUOT) is a 507.
async fn receive(body: Body, path: &Path, admitted: Admitted, pace: Pace) -> Result<Stored, ServiceError> {
    let Admitted { declared, limit, room, used, quota, mut reserved, upload } = admitted;
    let internal = |e: std::io::Error| ServiceError::io(STORING, path, &e);
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total = 0u64;
    let mut stream = body.into_data_stream();
    let start = Instant::now();
    let mut last = start;
    loop {
        let (due, why) = pace.due(start, last, total);
        let next = tokio::time::timeout_at(due, stream.next())
            .await
            .map_err(|_| ServiceError::Timeout(format!("{why} and was dropped; send it again")))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ServiceError::BadRequest(format!("the upload broke off: {e}")))?;
        last = Instant::now();
        total += chunk.len() as u64;
        if total > limit {
            return Err(ServiceError::TooLarge { limit });
        }
        // A body without Content-Length reserves its room as it comes.
        if declared.is_none_or(|d| total > d) && !reserved.grow_within(chunk.len() as u64, room) {
            return Err(quotas::exceeded("disk", total, used, quota, "bytes"));
        }
        hash.update(&chunk);
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    if total == 0 {
        return Err(ServiceError::BadRequest(
            "the artifact is empty: send its bytes as the request body".into(),
        ));
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(hash.finish().as_ref());
    Ok(Stored { bytes: total, sha256, _reserved: reserved, _upload: upload })
}
