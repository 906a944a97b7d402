//! A tenant's license policy (issue 16): the licenses its jobs report at `error` (denied) and at
//! `warning` at least (flagged), for jobs that give none of their own (`license_deny`,
//! `license_flag` on `POST /v1/jobs`). Kept on the tenant's row (migration 0008), applied when
//! a job is leased, each change audited on the tenant's chain (`tenant.license_policy_changed`).
//! The verdicts themselves are made in the VM ([`cella_scan::spdx::LicensePolicy`]).

use cella_audit::Actor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::audit_log::tenant_event;
use crate::error::ServiceError;

/// A license policy: SPDX identifiers (an entry also covers its `-only`, `-or-later` and `+`
/// forms) or prefixes ending in `*`, any case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LicensePolicyView {
    /// Licenses reported at `error`.
    pub deny: Vec<String>,
    /// Licenses reported at `warning` at least.
    pub flag: Vec<String>,
}

impl LicensePolicyView {
    /// Checks every entry, as the VM will.
    pub fn check(&self) -> Result<(), ServiceError> {
        cella_scan::spdx::LicensePolicy::new(&self.deny, &self.flag)
            .map(|_| ())
            .map_err(|e| ServiceError::Unprocessable(format!("license policy: {e}")))
    }
}

/// The tenant's license policy (empty lists: none).
pub async fn get(pool: &PgPool, tenant: &str) -> Result<LicensePolicyView, ServiceError> {
    let (deny, flag): (Vec<String>, Vec<String>) =
        sqlx::query_as("SELECT license_deny, license_flag FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_one(pool)
            .await?;
    Ok(LicensePolicyView { deny, flag })
}

/// Sets the tenant's license policy (checked), audited with what it was before.
pub async fn set(
    pool: &PgPool,
    tenant: &str,
    actor: &Actor,
    policy: LicensePolicyView,
) -> Result<LicensePolicyView, ServiceError> {
    policy.check()?;
    let mut tx = pool.begin().await?;
    let (deny, flag): (Vec<String>, Vec<String>) =
        sqlx::query_as("SELECT license_deny, license_flag FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
    let before = LicensePolicyView { deny, flag };
    sqlx::query("UPDATE tenants SET license_deny = $2, license_flag = $3 WHERE id = $1")
        .bind(tenant)
        .bind(&policy.deny)
        .bind(&policy.flag)
        .execute(&mut *tx)
        .await?;
    tenant_event(
        &mut tx,
        tenant,
        actor,
        "tenant.license_policy_changed",
        ("tenant", tenant),
        json!({ "before": before, "after": policy }),
    )
    .await?;
    tx.commit().await?;
    Ok(policy)
}
