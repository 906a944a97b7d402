//! Tenants, their API keys and the operators' credentials: creation, revocation, suspension
//! and authentication. Keys are shown once and stored only as SHA-256.

use cella_audit::Actor;
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use crate::audit_log::{operator_event, tenant_event};
use crate::error::ServiceError;
use crate::ids::{self, ADMIN_KEY_PREFIX, API_KEY_PREFIX};

/// Who made a request: a tenant's key, or an operator.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant_id: String,
    pub key_id: String,
    /// The tenant's own quotas (see [`crate::quotas`]).
    pub quotas: crate::quotas::QuotaOverrides,
}

/// A tenant as the admin API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub suspended: bool,
    pub max_concurrent: i32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// A freshly created key: the only time its secret is visible.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NewKey {
    pub tenant_id: String,
    pub key_id: String,
    /// The API key. It is not stored and cannot be shown again.
    pub api_key: String,
}

/// Tenant names: 1–64 of letters, digits, `-`, `_`, `.`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Creates a tenant and its first API key.
pub async fn create_tenant(
    pool: &PgPool,
    name: &str,
    max_concurrent: u32,
    actor: &Actor,
) -> Result<(Tenant, NewKey), ServiceError> {
    if !valid_name(name) {
        return Err(ServiceError::BadRequest(format!(
            "tenant name {name:?} is not valid: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    let id = ids::new_id("tenant");
    let mut tx = pool.begin().await?;
    let tenant: Option<Tenant> = sqlx::query_as(
        "INSERT INTO tenants (id, name, max_concurrent) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING
         RETURNING id, name, suspended, max_concurrent, created_at",
    )
    .bind(&id)
    .bind(name)
    .bind(i32::try_from(max_concurrent.max(1)).unwrap_or(i32::MAX))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(tenant) = tenant else {
        return Err(ServiceError::Conflict(format!("a tenant named {name:?} already exists")));
    };
    operator_event(&mut tx, Some(&id), actor, "tenant.created", ("tenant", &id), json!({ "name": name }))
        .await?;
    tenant_event(&mut tx, &id, actor, "tenant.created", ("tenant", &id), json!({ "name": name })).await?;
    let key = insert_key(&mut tx, &id, actor).await?;
    tx.commit().await?;
    Ok((tenant, key))
}

async fn insert_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant_id: &str,
    actor: &Actor,
) -> Result<NewKey, ServiceError> {
    let key_id = ids::new_id("key");
    let secret = ids::new_secret(API_KEY_PREFIX);
    sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash) VALUES ($1, $2, $3)")
        .bind(&key_id)
        .bind(tenant_id)
        .bind(&ids::sha256(secret.as_bytes())[..])
        .execute(&mut **tx)
        .await?;
    tenant_event(tx, tenant_id, actor, "api_key.created", ("api_key", &key_id), json!({})).await?;
    Ok(NewKey { tenant_id: tenant_id.to_owned(), key_id, api_key: secret })
}

/// A new API key for an existing tenant.
pub async fn create_key(pool: &PgPool, tenant_id: &str, actor: &Actor) -> Result<NewKey, ServiceError> {
    let mut tx = pool.begin().await?;
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(ServiceError::NotFound(format!("tenant {tenant_id}")));
    }
    operator_event(&mut tx, Some(tenant_id), actor, "api_key.created", ("tenant", tenant_id), json!({}))
        .await?;
    let key = insert_key(&mut tx, tenant_id, actor).await?;
    tx.commit().await?;
    Ok(key)
}

/// Revokes one key (`key_id`), or all of a tenant's keys (`key_id` = None). Returns how many.
pub async fn revoke_keys(
    pool: &PgPool,
    tenant_id: &str,
    key_id: Option<&str>,
    actor: &Actor,
) -> Result<u64, ServiceError> {
    let mut tx = pool.begin().await?;
    let revoked: Vec<String> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = now()
         WHERE tenant_id = $1 AND ($2::text IS NULL OR id = $2) AND revoked_at IS NULL
         RETURNING id",
    )
    .bind(tenant_id)
    .bind(key_id)
    .fetch_all(&mut *tx)
    .await?;
    if revoked.is_empty() {
        let what = key_id
            .map_or_else(|| format!("active keys of tenant {tenant_id}"), |k| format!("active key {k}"));
        return Err(ServiceError::NotFound(what));
    }
    operator_event(
        &mut tx,
        Some(tenant_id),
        actor,
        "api_key.revoked",
        ("tenant", tenant_id),
        json!({ "keys": revoked }),
    )
    .await?;
    for key in &revoked {
        tenant_event(&mut tx, tenant_id, actor, "api_key.revoked", ("api_key", key), json!({})).await?;
    }
    tx.commit().await?;
    Ok(revoked.len() as u64)
}

/// Suspends (or reinstates) a tenant: its keys answer 403 and its queued jobs wait.
pub async fn set_suspended(
    pool: &PgPool,
    tenant_id: &str,
    suspended: bool,
    actor: &Actor,
) -> Result<Tenant, ServiceError> {
    let mut tx = pool.begin().await?;
    let tenant: Option<Tenant> = sqlx::query_as(
        "UPDATE tenants SET suspended = $2 WHERE id = $1
         RETURNING id, name, suspended, max_concurrent, created_at",
    )
    .bind(tenant_id)
    .bind(suspended)
    .fetch_optional(&mut *tx)
    .await?;
    let tenant = tenant.ok_or_else(|| ServiceError::NotFound(format!("tenant {tenant_id}")))?;
    let action = if suspended { "tenant.suspended" } else { "tenant.reinstated" };
    operator_event(&mut tx, Some(tenant_id), actor, action, ("tenant", tenant_id), json!({})).await?;
    tenant_event(&mut tx, tenant_id, actor, action, ("tenant", tenant_id), json!({})).await?;
    tx.commit().await?;
    Ok(tenant)
}

/// Every tenant.
pub async fn list(pool: &PgPool) -> Result<Vec<Tenant>, ServiceError> {
    Ok(sqlx::query_as(
        "SELECT id, name, suspended, max_concurrent, created_at FROM tenants ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?)
}

/// The tenant and key behind an API key.
pub async fn authenticate(pool: &PgPool, api_key: &str) -> Result<Caller, ServiceError> {
    if !api_key.starts_with(API_KEY_PREFIX) || api_key.starts_with(ADMIN_KEY_PREFIX) {
        return Err(ServiceError::BadKey);
    }
    let row = sqlx::query(&format!(
        "SELECT k.id, k.tenant_id, t.suspended, {} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        crate::quotas::COLUMNS
    ))
    .bind(&ids::sha256(api_key.as_bytes())[..])
    .fetch_optional(pool)
    .await?
    .ok_or(ServiceError::BadKey)?;
    let caller = Caller {
        tenant_id: row.try_get("tenant_id")?,
        key_id: row.try_get("id")?,
        quotas: crate::quotas::QuotaOverrides::from_row(&row)?,
    };
    if row.try_get::<bool, _>("suspended")? {
        return Err(ServiceError::TenantSuspended(caller.tenant_id));
    }
    Ok(caller)
}

/// Whether API key `key_id` is still valid, checked in `tx` (locking the key's row until the
/// transaction ends, so a revocation cannot slip in between): a request that authenticated
/// before a long upload re-checks before it records what it uploaded. 401 when revoked.
pub async fn recheck_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key_id: &str,
) -> Result<(), ServiceError> {
    let valid: Option<bool> =
        sqlx::query_scalar("SELECT revoked_at IS NULL FROM api_keys WHERE id = $1 FOR SHARE")
            .bind(key_id)
            .fetch_optional(&mut **tx)
            .await?;
    if valid == Some(true) {
        Ok(())
    } else {
        Err(ServiceError::BadKey)
    }
}

/// The tenant's fingerprint key, hex (see `migrations/0005_tenant_limits.sql`).
pub async fn fingerprint_key(pool: &PgPool, tenant_id: &str) -> Result<String, ServiceError> {
    let key: Vec<u8> = sqlx::query_scalar("SELECT fingerprint_key FROM tenants WHERE id = $1")
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("tenant {tenant_id}")))?;
    Ok(ids::hex(&key))
}

/// The operator id behind an admin credential.
pub async fn authenticate_admin(pool: &PgPool, admin_key: &str) -> Result<String, ServiceError> {
    if !admin_key.starts_with(ADMIN_KEY_PREFIX) {
        return Err(ServiceError::BadKey);
    }
    sqlx::query_scalar("SELECT id FROM admin_keys WHERE key_hash = $1 AND revoked_at IS NULL")
        .bind(&ids::sha256(admin_key.as_bytes())[..])
        .fetch_optional(pool)
        .await?
        .ok_or(ServiceError::BadKey)
}

/// Stores a new operator credential and returns (id, secret).
pub async fn create_admin_key(pool: &PgPool) -> Result<(String, String), ServiceError> {
    let id = ids::new_id("admin");
    let secret = ids::new_secret(ADMIN_KEY_PREFIX);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO admin_keys (id, key_hash) VALUES ($1, $2)")
        .bind(&id)
        .bind(&ids::sha256(secret.as_bytes())[..])
        .execute(&mut *tx)
        .await?;
    operator_event(
        &mut tx,
        None,
        &Actor::System("serve".into()),
        "admin_key.created",
        ("admin_key", &id),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok((id, secret))
}

/// One of a tenant's API keys as the admin API lists it (never the key itself: only its hash is
/// kept).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyInfo {
    pub key_id: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
}

/// A tenant's keys, newest first (404 for an unknown tenant).
pub async fn list_keys(pool: &PgPool, tenant_id: &str) -> Result<Vec<KeyInfo>, ServiceError> {
    let known: Option<bool> = sqlx::query_scalar("SELECT true FROM tenants WHERE id = $1")
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?;
    if known.is_none() {
        return Err(ServiceError::NotFound(format!("tenant {tenant_id}")));
    }
    Ok(sqlx::query_as(
        "SELECT id AS key_id, created_at, revoked_at FROM api_keys WHERE tenant_id = $1
         ORDER BY created_at DESC, id DESC",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}

/// The ids of a tenant's keys that are not revoked.
pub async fn active_keys(pool: &PgPool, tenant_id: &str) -> Result<Vec<String>, ServiceError> {
    Ok(sqlx::query_scalar("SELECT id FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL")
        .bind(tenant_id)
        .fetch_all(pool)
        .await?)
}
