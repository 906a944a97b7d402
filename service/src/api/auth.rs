//! Authentication as extractors: [`TenantAuth`] for a tenant's API key, [`AdminAuth`] for the
//! operator credential. Handlers never parse `Authorization` themselves.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use cella_audit::Actor;

use super::AppState;
use crate::error::ServiceError;
use crate::tenants::{self, Caller};

fn bearer(parts: &Parts) -> Result<&str, ServiceError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or(ServiceError::Unauthenticated)?;
    let value = value.to_str().map_err(|_| ServiceError::Unauthenticated)?;
    let (scheme, token) = value.split_once(' ').ok_or(ServiceError::Unauthenticated)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ServiceError::Unauthenticated);
    }
    Ok(token.trim())
}

/// The tenant behind the request's API key.
#[derive(Debug, Clone)]
pub struct TenantAuth(pub Caller);

impl TenantAuth {
    pub fn tenant(&self) -> &str {
        &self.0.tenant_id
    }

    pub fn actor(&self) -> Actor {
        Actor::ApiKey(self.0.key_id.clone())
    }
}

impl FromRequestParts<AppState> for TenantAuth {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        Ok(TenantAuth(tenants::authenticate(&state.pool, key).await?))
    }
}

/// An operator, by admin credential.
#[derive(Debug, Clone)]
pub struct AdminAuth(pub String);

impl AdminAuth {
    pub fn actor(&self) -> Actor {
        Actor::Admin(self.0.clone())
    }
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        Ok(AdminAuth(tenants::authenticate_admin(&state.pool, key).await?))
    }
}
