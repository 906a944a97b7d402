//! Spare jails, made ahead of the launches that take them, with `--jail-prepared`. The worker
//! keeps one per slot, the session manager one for the next session VMM (slot 0 of its own
//! set); a launch refills its slot's in the background. A spare that turns out unusable costs
//! a launch its head start only: the jailer says so and makes the jail itself.
//!
//! Two kinds:
//! - **held** (the worker's): the whole jail made and its VMM started and built in it
//!   (`cella-vmm scan --jailed --jail-hold`, which runs `cella-jailer --hold`), waiting for the
//!   scan that takes it; the launch binds its artifact and socket folder in and the VM runs at
//!   once. The holder process is this process's child (it gets SIGTERM if this process dies)
//!   and ends when the scan that took it ends; SIGTERM discards an unused one.
//! - **prepared** (the session manager's): a jail folder with the VMM binary's copy and a
//!   network namespace (`cella-jailer prepare`); a session's jail differs in each launch's
//!   folder, which a held jail cannot take.
//!
//! Spares are named `spare-<pid>-<kind><n>-<k>` (the `cella` process, `job` or `session`, the
//! set, a serial number), so spares a crashed process left behind are recognised and removed by
//! the next one on the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// How long a held spare may take to get ready.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a discarded held spare may take to remove its jail.
const DISCARD_WITHIN: Duration = Duration::from_secs(10);

/// The command that makes a held spare: its id and the worker slot it is for.
pub type HoldCommand = Box<dyn Fn(&str, u32) -> Command + Send + Sync>;

/// Where `cella-jailer` makes jails by default (its `--chroot-base`), and the folder of the
/// VMM's jails in it.
const JAILS: &str = "/dev/shm/cella-jailer/cella-vmm";

/// Spare sets made by this process so far (several workers may run in one process in tests).
static SETS: AtomicU64 = AtomicU64::new(0);

/// One worker's spares.
pub struct Spares {
    jailer: PathBuf,
    vmm: PathBuf,
    /// Makes held spares; none: prepared ones.
    hold: Option<HoldCommand>,
    /// The holder processes of ready held spares, by id.
    holders: Mutex<HashMap<String, Child>>,
    prefix: String,
    serial: AtomicU64,
    ready: Mutex<HashMap<u32, String>>,
    /// Set once the worker stops: spares finished after that are removed, not kept.
    closed: AtomicBool,
    /// Set after a `prepare` failed: no more are tried (launches make their own jails).
    broken: AtomicBool,
    /// Spares being made; [`Spares::close`] waits for them.
    making: AtomicU64,
    made: Notify,
}

impl Spares {
    /// Spares for jailed launches of `vmm` (with `cella-jailer` beside it); `kind` (`job`,
    /// `session`) goes into their names.
    pub fn new(vmm: &Path, kind: &str) -> Arc<Self> {
        Self::make(vmm, kind, None)
    }

    /// Held spares, made by `hold` (see the module's text).
    pub fn held(vmm: &Path, kind: &str, hold: HoldCommand) -> Arc<Self> {
        Self::make(vmm, kind, Some(hold))
    }

    fn make(vmm: &Path, kind: &str, hold: Option<HoldCommand>) -> Arc<Self> {
        // The jailer refuses a symlinked exec-file; the jailed launch names the real file too.
        let vmm = std::fs::canonicalize(vmm).unwrap_or_else(|_| vmm.to_owned());
        let set = SETS.fetch_add(1, Ordering::Relaxed);
        Arc::new(Spares {
            jailer: vmm.with_file_name("cella-jailer"),
            vmm,
            hold,
            holders: Mutex::default(),
            prefix: format!("spare-{}-{kind}{set}", std::process::id()),
            serial: AtomicU64::new(0),
            ready: Mutex::default(),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            making: AtomicU64::new(0),
            made: Notify::new(),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<u32, String>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spare ready for `slot`, if there is one; it is the caller's to launch with. A held
    /// spare's holder is reaped when it ends, with the launch that takes it.
    pub fn take(&self, slot: u32) -> Option<String> {
        let id = self.ready().remove(&slot)?;
        if let Some(mut holder) = self.holders().remove(&id) {
            tokio::spawn(async move {
                let _ = holder.wait().await;
            });
        }
        Some(id)
    }

    /// Makes a spare for `slot` in the background.
    pub fn refill(self: &Arc<Self>, slot: u32) {
        if self.broken.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        self.making.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let id = format!("{}-{}", me.prefix, me.serial.fetch_add(1, Ordering::Relaxed));
            let made = match &me.hold {
                Some(_) => me.start_holder(&id, slot).await,
                None => me.prepare(&id).await,
            };
            match made {
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
                        eprintln!(
                            "cella worker: cannot make spare jails ({reason}); jobs make their jails at launch"
                        );
                    }
                }
            }
            me.making.fetch_sub(1, Ordering::AcqRel);
            me.made.notify_waiters();
        });
    }

    async fn prepare(&self, id: &str) -> Result<(), String> {
        let output = Command::new(&self.jailer)
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

    /// Starts the holder of held spare `id` and waits until it says it is ready.
    async fn start_holder(&self, id: &str, slot: u32) -> Result<(), String> {
        let Some(hold) = &self.hold else { return Err("no hold command".into()) };
        let mut cmd = hold(id, slot);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        crate::signal::terminate_with_parent(&mut cmd);
        let mut holder = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", self.vmm.display()))?;
        let stdout = holder.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        let said = tokio::time::timeout(READY_WITHIN, reader.read_line(&mut line)).await;
        if !matches!(said, Ok(Ok(_))) || line.trim() != format!("ready {id}") {
            discard(&mut holder).await;
            let line = line.trim();
            return Err(format!(
                "the held spare {id} did not get ready (it said {line:?}; its message is above)"
            ));
        }
        self.holders().insert(id.to_owned(), holder);
        Ok(())
    }

    async fn remove(&self, id: &str) {
        let holder = self.holders().remove(id);
        if let Some(mut holder) = holder {
            discard(&mut holder).await;
            return;
        }
        let _ = Command::new(&self.jailer)
            .args(["cleanup", "--id", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// Stops making spares, waits (a few seconds at most) for those under way, which remove
    /// themselves, and removes the ready ones (when the worker stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.making.load(Ordering::Acquire) > 0 {
            let made = self.made.notified();
            if self.making.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, made).await.is_err() {
                break;
            }
        }
        let ids: Vec<String> = self.ready().drain().map(|(_, id)| id).collect();
        for id in ids {
            self.remove(&id).await;
        }
    }

    /// Held spares ready now (for tests and metrics).
    pub fn held_count(&self) -> usize {
        self.holders().len()
    }

    /// Removes the spares of worker processes on this host that are gone.
    pub async fn sweep_orphans(&self) {
        let Ok(entries) = std::fs::read_dir(JAILS) else { return };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("spare-").and_then(|rest| rest.split('-').next()) else {
                continue;
            };
            let gone = pid.parse::<u32>().is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                self.remove(&name).await;
            }
        }
    }
}

/// Discards a held spare: SIGTERM to its holder, which kills its VMM and removes its jail;
/// SIGKILL if it takes too long (then `cella-jailer cleanup` at the next start sweeps).
async fn discard(holder: &mut Child) {
    if let Some(pid) = holder.id() {
        let _ = crate::signal::terminate(pid);
    }
    if tokio::time::timeout(DISCARD_WITHIN, holder.wait()).await.is_err() {
        let _ = holder.kill().await;
    }
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares")
            .field("prefix", &self.prefix)
            .field("held", &self.hold.is_some())
            .field("ready", &*self.ready())
            .finish_non_exhaustive()
    }
}
