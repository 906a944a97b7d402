//! The helper vCPU: a second vCPU some VMs have (`BootInfo::helpers`), and the scan's
//! workers that use it.
//!
//! The helper enters `_start` with its index and its own stack, and waits for work in
//! [`helper_main`]. The boot vCPU posts a task ([`run`]): it publishes a reference to
//! the task and bumps [`POSTED`], wakes the helper with one port write, runs the task as
//! worker 0, and spins until the helper has set [`FINISHED`] to the same generation. Nothing
//! is sent to the VMM but the wake and the helper's waits: the task and its results stay in
//! guest memory, which both vCPUs share.
//!
//! A task on the helper must only compute: no device I/O, no console. If it panics, the
//! panic handler ends the VM from the helper, and the VMM ends it with the helper's status.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use cella_abi::ports;

use super::{entry, io};

/// How long one helper wait blocks at most before it looks again (a wake ends it sooner).
const WAIT_MS: u32 = 1000;

/// The generation of the last task posted by the boot vCPU.
static POSTED: AtomicU64 = AtomicU64::new(0);
/// The generation of the last task the helper finished.
static FINISHED: AtomicU64 = AtomicU64::new(0);
/// The task posted: a pointer to a `&(dyn Fn(usize) + Sync)` on the boot vCPU's stack, valid
/// until `FINISHED` reaches `POSTED`.
static TASK: AtomicPtr<&'static (dyn Fn(usize) + Sync)> = AtomicPtr::new(core::ptr::null_mut());

/// The helper vCPU's life: wait for a task, run it as worker 1, say so; forever. The VM ends
/// through the boot vCPU.
pub fn helper_main() -> ! {
    let mut done = 0;
    loop {
        let posted = POSTED.load(Ordering::Acquire);
        if posted == done {
            io::out_u32(ports::HELPER_WAIT, WAIT_MS);
            continue;
        }
        let task = TASK.load(Ordering::Acquire);
        // SAFETY: `run` stored a pointer to a live `&dyn Fn` before it published
        // generation `posted` (Release, read above with Acquire), and keeps it alive until it
        // sees `FINISHED == posted`, which is only stored below, after the call.
        let task: &(dyn Fn(usize) + Sync) = unsafe { *task };
        task(1);
        done = posted;
        FINISHED.store(posted, Ordering::Release);
    }
}

/// vCPUs this VM runs guest code on: the boot vCPU, and a helper if it has one.
pub fn count() -> usize {
    1 + entry::boot_info().helpers.min(1) as usize
}

/// Runs `task(w)` for each vCPU `w` in `0..count()` at once: `task(0)` here on the boot vCPU,
/// `task(1)` on the helper; returns when both have returned. Boot vCPU only.
pub fn run(task: &(dyn Fn(usize) + Sync)) {
    if count() == 1 {
        return task(0);
    }
    // SAFETY: only the lifetime changes. The helper uses the reference only between the
    // publication below and its store of `FINISHED == generation`, and this function does not
    // return before it has seen that store (the pointer is cleared then).
    let task_static =
        unsafe { core::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(task) };
    let mut slot = task_static;
    TASK.store(&raw mut slot, Ordering::Release);
    let generation = POSTED.fetch_add(1, Ordering::AcqRel) + 1;
    io::out_u32(ports::HELPER_WAKE, 1);
    task(0);
    while FINISHED.load(Ordering::Acquire) != generation {
        core::hint::spin_loop();
    }
    TASK.store(core::ptr::null_mut(), Ordering::Release);
}

/// The vCPUs as the scan's workers.
#[cfg(feature = "scanner")]
struct Vcpus;

#[cfg(feature = "scanner")]
impl cella_scan::parallel::Workers for Vcpus {
    fn count(&self) -> usize {
        count()
    }

    fn run(&self, task: &(dyn Fn(usize) + Sync)) {
        run(task)
    }
}

/// Lets the scan use the helper vCPU, if this VM has one (call after any park: a VM restored
/// from a template learns its helpers then).
#[cfg(feature = "scanner")]
pub fn install() {
    if count() > 1 {
        cella_scan::parallel::set_workers(&Vcpus);
    }
}
