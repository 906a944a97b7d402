//! Request bodies streamed to disk: artifacts of jobs and sessions, files added to a session.
//! One implementation of the limits (declared and actual size, idle uploads), the hashing and
//! the `.part` file that is renamed only when the upload is complete.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::AppState;
use crate::error::ServiceError;

/// The longest artifact or file name accepted.
pub const MAX_NAME: usize = 255;

/// A stored upload.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

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

/// Streams `body` to `path` (through `path.part`, renamed when complete), refusing more than
/// `limit` bytes (by `Content-Length` at once, else when the limit is passed), an empty body,
/// and an upload that sends nothing for the configured `upload_idle_secs`. Nothing is left on
/// disk when it fails.
pub async fn store(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    path: &Path,
    limit: u64,
) -> Result<Stored, ServiceError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ServiceError::TooLarge { limit });
    }
    let part = path.with_extension("part");
    let idle = Duration::from_secs(state.config.jobs.upload_idle_secs.max(1));
    let stored = match receive(body, &part, limit, idle).await {
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

/// Streams the body into `path`, hashing it, and stops at `limit` bytes. A full disk (ENOSPC,
/// EDQUOT) is a 507.
async fn receive(body: Body, path: &Path, limit: u64, idle: Duration) -> Result<Stored, ServiceError> {
    let internal = |e: std::io::Error| ServiceError::io(STORING, path, &e);
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let next = tokio::time::timeout(idle, stream.next()).await.map_err(|_| {
            ServiceError::Timeout(format!(
                "the upload sent nothing for {} s and was dropped; send it again",
                idle.as_secs()
            ))
        })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ServiceError::BadRequest(format!("the upload broke off: {e}")))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(ServiceError::TooLarge { limit });
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
    Ok(Stored { bytes: total, sha256 })
}
