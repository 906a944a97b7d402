//! The worker's spares: for each slot, one VMM started ahead ([`cella_host::spare`]), in its
//! cell when jailed, confined from before it serves anything and waiting on its control socket
//! for the slot's next scan. A scan takes the slot's spare and a new one is started at once, in
//! the background. Spares are made with the worker's default CPU quota; a tenant with a quota
//! of its own gets a spare made for its scan.
//!
//! A slot's next spare is restored from the template of the policy its last job ran (see
//! [`super::template`]), else the default one. A spare restored from a template of a tenant's
//! own packs holds that tenant's rules: it runs that tenant's jobs only, and is stopped rather
//! than given another's.
//!
//! Slot N's VMMs run as uid `jail_uid_base + N`: the spare waiting for the slot's next scan and
//! the slot's running scan share it. Both are confined to no path access at all (Landlock), a
//! seccomp filter on every thread, no capabilities and a PID namespace each, so neither can
//! reach the other through the uid.
//!
//! Jailed spares are named `spare-<pid>-job<n>-<k>` like the session manager's prepared ones
//! ([`crate::spares`]), so those a crashed process left behind are removed by the next one on
//! the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use cella_host::job::SerializedPolicy;
use cella_host::spare::{Spare, SpareError, SpareOptions};
use tokio::sync::oneshot;

use super::launch::Launcher;
use super::template::{PolicyKey, RestoredFrom};

/// A spare to start, and where it goes.
struct Order {
    options: SpareOptions,
    reply: oneshot::Sender<Result<Spare, SpareError>>,
}

/// Starts spares on a thread that lives as long as the pool: a spare's parent-death signal
/// fires when the *thread* that started it ends, so spares started on short-lived runtime
/// threads would die with them. One per slot: starting a jailed spare waits for its jailer to
/// make the cell (a few ms), and slots must not queue behind each other for that.
fn spawner(slot: u32) -> mpsc::Sender<Order> {
    let (orders, received) = mpsc::channel::<Order>();
    let thread = std::thread::Builder::new().name(format!("spare-spawner-{slot}")).spawn(move || {
        for order in received {
            let _ = order.reply.send(Spare::start(&order.options));
        }
    });
    if let Err(e) = thread {
        tracing::error!(error = %e, "cannot start the spare spawner thread");
    }
    orders
}

/// A spare, and the template its VM was restored from (the one its options named when it was
/// started: a later template does not change what it holds).
#[derive(Debug)]
pub struct PoolSpare {
    pub spare: Spare,
    pub template: Option<RestoredFrom>,
}

impl PoolSpare {
    /// Whether a job of `key` may run in this spare: booted, or restored from a template of
    /// built-in packs or of the job's tenant's own (never another tenant's).
    pub fn may_run(&self, key: &PolicyKey) -> bool {
        self.template.as_ref().is_none_or(|t| key.may_run_in(&t.key))
    }
}

/// One worker's spares.
pub struct SparePool {
    launcher: Launcher,
    /// The spares' private folder (their control sockets), root's, mode 0700.
    run_dir: PathBuf,
    /// Each slot's spawner thread, made at its first spare.
    spawners: Mutex<HashMap<u32, mpsc::Sender<Order>>>,
    prefix: String,
    serial: AtomicU64,
    ready: Mutex<HashMap<u32, PoolSpare>>,
    /// The policy each slot's last job ran: the slot's next spare is restored from its
    /// template, if there is one.
    preferred: Mutex<HashMap<u32, PolicyKey>>,
    /// Set once the worker stops: no more spares are made.
    closed: AtomicBool,
    /// Set once making a spare failed, so the failure is logged once.
    failing: AtomicBool,
    /// Spares being made; [`SparePool::close`] waits for them.
    making: crate::spares::InFlight,
}

impl std::fmt::Debug for SparePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparePool").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SparePool {
    /// Spares of `launcher`'s kind, their control sockets in `run_dir` (made root's, 0700).
    pub fn new(launcher: Launcher, run_dir: PathBuf) -> Arc<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let _ = std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&run_dir);
        let _ = std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700));
        let set = crate::spares::SETS.fetch_add(1, Ordering::Relaxed);
        Arc::new(SparePool {
            launcher,
            run_dir,
            spawners: Mutex::default(),
            prefix: format!("spare-{}-job{set}", std::process::id()),
            serial: AtomicU64::new(0),
            ready: Mutex::default(),
            preferred: Mutex::default(),
            closed: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            making: Default::default(),
        })
    }

    /// The uid slot `slot`'s VMMs run as.
    pub fn uid(&self, slot: u32) -> u32 {
        self.launcher.jail_uid_base().saturating_add(slot)
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<u32, PoolSpare>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a spare for `slot` under `cpu_percent`, on the spawner thread, restored from the
    /// template for jobs of `key` (the default one when `key` is none or has none).
    async fn start(
        &self,
        slot: u32,
        cpu_percent: u32,
        key: Option<&PolicyKey>,
    ) -> Result<PoolSpare, SpareError> {
        if self.launcher.template().is_some_and(|t| t.is_stale()) {
            let launcher = self.launcher.clone();
            let _ = tokio::task::spawn_blocking(move || launcher.refresh_template()).await;
        }
        let id = format!("{}-{}", self.prefix, self.serial.fetch_add(1, Ordering::Relaxed));
        let template = {
            let mut shelf = self.launcher.shelf();
            match key {
                Some(key) => shelf.for_key(key),
                None => shelf.default_template().cloned(),
            }
        };
        let mut options = self.launcher.spare_options(&id, self.uid(slot), cpu_percent);
        options.run_dir = self.run_dir.clone();
        options.template = template.as_ref().map(|t| t.dir().to_owned());
        let (reply, answer) = oneshot::channel();
        let sent = self
            .spawners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(slot)
            .or_insert_with(|| spawner(slot))
            .send(Order { options, reply });
        let gone = || SpareError::Spawn {
            vmm: self.launcher.vmm().to_owned(),
            source: std::io::Error::other("the spare spawner thread is gone"),
        };
        if sent.is_err() {
            return Err(gone());
        }
        // The template's folder is kept until here: a spare reads it while it starts, and
        // not after (its memory stays mapped from the file whatever becomes of the name).
        let spare = answer.await.unwrap_or_else(|_| Err(gone()))?;
        Ok(PoolSpare { spare, template: template.map(|t| RestoredFrom { id: t.identity.id, key: t.key }) })
    }

    /// A spare for a job of `key` in `slot` under `cpu_percent`: the slot's ready one if it
    /// was made for that quota, may run the job and still runs, else one started now. True if
    /// it was ready. The slot's next spare is made for jobs of `key`.
    pub async fn take(
        self: &Arc<Self>,
        slot: u32,
        cpu_percent: u32,
        key: &PolicyKey,
    ) -> Result<(PoolSpare, bool), SpareError> {
        self.preferred.lock().unwrap_or_else(|p| p.into_inner()).insert(slot, key.clone());
        let ready = match cpu_percent == self.launcher.default_cpu_percent() {
            true => self.ready().remove(&slot),
            false => None,
        };
        if let Some(mut ready) = ready {
            let may_run = ready.may_run(key);
            if may_run && ready.spare.is_alive() {
                return Ok((ready, true));
            }
            if may_run {
                tracing::warn!(slot, "the slot's spare VMM ended while it waited; starting another");
            }
            let _ = tokio::task::spawn_blocking(move || drop(ready)).await;
        }
        self.start(slot, cpu_percent, Some(key)).await.map(|s| (s, false))
    }

    /// Starts `slot`'s next spare in the background, unless it has one: restored from the
    /// template of the policy of the slot's last job, if there is one.
    pub fn refill(self: &Arc<Self>, slot: u32) {
        if self.closed.load(Ordering::Relaxed) || self.ready().contains_key(&slot) {
            return;
        }
        let me = self.clone();
        self.making.begin();
        tokio::spawn(async move {
            let key = me.preferred.lock().unwrap_or_else(|p| p.into_inner()).get(&slot).cloned();
            match me.start(slot, me.launcher.default_cpu_percent(), key.as_ref()).await {
                Ok(spare) => {
                    let unwanted = if me.closed.load(Ordering::Relaxed) {
                        Some(spare)
                    } else {
                        me.failing.store(false, Ordering::Relaxed);
                        me.ready().insert(slot, spare)
                    };
                    // Dropping a spare stops it (SIGTERM) and waits for it.
                    if let Some(unwanted) = unwanted {
                        let _ = tokio::task::spawn_blocking(move || drop(unwanted.spare)).await;
                    }
                }
                Err(e) => {
                    if !me.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            slot,
                            error = %crate::error::error_chain(&e),
                            "cannot make a spare VMM; scans start their own"
                        );
                    }
                }
            }
            me.making.end();
        });
    }

    /// Makes the template of a job's policy `key` (named `policy`, serialized as `serialized`) in
    /// the background if the shelf wants it ([`Shelf::start_building`]). Once it is made,
    /// slots whose last job ran that policy get a spare restored from it in place of the one
    /// waiting.
    pub fn want_template(
        self: &Arc<Self>,
        key: &PolicyKey,
        policy: &str,
        serialized: &Arc<SerializedPolicy>,
    ) {
        if self.closed.load(Ordering::Relaxed) || !self.launcher.shelf().start_building(key) {
            return;
        }
        let me = self.clone();
        let (key, policy, serialized) = (key.clone(), policy.to_owned(), serialized.clone());
        self.making.begin();
        tokio::spawn(async move {
            let (launcher, uid) = (me.launcher.clone(), me.uid(0));
            let spares_dir = me.run_dir.clone();
            let built = {
                let key = key.clone();
                tokio::task::spawn_blocking(move || {
                    super::template::build(&launcher, key, &policy, serialized.bytes(), &spares_dir, uid)
                })
                .await
            };
            let made = match built {
                Ok(Ok(t)) => {
                    tracing::info!(
                        template = &t.identity.id[..12],
                        policy = %t.policy,
                        build_ms = t.build_ms,
                        "template of a job's policy made"
                    );
                    Some(t)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), "no template for a job's policy; its jobs build their engine in the VM");
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "the template maker panicked");
                    None
                }
            };
            let made_one = made.is_some();
            me.launcher.shelf().built(&key, made);
            if made_one {
                me.swap_waiting_spares(&key).await;
            }
            me.making.end();
        });
    }

    /// Stops the spares waiting in slots whose last job ran `key` but which were not restored
    /// from its template, and starts their replacements.
    async fn swap_waiting_spares(self: &Arc<Self>, key: &PolicyKey) {
        let slots: Vec<u32> = {
            let preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
            preferred.iter().filter(|(_, k)| *k == key).map(|(slot, _)| *slot).collect()
        };
        for slot in slots {
            let stale = {
                let mut ready = self.ready();
                match ready.get(&slot) {
                    Some(spare) if spare.template.as_ref().is_none_or(|t| t.key != *key) => {
                        ready.remove(&slot)
                    }
                    _ => None,
                }
            };
            if let Some(stale) = stale {
                let _ = tokio::task::spawn_blocking(move || drop(stale)).await;
                self.refill(slot);
            }
        }
    }

    /// Stops making spares, waits (a few seconds at most) for those under way, and stops the
    /// ready ones (when the worker stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.making.settle(std::time::Duration::from_secs(10)).await;
        let ready: Vec<Spare> = self.ready().drain().map(|(_, ready)| ready.spare).collect();
        let _ = tokio::task::spawn_blocking(move || drop(ready)).await;
    }

    /// Removes the jails of spares that worker processes of this host which are gone left, and
    /// their control sockets' folders.
    pub async fn sweep_orphans(&self) {
        cella_host::spare::sweep_stale(&self.run_dir);
        if self.launcher.jailed() {
            crate::spares::sweep_orphans(&self.launcher.vmm().with_file_name("cella-jailer")).await;
        }
    }
}
