//! Per-tenant quotas: what one tenant may hold at once (session memory, live sessions, bytes on
//! disk, uploads and requests in flight, rule packs and their compiled size) and the CPU each of
//! its VMs may use. A tenant's own
//! values live in the `quota_*` columns of `tenants` (NULL: the configured default, see
//! [`crate::config::QuotasConfig`]); operators see and change them through the admin API
//! (`/v1/admin/tenants/{id}/quotas`), each change audited on both chains.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::audit_log::{operator_event, tenant_event};
use crate::config::Config;
use crate::error::ServiceError;
use cella_audit::Actor;

/// A tenant's own quotas; `None`: the configured default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    pub session_mem_mib: Option<u32>,
    pub live_sessions: Option<u32>,
    pub disk_bytes: Option<u64>,
    pub uploads: Option<u32>,
    pub requests: Option<u32>,
    /// 1-10000 (percent of one CPU).
    pub vm_cpu_percent: Option<u32>,
    #[serde(default)]
    pub packs: Option<u32>,
    #[serde(default)]
    pub pack_compiled_bytes: Option<u64>,
}

/// The quotas in force for a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quotas {
    /// Guest memory of its running and paused sessions together, MiB.
    pub session_mem_mib: u32,
    /// Sessions not terminated or failed (suspended ones count).
    pub live_sessions: u32,
    /// Artifacts of its queued and running jobs, its live sessions' artifacts and snapshots, and
    /// its uploads under way, in bytes.
    pub disk_bytes: u64,
    /// Uploads in flight at once.
    pub uploads: u32,
    /// Requests in flight at once.
    pub requests: u32,
    /// CPU each of its VMs may use, percent of one CPU.
    pub vm_cpu_percent: u32,
    /// Rule packs with a live version.
    pub packs: u32,
    /// What its live pack versions' regexes take compiled, together, in bytes.
    pub pack_compiled_bytes: u64,
}

/// What a tenant holds now, measured as the quotas count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub session_mem_mib: u64,
    pub live_sessions: u64,
    /// Stored (not counting uploads under way).
    pub disk_bytes: u64,
    pub packs: u64,
    pub pack_compiled_bytes: u64,
}

/// A tenant's quotas as the admin API shows them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QuotaView {
    pub tenant: String,
    /// Its own values (null: the default).
    pub overrides: QuotaOverrides,
    /// The values in force.
    pub effective: Quotas,
    pub usage: Usage,
}

/// The columns [`QuotaOverrides::from_row`] reads.
pub const COLUMNS: &str = "t.quota_session_mem_mib, t.quota_live_sessions, t.quota_disk_bytes, \
     t.quota_uploads, t.quota_requests, t.quota_vm_cpu_percent, t.quota_packs, t.quota_pack_compiled_bytes";

fn unsigned<T: TryFrom<i64>>(v: Option<i64>) -> Option<T> {
    v.and_then(|v| T::try_from(v).ok())
}

impl QuotaOverrides {
    /// From a row that selected [`COLUMNS`].
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let int = |c: &str| row.try_get::<Option<i32>, _>(c).map(|v| unsigned(v.map(i64::from)));
        Ok(QuotaOverrides {
            session_mem_mib: int("quota_session_mem_mib")?,
            live_sessions: int("quota_live_sessions")?,
            disk_bytes: unsigned(row.try_get::<Option<i64>, _>("quota_disk_bytes")?),
            uploads: int("quota_uploads")?,
            requests: int("quota_requests")?,
            vm_cpu_percent: int("quota_vm_cpu_percent")?,
            packs: int("quota_packs")?,
            pack_compiled_bytes: unsigned(row.try_get::<Option<i64>, _>("quota_pack_compiled_bytes")?),
        })
    }

    /// The quotas in force: these values, else the configured defaults.
    pub fn effective(&self, config: &Config) -> Quotas {
        let d = &config.quotas;
        Quotas {
            session_mem_mib: self.session_mem_mib.unwrap_or(d.session_mem_mib),
            live_sessions: self.live_sessions.unwrap_or(config.sessions.max_per_tenant),
            disk_bytes: self.disk_bytes.unwrap_or(d.disk_bytes),
            uploads: self.uploads.unwrap_or(d.uploads),
            requests: self.requests.unwrap_or(d.requests),
            vm_cpu_percent: self.vm_cpu_percent.unwrap_or(d.vm_cpu_percent),
            packs: self.packs.unwrap_or(d.packs),
            pack_compiled_bytes: self.pack_compiled_bytes.unwrap_or(d.pack_compiled_bytes),
        }
    }

    fn check(&self) -> Result<(), ServiceError> {
        if self.vm_cpu_percent.is_some_and(|p| !(1..=10_000).contains(&p)) {
            return Err(ServiceError::Unprocessable(
                "vm_cpu_percent must be 1-10000 (percent of one CPU)".into(),
            ));
        }
        let too_big = |v: Option<u32>| v.is_some_and(|v| v > i32::MAX as u32);
        if too_big(self.session_mem_mib)
            || too_big(self.live_sessions)
            || too_big(self.uploads)
            || too_big(self.requests)
            || too_big(self.packs)
            || self.disk_bytes.is_some_and(|v| v > i64::MAX as u64)
            || self.pack_compiled_bytes.is_some_and(|v| v > i64::MAX as u64)
        {
            return Err(ServiceError::Unprocessable("a quota is out of range".into()));
        }
        Ok(())
    }
}

/// A tenant's own quotas.
pub async fn overrides(pool: &PgPool, tenant: &str) -> Result<QuotaOverrides, ServiceError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants t WHERE t.id = $1"))
        .bind(tenant)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("tenant {tenant}")))?;
    Ok(QuotaOverrides::from_row(&row)?)
}

/// What the tenant holds now.
pub async fn usage<'e>(db: impl sqlx::PgExecutor<'e>, tenant: &str) -> Result<Usage, ServiceError> {
    let row = sqlx::query(
        "SELECT
           (SELECT coalesce(sum(mem_mib), 0)::int8 FROM sessions
             WHERE tenant_id = $1 AND state NOT IN ('suspended', 'terminated', 'failed')) AS mem,
           (SELECT count(*) FROM sessions WHERE tenant_id = $1 AND state NOT IN ('terminated', 'failed')) AS live,
           (SELECT coalesce(sum(artifact_bytes), 0)::int8 FROM jobs
             WHERE tenant_id = $1 AND state IN ('queued', 'running'))
           + (SELECT coalesce(sum(artifact_bytes + coalesce(snapshot_bytes, 0)), 0)::int8 FROM sessions
             WHERE tenant_id = $1 AND state NOT IN ('terminated', 'failed')) AS disk,
           (SELECT count(DISTINCT name) FROM tenant_packs WHERE tenant_id = $1 AND deleted_at IS NULL) AS packs,
           (SELECT coalesce(sum(compiled_bytes), 0)::int8 FROM tenant_packs
             WHERE tenant_id = $1 AND deleted_at IS NULL) AS pack_bytes",
    )
    .bind(tenant)
    .fetch_one(db)
    .await?;
    let get = |c: &str| row.try_get::<i64, _>(c).map(|v| v.max(0) as u64);
    Ok(Usage {
        session_mem_mib: get("mem")?,
        live_sessions: get("live")?,
        disk_bytes: get("disk")?,
        packs: get("packs")?,
        pack_compiled_bytes: get("pack_bytes")?,
    })
}

/// The admin API's view of a tenant's quotas.
pub async fn view(pool: &PgPool, config: &Config, tenant: &str) -> Result<QuotaView, ServiceError> {
    let overrides = overrides(pool, tenant).await?;
    Ok(QuotaView {
        tenant: tenant.to_owned(),
        effective: overrides.effective(config),
        overrides,
        usage: usage(pool, tenant).await?,
    })
}

/// Sets a tenant's own quotas (all of them: `None` goes back to the default), audited on the
/// operator's chain and the tenant's.
pub async fn set(
    pool: &PgPool,
    config: &Config,
    tenant: &str,
    new: &QuotaOverrides,
    actor: &Actor,
) -> Result<QuotaView, ServiceError> {
    new.check()?;
    let mut tx = pool.begin().await?;
    let before = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants t WHERE t.id = $1 FOR UPDATE"))
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("tenant {tenant}")))?;
    let before = QuotaOverrides::from_row(&before)?;
    let int = |v: Option<u32>| v.map(|v| v as i32);
    sqlx::query(
        "UPDATE tenants SET quota_session_mem_mib = $2, quota_live_sessions = $3, quota_disk_bytes = $4,
                quota_uploads = $5, quota_requests = $6, quota_vm_cpu_percent = $7, quota_packs = $8,
                quota_pack_compiled_bytes = $9
         WHERE id = $1",
    )
    .bind(tenant)
    .bind(int(new.session_mem_mib))
    .bind(int(new.live_sessions))
    .bind(new.disk_bytes.map(|v| v as i64))
    .bind(int(new.uploads))
    .bind(int(new.requests))
    .bind(int(new.vm_cpu_percent))
    .bind(int(new.packs))
    .bind(new.pack_compiled_bytes.map(|v| v as i64))
    .execute(&mut *tx)
    .await?;
    let details = json!({ "before": before, "after": new });
    operator_event(
        &mut tx,
        Some(tenant),
        actor,
        "tenant.quotas_changed",
        ("tenant", tenant),
        details.clone(),
    )
    .await?;
    tenant_event(&mut tx, tenant, actor, "tenant.quotas_changed", ("tenant", tenant), details).await?;
    tx.commit().await?;
    view(pool, config, tenant).await
}

/// 409 for a quota a request would pass.
pub fn exceeded(what: &str, asked: u64, used: u64, quota: u64, unit: &str) -> ServiceError {
    ServiceError::Conflict(format!(
        "this would exceed your tenant's {what} quota: {asked} {unit} more, with {used} of {quota} {unit} in use; \
         free some (terminate sessions, wait for jobs to finish) or ask your operator to raise it"
    ))
}
