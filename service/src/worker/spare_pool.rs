//! The worker's spares: for each slot, one VMM started ahead ([`cella_host::spare`]), in its
//! cell when jailed, confined from before it serves anything and waiting on its control socket
//! for the slot's next scan. A scan takes the slot's spare and a new one is started at once, in
//! the background. Spares are made with the worker's default CPU quota; a tenant with a quota
//! of its own gets a spare made for its scan.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cella_host::spare::{Spare, SpareError};

use super::launch::Launcher;

/// One worker's spares.
pub struct SparePool {
    launcher: Launcher,
    prefix: String,
    serial: AtomicU64,
    ready: Mutex<HashMap<u32, Spare>>,
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
    pub fn new(launcher: Launcher) -> Arc<Self> {
        let set = crate::spares::SETS.fetch_add(1, Ordering::Relaxed);
        Arc::new(SparePool {
            launcher,
            prefix: format!("spare-{}-job{set}", std::process::id()),
            serial: AtomicU64::new(0),
            ready: Mutex::default(),
            closed: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            making: Default::default(),
        })
    }

    /// The uid slot `slot`'s VMMs run as.
    pub fn uid(&self, slot: u32) -> u32 {
        self.launcher.jail_uid_base().saturating_add(slot)
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Spare>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a spare for `slot` under `cpu_percent` (blocking: it forks).
    fn start(&self, slot: u32, cpu_percent: u32) -> Result<Spare, SpareError> {
        let id = format!("{}-{}", self.prefix, self.serial.fetch_add(1, Ordering::Relaxed));
        Spare::start(&self.launcher.spare_options(&id, self.uid(slot), cpu_percent))
    }

    /// A spare for a scan in `slot` under `cpu_percent`: the slot's ready one if it was made
    /// for that quota, else one started now. True if it was ready.
    pub async fn take(self: &Arc<Self>, slot: u32, cpu_percent: u32) -> Result<(Spare, bool), SpareError> {
        if cpu_percent == self.launcher.default_cpu_percent() {
            if let Some(spare) = self.ready().remove(&slot) {
                return Ok((spare, true));
            }
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.start(slot, cpu_percent).map(|s| (s, false)))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Starts `slot`'s next spare in the background, unless it has one.
    pub fn refill(self: &Arc<Self>, slot: u32) {
        if self.closed.load(Ordering::Relaxed) || self.ready().contains_key(&slot) {
            return;
        }
        let me = self.clone();
        self.making.begin();
        tokio::task::spawn_blocking(move || {
            match me.start(slot, me.launcher.default_cpu_percent()) {
                Ok(spare) => {
                    let unwanted = if me.closed.load(Ordering::Relaxed) {
                        Some(spare)
                    } else {
                        me.failing.store(false, Ordering::Relaxed);
                        me.ready().insert(slot, spare)
                    };
                    // Dropping a spare stops it (SIGTERM) and waits for it.
                    drop(unwanted);
                }
                Err(e) => {
                    if !me.failing.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "cella worker: cannot make a spare VMM ({}); scans start their own",
                            crate::error::error_chain(&e)
                        );
                    }
                }
            }
            me.making.end();
        });
    }

    /// Stops making spares, waits (a few seconds at most) for those under way, and stops the
    /// ready ones (when the worker stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.making.settle(std::time::Duration::from_secs(10)).await;
        let ready: Vec<Spare> = self.ready().drain().map(|(_, spare)| spare).collect();
        let _ = tokio::task::spawn_blocking(move || drop(ready)).await;
    }

    /// Removes the jails of spares that worker processes of this host which are gone left.
    pub async fn sweep_orphans(&self) {
        if self.launcher.jailed() {
            crate::spares::sweep_orphans(&self.launcher.vmm().with_file_name("cella-jailer")).await;
        }
    }
}
