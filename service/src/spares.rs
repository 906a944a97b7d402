//! Prepared spare jails, made ahead of the launches that take them: `cella-jailer prepare`
//! makes a jail folder with a network namespace while nothing waits,
//! and the next launch takes the spare with `--jail-prepared`. The session manager keeps one
//! for the next session VMM (a session's jail binds its own folder); the worker keeps spare VMMs
//! instead ([`crate::worker::spare_pool`]). A launch refills in
//! the background. A spare that turns out unusable costs a launch its head start only: the
//! jailer says so and makes the jail itself.
//!
//! Spares are named `spare-<pid>-<kind><n>-<k>` (the `cella` process, `job` or `session`, the
//! set, a serial number), so spares a crashed process left behind are recognised and removed by
//! the next one on the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::process::Command;
use tokio::sync::Notify;

/// Where `cella-jailer` makes jails by default (its `--chroot-base`), and the folder of the
/// VMM's jails in it.
const JAILS: &str = "/dev/shm/cella-jailer/cella-vmm";

/// Spare sets made by this process so far (several workers may run in one process in tests).
pub(crate) static SETS: AtomicU64 = AtomicU64::new(0);

/// One worker's spares.
#[derive(Debug)]
pub struct Spares {
    jailer: PathBuf,
    vmm: PathBuf,
    prefix: String,
    serial: AtomicU64,
    ready: Mutex<HashMap<u32, String>>,
    /// Set once the worker stops: spares finished after that are removed, not kept.
    closed: AtomicBool,
    /// Set after a `prepare` failed: no more are tried (launches make their own jails).
    broken: AtomicBool,
    /// Spares being made; [`Spares::close`] waits for them.
    making: InFlight,
}

impl Spares {
    /// Spares for jailed launches of `vmm` (with `cella-jailer` beside it); `kind` (`job`,
    /// `session`) goes into their names.
    pub fn new(vmm: &Path, kind: &str) -> Arc<Self> {
        // The jailer refuses a symlinked exec-file; the jailed launch names the real file too.
        let vmm = std::fs::canonicalize(vmm).unwrap_or_else(|_| vmm.to_owned());
        let set = SETS.fetch_add(1, Ordering::Relaxed);
        Arc::new(Spares {
            jailer: vmm.with_file_name("cella-jailer"),
            vmm,
            prefix: format!("spare-{}-{kind}{set}", std::process::id()),
            serial: AtomicU64::new(0),
            ready: Mutex::default(),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            making: Default::default(),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<u32, String>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spare ready for `slot`, if there is one; it is the caller's to launch with.
    pub fn take(&self, slot: u32) -> Option<String> {
        self.ready().remove(&slot)
    }

    /// Makes a spare for `slot` in the background.
    pub fn refill(self: &Arc<Self>, slot: u32) {
        if self.broken.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        self.making.begin();
        tokio::spawn(async move {
            let id = format!("{}-{}", me.prefix, me.serial.fetch_add(1, Ordering::Relaxed));
            match me.prepare(&id).await {
                Ok(()) => {
                    let unwanted = if me.closed.load(Ordering::Relaxed) {
                        Some(id)
                    } else {
                        me.ready().insert(slot, id)
                    };
                    if let Some(unwanted) = unwanted {
                        me.remove(&unwanted).await;
                    }
                }
                Err(reason) => {
                    if !me.broken.swap(true, Ordering::Relaxed) {
                        tracing::warn!(reason = %reason, "cannot make spare jails; VMMs make their jails at launch");
                    }
                }
            }
            me.making.end();
        });
    }

    async fn prepare(&self, id: &str) -> Result<(), String> {
        let mut command = Command::new(&self.jailer);
        cella_log::words_for_people(command.as_std_mut());
        let output = command
            .args(["prepare", "--id", id, "--exec-file"])
            .arg(&self.vmm)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.jailer.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    async fn remove(&self, id: &str) {
        remove(&self.jailer, id).await;
    }

    /// Stops making spares, waits (a few seconds at most) for those under way, which remove
    /// themselves, and removes the ready ones (when the worker stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.making.settle(std::time::Duration::from_secs(10)).await;
        let ids: Vec<String> = self.ready().drain().map(|(_, id)| id).collect();
        for id in ids {
            self.remove(&id).await;
        }
    }

    /// Removes the spares of worker processes on this host that are gone.
    pub async fn sweep_orphans(&self) {
        sweep_orphans(&self.jailer).await;
    }
}

/// Removes the spares (prepared jails and spare VMMs' jails) that `cella` processes of this host
/// which are gone left behind, with `cella-jailer cleanup` (which kills what still runs in their
/// cgroups). Only a process known gone leaves an orphan: one that cannot be looked at keeps its
/// spares.
pub async fn sweep_orphans(jailer: &Path) {
    let Ok(entries) = std::fs::read_dir(JAILS) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if cella_host::spare::left_by_a_gone_process(&name) {
            remove(jailer, &name).await;
        }
    }
}

/// `cella-jailer cleanup --id ID`.
pub(crate) async fn remove(jailer: &Path, id: &str) {
    let _ = Command::new(jailer)
        .args(["cleanup", "--id", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Spares being made in the background, so that stopping can wait for them.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicU64,
    done: Notify,
}

impl InFlight {
    /// One more is under way.
    pub(crate) fn begin(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// One is done (made, or given up).
    pub(crate) fn end(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.done.notify_waiters();
    }

    /// Waits until none is under way, `within` at most.
    pub(crate) async fn settle(&self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.count.load(Ordering::Acquire) > 0 {
            let done = self.done.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                break;
            }
        }
    }
}
