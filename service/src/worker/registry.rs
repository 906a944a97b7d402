//! The `workers` table: each worker registers, heartbeats (and learns there whether an
//! operator asked it to drain), and marks itself stopped.

use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::error::ServiceError;

/// A worker as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub hostname: String,
    pub pid: i32,
    pub concurrency: i32,
    pub running: i32,
    pub draining: bool,
    /// Whether it heartbeated recently (within three heartbeat periods).
    pub alive: bool,
    pub heartbeat_age_secs: f64,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub stopped_at: Option<String>,
}

pub async fn register(
    pool: &PgPool,
    id: &str,
    hostname: &str,
    pid: u32,
    concurrency: u32,
) -> Result<(), ServiceError> {
    sqlx::query("INSERT INTO workers (id, hostname, pid, concurrency) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(hostname)
        .bind(i32::try_from(pid).unwrap_or(-1))
        .bind(i32::try_from(concurrency).unwrap_or(i32::MAX))
        .execute(pool)
        .await?;
    Ok(())
}

/// Records liveness and load; returns whether the worker should drain.
pub async fn heartbeat(pool: &PgPool, id: &str, running: usize) -> Result<bool, ServiceError> {
    let draining: Option<bool> = sqlx::query_scalar(
        "UPDATE workers SET heartbeat_at = now(), running = $2 WHERE id = $1 RETURNING draining",
    )
    .bind(id)
    .bind(i32::try_from(running).unwrap_or(i32::MAX))
    .fetch_optional(pool)
    .await?;
    Ok(draining.unwrap_or(false))
}

pub async fn stopped(pool: &PgPool, id: &str) -> Result<(), ServiceError> {
    sqlx::query("UPDATE workers SET stopped_at = now(), running = 0 WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Asks a worker to drain (stop leasing; running jobs finish) or to take work again.
/// Takes effect at the worker's next heartbeat.
pub async fn set_draining(
    conn: &mut sqlx::PgConnection,
    id: &str,
    draining: bool,
) -> Result<(), ServiceError> {
    let updated = sqlx::query("UPDATE workers SET draining = $2 WHERE id = $1 AND stopped_at IS NULL")
        .bind(id)
        .bind(draining)
        .execute(conn)
        .await?
        .rows_affected();
    if updated == 0 {
        return Err(ServiceError::NotFound(format!("running worker {id}")));
    }
    Ok(())
}

/// Workers, newest first; stopped ones only if `include_stopped`.
pub async fn list(pool: &PgPool, include_stopped: bool) -> Result<Vec<WorkerView>, ServiceError> {
    let rows = sqlx::query(
        "SELECT id, hostname, pid, concurrency, running, draining, stopped_at,
                extract(epoch FROM now() - heartbeat_at)::float8 AS age
         FROM workers WHERE $1 OR stopped_at IS NULL ORDER BY created_at DESC",
    )
    .bind(include_stopped)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let age: f64 = r.try_get("age")?;
            let stopped: Option<time::OffsetDateTime> = r.try_get("stopped_at")?;
            Ok(WorkerView {
                id: r.try_get("id")?,
                hostname: r.try_get("hostname")?,
                pid: r.try_get("pid")?,
                concurrency: r.try_get("concurrency")?,
                running: r.try_get("running")?,
                draining: r.try_get("draining")?,
                alive: stopped.is_none() && age < 3.0 * super::HEARTBEAT.as_secs_f64(),
                heartbeat_age_secs: age,
                stopped_at: stopped
                    .map(|t| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}
