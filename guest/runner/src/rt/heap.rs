//! The global allocator: Talc over the heap range the VMM gave us in boot-info.

use core::sync::atomic::{AtomicBool, Ordering};

use talc::source::Manual;
use talc::TalcLock;

/// A spin lock for a program with one thread: it is never contended, but `GlobalAlloc` needs
/// `Sync`, and a real lock keeps that honest if a second vCPU ever runs guest code.
pub struct SpinLock(AtomicBool);

// SAFETY: `lock` only returns once it has swapped `false` for `true`, so at most one holder
// exists at a time; `unlock` releases with `Release` ordering, pairing with `Acquire`.
unsafe impl lock_api::RawMutex for SpinLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = SpinLock(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            core::hint::spin_loop();
        }
    }

    fn try_lock(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

#[global_allocator]
static HEAP: TalcLock<SpinLock, Manual> = TalcLock::new(Manual);

/// Hands `[start, end)` to the allocator. Returns `false` if the range is too small.
///
/// # Safety
/// The range must be mapped, writable, and used by nothing else for the rest of the run.
pub unsafe fn init(start: u64, end: u64) -> bool {
    let size = end.saturating_sub(start) as usize;
    // SAFETY: the caller hands over exclusive use of the range.
    unsafe { HEAP.lock().claim(start as *mut u8, size).is_some() }
}
