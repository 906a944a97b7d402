//! The service's audit events: one call per state change, appended in that change's
//! transaction so the event and the change commit together or not at all.

use cella_audit::{Actor, NewEvent, Resource, TenantId};
use serde_json::Value;
use sqlx::{Postgres, Transaction};

use crate::error::ServiceError;

/// Appends `action` on `resource` to `tenant`'s chain.
pub async fn tenant_event(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    actor: &Actor,
    action: &str,
    resource: (&str, &str),
    details: Value,
) -> Result<(), ServiceError> {
    let tenant =
        TenantId::new(tenant).map_err(|e| ServiceError::Internal(format!("tenant id for audit: {e}")))?;
    let event =
        NewEvent::tenant(tenant, actor.clone(), action, Resource::new(resource.0, resource.1), details);
    cella_audit::append(tx, &event).await?;
    Ok(())
}

/// Appends an operator action (optionally concerning a tenant) to the operator chain.
pub async fn operator_event(
    tx: &mut Transaction<'_, Postgres>,
    concerning: Option<&str>,
    actor: &Actor,
    action: &str,
    resource: (&str, &str),
    details: Value,
) -> Result<(), ServiceError> {
    let concerning = concerning
        .map(TenantId::new)
        .transpose()
        .map_err(|e| ServiceError::Internal(format!("tenant id for audit: {e}")))?;
    let event =
        NewEvent::operator(concerning, actor.clone(), action, Resource::new(resource.0, resource.1), details);
    cella_audit::append(tx, &event).await?;
    Ok(())
}
