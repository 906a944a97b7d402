//! The session manager in `cella serve`: every transition of a session's VM, one at a time per
//! session (a lock per session id here, and the generation fence in the database across
//! processes), each recorded with its audit event. The VM is reached only through
//! [`Vmms`]; its blocking calls run in `spawn_blocking`.
//!
//! Jailed session VMMs (`worker.jailed`) each run as a uid/gid of their own, from
//! `sessions.jail_uid_base` up: a launch takes the lowest one that no process of this host
//! runs as (so a restarted service never hands out the uid of a VMM it re-adopted, nor one
//! that anything else uses) and no other launch in progress holds, and holds it until its VMM
//! answers (by then the VMM runs as it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cella_audit::Actor;
use cella_proto::SessionRequest;
use serde_json::{json, Value};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::OwnedMutexGuard;

use crate::limits::TokenBucket;
use crate::quotas::Quotas;
use crate::tenants::Caller;

use super::driver::VmmDriver;
use super::store::{Due, Event, NewSession, PgSessions, Session, SessionStore};
use super::vmm::{
    self, Attach, Frame, Guest, JailSpec, LaunchSpec, Liveness, Reply, RestoreSpec, Source, SpareVmm,
    VmState, VmmError, Vmms,
};
use super::{SessionParams, State};
use crate::config::SessionsConfig;
use crate::data_dir::DataDir;
use crate::error::{error_chain, ServiceError};

/// How long a VMM may take to answer on its control socket after it started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest may take to listen (it indexes the artifact first).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped VMM may take to scrub and exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A session VMM stops itself this long after its session's deadline (`--max-duration-secs`),
/// a backstop for a service that is gone; the reaper terminates the session at the deadline
/// first.
const VMM_DEADLINE_GRACE_SECS: u64 = 30;
/// The most `cella-vmm session --max-duration-secs` accepts.
const VMM_MAX_DURATION_SECS: u64 = 8 * 3600;

/// The `--max-duration-secs` for a session VMM with `left` seconds to its deadline.
/// Failed sessions' reasons (which can quote the guest's console) reach the log at 20 lines
/// at once, then one a second.
static SESSION_WORDS: crate::logging::GuestWords =
    crate::logging::GuestWords::new(20, std::time::Duration::from_secs(1));

fn vmm_max_duration(left: u64) -> Duration {
    Duration::from_secs((left + VMM_DEADLINE_GRACE_SECS).clamp(1, VMM_MAX_DURATION_SECS))
}
/// The file that marks a snapshot as complete (written by the manager after the VMM's
/// snapshot call returned): only such a snapshot is ever restored.
pub const SNAPSHOT_COMPLETE: &str = "cella-snapshot.json";

/// The files of one session: its folder `<data>/sessions/<id>/` (mode 0700, root's; a jailed
/// VMM's while it runs), and beside it the VMM's log and the snapshot.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    pub dir: PathBuf,
    pub artifact: PathBuf,
    pub api_sock: PathBuf,
    pub vsock: PathBuf,
    /// `<data>/sessions/<id>.snapshot/`: outside the folder a booted VMM owns while it runs, so
    /// nothing a VMM does can turn what this process writes there, or reads back to restore,
    /// into a path of the host's (a link planted in its folder, say).
    pub snapshot: PathBuf,
    /// `<data>/sessions/<id>.vmm.log`: outside the folder, which the jail uid owns while its
    /// VMM runs and which `cella-jailer` checks before handing it over.
    pub log: PathBuf,
}

/// The suffix of a session's VMM log in `<data>/sessions/`.
const LOG_SUFFIX: &str = ".vmm.log";
/// The suffix of a session's snapshot folder in `<data>/sessions/`.
const SNAPSHOT_SUFFIX: &str = ".snapshot";

impl SessionPaths {
    /// `sessions`: the `sessions` folder of the data folder, as an absolute path without
    /// symbolic links (the jailer binds the session folder at exactly that path).
    pub fn new(sessions: &Path, id: &str) -> Self {
        let dir = sessions.join(id);
        Self {
            artifact: dir.join("artifact"),
            api_sock: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
            snapshot: sessions.join(format!("{id}{SNAPSHOT_SUFFIX}")),
            log: sessions.join(format!("{id}{LOG_SUFFIX}")),
            dir,
        }
    }

    /// Deletes the folder, the log and the snapshot.
    async fn remove(&self) {
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
        let _ = tokio::fs::remove_file(&self.log).await;
        let _ = tokio::fs::remove_dir_all(&self.snapshot).await;
    }
}

/// What one session holds in this process besides its row: the open guest connection, and
/// what is left of its exec rate.
#[derive(Debug, Default)]
pub struct Slot {
    guest: Option<Guest>,
    execs: Option<crate::limits::TokenBucket>,
}

type Slots = Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>;

/// A session's lock, held. When it is let go and nobody else holds or waits for it, and the
/// slot keeps nothing (no open guest connection), its entry leaves the map: the map never holds
/// more than the sessions with a connection open plus the calls in flight, however many ids
/// callers try.
#[derive(Debug)]
pub struct SlotGuard<'m> {
    guard: Option<OwnedMutexGuard<Slot>>,
    slots: &'m Slots,
    id: String,
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.guard.as_ref().unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        self.guard.as_mut().unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        // An open connection, or a rate not yet back to full, is worth keeping.
        if guard.guest.is_some() || guard.execs.as_ref().is_some_and(|b| !b.is_full(Instant::now())) {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and this guard's. Anyone else waiting for the lock holds a
        // third (taken under the map's lock, as this check is), so the entry stays for them.
        let mine = OwnedMutexGuard::mutex(&guard);
        if slots.get(&self.id).is_some_and(|a| Arc::ptr_eq(a, mine) && Arc::strong_count(a) == 2) {
            slots.remove(&self.id);
        }
    }
}

/// Runs sessions' VMs on this host: real VMMs ([`Vmms`]) recorded in PostgreSQL
/// ([`PgSessions`]) in `cella serve`; any [`VmmDriver`] and [`SessionStore`] in tests.
pub struct SessionManager<D: VmmDriver = Vmms, S: SessionStore = PgSessions> {
    store: S,
    config: SessionsConfig,
    sessions_dir: PathBuf,
    host: String,
    vmms: Arc<D>,
    slots: Slots,
    /// Jail uids taken by launches that have not recorded their VMM yet; held while a launch
    /// picks one, so two launches never pick the same (shared with the spares).
    jail_uids: super::spares::Reserved,
    /// The spare session VMM a restore takes ([`super::spares`]).
    spares: Arc<super::spares::SparePool<D>>,
    default_cpu_percent: u32,
}

/// How [`SessionManager::stop_vm`] ended a VMM.
#[derive(Debug, Default)]
struct Stopped {
    /// Its run report, when the control API's stop gave one.
    report: Option<Value>,
    /// It ended on our stop or SIGTERM (jailed: its supervisor removed the jail); otherwise
    /// it was gone already or had to be killed, and a jail may be left behind.
    on_request: bool,
}

/// Why a session was suspended or terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A tenant asked.
    Requested,
    /// No exec or connect for its idle time.
    Idle,
    /// Its deadline passed.
    Deadline,
    /// A termination that could not finish before, finished by the reaper.
    Retried,
    /// Found after a restart of `cella serve`.
    Recovered,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Requested => "requested",
            Reason::Idle => "idle",
            Reason::Deadline => "deadline",
            Reason::Recovered => "recovered",
            Reason::Retried => "retried",
        }
    }
}

/// This host's name, as sessions record it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// A snapshot folder's size on disk (allocated blocks: the memory file is sparse).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| if m.is_dir() { 0 } else { m.blocks() * 512 })
        .sum()
}

/// Removes a restored session's snapshot folder off the caller's path: it is renamed aside at
/// once (so a suspend that follows writes a new one at the same place, and recovery never finds
/// the old one), and its files, up to the guest's memory size, are deleted in the background.
/// A snapshot that cannot be renamed is deleted in place, before this returns.
fn remove_snapshot_later(snapshot: &Path) {
    let name = snapshot.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = snapshot.with_file_name(format!("{name}.restored-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aside);
    match std::fs::rename(snapshot, &aside) {
        Ok(()) => {
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&aside);
            });
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(snapshot);
        }
    }
}

/// The last line of the VMM's log, for a failure reason (bounded, control characters escaped:
/// the guest's console and messages end up there).
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    let line =
        String::from_utf8_lossy(tail).lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_owned();
    let line: String = line.chars().take(300).collect();
    crate::error::escape_controls(&line).into_owned()
}

/// `text` as a tenant may see it: every absolute host path cut to its last part
/// (`…/vsock.sock`), so answers, stored reasons and the tenant's audit events say what failed
/// without showing the host's layout. The server's log keeps the whole text.
pub fn for_tenant(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        let starts_path = rest[..i].chars().next_back().is_none_or(|c| " (\"'`=:[{,".contains(c));
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'`)]},;".contains(c))
            .map_or(rest.len(), |n| i + n);
        let path = &rest[i..end];
        out.push_str(&rest[..i]);
        if starts_path && path[1..].contains('/') {
            out.push('…');
            out.push_str(&path[path.rfind('/').unwrap_or(0)..]);
        } else {
            out.push_str(path);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The answer when `/proc` (or another host resource) cannot be read: 503, try again; nothing
/// was concluded or changed.
pub(super) fn short_of_resources(e: &str) -> ServiceError {
    tracing::warn!(error = %e, "sessions: a host resource cannot be read");
    ServiceError::Overloaded {
        detail: "the server is short of resources and could not check the session's VM; nothing was changed, try again"
            .to_owned(),
        retry_after: Duration::from_secs(5),
    }
}

/// The VMM's liveness, looked at again for a short while if `/proc` cannot be read at first
/// (a moment without a free file descriptor).
fn settled_liveness(b: &impl VmmDriver, pid: u32, api: &Path) -> Liveness {
    let mut seen = b.alive(pid, api);
    for _ in 0..10 {
        if !matches!(seen, Liveness::Unknown(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        seen = b.alive(pid, api);
    }
    seen
}

/// 409 for a call that does not apply in the session's state, saying what to do.
pub fn wrong_state(s: &Session, action: &str) -> ServiceError {
    let id = &s.id;
    let hint = match s.state {
        State::Paused => format!("it is paused; resume it first (POST /v1/sessions/{id}/resume or /connect)"),
        State::Suspended => {
            format!("it is suspended; resume it first (POST /v1/sessions/{id}/resume or /connect)")
        }
        State::Running => "it is running".to_owned(),
        State::Terminated => "it has been terminated; create a new session".to_owned(),
        State::Failed => format!(
            "it failed ({}); create a new session",
            s.failure_reason.as_deref().unwrap_or("no reason recorded")
        ),
        st => format!("it is {st}; try again in a moment"),
    };
    ServiceError::Conflict(format!("cannot {action} session {id}: {hint}"))
}

impl<D: VmmDriver, S: SessionStore> std::fmt::Debug for SessionManager<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("host", &self.host)
            .field("sessions_dir", &self.sessions_dir)
            .field("jailed", &self.vmms.jailed())
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    pub fn new(pool: PgPool, config: SessionsConfig, data_dir: DataDir, host: String, vmms: Vmms) -> Self {
        Self::with_parts(PgSessions(pool), config, data_dir, host, vmms)
    }
}

impl<D: VmmDriver, S: SessionStore> SessionManager<D, S> {
    /// A manager of the sessions recorded in `store`, whose VMMs `vmms` drives, with their
    /// folders under `data_dir`'s `sessions`.
    pub fn with_parts(store: S, config: SessionsConfig, data_dir: DataDir, host: String, vmms: D) -> Self {
        let sessions = data_dir.sessions();
        let sessions_dir =
            std::fs::canonicalize(&sessions).or_else(|_| std::path::absolute(&sessions)).unwrap_or(sessions);
        let vmms = Arc::new(vmms);
        let jail_uids = super::spares::Reserved::default();
        let spares = Arc::new(super::spares::SparePool::new(
            vmms.clone(),
            &sessions_dir,
            jail_uids.clone(),
            config.jail_uid_base,
            config.jail_uids,
        ));
        Self {
            store,
            config,
            sessions_dir,
            host,
            vmms,
            slots: Mutex::default(),
            jail_uids,
            spares,
            default_cpu_percent: 100,
        }
    }

    pub fn config(&self) -> &SessionsConfig {
        &self.config
    }

    /// Keeps a spare session VMM ready for restores of sessions of the configured default
    /// size under the default CPU quota (`cella serve` calls this once it has recovered).
    pub fn keep_spare(&self) {
        self.spares.keep(self.config.mem_mib, self.default_cpu_percent);
    }

    /// Ends the spare session VMM still waiting, after one being made (`cella serve` stopping;
    /// blocks).
    pub fn close_spares(&self) {
        self.spares.close();
    }

    /// The CPU quota per VM of tenants without one of their own (percent of one CPU; default
    /// 100, or as configured in `[quotas]`).
    pub fn with_default_cpu_percent(mut self, percent: u32) -> Self {
        self.default_cpu_percent = percent.max(1);
        self
    }

    /// The tenant's CPU quota per VM (percent of one CPU).
    async fn cpu_percent(&self, tenant: &str) -> Result<u32, ServiceError> {
        Ok(self.store.vm_cpu_percent(tenant).await?.unwrap_or(self.default_cpu_percent))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// This host's sessions the reaper may have to act on.
    pub(super) async fn due(&self) -> Result<Vec<Due>, ServiceError> {
        self.store.due_on_host(&self.host).await
    }

    pub fn paths(&self, id: &str) -> SessionPaths {
        SessionPaths::new(&self.sessions_dir, id)
    }

    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_owned()).or_default().clone()
    }

    async fn lock(&self, id: &str) -> SlotGuard<'_> {
        let guard = self.slot(id).lock_owned().await;
        SlotGuard { guard: Some(guard), slots: &self.slots, id: id.to_owned() }
    }

    /// The lock of a session if nobody holds it (the reaper skips busy sessions).
    pub(super) fn try_lock(&self, id: &str) -> Option<SlotGuard<'_>> {
        let guard = self.slot(id).try_lock_owned().ok()?;
        Some(SlotGuard { guard: Some(guard), slots: &self.slots, id: id.to_owned() })
    }

    /// Session locks this process holds an entry for (for tests and metrics).
    pub fn lock_entries(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn forget(&self, id: &str) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&D) -> Result<T, VmmError> + Send + 'static,
    ) -> Result<T, VmmError> {
        let vmms = self.vmms.clone();
        tokio::task::spawn_blocking(move || f(&vmms))
            .await
            .unwrap_or_else(|e| Err(VmmError::Control(format!("the blocking task ended: {e}"))))
    }

    /// A session that lives on another host cannot be driven from here.
    fn check_host(&self, s: &Session) -> Result<(), ServiceError> {
        if s.host == self.host {
            return Ok(());
        }
        Err(ServiceError::Conflict(format!(
            "session {} runs on host {}; send this call to the API on that host (this is {})",
            s.id, s.host, self.host
        )))
    }

    /// Records a new session (its artifact already at [`SessionPaths::artifact`]) and starts its
    /// VM. A VM that does not come up leaves the session `failed`, with the reason.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        id: &str,
        caller: &Caller,
        quotas: &Quotas,
        actor: &Actor,
        artifact_name: Option<&str>,
        artifact_bytes: u64,
        artifact_sha256: [u8; 32],
        params: &SessionParams,
    ) -> Result<Session, ServiceError> {
        let mut slot = self.lock(id).await;
        let tenant = caller.tenant_id.as_str();
        let new = NewSession {
            id,
            tenant,
            artifact_name,
            artifact_bytes,
            artifact_sha256,
            params,
            host: &self.host,
            max_secs: self.config.max_duration(),
            key_id: &caller.key_id,
            max_live: quotas.live_sessions,
            max_mem_mib: quotas.session_mem_mib,
        };
        let s = self.store.insert(&new, actor).await?;
        match self.start_locked(&mut slot, s, actor).await {
            Ok(s) => Ok(s),
            Err(ServiceError::Vm(_)) => self.store.get(Some(tenant), id).await,
            Err(e) => Err(e),
        }
    }

    async fn start_locked(
        &self,
        slot: &mut Slot,
        s: Session,
        actor: &Actor,
    ) -> Result<Session, ServiceError> {
        let paths = self.paths(&s.id);
        let starting =
            self.store.transition(&s, &Session { state: State::Starting, ..s.clone() }, false, None).await?;
        let left = (starting.max_deadline - OffsetDateTime::now_utc()).whole_seconds().max(1) as u64;
        let spec = LaunchSpec {
            dir: paths.dir.clone(),
            api_sock: paths.api_sock.clone(),
            vsock: paths.vsock.clone(),
            source: Source::Artifact {
                path: paths.artifact.clone(),
                name: s.artifact_name.clone().unwrap_or_else(|| "artifact".to_owned()),
            },
            mem_mib: u32::try_from(s.mem_mib).unwrap_or(256),
            read_policy: s.read_policy.clone(),
            max_duration: vmm_max_duration(left),
            log: paths.log.clone(),
            jail: None,
            cpu_percent: self.cpu_percent(&s.tenant_id).await?,
        };
        let t0 = Instant::now();
        let (launched, pid) = match self.launch(&starting, spec).await {
            Ok(v) => v,
            Err((row, e)) => return Err(self.fail(row, &format!("the VM did not start: {e}"), actor).await),
        };
        let (guest, ready_ms) = match self.connect_guest(&paths).await {
            Ok(g) => (g, ms(t0)),
            Err(e) => return Err(self.fail(launched, &format!("the VM did not start: {e}"), actor).await),
        };
        let running = Session { state: State::Running, ..launched.clone() };
        let event = Event {
            actor,
            action: "session.started",
            details: json!({ "pid": pid, "ready_ms": ready_ms, "mem_mib": s.mem_mib, "host": self.host }),
        };
        let s = self.store.transition(&launched, &running, true, Some(event)).await?;
        slot.guest = Some(guest);
        Ok(s)
    }

    /// Launches a VMM (jailed as configured) and records its pid and sockets at once (state
    /// unchanged), so a restart of this process finds it. On failure, returns the row to fail.
    async fn launch(&self, s: &Session, spec: LaunchSpec) -> Result<(Session, u32), (Session, String)> {
        let uid = self.reserve_jail_uid_if_jailed().await;
        self.launch_reserved(s, spec, uid).await
    }

    /// A jail uid reserved ahead ([`SessionManager::reserve_jail_uid`]) when VMMs are jailed; `None`
    /// when they are not.
    async fn reserve_jail_uid_if_jailed(&self) -> Option<Result<u32, ServiceError>> {
        match self.vmms.jailed() {
            true => Some(self.reserve_jail_uid().await),
            false => None,
        }
    }

    /// [`SessionManager::launch`] with the jail uid reserved already (released here, whatever happens).
    async fn launch_reserved(
        &self,
        s: &Session,
        mut spec: LaunchSpec,
        uid: Option<Result<u32, ServiceError>>,
    ) -> Result<(Session, u32), (Session, String)> {
        let Some(uid) = uid else {
            return self.launch_recorded(s, spec).await;
        };
        let uid = match uid {
            Ok(uid) => uid,
            Err(e) => return Err((s.clone(), e.to_string())),
        };
        spec.jail = Some(JailSpec { id: vmm::jail_id(&s.id), uid });
        let launched = self.launch_recorded(s, spec).await;
        // Ready (or failed): from now on the VMM's process holds the uid.
        self.jail_uids.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        launched
    }

    /// The lowest jail uid of `sessions.jail_uid_base ..+ sessions.jail_uids` that no process
    /// of this host runs as and no other launch holds; held until released.
    async fn reserve_jail_uid(&self) -> Result<u32, ServiceError> {
        let (vmms, reserved) = (self.vmms.clone(), self.jail_uids.clone());
        let (base, count) = (self.config.jail_uid_base, self.config.jail_uids);
        tokio::task::spawn_blocking(move || super::spares::reserve_uid(&*vmms, &reserved, base, count))
            .await
            .map_err(|e| ServiceError::Internal(format!("listing processes: {e}")))?
    }

    async fn launch_recorded(
        &self,
        s: &Session,
        spec: LaunchSpec,
    ) -> Result<(Session, u32), (Session, String)> {
        for stale in [&spec.api_sock, &spec.vsock] {
            let _ = std::fs::remove_file(stale);
        }
        let spec2 = spec.clone();
        let pid = match self.blocking(move |b| b.launch(&spec2)).await {
            Ok(pid) => pid,
            Err(e) => return Err((s.clone(), error_chain(&e))),
        };
        let recorded = Session {
            vmm_pid: i32::try_from(pid).ok(),
            api_sock: Some(spec.api_sock.display().to_string()),
            vsock_sock: Some(spec.vsock.display().to_string()),
            ..s.clone()
        };
        // Recording the VMM and waiting for it to answer go on at once: each takes a few
        // milliseconds, and a restore waits for both.
        let api = spec.api_sock.clone();
        let (record, ready) = tokio::join!(
            self.store.transition(s, &recorded, false, None),
            self.blocking(move |b| b.wait_ready(pid, &api, READY_TIMEOUT)),
        );
        let s = match record {
            Ok(s) => s,
            Err(e) => {
                // Best effort: the launch fails either way, and the reaper or a restart finds a
                // VMM that is still there by its socket.
                let _ = self.stop_vm(pid, &spec.api_sock, &s.id).await;
                return Err((s.clone(), format!("recording the VMM: {e}")));
            }
        };
        match ready {
            Ok(()) => Ok((s, pid)),
            Err(e) => Err((s, format!("{}; VMM log: {}", error_chain(&e), log_tail(&spec.log)))),
        }
    }

    async fn connect_guest(&self, paths: &SessionPaths) -> Result<Guest, String> {
        let vsock = paths.vsock.clone();
        let exec_timeout = self.config.exec_timeout();
        self.blocking(move |b| b.connect(&vsock, CONNECT_TIMEOUT, exec_timeout))
            .await
            .map_err(|e| format!("{}; VMM log: {}", error_chain(&e), log_tail(&paths.log)))
    }

    /// Stops session `id`'s VMM `pid` if it may still run: the control API's stop (it scrubs
    /// and exits), else SIGTERM, then SIGKILL if it has not exited after [`EXIT_TIMEOUT`].
    /// Jailed, a VMM that did not end on request (it was gone already, or was killed) may have
    /// left its jail behind: `cella-jailer cleanup` removes it and gives the session's folder
    /// back to root.
    async fn stop_vm(&self, pid: u32, api_sock: &Path, id: &str) -> Result<Stopped, ServiceError> {
        let api = api_sock.to_owned();
        let stop_timeout = self.config.stop_timeout();
        let stopped = self
            .blocking(move |b| {
                match settled_liveness(b, pid, &api) {
                    Liveness::Gone => return Ok(Ok(Stopped::default())),
                    Liveness::Unknown(e) => return Ok(Err(e)),
                    Liveness::Alive => {}
                }
                // A VMM stopped by SIGSTOP answers nothing until it is continued: continue it
                // first, so that it stops as asked and scrubs its memory.
                b.continue_stopped(pid);
                let report = b.stop_within(&api, stop_timeout).ok();
                if report.is_none() {
                    b.signal(pid, false);
                }
                let until = Instant::now() + EXIT_TIMEOUT;
                while !b.alive(pid, &api).gone() {
                    if Instant::now() > until {
                        b.signal(pid, true);
                        return Ok(Ok(Stopped { report, on_request: false }));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(Ok(Stopped { report, on_request: true }))
            })
            .await
            .unwrap_or_else(|e| Err(error_chain(&e)))
            .map_err(|e| short_of_resources(&e))?;
        if self.vmms.jailed() && !stopped.on_request {
            self.cleanup_jail(id, api_sock).await;
        }
        // A spare's folder held only its control socket.
        self.spares.remove_folder(api_sock);
        Ok(stopped)
    }

    /// Whether the session's VMM is there (no VMM recorded: gone).
    async fn liveness(&self, s: &Session) -> Liveness {
        match (s.vmm_pid, s.api_sock.clone()) {
            (Some(pid), Some(api)) => self
                .blocking(move |b| Ok(settled_liveness(b, pid as u32, Path::new(&api))))
                .await
                .unwrap_or_else(|e| Liveness::Unknown(error_chain(&e))),
            _ => Liveness::Gone,
        }
    }

    /// `cella-jailer cleanup` for the jail of session `id`'s VMM serving `api_sock` (after its
    /// supervisor died): the spare's it took, else the session's own, giving its folder back to
    /// root if it is still there. Failures are logged: the session moves on.
    async fn cleanup_jail(&self, id: &str, api_sock: &Path) {
        let jail = self.spares.jail_of(api_sock).unwrap_or_else(|| vmm::jail_id(id));
        let dir = self.paths(id).dir;
        let result =
            self.blocking(move |b| b.cleanup_jail(&jail, dir.is_dir().then_some(dir.as_path()))).await;
        match result {
            Ok(said) if !said.is_empty() => tracing::info!(session = %id, said = %said, "jail cleaned up"),
            Ok(_) => {}
            Err(e) => tracing::warn!(session = %id, error = %error_chain(&e), "cannot clean up the jail"),
        }
    }

    /// Stops the session's VMM (it scrubs its memory); its run report, if it gave one. An error
    /// when it cannot be told whether the VMM is still there: nothing was done, try again.
    async fn stop_session_vm(&self, s: &Session) -> Result<Option<Value>, ServiceError> {
        match (s.vmm_pid, &s.api_sock) {
            (Some(pid), Some(api)) => Ok(self.stop_vm(pid as u32, Path::new(api), &s.id).await?.report),
            _ => Ok(None),
        }
    }

    /// Marks the session failed with `reason` (ending its VM and deleting its files); returns
    /// the error for the caller. A VMM whose state cannot be told is never left running behind
    /// a failed session: then nothing changes and the caller gets that error.
    async fn fail(&self, s: Session, reason: &str, actor: &Actor) -> ServiceError {
        if let Err(e) = self.stop_session_vm(&s).await {
            return e;
        }
        let reason = &*crate::error::escape_controls(reason);
        // The reason can hold the tail of the VMM's log (the guest's console): rate-limited.
        if let Some(left_out) = SESSION_WORDS.admit(std::time::Instant::now()) {
            tracing::warn!(session = %s.id, tenant = %s.tenant_id, reason = %reason, left_out, "session failed");
        }
        let reason = &for_tenant(reason);
        self.paths(&s.id).remove().await;
        let failed = Session {
            state: State::Failed,
            vmm_pid: None,
            api_sock: None,
            vsock_sock: None,
            snapshot_dir: None,
            snapshot_bytes: None,
            failure_reason: Some(reason.to_owned()),
            ..s.clone()
        };
        let event = Event {
            actor,
            action: "session.failed",
            details: json!({ "was": s.state.as_str(), "reason": reason }),
        };
        match self.store.transition(&s, &failed, false, Some(event)).await {
            Ok(_) => ServiceError::Vm(format!("session {} failed: {reason}", s.id)),
            Err(e) => e,
        }
    }

    /// Pauses a running session (its vCPUs stop; its memory stays). Pausing a paused session
    /// does nothing.
    pub async fn pause(&self, tenant: &str, id: &str, actor: &Actor) -> Result<Session, ServiceError> {
        let _slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        match s.state {
            State::Paused => return Ok(s),
            State::Running => self.check_host(&s)?,
            _ => return Err(wrong_state(&s, "pause")),
        }
        let api = PathBuf::from(s.api_sock.clone().unwrap_or_default());
        let t0 = Instant::now();
        if let Err(e) = self.blocking(move |b| b.pause(&api)).await {
            return Err(self.vm_error(s, "pause", e, actor).await);
        }
        let paused = Session { state: State::Paused, ..s.clone() };
        let event = Event { actor, action: "session.paused", details: json!({ "pause_ms": ms(t0) }) };
        self.store.transition(&s, &paused, false, Some(event)).await
    }

    /// Resumes a paused session, or restores a suspended one on a new VMM. Resuming a running
    /// session does nothing.
    pub async fn resume(&self, tenant: &str, id: &str, actor: &Actor) -> Result<Session, ServiceError> {
        let mut slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        self.resume_locked(&mut slot, s, actor, "resume").await
    }

    async fn resume_locked(
        &self,
        slot: &mut Slot,
        s: Session,
        actor: &Actor,
        action: &str,
    ) -> Result<Session, ServiceError> {
        match s.state {
            State::Running => Ok(s),
            State::Paused => {
                self.check_host(&s)?;
                let api = PathBuf::from(s.api_sock.clone().unwrap_or_default());
                let t0 = Instant::now();
                if let Err(e) = self.blocking(move |b| b.resume(&api)).await {
                    return Err(self.vm_error(s, "resume", e, actor).await);
                }
                let running = Session { state: State::Running, ..s.clone() };
                let event =
                    Event { actor, action: "session.resumed", details: json!({ "resume_ms": ms(t0) }) };
                self.store.transition(&s, &running, true, Some(event)).await
            }
            State::Suspended => {
                self.check_host(&s)?;
                self.restore_locked(slot, s, actor, None).await
            }
            _ => Err(wrong_state(&s, action)),
        }
    }

    /// Restores a suspended session from its snapshot into a spare VMM; `then`: the deadline
    /// extension and event of the connect that asked, written with the restore's own.
    async fn restore_locked(
        &self,
        slot: &mut Slot,
        s: Session,
        actor: &Actor,
        then: Option<(Option<u64>, Event<'_>)>,
    ) -> Result<Session, ServiceError> {
        let paths = self.paths(&s.id);
        if !paths.snapshot.join(SNAPSHOT_COMPLETE).is_file() {
            return Err(self.fail(s, "its snapshot is missing or incomplete", actor).await);
        }
        let left = (s.max_deadline - OffsetDateTime::now_utc()).whole_seconds().max(1) as u64;
        let spec = RestoreSpec {
            snapshot: paths.snapshot.clone(),
            disk: paths.artifact.clone(),
            vsock: paths.vsock.clone(),
            log: paths.log.clone(),
            max_duration: vmm_max_duration(left),
        };
        let t0 = Instant::now();
        let mem_mib = u32::try_from(s.mem_mib).unwrap_or(256);
        // The spare's jail has the tenant's CPU quota: read it first (a read, no write).
        let spare = match self.cpu_percent(&s.tenant_id).await {
            Ok(cpu_percent) => self.take_spare(mem_mib, cpu_percent).await,
            Err(e) => Err(e),
        };
        let spare = match spare {
            Ok(spare) => spare,
            Err(e) => {
                // Nothing changed: the session stays suspended, and the refusal is recorded.
                let reason = for_tenant(&error_chain(&e));
                let event =
                    Event { actor, action: "session.restore_failed", details: json!({ "reason": reason }) };
                self.store.transition(&s, &s, false, Some(event)).await?;
                return Err(ServiceError::Vm(format!(
                    "restoring session {} from its snapshot failed: {reason}; it stays suspended",
                    s.id
                )));
            }
        };
        let launched = match self.restore_recorded(&s, &spare, &spec).await {
            Ok(row) => match self.connect_guest(&paths).await {
                Ok(guest) => Ok((row, spare.pid, guest)),
                Err(e) => Err((row, e)),
            },
            Err(e) => Err(e),
        };
        let (row, pid, guest) = match launched {
            Ok(v) => v,
            Err((row, reason)) => {
                // The snapshot is still there: the session stays suspended, once its new VMM is
                // known to be gone.
                self.stop_session_vm(&row).await?;
                let back = Session {
                    state: State::Suspended,
                    vmm_pid: None,
                    api_sock: None,
                    vsock_sock: None,
                    ..row.clone()
                };
                tracing::warn!(session = %s.id, tenant = %s.tenant_id, reason = %reason, "session restore failed");
                let reason = for_tenant(&reason);
                let event =
                    Event { actor, action: "session.restore_failed", details: json!({ "reason": reason }) };
                self.store.transition(&row, &back, false, Some(event)).await?;
                return Err(ServiceError::Vm(format!(
                    "restoring session {} from its snapshot failed: {reason}; it stays suspended",
                    s.id
                )));
            }
        };
        let running =
            Session { state: State::Running, snapshot_dir: None, snapshot_bytes: None, ..row.clone() };
        let event = Event {
            actor,
            action: "session.restored",
            details: json!({ "pid": pid, "restore_ms": ms(t0), "snapshot_bytes": s.snapshot_bytes }),
        };
        let s = match then {
            Some((extend, connected)) => {
                self.store.transition_then_touch(&row, &running, event, extend, connected).await?
            }
            None => self.store.transition(&row, &running, true, Some(event)).await?,
        };
        slot.guest = Some(guest);
        // The new VMM maps the memory file privately; unlinking it leaves that mapping intact.
        remove_snapshot_later(&paths.snapshot);
        Ok(s)
    }

    /// The spare session VMM ready for a VM of `mem_mib` under `cpu_percent`, or one started
    /// now; the pool makes the next in the background.
    async fn take_spare(&self, mem_mib: u32, cpu_percent: u32) -> Result<SpareVmm, ServiceError> {
        let taken = self.spares.take(mem_mib, cpu_percent);
        self.spares.refill();
        match taken {
            Some(spare) => Ok(spare),
            None => {
                let spares = self.spares.clone();
                tokio::task::spawn_blocking(move || spares.start(mem_mib, cpu_percent))
                    .await
                    .map_err(|e| ServiceError::Internal(format!("starting a VMM: {e}")))?
            }
        }
    }

    /// Restores `spec`'s snapshot in `spare` while the suspended session `s` moves to
    /// `resuming` with the VMM (its pid and control socket) recorded: the fence and the load at
    /// once. If the fence fails (the session changed meanwhile) the VM is stopped and that is
    /// the error; if the load fails, the recorded row is returned to settle.
    async fn restore_recorded(
        &self,
        s: &Session,
        spare: &SpareVmm,
        spec: &RestoreSpec,
    ) -> Result<Session, (Session, String)> {
        let recorded = Session {
            state: State::Resuming,
            vmm_pid: i32::try_from(spare.pid).ok(),
            api_sock: Some(spare.api_sock.display().to_string()),
            vsock_sock: Some(spec.vsock.display().to_string()),
            ..s.clone()
        };
        let (spare2, spec2) = (spare.clone(), spec.clone());
        let (record, loaded) = tokio::join!(
            self.store.transition(s, &recorded, false, None),
            self.blocking(move |b| b.restore_into(&spare2, &spec2)),
        );
        let row = match record {
            Ok(row) => row,
            Err(e) => {
                let _ = self.stop_vm(spare.pid, &spare.api_sock, &s.id).await;
                return Err((s.clone(), format!("recording the VMM: {e}")));
            }
        };
        match loaded {
            Ok(()) => Ok(row),
            Err(e) => Err((row, format!("{}; VMM log: {}", error_chain(&e), log_tail(&spec.log)))),
        }
    }

    /// Suspends a running or paused session: pause, snapshot to disk, stop the VMM (which scrubs
    /// its memory and exits). If the snapshot fails the session keeps running (or paused).
    pub async fn suspend(&self, tenant: &str, id: &str, actor: &Actor) -> Result<Session, ServiceError> {
        let mut slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        self.suspend_locked(&mut slot, s, actor, Reason::Requested).await
    }

    pub(super) async fn suspend_locked(
        &self,
        slot: &mut Slot,
        s: Session,
        actor: &Actor,
        reason: Reason,
    ) -> Result<Session, ServiceError> {
        match s.state {
            State::Suspended => return Ok(s),
            State::Running | State::Paused => self.check_host(&s)?,
            _ => return Err(wrong_state(&s, "suspend")),
        }
        let paths = self.paths(&s.id);
        let was = s.state;
        let api = PathBuf::from(s.api_sock.clone().unwrap_or_default());
        let pid = s.vmm_pid.unwrap_or(0) as u32;
        let suspending = self
            .store
            .transition(&s, &Session { state: State::Suspending, ..s.clone() }, false, None)
            .await?;
        slot.guest = None;
        let t0 = Instant::now();
        let snapshot = paths.snapshot.clone();
        let api2 = api.clone();
        let taken = self
            .blocking(move |b| {
                if was == State::Running {
                    b.pause(&api2)?;
                }
                let pause_ms = ms(t0);
                // Made anew: this process makes the folder and the files, the VMM writes them.
                let _ = std::fs::remove_dir_all(&snapshot);
                let t1 = Instant::now();
                let details = b.snapshot(&api2, &snapshot);
                if details.is_err() {
                    let _ = std::fs::remove_dir_all(&snapshot);
                }
                Ok((pause_ms, ms(t1), details?))
            })
            .await;
        let (pause_ms, snapshot_ms, snap_details) = match taken {
            Ok(v) => v,
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(session = %s.id, tenant = %s.tenant_id, error = %message, "session suspend failed");
                let message = for_tenant(&message);
                if self.liveness(&suspending).await.gone() {
                    return Err(self
                        .fail(suspending, &format!("the VMM ended while suspending: {message}"), actor)
                        .await);
                }
                if was == State::Running {
                    let api = api.clone();
                    let _ = self.blocking(move |b| b.resume(&api)).await;
                }
                let back = Session { state: was, ..suspending.clone() };
                let event = Event {
                    actor,
                    action: "session.suspend_failed",
                    details: json!({ "reason": message, "trigger": reason.as_str() }),
                };
                // An idle suspend that failed is tried again after another idle period, not at
                // every pass of the reaper.
                self.store.transition(&suspending, &back, reason == Reason::Idle, Some(event)).await?;
                return Err(ServiceError::Vm(format!(
                    "suspending session {} failed: {message}; it is still {was}",
                    s.id
                )));
            }
        };
        let bytes = disk_bytes(&paths.snapshot);
        let marker = json!({ "session": s.id, "bytes": bytes, "vmm": snap_details });
        if let Err(e) = crate::files::write_private(
            &paths.snapshot.join(SNAPSHOT_COMPLETE),
            marker.to_string().as_bytes(),
        ) {
            let message = error_chain(&e);
            tracing::warn!(session = %s.id, tenant = %s.tenant_id, error = %message, "session suspend failed");
            let message = for_tenant(&message);
            let _ = tokio::fs::remove_dir_all(&paths.snapshot).await;
            if was == State::Running {
                let api = api.clone();
                let _ = self.blocking(move |b| b.resume(&api)).await;
            }
            let back = Session { state: was, ..suspending.clone() };
            let event =
                Event { actor, action: "session.suspend_failed", details: json!({ "reason": message }) };
            self.store.transition(&suspending, &back, false, Some(event)).await?;
            return Err(ServiceError::Vm(format!(
                "suspending session {} failed: {message}; it is still {was}",
                s.id
            )));
        }
        let t2 = Instant::now();
        let report = self.stop_vm(pid, &api, &s.id).await?.report;
        let stop_ms = ms(t2);
        for sock in [&paths.api_sock, &paths.vsock] {
            let _ = std::fs::remove_file(sock);
        }
        let suspended = Session {
            state: State::Suspended,
            vmm_pid: None,
            api_sock: None,
            vsock_sock: None,
            snapshot_dir: Some(paths.snapshot.display().to_string()),
            snapshot_bytes: Some(i64::try_from(bytes).unwrap_or(i64::MAX)),
            ..suspending.clone()
        };
        let event = Event {
            actor,
            action: "session.suspended",
            details: json!({
                "reason": reason.as_str(),
                "was": was.as_str(),
                "snapshot_bytes": bytes,
                "pause_ms": pause_ms,
                "snapshot_ms": snapshot_ms,
                "stop_ms": stop_ms,
                "scrub": report.as_ref().and_then(|r| r.get("scrub")).cloned(),
            }),
        };
        self.store.transition(&suspending, &suspended, false, Some(event)).await
    }

    /// Connects to a session: a paused one is resumed, a suspended one restored; `extend`
    /// moves the deadline to now + extend if that is later (never earlier, never past the
    /// maximum).
    pub async fn connect(
        &self,
        tenant: &str,
        id: &str,
        actor: &Actor,
        extend: Option<u64>,
    ) -> Result<Session, ServiceError> {
        let mut slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        let was = s.state;
        let deadline_before = crate::jobs::rfc3339(s.deadline);
        let event = Event {
            actor,
            action: "session.connected",
            details: json!({ "was": was.as_str(), "extend_secs": extend, "deadline_before": deadline_before }),
        };
        if was == State::Suspended {
            // Restored and connected in one write.
            self.check_host(&s)?;
            return self.restore_locked(&mut slot, s, actor, Some((extend, event))).await;
        }
        let s = self.resume_locked(&mut slot, s, actor, "connect to").await?;
        self.check_host(&s)?;
        self.store.touch(&s, extend, event).await
    }

    /// Sends one request to a running session's guest (`attach`: the policy or file it needs).
    /// A paused or suspended session answers 409: connect or resume it first.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec(
        &self,
        tenant: &str,
        id: &str,
        actor: &Actor,
        request: SessionRequest,
        attach: Option<Attach>,
        mut audit: Value,
    ) -> Result<Reply, ServiceError> {
        let mut slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        if s.state != State::Running {
            return Err(wrong_state(&s, "exec on"));
        }
        // Counted only for a running session of the caller's, so the rates kept are bounded by
        // the sessions that run.
        let (rate, burst) = (self.config.exec_per_sec, self.config.exec_burst);
        let now = std::time::Instant::now();
        if let Err(wait) = slot.execs.get_or_insert_with(|| TokenBucket::new(rate, burst, now)).take(now) {
            return Err(ServiceError::TooManyRequests {
                detail: format!(
                    "session {id} takes at most {rate} calls a second (bursts of {burst}); slow down"
                ),
                retry_after: wait,
            });
        }
        self.check_host(&s)?;
        let t0 = Instant::now();
        let guest = match slot.guest.take() {
            Some(g) => g,
            None => {
                let paths = self.paths(&s.id);
                match self.connect_guest(&paths).await {
                    Ok(g) => g,
                    Err(e) => {
                        return Err(self
                            .vm_error(s, "connect to the guest of", VmmError::Guest(e), actor)
                            .await)
                    }
                }
            }
        };
        let (guest, result) = tokio::task::spawn_blocking(move || {
            let mut guest = guest;
            let result = guest.exec(&request, attach.as_ref());
            (guest, result)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("exec task: {e}")))?;
        let reply = match result {
            Ok(reply) => {
                slot.guest = Some(guest);
                reply
            }
            Err(VmmError::Refused(message)) => {
                slot.guest = Some(guest);
                return Err(ServiceError::Unprocessable(message));
            }
            Err(e) => return Err(self.vm_error(s, "exec on", e, actor).await),
        };
        audit["ms"] = json!(ms(t0));
        audit["response_bytes"] = json!(reply.frames.iter().map(Frame::len).sum::<usize>());
        self.store.touch(&s, None, Event { actor, action: "session.exec", details: audit }).await?;
        Ok(reply)
    }

    /// Terminates a session: stops its VMM (which scrubs its memory), deletes its artifact and
    /// snapshot. Terminating a terminated session does nothing.
    pub async fn terminate(&self, tenant: &str, id: &str, actor: &Actor) -> Result<Session, ServiceError> {
        let mut slot = self.lock(id).await;
        let s = self.store.get(Some(tenant), id).await?;
        self.terminate_locked(&mut slot, s, actor, Reason::Requested).await
    }

    pub(super) async fn terminate_locked(
        &self,
        slot: &mut Slot,
        s: Session,
        actor: &Actor,
        reason: Reason,
    ) -> Result<Session, ServiceError> {
        if s.state == State::Terminated {
            return Ok(s);
        }
        self.check_host(&s)?;
        let was = s.state;
        let terminating = if s.state == State::Terminating {
            s.clone()
        } else {
            self.store
                .transition(&s, &Session { state: State::Terminating, ..s.clone() }, false, None)
                .await?
        };
        slot.guest = None;
        let t0 = Instant::now();
        // Not known to be stopped: the session stays `terminating`; the reaper finishes it.
        let report = self.stop_session_vm(&terminating).await?;
        self.paths(&s.id).remove().await;
        let lived = (OffsetDateTime::now_utc() - s.created_at).as_seconds_f64().round();
        let terminated = Session {
            state: State::Terminated,
            vmm_pid: None,
            api_sock: None,
            vsock_sock: None,
            snapshot_dir: None,
            snapshot_bytes: None,
            ..terminating.clone()
        };
        let event = Event {
            actor,
            action: "session.terminated",
            details: json!({
                "reason": reason.as_str(),
                "was": was.as_str(),
                "stop_ms": ms(t0),
                "lived_secs": lived,
                "files_deleted": true,
                "scrub": report.as_ref().and_then(|r| r.get("scrub")).cloned(),
            }),
        };
        let s = self.store.transition(&terminating, &terminated, false, Some(event)).await?;
        self.forget(&s.id);
        Ok(s)
    }

    /// A VM call failed: if the VMM is gone the session fails (with the reason); otherwise the
    /// session is left as it is and the caller is told.
    async fn vm_error(&self, s: Session, action: &str, e: VmmError, actor: &Actor) -> ServiceError {
        let message = error_chain(&e);
        if self.liveness(&s).await.gone() {
            let tail = log_tail(&self.paths(&s.id).log);
            return self.fail(s, &format!("the VMM exited ({message}); VMM log: {tail}"), actor).await;
        }
        tracing::warn!(session = %s.id, tenant = %s.tenant_id, error = %message, "cannot {action} the session");
        let message = for_tenant(&message);
        ServiceError::Vm(format!("cannot {action} session {}: {message}; it is still {}", s.id, s.state))
    }

    /// The reaper's check of one session (locked by the caller): past its deadline →
    /// terminated; idle → suspended; VMM gone → failed.
    pub(super) async fn reap_locked(
        &self,
        slot: &mut Slot,
        id: &str,
        expired: bool,
        idle: bool,
    ) -> Result<(), ServiceError> {
        let actor = Actor::System("session-reaper".to_owned());
        let s = self.store.get(None, id).await?;
        if s.host == self.host && s.state == State::Terminating {
            // A termination that stopped short (its VMM's state could not be told): finish it.
            self.terminate_locked(slot, s, &actor, Reason::Retried).await?;
            return Ok(());
        }
        if s.host != self.host || s.state.is_final() || s.state.is_transient() {
            return Ok(());
        }
        if expired {
            self.terminate_locked(slot, s, &actor, Reason::Deadline).await?;
            return Ok(());
        }
        if !matches!(s.state, State::Running | State::Paused) {
            return Ok(());
        }
        let liveness = self.liveness(&s).await;
        if let Liveness::Unknown(e) = &liveness {
            // Cannot look (out of file descriptors?): nothing is concluded; the next pass looks
            // again.
            return Err(short_of_resources(e));
        }
        if liveness.gone() {
            // A VMM that reached its own backstop near the deadline ended as planned.
            let backstop = time::Duration::seconds(VMM_DEADLINE_GRACE_SECS as i64);
            if s.deadline <= OffsetDateTime::now_utc() + backstop {
                self.terminate_locked(slot, s, &actor, Reason::Deadline).await?;
                return Ok(());
            }
            let tail = log_tail(&self.paths(&s.id).log);
            self.fail(s, &format!("the VMM exited unexpectedly; VMM log: {tail}"), &actor).await;
            return Ok(());
        }
        if idle {
            self.suspend_locked(slot, s, &actor, Reason::Idle).await?;
        }
        Ok(())
    }

    /// After a restart of `cella serve`: every session of this host that should have a VMM is
    /// re-adopted if its VMM still answers (in the state the VMM reports), else suspended if a
    /// complete snapshot exists, else failed with the reason. Unfinished terminations finish.
    /// Folders of sessions the database does not know are removed.
    pub async fn recover(&self) -> Result<(), ServiceError> {
        let actor = Actor::System("serve".to_owned());
        for s in self.store.live_on_host(&self.host).await? {
            let mut slot = self.lock(&s.id).await;
            let id = s.id.clone();
            if let Err(e) = self.recover_locked(&mut slot, s, &actor).await {
                tracing::warn!(session = %id, error = %e, "cannot recover the session");
            }
        }
        // Spares a killed `cella serve` left, but those sessions took.
        let in_use: std::collections::HashSet<PathBuf> = self
            .store
            .live_on_host(&self.host)
            .await?
            .into_iter()
            .filter_map(|s| s.api_sock.map(PathBuf::from))
            .collect();
        let spares = self.spares.clone();
        let _ = tokio::task::spawn_blocking(move || spares.sweep(&in_use)).await;
        if let Ok(entries) = std::fs::read_dir(&self.sessions_dir) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(&format!("{SNAPSHOT_SUFFIX}.restored-")) {
                    // A restored snapshot a killed process did not finish deleting.
                    let _ = tokio::fs::remove_dir_all(entry.path()).await;
                    continue;
                }
                let id = name.split_once('.').map_or(name.as_str(), |(id, _)| id);
                if crate::ids::is_id(id, "session") && !self.store.exists(id).await? {
                    self.paths(id).remove().await;
                }
            }
        }
        Ok(())
    }

    async fn recover_locked(&self, slot: &mut Slot, s: Session, actor: &Actor) -> Result<(), ServiceError> {
        let paths = self.paths(&s.id);
        match s.state {
            State::Suspended => {
                if !paths.snapshot.join(SNAPSHOT_COMPLETE).is_file() {
                    self.fail(s, "its snapshot was missing when the service restarted", actor).await;
                }
                return Ok(());
            }
            State::Pending => {
                self.fail(s, "the service restarted before the session started", actor).await;
                return Ok(());
            }
            State::Terminating => {
                self.terminate_locked(slot, s, actor, Reason::Recovered).await?;
                return Ok(());
            }
            _ => {}
        }
        let looked = match (s.vmm_pid, s.api_sock.clone()) {
            (Some(pid), Some(api)) => {
                self.blocking(move |b| match settled_liveness(b, pid as u32, Path::new(&api)) {
                    Liveness::Alive => b.state(Path::new(&api)).map(Some),
                    Liveness::Gone => Ok(None),
                    Liveness::Unknown(e) => Err(VmmError::Proc(e)),
                })
                .await
            }
            _ => Ok(None),
        };
        let vm_state = match looked {
            Ok(state) => state,
            // Cannot tell: recovery of this session waits (nothing is failed on a guess).
            Err(VmmError::Proc(e)) => return Err(short_of_resources(&e)),
            // There, but its control API does not answer: not adopted.
            Err(_) => None,
        };
        let adopt = match vm_state {
            Some(VmState::Running) => Some(State::Running),
            Some(VmState::Paused) => Some(State::Paused),
            _ => None,
        };
        if let Some(state) = adopt {
            let _ = tokio::fs::remove_dir_all(&paths.snapshot).await;
            let adopted = Session { state, snapshot_dir: None, snapshot_bytes: None, ..s.clone() };
            let event = Event {
                actor,
                action: "session.adopted",
                details: json!({ "was": s.state.as_str(), "pid": s.vmm_pid, "vm_state": state.as_str() }),
            };
            self.store.transition(&s, &adopted, false, Some(event)).await?;
            return Ok(());
        }
        self.stop_session_vm(&s).await?;
        for sock in [&paths.api_sock, &paths.vsock] {
            let _ = std::fs::remove_file(sock);
        }
        if paths.snapshot.join(SNAPSHOT_COMPLETE).is_file() {
            let bytes = disk_bytes(&paths.snapshot);
            let suspended = Session {
                state: State::Suspended,
                vmm_pid: None,
                api_sock: None,
                vsock_sock: None,
                snapshot_dir: Some(paths.snapshot.display().to_string()),
                snapshot_bytes: Some(i64::try_from(bytes).unwrap_or(i64::MAX)),
                ..s.clone()
            };
            let event = Event {
                actor,
                action: "session.suspended",
                details: json!({ "reason": Reason::Recovered.as_str(), "was": s.state.as_str(), "snapshot_bytes": bytes }),
            };
            self.store.transition(&s, &suspended, false, Some(event)).await?;
        } else {
            self.fail(s, "the VMM was gone when the service restarted", actor).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_texts_show_no_host_paths() {
        assert_eq!(
            for_tenant("the session at /var/lib/cella/sessions/s_1/vsock.sock did not accept (VMM log: open \"/srv/jailer/x/root/run\": EACCES)"),
            "the session at …/vsock.sock did not accept (VMM log: open \"…/run\": EACCES)"
        );
        assert_eq!(
            for_tenant("read policy deny/redact, path a/b and 1/2"),
            "read policy deny/redact, path a/b and 1/2"
        );
        assert_eq!(for_tenant("/single and /two/parts"), "/single and …/parts");
    }
}
