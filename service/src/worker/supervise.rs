//! A job's control loop while its VM runs: the lease is renewed every third of its length, a
//! cancel (asked through the database or told by LISTEN), a lost lease or the worker shutting
//! down stops the VM once, and a VMM that outlives its time limit by [`KILL_GRACE`] is killed.
//!
//! The loop reaches the world through two small traits, [`VmHandle`] (the running VMM: its
//! control API's stop and its pidfd) and [`LeaseKeeper`] (the job's row), so its every
//! transition is unit-tested with fakes and a paused clock: no KVM, no root, no PostgreSQL.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use super::launch::StopReason;

/// How long past its time limit a VMM may go on before the worker kills it (the VMM enforces
/// the limit itself; one that does not is hostile or broken).
pub const KILL_GRACE: Duration = Duration::from_secs(30);

/// The running VMM, as the loop reaches it.
pub trait VmHandle {
    /// Asks the VMM to stop: its VM stops and is scrubbed, the job channel ends and the run
    /// finishes with the stopped VM's report. Must not block: the real one asks on a thread
    /// of its own, and falls back to SIGTERM if the control API does not answer.
    fn request_stop(&self);
    /// Kills the VMM's process (SIGKILL through its pidfd: never a recycled pid).
    fn kill(&self);
}

/// What renewing the lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Renewed.
    Held,
    /// Renewed, and the job was asked to cancel.
    CancelAsked,
    /// Another worker holds the job now, or it ended: this attempt's result will be refused.
    Lost,
    /// The database did not answer: try again at the next beat (the lease outlives a few).
    Unknown,
}

/// The job's lease, as the loop renews it.
pub trait LeaseKeeper {
    fn renew(&self) -> impl Future<Output = Beat> + Send;
}

/// How a supervised run ended.
#[derive(Debug)]
pub struct Supervised<T> {
    /// What the run returned.
    pub result: T,
    /// Why the worker stopped the VM, if it did.
    pub stopped: Option<StopReason>,
    /// Whether the VMM outlived its time limit and was killed.
    pub killed: bool,
}

/// Drives `run` (the job in its VM, to its end) to completion while keeping the lease every
/// `beat`, stopping the VM once on the first cancel, lost lease or hand-back, and killing it at
/// `time_limit + KILL_GRACE`.
pub async fn supervise<T>(
    run: impl Future<Output = T>,
    vm: &impl VmHandle,
    lease: &impl LeaseKeeper,
    cancel: &mut watch::Receiver<bool>,
    hand_back: &mut watch::Receiver<bool>,
    beat: Duration,
    time_limit: Duration,
) -> Supervised<T> {
    tokio::pin!(run);
    let mut stopped: Option<StopReason> = None;
    let mut stop_sent = false;
    let kill_at = tokio::time::Instant::now() + time_limit + KILL_GRACE;
    let mut killed = false;
    let mut beats = tokio::time::interval(beat.max(Duration::from_millis(1)));
    beats.tick().await;
    let result = loop {
        tokio::select! {
            done = &mut run => break done,
            _ = beats.tick() => match lease.renew().await {
                Beat::CancelAsked if stopped.is_none() => stopped = Some(StopReason::Cancelled),
                Beat::Lost if stopped.is_none() => stopped = Some(StopReason::LeaseLost),
                _ => {}
            },
            Ok(()) = cancel.changed(), if stopped.is_none() => stopped = Some(StopReason::Cancelled),
            Ok(()) = hand_back.changed(), if stopped.is_none() => stopped = Some(StopReason::ShuttingDown),
            _ = tokio::time::sleep_until(kill_at), if !killed => {
                killed = true;
                vm.kill();
            }
        }
        if stopped.is_some() && !stop_sent {
            stop_sent = true;
            vm.request_stop();
        }
    };
    Supervised { result, stopped, killed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::sync::Notify;

    /// A VM that runs until it is stopped or killed (or `ends_after`), recording what it was
    /// asked.
    #[derive(Default)]
    struct FakeVm {
        stops: AtomicU32,
        kills: AtomicU32,
        /// Whether a stop request reaches it (a VMM whose control API is gone ignores it).
        deaf: bool,
        ended: Notify,
    }

    impl VmHandle for FakeVm {
        fn request_stop(&self) {
            self.stops.fetch_add(1, Ordering::SeqCst);
            if !self.deaf {
                self.ended.notify_one();
            }
        }
        fn kill(&self) {
            self.kills.fetch_add(1, Ordering::SeqCst);
            self.ended.notify_one();
        }
    }

    impl FakeVm {
        /// The run: ends when the VM is stopped or killed, or by itself after `ends_after`.
        async fn run(&self, ends_after: Duration) -> &'static str {
            tokio::select! {
                _ = self.ended.notified() => "ended on request",
                _ = tokio::time::sleep(ends_after) => "ended by itself",
            }
        }
    }

    /// A lease whose beats answer from a script (then `Held`), counting them.
    #[derive(Default)]
    struct FakeLease {
        script: Mutex<Vec<Beat>>,
        beats: AtomicU32,
    }

    impl FakeLease {
        fn answering(beats: &[Beat]) -> Self {
            FakeLease { script: Mutex::new(beats.iter().rev().copied().collect()), ..Default::default() }
        }
    }

    impl LeaseKeeper for FakeLease {
        async fn renew(&self) -> Beat {
            self.beats.fetch_add(1, Ordering::SeqCst);
            self.script.lock().unwrap().pop().unwrap_or(Beat::Held)
        }
    }

    const BEAT: Duration = Duration::from_secs(10);
    const LIMIT: Duration = Duration::from_secs(120);

    struct Case {
        vm: Arc<FakeVm>,
        lease: FakeLease,
        cancel: (watch::Sender<bool>, watch::Receiver<bool>),
        hand_back: (watch::Sender<bool>, watch::Receiver<bool>),
    }

    impl Case {
        fn new(vm: FakeVm, lease: FakeLease) -> Self {
            Case { vm: Arc::new(vm), lease, cancel: watch::channel(false), hand_back: watch::channel(false) }
        }

        async fn run(&mut self, ends_after: Duration) -> Supervised<&'static str> {
            let vm = self.vm.clone();
            supervise(
                async move { vm.run(ends_after).await },
                &*self.vm,
                &self.lease,
                &mut self.cancel.1,
                &mut self.hand_back.1,
                BEAT,
                LIMIT,
            )
            .await
        }

        fn asked(&self) -> (u32, u32) {
            (self.vm.stops.load(Ordering::SeqCst), self.vm.kills.load(Ordering::SeqCst))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_ends_by_itself_is_left_alone_and_its_lease_kept_meanwhile() {
        let mut case = Case::new(FakeVm::default(), FakeLease::default());
        let done = case.run(Duration::from_secs(35)).await;
        assert_eq!((done.result, done.stopped, done.killed), ("ended by itself", None, false));
        assert_eq!(case.asked(), (0, 0));
        // Beats at 10, 20 and 30 s.
        assert_eq!(case.lease.beats.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_asked_through_the_database_stops_the_vm_once() {
        let lease = FakeLease::answering(&[Beat::Held, Beat::CancelAsked, Beat::CancelAsked]);
        let mut case = Case::new(FakeVm { deaf: true, ..Default::default() }, lease);
        let done = case.run(Duration::from_secs(60)).await;
        assert_eq!(done.stopped, Some(StopReason::Cancelled));
        assert_eq!(case.asked(), (1, 0), "one stop, however often the cancel is seen");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_told_by_listen_stops_the_vm_at_once() {
        let mut case = Case::new(FakeVm::default(), FakeLease::default());
        case.cancel.0.send(true).unwrap();
        let done = case.run(Duration::from_secs(60)).await;
        assert_eq!((done.result, done.stopped), ("ended on request", Some(StopReason::Cancelled)));
        assert_eq!(case.asked(), (1, 0));
        assert_eq!(case.lease.beats.load(Ordering::SeqCst), 0, "stopped before the first beat");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_stops_the_vm_and_a_silent_database_does_not() {
        let lease = FakeLease::answering(&[Beat::Unknown, Beat::Unknown, Beat::Lost]);
        let mut case = Case::new(FakeVm::default(), lease);
        let done = case.run(Duration::from_secs(60)).await;
        assert_eq!((done.result, done.stopped), ("ended on request", Some(StopReason::LeaseLost)));
        assert_eq!(case.lease.beats.load(Ordering::SeqCst), 3);
        assert_eq!(case.asked(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_shutting_down_hands_the_job_back_and_the_first_reason_wins() {
        let mut case = Case::new(FakeVm { deaf: true, ..Default::default() }, FakeLease::default());
        case.hand_back.0.send(true).unwrap();
        let vm = case.vm.clone();
        let cancel = case.cancel.0.clone();
        // A cancel arriving after the hand-back changes nothing.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = cancel.send(true);
            tokio::time::sleep(Duration::from_secs(1)).await;
            vm.ended.notify_one();
        });
        let done = case.run(Duration::from_secs(60)).await;
        assert_eq!(done.stopped, Some(StopReason::ShuttingDown));
        assert_eq!(case.asked(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vmm_that_outlives_its_limit_is_killed_once_at_the_grace() {
        // Deaf to stops, never ending by itself: only the kill ends it.
        let mut case = Case::new(FakeVm { deaf: true, ..Default::default() }, FakeLease::default());
        let started = tokio::time::Instant::now();
        let done = case.run(Duration::from_secs(100_000)).await;
        assert_eq!((done.result, done.killed, done.stopped), ("ended on request", true, None));
        assert_eq!(case.asked(), (0, 1));
        assert_eq!(started.elapsed(), LIMIT + KILL_GRACE);
    }
}
