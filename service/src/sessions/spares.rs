//! Spare session VMMs: one `cella-vmm session --api-fd` kept started ahead (jailed: in a cell
//! of its own, as a jail uid of its own), confined to no paths from its first instruction and
//! waiting with its VM and vCPU made. A restore hands it the snapshot's files, the disk and a
//! vsock listener ([`VmmDriver::restore_into`]) instead of starting a VMM, so the jail, the
//! exec and the search for a free uid are off the restore's path; a restore that finds none
//! ready (another size, another CPU quota, or taken a moment ago) starts one there and then.
//! A take refills in the background.
//!
//! Spares live in `<sessions>/.spares/<name>/` (the name is also the jail's id:
//! `sspare-<pid>-<n>`, the `cella serve` that made it); a session that took one records its
//! control socket there, and its folder goes when its VMM has ended. [`SparePool::close`] ends
//! the one still waiting; [`SparePool::sweep`] ends those a killed `cella serve` left.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::VmmDriver;
use super::vmm::{SpareSpec, SpareVmm};
use crate::error::ServiceError;

/// How long [`SparePool::close`] waits for a spare being made (its start is bounded by less).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

/// The folder of spares in the sessions folder (not a session id, so never taken for one).
pub const SPARES_DIR: &str = ".spares";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The jail uids reserved by launches in progress, shared by the manager and the pool.
pub type Reserved = Arc<Mutex<HashSet<u32>>>;

/// The lowest uid of `base ..+ count` that no process of this host runs as and no launch in
/// progress holds; reserved (in `reserved`) until released. Blocks (a look through `/proc`).
pub fn reserve_uid(
    vmms: &impl VmmDriver,
    reserved: &Reserved,
    base: u32,
    count: u32,
) -> Result<u32, ServiceError> {
    let mut held = lock(reserved);
    let mut taken = vmms.uids_in_use().map_err(|e| super::manager::short_of_resources(&e))?;
    taken.extend(held.iter().copied());
    let uid = (base..base.saturating_add(count)).find(|uid| !taken.contains(uid)).ok_or_else(|| {
        ServiceError::Vm(format!(
            "no jail uid is free: this host runs {count} jailed session VMMs, the most \
             sessions.jail_uids allows; suspend or terminate a session, or raise it"
        ))
    })?;
    held.insert(uid);
    Ok(uid)
}

/// The spare kept ready, and how to make more.
pub struct SparePool<D: VmmDriver> {
    vmms: Arc<D>,
    dir: PathBuf,
    reserved: Reserved,
    uid_base: u32,
    uid_count: u32,
    /// The size and CPU quota of the spare kept ready (`None`: none is kept; restores start
    /// their own).
    keep: Mutex<Option<(u32, u32)>>,
    ready: Mutex<Option<SpareVmm>>,
    making: AtomicBool,
    closed: AtomicBool,
    serial: AtomicU64,
}

impl<D: VmmDriver> std::fmt::Debug for SparePool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparePool").field("dir", &self.dir).field("ready", &*lock(&self.ready)).finish()
    }
}

impl<D: VmmDriver> SparePool<D> {
    /// Spares in `<sessions>/.spares`, jailed as uids of `uid_base ..+ uid_count` (shared with
    /// the manager's launches through `reserved`) when `vmms` is jailed.
    pub fn new(vmms: Arc<D>, sessions: &Path, reserved: Reserved, uid_base: u32, uid_count: u32) -> Self {
        SparePool {
            vmms,
            dir: sessions.join(SPARES_DIR),
            reserved,
            uid_base,
            uid_count,
            keep: Mutex::new(None),
            ready: Mutex::new(None),
            making: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            serial: AtomicU64::new(0),
        }
    }

    /// Whether `api_sock` is a spare's control socket (a session that took one records it);
    /// then the name of its folder is its jail's id.
    pub fn jail_of(&self, api_sock: &Path) -> Option<String> {
        let dir = api_sock.parent()?;
        (dir.parent()? == self.dir).then(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))?
    }

    /// Removes the folder of the spare whose control socket is `api_sock`, once its VMM has
    /// ended; nothing for any other socket.
    pub fn remove_folder(&self, api_sock: &Path) {
        if self.jail_of(api_sock).is_some() {
            if let Some(dir) = api_sock.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Starts a spare for a VM of `mem_mib` under a CPU quota of `cpu_percent`, and waits
    /// until it is ready. Blocks.
    pub fn start(&self, mem_mib: u32, cpu_percent: u32) -> Result<SpareVmm, ServiceError> {
        let _ = std::fs::create_dir_all(&self.dir);
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let name = format!("sspare-{}-{n}", std::process::id());
        let jail_uid = match self.vmms.jailed() {
            true => Some(reserve_uid(&*self.vmms, &self.reserved, self.uid_base, self.uid_count)?),
            false => None,
        };
        let spec = SpareSpec {
            dir: self.dir.join(&name),
            log: self.dir.join(format!("{name}.log")),
            mem_mib,
            cpu_percent,
            jail_uid,
        };
        let started = self.vmms.start_spare(&spec);
        // Ready (or failed): from now on its VMM holds the uid.
        if let Some(uid) = jail_uid {
            lock(&self.reserved).remove(&uid);
        }
        started
            .map_err(|e| ServiceError::Vm(format!("cannot start a VMM: {}", crate::error::error_chain(&e))))
    }

    /// The spare ready for a VM of `mem_mib` under `cpu_percent`, if there is one.
    pub fn take(&self, mem_mib: u32, cpu_percent: u32) -> Option<SpareVmm> {
        let mut ready = lock(&self.ready);
        match &*ready {
            Some(s) if s.mem_mib == mem_mib && s.cpu_percent == cpu_percent => ready.take(),
            _ => None,
        }
    }

    /// Keeps a spare of this size and CPU quota ready from now on.
    pub fn keep(self: &Arc<Self>, mem_mib: u32, cpu_percent: u32) {
        *lock(&self.keep) = Some((mem_mib, cpu_percent));
        self.refill();
    }

    /// Makes the kept spare in the background, if none is ready or being made.
    pub fn refill(self: &Arc<Self>) {
        let Some((mem_mib, cpu_percent)) = *lock(&self.keep) else { return };
        if self.closed.load(Ordering::Relaxed) || self.making.swap(true, Ordering::AcqRel) {
            return;
        }
        let stale =
            lock(&self.ready).as_ref().is_some_and(|s| (s.mem_mib, s.cpu_percent) != (mem_mib, cpu_percent));
        if !stale && lock(&self.ready).is_some() {
            self.making.store(false, Ordering::Release);
            return;
        }
        let pool = self.clone();
        // All in one blocking task: a spare made is either kept or ended, even if the runtime
        // is going away.
        let spawned = std::thread::Builder::new().name("session-spare".into()).spawn(move || {
            let made = pool.start(mem_mib, cpu_percent);
            let mut ready = lock(&pool.ready);
            match made {
                Ok(spare) if !pool.closed.load(Ordering::Acquire) => {
                    if let Some(old) = ready.replace(spare) {
                        pool.vmms.discard_spare(&old);
                    }
                }
                Ok(spare) => pool.vmms.discard_spare(&spare),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make a spare session VMM; restores start their own")
                }
            }
            drop(ready);
            pool.making.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.making.store(false, Ordering::Release);
        }
    }

    /// Ends the spare still waiting; none is made from now on. One being made is waited for
    /// (it ends itself once made): a spare outlives this process, so none may be left behind
    /// half-made when it exits. Blocks.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let until = std::time::Instant::now() + CLOSE_WAIT;
        while self.making.load(Ordering::Acquire) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Some(spare) = lock(&self.ready).take() {
            self.vmms.discard_spare(&spare);
        }
    }

    /// Ends the spares a killed `cella serve` left (their folders name a process that is
    /// gone), except those whose control socket is in `in_use` (a session took them).
    pub fn sweep(&self, in_use: &HashSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(maker) = name.strip_prefix("sspare-").and_then(|r| r.split(['-', '.']).next()) else {
                continue;
            };
            let gone = maker.parse::<u32>().is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            let api_sock = entry.path().join(super::vmm::SPARE_API_SOCK);
            if !gone || in_use.contains(&api_sock) {
                continue;
            }
            if entry.path().is_dir() {
                self.vmms.end_stale_spare(&api_sock);
            }
            let _ = std::fs::remove_dir_all(entry.path());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl<D: VmmDriver> Drop for SparePool<D> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeVmms;
    use super::*;

    fn pool(vmms: &FakeVmms, dir: &Path) -> Arc<SparePool<FakeVmms>> {
        Arc::new(SparePool::new(Arc::new(vmms.clone()), dir, Reserved::default(), 70_000, 4))
    }

    fn wait_ready(pool: &SparePool<FakeVmms>) {
        let start = std::time::Instant::now();
        while lock(&pool.ready).is_none() || pool.making.load(Ordering::Acquire) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "no spare was made");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn a_kept_spare_is_taken_only_by_its_size_and_quota_and_ended_on_close() {
        let dir = std::env::temp_dir().join(format!("cella-spares-{}", std::process::id()));
        let vmms = FakeVmms::jailed();
        let pool = pool(&vmms, &dir);
        assert_eq!(pool.take(256, 100), None, "none is kept until asked");
        pool.keep(256, 100);
        wait_ready(&pool);
        assert_eq!(pool.take(128, 100), None, "another size");
        assert_eq!(pool.take(256, 50), None, "another CPU quota");
        let spare = pool.take(256, 100).expect("the kept spare");
        assert_eq!(
            pool.jail_of(&spare.api_sock).as_deref(),
            spare.dir().file_name().and_then(|n| n.to_str())
        );
        assert!(spare.dir().starts_with(dir.join(SPARES_DIR)), "{spare:?}");
        let uid = vmms.vm(spare.pid).jail_uid.expect("a jailed spare has a uid");
        assert!((70_000..70_004).contains(&uid), "{uid}");
        // The next is made in the background, with a uid of its own.
        pool.refill();
        wait_ready(&pool);
        let next = lock(&pool.ready).clone().expect("refilled");
        assert_ne!(vmms.vm(next.pid).jail_uid, Some(uid));
        pool.close();
        assert!(!vmms.vm(next.pid).alive, "close ends the spare still waiting");
        assert!(vmms.vm(spare.pid).alive, "not the one a session took");
        pool.refill();
        assert!(lock(&pool.ready).is_none() && !pool.making.load(Ordering::Acquire), "none after close");
        assert_eq!(pool.jail_of(Path::new("/d/sessions/s1/api.sock")), None, "a session's own socket");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
