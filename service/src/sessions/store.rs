//! The `sessions` table. Reads are scoped to a tenant (another tenant's session is "not
//! found"); every state change goes through [`transition`]: a conditional UPDATE on the state
//! and generation the caller read, committed together with its audit event.

use cella_audit::Actor;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;

use super::{SessionPage, SessionParams, SessionView, State};
use crate::audit_log::tenant_event;
use crate::error::ServiceError;
use crate::ids;
use crate::jobs::{actor_id, cursor_position, make_cursor, rfc3339, ArtifactView};

/// One row.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub tenant_id: String,
    pub state: State,
    pub generation: i64,
    pub artifact_name: Option<String>,
    pub artifact_bytes: i64,
    pub artifact_sha256: Vec<u8>,
    pub mem_mib: i32,
    pub read_policy: String,
    pub idle_suspend_secs: i32,
    pub deadline: OffsetDateTime,
    pub last_active_at: OffsetDateTime,
    pub host: String,
    pub vmm_pid: Option<i32>,
    pub api_sock: Option<String>,
    pub vsock_sock: Option<String>,
    pub snapshot_dir: Option<String>,
    pub snapshot_bytes: Option<i64>,
    pub failure_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub terminated_at: Option<OffsetDateTime>,
    /// `created_at` + the maximum duration: the latest the deadline can move to.
    pub max_deadline: OffsetDateTime,
}

/// A new session's row.
#[derive(Debug)]
pub struct NewSession<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub artifact_name: Option<&'a str>,
    pub artifact_bytes: u64,
    pub artifact_sha256: [u8; 32],
    pub params: &'a SessionParams,
    pub host: &'a str,
    /// The configured maximum duration: how far `connect` may extend the deadline.
    pub max_secs: u64,
    /// The caller's API key, checked again as the row is written (revoked meanwhile: 401).
    pub key_id: &'a str,
    /// The most live sessions the tenant may hold, this one included.
    pub max_live: u32,
    /// The most guest memory the tenant's running and paused sessions may have, this one
    /// included (MiB).
    pub max_mem_mib: u32,
}

/// The audit event of a transition.
#[derive(Debug)]
pub struct Event<'a> {
    pub actor: &'a Actor,
    pub action: &'static str,
    pub details: Value,
}

const COLUMNS: &str = "id, tenant_id, state, generation, artifact_name, artifact_bytes, artifact_sha256,
    mem_mib, read_policy, idle_suspend_secs, deadline, last_active_at, host, vmm_pid, api_sock,
    vsock_sock, snapshot_dir, snapshot_bytes, failure_reason, created_at, updated_at, terminated_at,
    max_deadline";

fn from_row(row: &PgRow) -> Result<Session, sqlx::Error> {
    let state: String = row.try_get("state")?;
    Ok(Session {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        state: State::parse(&state)
            .ok_or_else(|| sqlx::Error::Decode(format!("session state {state:?}").into()))?,
        generation: row.try_get("generation")?,
        artifact_name: row.try_get("artifact_name")?,
        artifact_bytes: row.try_get("artifact_bytes")?,
        artifact_sha256: row.try_get("artifact_sha256")?,
        mem_mib: row.try_get("mem_mib")?,
        read_policy: row.try_get("read_policy")?,
        idle_suspend_secs: row.try_get("idle_suspend_secs")?,
        deadline: row.try_get("deadline")?,
        last_active_at: row.try_get("last_active_at")?,
        host: row.try_get("host")?,
        vmm_pid: row.try_get("vmm_pid")?,
        api_sock: row.try_get("api_sock")?,
        vsock_sock: row.try_get("vsock_sock")?,
        snapshot_dir: row.try_get("snapshot_dir")?,
        snapshot_bytes: row.try_get("snapshot_bytes")?,
        failure_reason: row.try_get("failure_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        terminated_at: row.try_get("terminated_at")?,
        max_deadline: row.try_get("max_deadline")?,
    })
}

impl Session {
    pub fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            state: self.state.as_str().to_owned(),
            artifact: ArtifactView {
                name: self.artifact_name.clone(),
                bytes: self.artifact_bytes,
                sha256: ids::hex(&self.artifact_sha256),
            },
            mem_mib: self.mem_mib,
            read_policy: self.read_policy.clone(),
            idle_suspend_secs: self.idle_suspend_secs,
            deadline: rfc3339(self.deadline),
            max_deadline: rfc3339(self.max_deadline),
            last_active_at: rfc3339(self.last_active_at),
            host: self.host.clone(),
            snapshot_bytes: self.snapshot_bytes,
            error: self.failure_reason.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            terminated_at: self.terminated_at.map(rfc3339),
        }
    }
}

fn select() -> String {
    format!("SELECT {COLUMNS} FROM sessions")
}

/// Inserts a pending session and its `session.created` event, unless the tenant already holds
/// `max_live` live sessions (409). Creates of one tenant serialize on its row, so concurrent
/// ones cannot both slip under the limit.
/// Whether one more session of `mem_mib` fits the tenant's quotas, given what it holds.
pub fn check_session_quotas(
    usage: &crate::quotas::Usage,
    mem_mib: u32,
    max_live: u32,
    max_mem_mib: u32,
) -> Result<(), ServiceError> {
    if usage.live_sessions >= u64::from(max_live) {
        return Err(ServiceError::Conflict(format!(
            "this tenant holds {} live session(s), the most allowed is {max_live}: terminate one \
             (DELETE /v1/sessions/{{id}}, `cella session rm`) first",
            usage.live_sessions
        )));
    }
    check_session_memory(usage, mem_mib, max_mem_mib)
}

/// Whether `mem_mib` more of running sessions fits the tenant's session memory quota.
pub fn check_session_memory(
    usage: &crate::quotas::Usage,
    mem_mib: u32,
    max_mem_mib: u32,
) -> Result<(), ServiceError> {
    if usage.session_mem_mib + u64::from(mem_mib) > u64::from(max_mem_mib) {
        return Err(crate::quotas::exceeded(
            "session memory",
            u64::from(mem_mib),
            usage.session_mem_mib,
            u64::from(max_mem_mib),
            "MiB",
        ));
    }
    Ok(())
}

pub async fn insert(pool: &PgPool, new: &NewSession<'_>, actor: &Actor) -> Result<Session, ServiceError> {
    let mut tx = pool.begin().await?;
    crate::tenants::recheck_key(&mut tx, new.key_id).await?;
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE").bind(new.tenant).execute(&mut *tx).await?;
    let usage = crate::quotas::usage(&mut *tx, new.tenant).await?;
    check_session_quotas(&usage, new.params.mem_mib, new.max_live, new.max_mem_mib)?;
    let row = sqlx::query(&format!(
        "INSERT INTO sessions (id, tenant_id, created_by, artifact_name, artifact_bytes, artifact_sha256,
                               mem_mib, read_policy, idle_suspend_secs, deadline, max_deadline, host)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10),
                 now() + make_interval(secs => $11), $12)
         RETURNING {COLUMNS}"
    ))
    .bind(new.id)
    .bind(new.tenant)
    .bind(actor_id(actor))
    .bind(new.artifact_name)
    .bind(i64::try_from(new.artifact_bytes).unwrap_or(i64::MAX))
    .bind(&new.artifact_sha256[..])
    .bind(i32::try_from(new.params.mem_mib).unwrap_or(i32::MAX))
    .bind(&new.params.read_policy)
    .bind(i32::try_from(new.params.idle_suspend_secs).unwrap_or(i32::MAX))
    .bind(new.params.max_duration_secs as f64)
    .bind(new.max_secs.max(new.params.max_duration_secs) as f64)
    .bind(new.host)
    .fetch_one(&mut *tx)
    .await?;
    let session = from_row(&row)?;
    tenant_event(
        &mut tx,
        new.tenant,
        actor,
        "session.created",
        ("session", new.id),
        serde_json::json!({
            "artifact_bytes": new.artifact_bytes,
            "artifact_sha256": ids::hex(&new.artifact_sha256),
            "max_duration_secs": new.params.max_duration_secs,
            "idle_suspend_secs": new.params.idle_suspend_secs,
            "read_policy": new.params.read_policy,
            "mem_mib": new.params.mem_mib,
            "deadline": rfc3339(session.deadline),
            "host": new.host,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(session)
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("session {id}"))
}

/// The session `id` (of `tenant`, when given: another tenant's session is not found).
pub async fn get(pool: &PgPool, tenant: Option<&str>, id: &str) -> Result<Session, ServiceError> {
    let row = sqlx::query(&format!("{} WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)", select()))
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(from_row(&row)?)
}

/// A page of `tenant`'s sessions, newest first, optionally in one state.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    state: Option<&str>,
    cursor: Option<&str>,
    limit: u32,
) -> Result<SessionPage, ServiceError> {
    if let Some(s) = state {
        if State::parse(s).is_none() {
            let all: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
            return Err(ServiceError::BadRequest(format!(
                "unknown state {s:?}: use one of {}",
                all.join(", ")
            )));
        }
    }
    let (after_time, after_id) = cursor_position(cursor, "session")?;
    let limit = limit.clamp(1, 200);
    let rows = sqlx::query(&format!(
        "{} WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC LIMIT $5",
        select()
    ))
    .bind(tenant)
    .bind(state)
    .bind(after_time)
    .bind(after_id)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let mut sessions = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let s = from_row(row)?;
        last = Some((s.created_at, s.id.clone()));
        sessions.push(s.view());
    }
    let next_cursor = match (rows.len() > limit as usize, last) {
        (true, Some((t, id))) => Some(make_cursor(t, &id)),
        _ => None,
    };
    Ok(SessionPage { sessions, next_cursor })
}

/// Sessions on `host` that may need the reaper or recovery: not final.
pub async fn live_on_host(pool: &PgPool, host: &str) -> Result<Vec<Session>, ServiceError> {
    let rows = sqlx::query(&format!(
        "{} WHERE host = $1 AND state NOT IN ('terminated', 'failed') ORDER BY created_at",
        select()
    ))
    .bind(host)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect::<Result<_, _>>().map_err(Into::into)
}

/// Whether a session with this id exists (any tenant, any state).
pub async fn exists(pool: &PgPool, id: &str) -> Result<bool, ServiceError> {
    Ok(sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await?)
}

/// Writes `next` over `from` if the row still has `from`'s state and generation: the state, the
/// VMM's pid and sockets, the snapshot, the failure reason; `touch` also marks the session
/// active now. Appends `event` in the same transaction. A row that moved on answers 409.
pub async fn transition(
    pool: &PgPool,
    from: &Session,
    next: &Session,
    touch: bool,
    event: Option<Event<'_>>,
) -> Result<Session, ServiceError> {
    let mut tx = pool.begin().await?;
    let session = apply(&mut tx, from, next, touch).await?;
    if let Some(event) = event {
        append(&mut tx, &session, event).await?;
    }
    tx.commit().await?;
    Ok(session)
}

/// [`transition`] (touching) with its event, then [`touch`] with its own, in one transaction:
/// a connect that restored a suspended session.
pub async fn transition_then_touch(
    pool: &PgPool,
    from: &Session,
    next: &Session,
    event: Event<'_>,
    extend_secs: Option<u64>,
    then: Event<'_>,
) -> Result<Session, ServiceError> {
    let mut tx = pool.begin().await?;
    let session = apply(&mut tx, from, next, true).await?;
    append(&mut tx, &session, event).await?;
    let session = mark_active(&mut tx, &session, extend_secs).await?;
    append(&mut tx, &session, then).await?;
    tx.commit().await?;
    Ok(session)
}

/// The fenced write of [`transition`].
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    from: &Session,
    next: &Session,
    touch: bool,
) -> Result<Session, ServiceError> {
    let row = sqlx::query(&format!(
        "UPDATE sessions SET state = $3, generation = generation + 1, vmm_pid = $4, api_sock = $5,
                vsock_sock = $6, snapshot_dir = $7, snapshot_bytes = $8, failure_reason = $9,
                last_active_at = CASE WHEN $10 THEN now() ELSE last_active_at END,
                terminated_at = CASE WHEN $3 = 'terminated' THEN now() ELSE terminated_at END,
                updated_at = now()
         WHERE id = $1 AND state = $2 AND generation = $11
         RETURNING {COLUMNS}"
    ))
    .bind(&from.id)
    .bind(from.state.as_str())
    .bind(next.state.as_str())
    .bind(next.vmm_pid)
    .bind(&next.api_sock)
    .bind(&next.vsock_sock)
    .bind(&next.snapshot_dir)
    .bind(next.snapshot_bytes)
    .bind(&next.failure_reason)
    .bind(touch)
    .bind(from.generation)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(ServiceError::Conflict(format!(
            "session {} changed while this call was applied to it; read it again and retry",
            from.id
        )));
    };
    Ok(from_row(&row)?)
}

/// Marks a running session active now and appends `event` (exec, connect without a state
/// change); with `extend_secs`, moves the deadline to now + extend_secs if that is later, never
/// past `max_deadline`.
pub async fn touch(
    pool: &PgPool,
    session: &Session,
    extend_secs: Option<u64>,
    event: Event<'_>,
) -> Result<Session, ServiceError> {
    let mut tx = pool.begin().await?;
    let updated = mark_active(&mut tx, session, extend_secs).await?;
    append(&mut tx, &updated, event).await?;
    tx.commit().await?;
    Ok(updated)
}

/// The write of [`touch`].
async fn mark_active(
    tx: &mut Transaction<'_, Postgres>,
    session: &Session,
    extend_secs: Option<u64>,
) -> Result<Session, ServiceError> {
    let row = sqlx::query(&format!(
        "UPDATE sessions SET last_active_at = now(), updated_at = now(),
                deadline = CASE WHEN $2::float8 IS NULL THEN deadline
                           ELSE GREATEST(deadline, LEAST(now() + make_interval(secs => $2::float8), max_deadline)) END
         WHERE id = $1 AND state = 'running'
         RETURNING {COLUMNS}"
    ))
    .bind(&session.id)
    .bind(extend_secs.map(|s| s as f64))
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(ServiceError::Conflict(format!(
            "session {} stopped running while this call was applied to it; read it again",
            session.id
        )));
    };
    Ok(from_row(&row)?)
}

async fn append(
    tx: &mut Transaction<'_, Postgres>,
    s: &Session,
    event: Event<'_>,
) -> Result<(), ServiceError> {
    tenant_event(tx, &s.tenant_id, event.actor, event.action, ("session", &s.id), event.details).await
}

/// Sessions by state, for `/metrics`.
pub async fn count_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>, ServiceError> {
    let rows =
        sqlx::query("SELECT state, count(*) AS n FROM sessions GROUP BY state").fetch_all(pool).await?;
    rows.iter()
        .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// A session the reaper looks at: past its deadline, or idle past its `idle_suspend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub id: String,
    pub expired: bool,
    pub idle: bool,
}

/// This host's sessions the reaper may have to act on (running, paused, suspended or
/// terminating), with whether each is past its deadline and whether it is idle.
pub async fn due_on_host(pool: &PgPool, host: &str) -> Result<Vec<Due>, ServiceError> {
    let rows = sqlx::query(
        "SELECT id, deadline <= now() AS expired,
                (state IN ('running', 'paused') AND idle_suspend_secs > 0
                 AND last_active_at + make_interval(secs => idle_suspend_secs) <= now()) AS idle
         FROM sessions
         WHERE host = $1 AND state IN ('running', 'paused', 'suspended', 'terminating')",
    )
    .bind(host)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok(Due { id: r.try_get("id")?, expired: r.try_get("expired")?, idle: r.try_get("idle")? }))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// What the session manager needs of the sessions' rows: [`PgSessions`] in `cella serve`, an
/// in-memory table in the manager's unit tests. Every state change is a [`transition`]
/// fenced on the state and generation read.
pub trait SessionStore: Send + Sync + 'static {
    fn insert(
        &self,
        new: &NewSession<'_>,
        actor: &Actor,
    ) -> impl std::future::Future<Output = Result<Session, ServiceError>> + Send;
    fn get(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> impl std::future::Future<Output = Result<Session, ServiceError>> + Send;
    fn transition(
        &self,
        from: &Session,
        next: &Session,
        touch: bool,
        event: Option<Event<'_>>,
    ) -> impl std::future::Future<Output = Result<Session, ServiceError>> + Send;
    fn touch(
        &self,
        session: &Session,
        extend_secs: Option<u64>,
        event: Event<'_>,
    ) -> impl std::future::Future<Output = Result<Session, ServiceError>> + Send;
    /// [`SessionStore::transition`] (touching) with `event`, then [`SessionStore::touch`] with
    /// `then`, at once.
    fn transition_then_touch(
        &self,
        from: &Session,
        next: &Session,
        event: Event<'_>,
        extend_secs: Option<u64>,
        then: Event<'_>,
    ) -> impl std::future::Future<Output = Result<Session, ServiceError>> + Send;
    fn live_on_host(
        &self,
        host: &str,
    ) -> impl std::future::Future<Output = Result<Vec<Session>, ServiceError>> + Send;
    fn due_on_host(
        &self,
        host: &str,
    ) -> impl std::future::Future<Output = Result<Vec<Due>, ServiceError>> + Send;
    fn exists(&self, id: &str) -> impl std::future::Future<Output = Result<bool, ServiceError>> + Send;
    /// The tenant's own CPU quota per VM, if it has one (percent of one CPU).
    fn vm_cpu_percent(
        &self,
        tenant: &str,
    ) -> impl std::future::Future<Output = Result<Option<u32>, ServiceError>> + Send;
}

/// The `sessions` table in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSessions(pub PgPool);

impl SessionStore for PgSessions {
    async fn insert(&self, new: &NewSession<'_>, actor: &Actor) -> Result<Session, ServiceError> {
        insert(&self.0, new, actor).await
    }
    async fn get(&self, tenant: Option<&str>, id: &str) -> Result<Session, ServiceError> {
        get(&self.0, tenant, id).await
    }
    async fn transition(
        &self,
        from: &Session,
        next: &Session,
        touch: bool,
        event: Option<Event<'_>>,
    ) -> Result<Session, ServiceError> {
        transition(&self.0, from, next, touch, event).await
    }
    async fn touch(
        &self,
        session: &Session,
        extend_secs: Option<u64>,
        event: Event<'_>,
    ) -> Result<Session, ServiceError> {
        touch(&self.0, session, extend_secs, event).await
    }
    async fn transition_then_touch(
        &self,
        from: &Session,
        next: &Session,
        event: Event<'_>,
        extend_secs: Option<u64>,
        then: Event<'_>,
    ) -> Result<Session, ServiceError> {
        transition_then_touch(&self.0, from, next, event, extend_secs, then).await
    }
    async fn live_on_host(&self, host: &str) -> Result<Vec<Session>, ServiceError> {
        live_on_host(&self.0, host).await
    }
    async fn due_on_host(&self, host: &str) -> Result<Vec<Due>, ServiceError> {
        due_on_host(&self.0, host).await
    }
    async fn exists(&self, id: &str) -> Result<bool, ServiceError> {
        exists(&self.0, id).await
    }
    async fn vm_cpu_percent(&self, tenant: &str) -> Result<Option<u32>, ServiceError> {
        Ok(crate::quotas::overrides(&self.0, tenant).await?.vm_cpu_percent)
    }
}
