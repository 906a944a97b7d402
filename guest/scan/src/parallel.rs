//! Work spread over the workers the scan may use: in the VM, the boot vCPU and a helper vCPU
//! (the runner installs them with [`set_workers`]); natively, whatever the caller installs
//! (threads); by default one worker, the caller itself.
//!
//! A stage that can be split runs [`Workers::run`] with a task that claims pieces of work
//! until none are left, each worker with a state of its own ([`each_worker`]).

/// Runs a task on several workers at once.
pub trait Workers: Sync {
    /// How many workers [`Workers::run`] runs the task on (at least 1).
    fn count(&self) -> usize;

    /// Runs `task(w)` for each worker `w` in `0..count()` at the same time, and returns once
    /// every one has returned. Worker 0 is the caller.
    fn run(&self, task: &(dyn Fn(usize) + Sync));
}

/// The caller alone.
#[derive(Debug)]
pub struct OneWorker;

impl Workers for OneWorker {
    fn count(&self) -> usize {
        1
    }

    fn run(&self, task: &(dyn Fn(usize) + Sync)) {
        task(0)
    }
}

/// The installed workers; `None`: [`OneWorker`].
static INSTALLED: spin::Mutex<Option<&'static dyn Workers>> = spin::Mutex::new(None);

/// Installs the workers scans use from now on (replacing any installed before).
pub fn set_workers(workers: &'static dyn Workers) {
    *INSTALLED.lock() = Some(workers);
}

/// The workers installed, or [`OneWorker`].
pub fn workers() -> &'static dyn Workers {
    INSTALLED.lock().unwrap_or(&OneWorker)
}

/// Runs `task(w, &mut states[w])` on every worker of `workers` at once (`states` holds one
/// state per worker). Worker `w` alone touches `states[w]`.
pub fn each_worker<S: Send>(workers: &dyn Workers, states: &mut [S], task: impl Fn(usize, &mut S) + Sync) {
    assert_eq!(states.len(), workers.count(), "one state per worker");
    // Each lock is only ever taken by its own worker: it is never contended.
    let slots: alloc::vec::Vec<spin::Mutex<&mut S>> = states.iter_mut().map(spin::Mutex::new).collect();
    workers.run(&|w| task(w, &mut slots[w].lock()));
}
