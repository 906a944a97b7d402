//! The memory functions the compiler calls (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`).
//! The guest links no libc, and the Linux code generator expects these from one. Copies and
//! fills use `rep movsb`/`rep stosb`, which are fast on CPUs with ERMSB/FSRM.

use core::arch::asm;

/// # Safety
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract is exactly rep movsb's: n bytes from src to dest, forward.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` are valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: copying forward is correct when dest starts before src or past its end.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: overlapping with dest after src: copy backward (direction flag set, then cleared),
    // starting at the last byte of each buffer, both valid for n bytes.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// # Safety
/// `dest` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: rep stosb writes n bytes at dest, which the caller guarantees is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    use core::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8};
    // 16 bytes at a time with SSE2 (the compiler cannot turn intrinsics back into a memcmp
    // call), then the first differing byte decides.
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n and both buffers are valid for n bytes; loadu allows any alignment.
        let mask = unsafe {
            let x = _mm_loadu_si128(a.add(i).cast());
            let y = _mm_loadu_si128(b.add(i).cast());
            _mm_movemask_epi8(_mm_cmpeq_epi8(x, y)) as u32
        };
        if mask != 0xFFFF {
            i += (!mask).trailing_zeros() as usize;
            // SAFETY: the differing byte is inside this 16-byte block, so below n.
            let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
            return i32::from(x) - i32::from(y);
        }
        i += 16;
    }
    while i < n {
        // SAFETY: i < n, and both buffers are valid for n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
