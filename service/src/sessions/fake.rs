//! Fakes for the session manager's unit tests: [`FakeStore`], the `sessions` table in memory
//! with the same generation fence as [`super::store::transition`], and [`FakeVmms`], VMMs that
//! exist only as entries in a table, with faults a test can arm. Neither needs root, KVM or
//! PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cella_audit::Actor;
use cella_proto::SessionRequest;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::driver::VmmDriver;
use super::store::{Due, Event, NewSession, Session, SessionStore};
use super::vmm::{
    Attach, Frame, Guest, GuestLink, LaunchSpec, Liveness, Reply, RestoreSpec, Source, SpareSpec, SpareVmm,
    VmState, VmmError,
};
use super::State;
use crate::error::ServiceError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One audit event as the store recorded it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub session: String,
    pub action: &'static str,
    pub details: Value,
}

/// The `sessions` table and its audit events, in memory; its clones share them (the manager
/// holds one, the test another to look at what was written).
#[derive(Debug, Default, Clone)]
pub struct FakeStore {
    rows: Arc<Mutex<HashMap<String, Session>>>,
    events: Arc<Mutex<Vec<Recorded>>>,
    cpu_percent: Arc<Mutex<HashMap<String, u32>>>,
}

impl FakeStore {
    /// The row as stored now.
    pub fn row(&self, id: &str) -> Session {
        lock(&self.rows).get(id).cloned().unwrap_or_else(|| panic!("no session {id}"))
    }

    /// Changes the row behind the manager's back (another process's transition, an operator's
    /// hand), bumping its generation as every write does.
    pub fn edit(&self, id: &str, f: impl FnOnce(&mut Session)) {
        let mut rows = lock(&self.rows);
        let row = rows.get_mut(id).unwrap_or_else(|| panic!("no session {id}"));
        f(row);
        row.generation += 1;
    }

    /// The actions of session `id`'s events, in order.
    pub fn actions(&self, id: &str) -> Vec<&'static str> {
        lock(&self.events).iter().filter(|e| e.session == id).map(|e| e.action).collect()
    }

    /// The last event of `id` with this action.
    pub fn event(&self, id: &str, action: &str) -> Value {
        lock(&self.events)
            .iter()
            .rev()
            .find(|e| e.session == id && e.action == action)
            .map(|e| e.details.clone())
            .unwrap_or_else(|| panic!("session {id} has no {action} event"))
    }

    pub fn set_cpu_percent(&self, tenant: &str, percent: u32) {
        lock(&self.cpu_percent).insert(tenant.to_owned(), percent);
    }

    fn record(&self, id: &str, event: Event<'_>) {
        lock(&self.events).push(Recorded {
            session: id.to_owned(),
            action: event.action,
            details: event.details,
        });
    }
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("session {id}"))
}

impl SessionStore for FakeStore {
    async fn insert(&self, new: &NewSession<'_>, _actor: &Actor) -> Result<Session, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let live =
            lock(&self.rows).values().filter(|s| s.tenant_id == new.tenant && !s.state.is_final()).count();
        if live >= new.max_live as usize {
            return Err(ServiceError::Conflict(format!("this tenant holds {live} live session(s)")));
        }
        let secs = |s: u64| time::Duration::seconds(s as i64);
        let row = Session {
            id: new.id.to_owned(),
            tenant_id: new.tenant.to_owned(),
            state: State::Pending,
            generation: 0,
            artifact_name: new.artifact_name.map(str::to_owned),
            artifact_bytes: new.artifact_bytes as i64,
            artifact_sha256: new.artifact_sha256.to_vec(),
            mem_mib: new.params.mem_mib as i32,
            read_policy: new.params.read_policy.clone(),
            idle_suspend_secs: new.params.idle_suspend_secs as i32,
            deadline: now + secs(new.params.max_duration_secs),
            last_active_at: now,
            host: new.host.to_owned(),
            vmm_pid: None,
            api_sock: None,
            vsock_sock: None,
            snapshot_dir: None,
            snapshot_bytes: None,
            failure_reason: None,
            created_at: now,
            updated_at: now,
            terminated_at: None,
            max_deadline: now + secs(new.max_secs.max(new.params.max_duration_secs)),
        };
        lock(&self.rows).insert(row.id.clone(), row.clone());
        lock(&self.events).push(Recorded {
            session: row.id.clone(),
            action: "session.created",
            details: json!({}),
        });
        Ok(row)
    }

    async fn get(&self, tenant: Option<&str>, id: &str) -> Result<Session, ServiceError> {
        lock(&self.rows)
            .get(id)
            .filter(|s| tenant.is_none_or(|t| s.tenant_id == t))
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    async fn transition(
        &self,
        from: &Session,
        next: &Session,
        touch: bool,
        event: Option<Event<'_>>,
    ) -> Result<Session, ServiceError> {
        let updated = {
            let mut rows = lock(&self.rows);
            let row = rows
                .get_mut(&from.id)
                .filter(|r| r.state == from.state && r.generation == from.generation)
                .ok_or_else(|| ServiceError::Conflict(format!("session {} changed", from.id)))?;
            let now = OffsetDateTime::now_utc();
            row.state = next.state;
            row.generation += 1;
            row.vmm_pid = next.vmm_pid;
            row.api_sock = next.api_sock.clone();
            row.vsock_sock = next.vsock_sock.clone();
            row.snapshot_dir = next.snapshot_dir.clone();
            row.snapshot_bytes = next.snapshot_bytes;
            row.failure_reason = next.failure_reason.clone();
            if touch {
                row.last_active_at = now;
            }
            if next.state == State::Terminated {
                row.terminated_at = Some(now);
            }
            row.updated_at = now;
            row.clone()
        };
        if let Some(event) = event {
            self.record(&from.id, event);
        }
        Ok(updated)
    }

    async fn touch(
        &self,
        session: &Session,
        extend_secs: Option<u64>,
        event: Event<'_>,
    ) -> Result<Session, ServiceError> {
        let updated = {
            let mut rows = lock(&self.rows);
            let row = rows
                .get_mut(&session.id)
                .filter(|r| r.state == State::Running)
                .ok_or_else(|| ServiceError::Conflict(format!("session {} stopped running", session.id)))?;
            let now = OffsetDateTime::now_utc();
            row.last_active_at = now;
            row.updated_at = now;
            if let Some(extend) = extend_secs {
                let to = (now + time::Duration::seconds(extend as i64)).min(row.max_deadline);
                row.deadline = row.deadline.max(to);
            }
            row.clone()
        };
        self.record(&session.id, event);
        Ok(updated)
    }

    async fn transition_then_touch(
        &self,
        from: &Session,
        next: &Session,
        event: Event<'_>,
        extend_secs: Option<u64>,
        then: Event<'_>,
    ) -> Result<Session, ServiceError> {
        let moved = self.transition(from, next, true, Some(event)).await?;
        self.touch(&moved, extend_secs, then).await
    }

    async fn live_on_host(&self, host: &str) -> Result<Vec<Session>, ServiceError> {
        let mut live: Vec<Session> =
            lock(&self.rows).values().filter(|s| s.host == host && !s.state.is_final()).cloned().collect();
        live.sort_by_key(|s| s.created_at);
        Ok(live)
    }

    async fn due_on_host(&self, host: &str) -> Result<Vec<Due>, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let due = lock(&self.rows)
            .values()
            .filter(|s| s.host == host)
            .filter(|s| {
                matches!(s.state, State::Running | State::Paused | State::Suspended | State::Terminating)
            })
            .map(|s| Due {
                id: s.id.clone(),
                expired: s.deadline <= now,
                idle: matches!(s.state, State::Running | State::Paused)
                    && s.idle_suspend_secs > 0
                    && s.last_active_at + time::Duration::seconds(i64::from(s.idle_suspend_secs)) <= now,
            })
            .collect();
        Ok(due)
    }

    async fn exists(&self, id: &str) -> Result<bool, ServiceError> {
        Ok(lock(&self.rows).contains_key(id))
    }

    async fn vm_cpu_percent(&self, tenant: &str) -> Result<Option<u32>, ServiceError> {
        Ok(lock(&self.cpu_percent).get(tenant).copied())
    }
}

/// Faults a test arms; each applies to the next call of its kind (and is then disarmed), unless
/// said otherwise.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The VMM cannot be started.
    pub launch: bool,
    /// The VMM starts but exits before it answers.
    pub ready: bool,
    /// The guest does not accept the connection.
    pub connect: bool,
    /// The snapshot fails, the VMM staying up.
    pub snapshot: bool,
    /// The VMM dies while it snapshots.
    pub snapshot_kills: bool,
    /// The control API answers nothing to stop (the VMM still ends on SIGTERM).
    pub deaf_to_stop: bool,
    /// `/proc` cannot be read (every look, until disarmed by hand).
    pub proc_unreadable: bool,
    /// The guest refuses the next request (the connection stays usable).
    pub guest_refuses: bool,
}

/// One VMM of the fake.
#[derive(Debug, Clone)]
pub struct FakeVm {
    pub pid: u32,
    pub api: PathBuf,
    pub vsock: PathBuf,
    pub source: Source,
    pub state: VmState,
    pub alive: bool,
    pub jail_uid: Option<u32>,
    pub cpu_percent: u32,
    /// It was stopped through its control API (and scrubbed its memory).
    pub stopped_on_request: bool,
}

#[derive(Debug, Default)]
struct World {
    next_pid: u32,
    vms: Vec<FakeVm>,
    faults: Faults,
    calls: Vec<String>,
}

impl World {
    fn by_api(&mut self, api: &Path) -> Result<&mut FakeVm, VmmError> {
        self.vms
            .iter_mut()
            .rev()
            .find(|v| v.api == api && v.alive)
            .ok_or_else(|| VmmError::Control(format!("connecting to {}: connection refused", api.display())))
    }
}

/// VMMs that are entries in a table: launched, paused, snapshotted, stopped and killed as the
/// manager asks, with [`Faults`] to arm.
#[derive(Debug, Clone, Default)]
pub struct FakeVmms {
    world: Arc<Mutex<World>>,
    jailed: bool,
}

impl FakeVmms {
    pub fn jailed() -> Self {
        Self { jailed: true, ..Self::default() }
    }

    pub fn arm(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut lock(&self.world).faults);
    }

    /// Every VMM ever launched, in order.
    pub fn vms(&self) -> Vec<FakeVm> {
        lock(&self.world).vms.clone()
    }

    pub fn vm(&self, pid: u32) -> FakeVm {
        self.vms().into_iter().find(|v| v.pid == pid).unwrap_or_else(|| panic!("no VMM {pid}"))
    }

    /// The VMMs still there.
    pub fn live(&self) -> Vec<FakeVm> {
        self.vms().into_iter().filter(|v| v.alive).collect()
    }

    /// The calls made, as `name pid`-style lines.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.world).calls.clone()
    }

    /// The VMM `pid` dies on its own (crash, OOM kill).
    pub fn crash(&self, pid: u32) {
        if let Some(vm) = lock(&self.world).vms.iter_mut().find(|v| v.pid == pid) {
            vm.alive = false;
        }
    }

    /// Forgets every VMM's process, as a reboot of the host would (the rows stay).
    pub fn reboot(&self) {
        for vm in lock(&self.world).vms.iter_mut() {
            vm.alive = false;
        }
    }

    fn call(&self, what: String) -> MutexGuard<'_, World> {
        let mut world = lock(&self.world);
        world.calls.push(what);
        world
    }
}

impl VmmDriver for FakeVmms {
    fn jailed(&self) -> bool {
        self.jailed
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError> {
        let mut world = self.call(format!("launch {}", spec.api_sock.display()));
        if std::mem::take(&mut world.faults.launch) {
            return Err(VmmError::Spawn(std::io::Error::other("fork: resource temporarily unavailable")));
        }
        if let Source::Snapshot { dir } = &spec.source {
            // A restore maps the memory file: it must still be there when the VMM starts.
            if !dir.join("memory").is_file() {
                return Err(VmmError::NotReady(format!("no snapshot at {}", dir.display())));
            }
        }
        world.next_pid += 1;
        let pid = 1000 + world.next_pid;
        world.vms.push(FakeVm {
            pid,
            api: spec.api_sock.clone(),
            vsock: spec.vsock.clone(),
            source: spec.source.clone(),
            state: VmState::Running,
            alive: true,
            jail_uid: spec.jail.as_ref().map(|j| j.uid),
            cpu_percent: spec.cpu_percent,
            stopped_on_request: false,
        });
        Ok(pid)
    }

    fn wait_ready(&self, pid: u32, _api: &Path, _timeout: Duration) -> Result<(), VmmError> {
        let mut world = self.call(format!("wait_ready {pid}"));
        if std::mem::take(&mut world.faults.ready) {
            if let Some(vm) = world.vms.iter_mut().find(|v| v.pid == pid) {
                vm.alive = false;
            }
            return Err(VmmError::NotReady("the VMM exited (the VM is NotStarted)".to_owned()));
        }
        Ok(())
    }

    fn state(&self, api: &Path) -> Result<VmState, VmmError> {
        let mut world = self.call("state".to_owned());
        Ok(world.by_api(api)?.state)
    }

    fn pause(&self, api: &Path) -> Result<(), VmmError> {
        let mut world = self.call("pause".to_owned());
        world.by_api(api)?.state = VmState::Paused;
        Ok(())
    }

    fn resume(&self, api: &Path) -> Result<(), VmmError> {
        let mut world = self.call("resume".to_owned());
        world.by_api(api)?.state = VmState::Running;
        Ok(())
    }

    fn snapshot(&self, api: &Path, dir: &Path) -> Result<Value, VmmError> {
        let mut world = self.call("snapshot".to_owned());
        let (fail, kill) =
            (std::mem::take(&mut world.faults.snapshot), std::mem::take(&mut world.faults.snapshot_kills));
        let vm = world.by_api(api)?;
        if vm.state != VmState::Paused {
            return Err(VmmError::Control("the VM is not paused".to_owned()));
        }
        if kill {
            vm.alive = false;
            return Err(VmmError::Control("connection reset by peer".to_owned()));
        }
        // Written in part either way: a failed snapshot leaves a folder the manager must remove.
        std::fs::create_dir_all(dir).map_err(|e| VmmError::Io("snapshot folder".to_owned(), e))?;
        std::fs::write(dir.join("memory"), vec![7u8; 8192])
            .map_err(|e| VmmError::Io("snapshot memory".to_owned(), e))?;
        if fail {
            return Err(VmmError::Control("no space left on device".to_owned()));
        }
        Ok(json!({ "memory_bytes": 8192 }))
    }

    fn stop_within(&self, api: &Path, _timeout: Duration) -> Result<Value, VmmError> {
        let mut world = self.call("stop".to_owned());
        let deaf = world.faults.deaf_to_stop;
        let vm = world.by_api(api)?;
        if deaf {
            return Err(VmmError::Control("no answer within 5 s".to_owned()));
        }
        vm.alive = false;
        vm.stopped_on_request = true;
        Ok(json!({ "scrub": { "verified": true, "pid": vm.pid } }))
    }

    fn continue_stopped(&self, pid: u32) {
        drop(self.call(format!("continue {pid}")));
    }

    fn connect(&self, vsock: &Path, _timeout: Duration, _exec_timeout: Duration) -> Result<Guest, VmmError> {
        let mut world = self.call("connect".to_owned());
        if std::mem::take(&mut world.faults.connect) {
            return Err(VmmError::Guest("the guest did not accept the connection".to_owned()));
        }
        let pid = world
            .vms
            .iter()
            .rev()
            .find(|v| v.vsock == vsock && v.alive)
            .map(|v| v.pid)
            .ok_or_else(|| VmmError::Guest(format!("nothing listens on {}", vsock.display())))?;
        Ok(Guest::new(FakeGuest { world: self.world.clone(), pid }))
    }

    fn alive(&self, pid: u32, _api: &Path) -> Liveness {
        let world = lock(&self.world);
        if world.faults.proc_unreadable {
            return Liveness::Unknown("/proc: too many open files".to_owned());
        }
        match world.vms.iter().any(|v| v.pid == pid && v.alive) {
            true => Liveness::Alive,
            false => Liveness::Gone,
        }
    }

    fn signal(&self, pid: u32, kill: bool) {
        let mut world = self.call(format!("{} {pid}", if kill { "kill" } else { "term" }));
        if let Some(vm) = world.vms.iter_mut().find(|v| v.pid == pid) {
            vm.alive = false;
        }
    }

    fn cleanup_jail(&self, id: &str, _dir: Option<&Path>) -> Result<String, VmmError> {
        drop(self.call(format!("cleanup {id}")));
        Ok(String::new())
    }

    fn uids_in_use(&self) -> Result<HashSet<u32>, String> {
        let world = lock(&self.world);
        if world.faults.proc_unreadable {
            return Err("/proc: too many open files".to_owned());
        }
        Ok(world.vms.iter().filter(|v| v.alive).filter_map(|v| v.jail_uid).collect())
    }

    /// A spare is a VMM with no VM; the `launch` fault makes it fail to start.
    fn start_spare(&self, spec: &SpareSpec) -> Result<SpareVmm, VmmError> {
        let api = spec.dir.join(super::vmm::SPARE_API_SOCK);
        let mut world = self.call(format!("start_spare {}", api.display()));
        if std::mem::take(&mut world.faults.launch) {
            return Err(VmmError::Spawn(std::io::Error::other("fork: resource temporarily unavailable")));
        }
        world.next_pid += 1;
        let pid = 1000 + world.next_pid;
        world.vms.push(FakeVm {
            pid,
            api: api.clone(),
            vsock: PathBuf::new(),
            source: Source::Snapshot { dir: PathBuf::new() },
            state: VmState::NotStarted,
            alive: true,
            jail_uid: spec.jail_uid,
            cpu_percent: spec.cpu_percent,
            stopped_on_request: false,
        });
        Ok(SpareVmm {
            pid,
            api_sock: api,
            log: spec.log.clone(),
            mem_mib: spec.mem_mib,
            cpu_percent: spec.cpu_percent,
        })
    }

    /// The `ready` fault makes the spare die during the load.
    fn restore_into(&self, spare: &SpareVmm, spec: &RestoreSpec) -> Result<(), VmmError> {
        let mut world = self.call(format!("restore_into {}", spare.pid));
        let fault = std::mem::take(&mut world.faults.ready);
        let vm = world
            .vms
            .iter_mut()
            .find(|v| v.pid == spare.pid && v.alive)
            .ok_or_else(|| VmmError::Control("the spare is gone".to_owned()))?;
        if fault {
            vm.alive = false;
            return Err(VmmError::Control("connection reset by peer".to_owned()));
        }
        // A restore maps the memory file: it must still be there.
        if !spec.snapshot.join("memory").is_file() {
            return Err(VmmError::Control(format!("no snapshot at {}", spec.snapshot.display())));
        }
        vm.source = Source::Snapshot { dir: spec.snapshot.clone() };
        vm.vsock = spec.vsock.clone();
        vm.state = VmState::Running;
        Ok(())
    }

    fn discard_spare(&self, spare: &SpareVmm) {
        let mut world = self.call(format!("discard_spare {}", spare.pid));
        if let Some(vm) = world.vms.iter_mut().find(|v| v.pid == spare.pid) {
            vm.alive = false;
        }
    }

    fn end_stale_spare(&self, api_sock: &Path) {
        let mut world = self.call(format!("end_stale_spare {}", api_sock.display()));
        for vm in world.vms.iter_mut().filter(|v| v.api == api_sock) {
            vm.alive = false;
        }
    }
}

/// A guest that answers each request with its `op` and one data frame, while its VM lives.
struct FakeGuest {
    world: Arc<Mutex<World>>,
    pid: u32,
}

impl GuestLink for FakeGuest {
    fn exec(&mut self, request: &SessionRequest, attach: Option<&Attach>) -> Result<Reply, VmmError> {
        let mut world = lock(&self.world);
        world.calls.push(format!("exec {} {}", self.pid, request.op()));
        if !world.vms.iter().any(|v| v.pid == self.pid && v.alive && v.state == VmState::Running) {
            return Err(VmmError::Guest("the connection was reset".to_owned()));
        }
        if std::mem::take(&mut world.faults.guest_refuses) {
            return Err(VmmError::Refused("the session refused it (bad_request): no such file".to_owned()));
        }
        let attached = attach.map(|a| match a {
            Attach::Policy(p) => p.len(),
            Attach::File(_) => 0,
        });
        Ok(Reply {
            response: json!({ "op": request.op(), "attached": attached, "pid": self.pid }),
            frames: vec![Frame::Data(b"answer".to_vec())],
        })
    }
}
