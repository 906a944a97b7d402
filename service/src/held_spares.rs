//! The worker's held spares: for each slot, one jail made and its VMM started and built ahead
//! (`cella-vmm scan --jailed --jail-hold`, which runs `cella-jailer --hold`), waiting for the
//! slot's next scan, which takes it with `--jail-prepared` and binds its artifact and socket
//! folder in (see the jailer's `held` module). The holder process is this process's child (it
//! gets SIGTERM if this process dies, and discards the spare) and ends with the scan that took
//! it; SIGTERM discards an unused one.
//!
//! **Two uids per slot.** A held VMM waits without Landlock (its rules are made at its launch),
//! so it never shares a uid with a launched VMM: slot N has uids `jail_uid_base + 2N` and
//! `+ 2N + 1`, and the slot's holder always has the one its running scan does not. A scan
//! launched from the spare runs as the spare's uid; a scan launched without one (none was
//! ready) takes the uid the slot's holder (if one is being made) does not have; the spare made
//! for the slot next takes the other.
//!
//! Spares are named `spare-<pid>-job<n>-<k>` like prepared ones ([`crate::spares`]), so those a
//! crashed process left behind are removed by the next one on the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// How long a held spare may take to get ready.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Launches in a row that may not use their held spares before no more are made.
const UNUSED_LIMIT: u64 = 3;
/// How long a discarded held spare may take to remove its jail.
const DISCARD_WITHIN: Duration = Duration::from_secs(10);

/// The command that makes a held spare: its id and the uid its VMM runs as.
pub type HoldCommand = Box<dyn Fn(&str, u32) -> Command + Send + Sync>;

/// A held spare, from the moment it is being made.
struct Holder {
    id: String,
    uid: u32,
    /// The holder process, once it said it is ready.
    child: Option<Child>,
}

/// One slot: its holder, and the uid of its running scan.
#[derive(Default)]
struct Slot {
    holder: Option<Holder>,
    busy: Option<u32>,
}

/// One worker's held spares.
pub struct HeldSpares {
    jailer: PathBuf,
    vmm: PathBuf,
    hold: HoldCommand,
    uid_base: u32,
    prefix: String,
    serial: AtomicU64,
    slots: Mutex<HashMap<u32, Slot>>,
    /// Set once the worker stops: spares finished after that are discarded, not kept.
    closed: AtomicBool,
    /// Set after a spare failed to get ready: no more are made (launches make their own jails).
    broken: AtomicBool,
    /// Launches in a row that took a spare and did not run in it (their reports say so).
    unused: AtomicU64,
    /// Holders being started; [`HeldSpares::close`] waits for them.
    making: crate::spares::InFlight,
}

impl HeldSpares {
    /// Held spares for the jailed launches of `vmm` (with `cella-jailer` beside it), slot N's
    /// VMMs running as `uid_base + 2N` or `+ 2N + 1`, made by `hold`.
    pub fn new(vmm: PathBuf, uid_base: u32, hold: HoldCommand) -> Arc<Self> {
        let set = crate::spares::SETS.fetch_add(1, Ordering::Relaxed);
        Arc::new(HeldSpares {
            jailer: vmm.with_file_name("cella-jailer"),
            vmm,
            hold,
            uid_base,
            prefix: format!("spare-{}-job{set}", std::process::id()),
            serial: AtomicU64::new(0),
            slots: Mutex::default(),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            unused: AtomicU64::new(0),
            making: Default::default(),
        })
    }

    /// The two uids of `slot`.
    pub fn uids(uid_base: u32, slot: u32) -> [u32; 2] {
        let first = uid_base.saturating_add(slot.saturating_mul(2));
        [first, first.saturating_add(1)]
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a scan in `slot`: the slot's ready spare and its uid, or no spare and the uid to
    /// launch with (the one the slot's holder, if one is being made, does not have). Call
    /// [`HeldSpares::refill`] once the scan started and [`HeldSpares::finished`] when it ended.
    pub fn launch(&self, slot: u32) -> (Option<String>, u32) {
        let mut slots = self.slots();
        let state = slots.entry(slot).or_default();
        let [a, b] = Self::uids(self.uid_base, slot);
        if let Some(holder) = state.holder.take_if(|h| h.child.is_some()) {
            state.busy = Some(holder.uid);
            if let Some(mut child) = holder.child {
                // Reaped when it ends, with the scan that takes it.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            return (Some(holder.id), holder.uid);
        }
        let uid = if state.holder.as_ref().is_some_and(|h| h.uid == a) { b } else { a };
        state.busy = Some(uid);
        (None, uid)
    }

    /// The scan in `slot` ended. `ran_in_spare`: whether its VMM ran in the spare it took
    /// (its report's `built_ahead`), if it took one and reported. After a few launches in a row
    /// that could not use their spares (the jailer said why in the log), no more are made.
    pub fn finished(&self, slot: u32, ran_in_spare: Option<bool>) {
        if let Some(state) = self.slots().get_mut(&slot) {
            state.busy = None;
        }
        match ran_in_spare {
            Some(true) => self.unused.store(0, Ordering::Relaxed),
            Some(false) if self.unused.fetch_add(1, Ordering::Relaxed) + 1 == UNUSED_LIMIT => {
                self.broken.store(true, Ordering::Relaxed);
                eprintln!(
                    "cella worker: the last {UNUSED_LIMIT} scans could not use their held spares (the \
                     jailer's messages above say why); jobs make their jails at launch from now on"
                );
            }
            _ => {}
        }
    }

    /// Makes `slot`'s held spare in the background, unless it has one (ready or being made).
    pub fn refill(self: &Arc<Self>, slot: u32) {
        if self.broken.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
            return;
        }
        let (id, uid) = {
            let mut slots = self.slots();
            let state = slots.entry(slot).or_default();
            if state.holder.is_some() {
                return;
            }
            let [a, b] = Self::uids(self.uid_base, slot);
            let uid = if state.busy == Some(a) { b } else { a };
            let id = format!("{}-{}", self.prefix, self.serial.fetch_add(1, Ordering::Relaxed));
            state.holder = Some(Holder { id: id.clone(), uid, child: None });
            (id, uid)
        };
        let me = self.clone();
        self.making.begin();
        tokio::spawn(async move {
            match me.start_holder(&id, uid).await {
                Ok(child) => {
                    if let Some(mut unwanted) = me.keep(slot, &id, child) {
                        discard(&mut unwanted).await;
                    }
                }
                Err(reason) => {
                    me.forget(slot, &id);
                    if !me.broken.swap(true, Ordering::Relaxed) {
                        eprintln!("cella worker: cannot make held spares ({reason}); jobs make their jails at launch");
                    }
                }
            }
            me.making.end();
        });
    }

    /// Keeps the ready holder of spare `id` in `slot`; gives it back if it is no longer wanted
    /// (the worker is stopping).
    fn keep(&self, slot: u32, id: &str, child: Child) -> Option<Child> {
        if self.closed.load(Ordering::Relaxed) {
            self.forget(slot, id);
            return Some(child);
        }
        let mut slots = self.slots();
        match slots.get_mut(&slot).and_then(|s| s.holder.as_mut()).filter(|h| h.id == id) {
            Some(holder) => {
                holder.child = Some(child);
                None
            }
            None => Some(child),
        }
    }

    fn forget(&self, slot: u32, id: &str) {
        if let Some(state) = self.slots().get_mut(&slot) {
            state.holder.take_if(|h| h.id == id);
        }
    }

    /// Starts the holder of spare `id` and waits until it says it is ready.
    async fn start_holder(&self, id: &str, uid: u32) -> Result<Child, String> {
        let mut cmd = (self.hold)(id, uid);
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
        Ok(holder)
    }

    /// Stops making spares, waits (a few seconds at most) for those under way, and discards
    /// the ready ones (when the worker stops).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.making.settle(Duration::from_secs(10)).await;
        let ready: Vec<Child> =
            self.slots().values_mut().filter_map(|s| s.holder.take().and_then(|h| h.child)).collect();
        for mut child in ready {
            discard(&mut child).await;
        }
    }

    /// Removes the spares of worker processes on this host that are gone.
    pub async fn sweep_orphans(&self) {
        crate::spares::sweep_orphans(&self.jailer).await;
    }

    /// The uids of the slot's ready or coming spare and of its running scan (for tests).
    pub fn slot_uids(&self, slot: u32) -> (Option<u32>, Option<u32>) {
        let slots = self.slots();
        let state = slots.get(&slot);
        (state.and_then(|s| s.holder.as_ref().map(|h| h.uid)), state.and_then(|s| s.busy))
    }
}

/// Discards a held spare: SIGTERM to its holder, which kills its VMM and removes its jail;
/// SIGKILL if it takes too long (then the next start's sweep removes the jail).
async fn discard(holder: &mut Child) {
    if let Some(pid) = holder.id() {
        let _ = crate::signal::terminate(pid);
    }
    if tokio::time::timeout(DISCARD_WITHIN, holder.wait()).await.is_err() {
        let _ = holder.kill().await;
    }
}

impl std::fmt::Debug for HeldSpares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldSpares").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spares whose holder command is never run (the tests drive the slot state by hand).
    fn spares() -> Arc<HeldSpares> {
        HeldSpares::new(
            PathBuf::from("/nonexistent/cella-vmm"),
            64_100,
            Box::new(|_, _| Command::new("true")),
        )
    }

    /// Marks `slot`'s holder as being made with `uid`, as `refill` does before it starts it.
    fn making(spares: &HeldSpares, slot: u32, uid: u32) {
        spares.slots().entry(slot).or_default().holder =
            Some(Holder { id: format!("s{uid}"), uid, child: None });
    }

    #[test]
    fn each_slot_has_two_uids_of_its_own() {
        assert_eq!(HeldSpares::uids(64_100, 0), [64_100, 64_101]);
        assert_eq!(HeldSpares::uids(64_100, 3), [64_106, 64_107]);
    }

    #[tokio::test]
    async fn a_launch_without_a_ready_spare_never_takes_the_uid_of_the_one_being_made() {
        let spares = spares();
        // Nothing held: the first uid.
        assert_eq!(spares.launch(0), (None, 64_100));
        spares.finished(0, None);
        // A spare being made with either uid: the launch takes the other.
        for (held, launch) in [(64_100, 64_101), (64_101, 64_100)] {
            making(&spares, 0, held);
            assert_eq!(spares.launch(0), (None, launch));
            assert_eq!(spares.slot_uids(0), (Some(held), Some(launch)));
            spares.finished(0, None);
            spares.forget(0, &format!("s{held}"));
        }
    }

    #[tokio::test]
    async fn the_spare_made_while_a_scan_runs_takes_the_other_uid() {
        let spares = spares();
        for busy in [64_102, 64_103] {
            spares.slots().entry(1).or_default().busy = Some(busy);
            spares.closed.store(false, Ordering::Relaxed);
            // refill marks the slot's coming spare before it starts the (here failing) holder.
            spares.refill(1);
            let (held, running) = spares.slot_uids(1);
            assert_eq!(running, Some(busy));
            assert_eq!(held, Some(if busy == 64_102 { 64_103 } else { 64_102 }));
            // A second refill while one is coming makes no second spare.
            let before = spares.serial.load(Ordering::Relaxed);
            spares.refill(1);
            assert_eq!(spares.serial.load(Ordering::Relaxed), before);
            let id = spares.slots()[&1].holder.as_ref().unwrap().id.clone();
            spares.forget(1, &id);
        }
    }

    #[tokio::test]
    async fn spares_that_launches_cannot_use_stop_being_made() {
        let spares = spares();
        for _ in 0..UNUSED_LIMIT - 1 {
            spares.finished(0, Some(false));
        }
        spares.finished(0, Some(true));
        spares.finished(0, Some(false));
        assert!(!spares.broken.load(Ordering::Relaxed), "a used spare starts the count again");
        for _ in 0..UNUSED_LIMIT - 1 {
            spares.finished(0, Some(false));
        }
        assert!(spares.broken.load(Ordering::Relaxed));
        spares.refill(0);
        assert_eq!(spares.slot_uids(0), (None, None), "no spare is made any more");
    }
}
