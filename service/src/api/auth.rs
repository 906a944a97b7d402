//! Authentication as extractors: [`TenantAuth`] for a tenant's API key, [`AdminAuth`] for the
//! operator credential. Handlers never parse `Authorization` themselves.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use cella_audit::Actor;

use super::AppState;
use crate::error::ServiceError;
use crate::limits::{too_many, Permit};
use crate::quotas::Quotas;
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

/// The tenant behind the request's API key, its quotas in force, and its place among the
/// tenant's requests in flight (given back when the handler is done with it).
#[derive(Debug, Clone)]
pub struct TenantAuth {
    pub caller: Caller,
    pub quotas: Quotas,
    _in_flight: Arc<Permit>,
}

impl TenantAuth {
    pub fn tenant(&self) -> &str {
        &self.caller.tenant_id
    }

    pub fn key_id(&self) -> &str {
        &self.caller.key_id
    }

    pub fn actor(&self) -> Actor {
        Actor::ApiKey(self.caller.key_id.clone())
    }
}

/// What a tenant over its requests quota is told to wait.
const REQUESTS_RETRY_AFTER: Duration = Duration::from_secs(1);

impl FromRequestParts<AppState> for TenantAuth {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        let caller = tenants::authenticate(&state.pool, key).await?;
        let quotas = caller.quotas.effective(&state.config);
        let in_flight = state
            .limits
            .requests
            .try_take(&caller.tenant_id, quotas.requests)
            .ok_or_else(|| too_many("requests", quotas.requests, REQUESTS_RETRY_AFTER))?;
        Ok(TenantAuth { caller, quotas, _in_flight: Arc::new(in_flight) })
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
