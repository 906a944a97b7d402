//! Port I/O. Each `out` is one VM exit; the VMM's TSS bitmap allows only the ports in
//! `cella_abi::ports::GUEST_PORTS`.

use core::arch::asm;

/// Writes a 32-bit value to `port`. Not `nomem`: the VMM may read guest memory the value
/// points at (the console line), so every store before this must have happened.
pub fn out_u32(port: u16, value: u32) {
    // SAFETY: port I/O has no effect on this program's memory; the VMM owns every port.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}
