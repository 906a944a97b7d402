//! A tenant's baselines: the keyed location fingerprints of findings it already has, stored so
//! that jobs can name them (`POST /v1/jobs?baseline=NAME`) and the scan suppresses those
//! findings (see `cella_policies::baseline`). Content-addressed per tenant: storing the same
//! fingerprints again answers the baseline already kept.

use cella_audit::Actor;
use cella_policies::baseline::Baseline;
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use crate::audit_log::tenant_event;
use crate::error::ServiceError;
use crate::ids;

/// A baseline as the API shows it (not its fingerprints).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BaselineView {
    pub id: String,
    pub name: Option<String>,
    /// Findings it holds.
    pub fingerprints: i32,
    /// SHA-256 of its fingerprints (32 bytes each, sorted), hex.
    pub sha256: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
}

const COLUMNS: &str = "id, name, count, sha256, created_at";

fn view(row: &sqlx::postgres::PgRow) -> Result<BaselineView, sqlx::Error> {
    Ok(BaselineView {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        fingerprints: row.try_get("count")?,
        sha256: ids::hex(row.try_get::<&[u8], _>("sha256")?),
        created_at: crate::jobs::rfc3339(row.try_get::<OffsetDateTime, _>("created_at")?),
    })
}

/// Checks a baseline name: 1-64 letters, digits, `.`, `_`, `-` (not a baseline id's shape).
pub fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !ids::is_id(name, "bl");
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Unprocessable(format!(
            "baseline name {name:?} must be 1-64 letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Stores `baseline` for `tenant` (under `name`, if given); the same fingerprints stored before
/// answer that baseline (named `name` now if it had no name). Audited (`baseline.created`).
pub async fn create(
    pool: &PgPool,
    tenant: &str,
    actor: &Actor,
    name: Option<&str>,
    baseline: &Baseline,
) -> Result<(BaselineView, bool), ServiceError> {
    if let Some(name) = name {
        check_name(name)?;
    }
    let payload = baseline.wire_payload();
    let sha256 = ids::sha256(&payload);
    let mut tx = pool.begin().await?;
    // One tenant's stores serialize on its row: the content and name checks below hold.
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE").bind(tenant).execute(&mut *tx).await?;
    let existing = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM baselines WHERE tenant_id = $1 AND sha256 = $2 AND deleted_at IS NULL"
    ))
    .bind(tenant)
    .bind(&sha256[..])
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = existing {
        let mut found = view(&row)?;
        if let Some(name) = name.filter(|_| found.name.is_none()) {
            ensure_name_free(&mut tx, tenant, name).await?;
            sqlx::query("UPDATE baselines SET name = $2 WHERE id = $1")
                .bind(&found.id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            found.name = Some(name.to_owned());
        }
        tx.commit().await?;
        return Ok((found, false));
    }
    if let Some(name) = name {
        ensure_name_free(&mut tx, tenant, name).await?;
    }
    let id = ids::new_id("bl");
    let row = sqlx::query(&format!(
        "INSERT INTO baselines (id, tenant_id, name, sha256, fingerprints, count, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(tenant)
    .bind(name)
    .bind(&sha256[..])
    .bind(&payload)
    .bind(i32::try_from(baseline.len()).unwrap_or(i32::MAX))
    .bind(crate::jobs::actor_id(actor))
    .fetch_one(&mut *tx)
    .await?;
    let created = view(&row)?;
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "baseline.created",
        ("baseline", &id),
        json!({ "name": name, "fingerprints": baseline.len(), "sha256": created.sha256 }),
    )
    .await?;
    tx.commit().await?;
    Ok((created, true))
}

async fn ensure_name_free(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant: &str,
    name: &str,
) -> Result<(), ServiceError> {
    let taken: Option<String> = sqlx::query_scalar(
        "SELECT id FROM baselines WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    match taken {
        Some(id) => Err(ServiceError::Conflict(format!(
            "baseline name {name:?} is taken by {id}: delete it first (DELETE /v1/baselines/{name})"
        ))),
        None => Ok(()),
    }
}

/// The tenant's baselines, newest first.
pub async fn list(pool: &PgPool, tenant: &str) -> Result<Vec<BaselineView>, ServiceError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM baselines WHERE tenant_id = $1 AND deleted_at IS NULL
         ORDER BY created_at DESC, id DESC LIMIT 1000"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(view).collect::<Result<_, _>>()?)
}

/// The tenant's live baseline with this id or name (404 otherwise).
/// A baseline is named by its id (`bl_…`) or its name; anything else is no baseline, answered
/// without a query (a NUL byte, say, is no text PostgreSQL takes).
fn check_id_or_name(id_or_name: &str) -> Result<(), ServiceError> {
    if ids::is_id(id_or_name, "bl") || check_name(id_or_name).is_ok() {
        Ok(())
    } else {
        Err(ServiceError::NotFound(format!("baseline {id_or_name:?}")))
    }
}

pub async fn get(pool: &PgPool, tenant: &str, id_or_name: &str) -> Result<BaselineView, ServiceError> {
    check_id_or_name(id_or_name)?;
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM baselines WHERE tenant_id = $1 AND (id = $2 OR name = $2) AND deleted_at IS NULL"
    ))
    .bind(tenant)
    .bind(id_or_name)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("baseline {id_or_name:?}")))?;
    Ok(view(&row)?)
}

/// Deletes a baseline: jobs already queued with it keep it; new jobs cannot name it. Audited.
pub async fn delete(
    pool: &PgPool,
    tenant: &str,
    id_or_name: &str,
    actor: &Actor,
) -> Result<BaselineView, ServiceError> {
    check_id_or_name(id_or_name)?;
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "UPDATE baselines SET deleted_at = now()
         WHERE tenant_id = $1 AND (id = $2 OR name = $2) AND deleted_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(tenant)
    .bind(id_or_name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("baseline {id_or_name:?}")))?;
    let gone = view(&row)?;
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "baseline.deleted",
        ("baseline", &gone.id),
        json!({ "name": gone.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(gone)
}

/// A baseline's fingerprints as a baseline file's text (`cella-baseline/1`).
pub async fn file_text(pool: &PgPool, tenant: &str, id_or_name: &str) -> Result<String, ServiceError> {
    let found = get(pool, tenant, id_or_name).await?;
    let payload: Vec<u8> = sqlx::query_scalar("SELECT fingerprints FROM baselines WHERE id = $1")
        .bind(&found.id)
        .fetch_one(pool)
        .await?;
    let set = cella_scan::FingerprintSet::from_wire(&payload).ok_or_else(|| {
        ServiceError::Internal(format!("baseline {} holds a partial fingerprint", found.id))
    })?;
    Ok(Baseline::new(set).to_json())
}
