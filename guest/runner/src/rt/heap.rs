//! The global allocator: Talc over the heap range the VMM gave us in boot-info, plus a
//! zero arena for large zeroed allocations.
//!
//! The VMM hands the guest fresh memory: every heap page reads as zero until something writes
//! it, and the first write to a page costs a fault that is expensive here (~10 µs on this
//! machine's nested KVM), and every page written must later be scrubbed by the VMM. A
//! `vec![0; n]` served by Talc would write all `n` bytes. So zeroed allocations of a page or
//! more are carved, top down, from the top of the heap, which nothing ever writes except
//! through such allocations: their memory is already zero, and only the pages the program then
//! uses are touched (a 4 MiB disk window holding a 10 KiB artifact costs three pages, not 1024).
//! Freed blocks of the zero arena are not reused (they are no longer zero); once the arena is
//! exhausted, zeroed allocations fall back to Talc and an explicit fill.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use talc::source::Manual;
use talc::TalcLock;

/// Zeroed allocations at least this large come from the zero arena.
const ZERO_ARENA_MIN_ALLOC: usize = 4096;
/// The zero arena takes at most this much of the heap...
const ZERO_ARENA_MAX: usize = 32 << 20;
/// ... and at most this fraction (1/n) of it.
const ZERO_ARENA_FRACTION: usize = 4;

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

/// Talc for everything, except zeroed allocations of a page or more while the zero arena
/// `[zero_floor, zero_end)` has room: those are taken from its never-used top, `zero_top`.
pub struct Heap {
    talc: TalcLock<SpinLock, Manual>,
    zero_floor: AtomicUsize,
    zero_top: AtomicUsize,
    zero_end: AtomicUsize,
}

#[global_allocator]
static HEAP: Heap = Heap {
    talc: TalcLock::new(Manual),
    zero_floor: AtomicUsize::new(0),
    zero_top: AtomicUsize::new(0),
    zero_end: AtomicUsize::new(0),
};

impl Heap {
    fn in_zero_arena(&self, ptr: *mut u8) -> bool {
        let p = ptr as usize;
        p >= self.zero_floor.load(Ordering::Relaxed) && p < self.zero_end.load(Ordering::Relaxed)
    }

    /// A block from the zero arena, or `None` if it has no room for `layout`.
    fn take_zeroed(&self, layout: Layout) -> Option<*mut u8> {
        let floor = self.zero_floor.load(Ordering::Relaxed);
        let mut top = self.zero_top.load(Ordering::Relaxed);
        loop {
            let start = top.checked_sub(layout.size())? & !(layout.align() - 1);
            if start < floor {
                return None;
            }
            match self.zero_top.compare_exchange(top, start, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(start as *mut u8),
                Err(now) => top = now,
            }
        }
    }
}

// SAFETY: every block comes either from Talc (which upholds `GlobalAlloc` for its blocks) or
// from the zero arena, a range Talc was never given: a successful compare-exchange moves
// `zero_top` down past the returned block, so arena blocks never overlap each other, and they
// stay at or above `zero_floor`, so they never overlap Talc's range below it. Arena blocks are
// never reused, so `dealloc` and `realloc` route a pointer by the range it lies in.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract (a non-zero size) is passed on unchanged.
        unsafe { self.talc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= ZERO_ARENA_MIN_ALLOC {
            if let Some(ptr) = self.take_zeroed(layout) {
                // Nothing has written the arena below its initial top since the VMM zeroed it.
                return ptr;
            }
        }
        // SAFETY: the caller's contract is passed on; a non-null block is valid for `size`
        // bytes of writes.
        unsafe {
            let ptr = self.talc.alloc(layout);
            if !ptr.is_null() {
                core::ptr::write_bytes(ptr, 0, layout.size());
            }
            ptr
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.in_zero_arena(ptr) {
            return; // no longer zero: never handed out again
        }
        // SAFETY: outside the arena, `ptr` came from Talc with this layout (caller's contract).
        unsafe { self.talc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.in_zero_arena(ptr) {
            // SAFETY: outside the arena, `ptr` came from Talc with `layout` (caller's contract).
            return unsafe { self.talc.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow `isize`, so this layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_size` is non-zero (caller's contract).
        let new = unsafe { self.talc.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and distinct (Talc never
            // hands out arena memory).
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

/// Hands `[start, end)` to the allocator: its top part (a quarter, at most 32 MiB) becomes the
/// zero arena, the rest Talc's. Returns `false` if the range is too small.
///
/// # Safety
/// The range must be mapped, writable, read as zero (fresh from the VMM), and used by nothing
/// else for the rest of the run. Call it once, before the first allocation.
pub unsafe fn init(start: u64, end: u64) -> bool {
    let size = end.saturating_sub(start) as usize;
    let arena = (size / ZERO_ARENA_FRACTION).min(ZERO_ARENA_MAX) & !(ZERO_ARENA_MIN_ALLOC - 1);
    let split = start as usize + (size - arena);
    HEAP.zero_floor.store(split, Ordering::Relaxed);
    HEAP.zero_top.store(split + arena, Ordering::Relaxed);
    HEAP.zero_end.store(split + arena, Ordering::Relaxed);
    // SAFETY: the caller hands over exclusive use of the range; Talc gets the part below the
    // arena.
    unsafe { HEAP.talc.lock().claim(start as *mut u8, split - start as usize).is_some() }
}
