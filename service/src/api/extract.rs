//! `Json`, `Query` and path-id extractors whose rejections are problem documents: malformed JSON
//! or a bad query string answers 400 (a well-formed body of the wrong shape 422), an id that is
//! not one of ours 404, never plain text.

use std::marker::PhantomData;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ServiceError;

/// A JSON body.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ServiceError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ServiceError::Unprocessable(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ServiceError::BadRequest(
                "send the body as JSON with Content-Type: application/json".into(),
            )),
            Err(e) => Err(ServiceError::BadRequest(format!("malformed JSON body: {}", e.body_text()))),
        }
    }
}

/// A query string.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ServiceError::BadRequest(format!("bad query string: {}", e.body_text())))
            }
            Err(e) => Err(ServiceError::BadRequest(e.body_text())),
        }
    }
}

/// What kind of id a [`PathId`] holds: the prefix of ours it must carry.
pub trait IdKind {
    const PREFIX: &'static str;
}

/// Jobs' ids (`job_…`).
#[derive(Debug)]
pub enum JobKind {}

impl IdKind for JobKind {
    const PREFIX: &'static str = "job";
}

/// Sessions' ids (`session_…`).
#[derive(Debug)]
pub enum SessionKind {}

impl IdKind for SessionKind {
    const PREFIX: &'static str = "session";
}

/// The `{id}` of a request path, checked to look like one of ours of kind `K`; anything else
/// answers 404 (a problem document) before the database or the audit log is touched.
#[derive(Debug)]
pub struct PathId<K: IdKind>(String, PhantomData<K>);

/// Tenants' ids (`tenant_…`).
#[derive(Debug)]
pub enum TenantKind {}

impl IdKind for TenantKind {
    const PREFIX: &'static str = "tenant";
}

/// A job's id from the path.
pub type JobId = PathId<JobKind>;
/// A tenant's id from the path (the admin API).
pub type TenantId = PathId<TenantKind>;
/// A session's id from the path.
pub type SessionId = PathId<SessionKind>;

impl<K: IdKind> PathId<K> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<K: IdKind> std::ops::Deref for PathId<K> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<K: IdKind> std::fmt::Display for PathId<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Send + Sync, K: IdKind> FromRequestParts<S> for PathId<K> {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ServiceError::BadRequest(e.body_text()))?;
        super::known_id(&id, K::PREFIX)?;
        Ok(PathId(id, PhantomData))
    }
}
