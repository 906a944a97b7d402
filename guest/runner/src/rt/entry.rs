//! Entry point, the modes' bodies, exit and the panic handler.

use core::fmt::Write;

use cella_abi::{layout, ports, split_args, status, BootInfo};

use super::console::Console;
use super::{heap, helper, io, modes};
use cella_runner::mode::Mode;

/// The VMM enters here at CPL 3: the boot vCPU (`vcpu` 0) with the stack at
/// `BootInfo::stack_top - 8`, a helper vCPU (`vcpu` 1) with its own stack, to wait for work.
#[no_mangle]
pub extern "C" fn _start(_boot_info: u64, vcpu: u64) -> ! {
    if vcpu != 0 {
        helper::helper_main()
    }
    let boot = boot_info();
    let mut console = Console::new();
    if !boot.is_valid() {
        let _ = writeln!(
            console,
            "cella-runner: boot-info magic/version/size {:#x}/{}/{} is not the expected {}",
            boot.magic,
            boot.version,
            boot.size,
            cella_abi::BOOT_INFO_VERSION
        );
        exit(status::BAD_BOOT_INFO);
    }
    // SAFETY: the VMM maps [heap_start, heap_end) for us and nothing else uses it.
    if !unsafe { heap::init(boot.heap_start, boot.heap_end) } {
        let _ =
            writeln!(console, "cella-runner: heap of {} bytes is too small", boot.heap_end - boot.heap_start);
        exit(status::BAD_BOOT_INFO);
    }
    match Mode::parse(split_args(args(&boot))) {
        Ok(mode) => modes::run(mode, &boot, &mut console),
        Err(e) => {
            let _ = writeln!(console, "cella-runner: {e}");
            exit(status::USAGE)
        }
    }
}

/// The boot-info block as it is now: at the first instruction, or after a park, when the VMM
/// that restored this VM has written its own arguments.
pub fn boot_info() -> BootInfo {
    // SAFETY: the VMM writes the boot-info block at this fixed, mapped address before the
    // first instruction (and before a restored VM goes on after its park); read by value.
    unsafe { core::ptr::read_volatile(layout::BOOT_INFO_ADDR as *const BootInfo) }
}

/// The arguments `boot` names.
pub fn args(boot: &BootInfo) -> &'static [u8] {
    let len = (boot.args_len as u64).min(layout::ARGS_MAX_LEN) as usize;
    // SAFETY: the VMM wrote `args_len` bytes of arguments at `args_addr` (checked against the
    // argument block's size), inside mapped memory, and nothing writes them while we run.
    unsafe { core::slice::from_raw_parts(boot.args_addr as *const u8, len) }
}

/// Parks the VM for its template snapshot (see [`ports::PARK`]); returns in each VM restored
/// from it. The `out` is a compiler barrier, so memory the VMM rewrote is read afresh.
#[cfg(feature = "scanner")]
pub fn park() {
    io::out_u32(ports::PARK, 1);
}

/// Ends the VM with `code`. The VMM stops the vCPU at the port write, so this never returns.
pub fn exit(code: u32) -> ! {
    io::out_u32(ports::EXIT, code);
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut console = Console::new();
    let _ = writeln!(console, "cella-runner panicked: {info}");
    console.flush();
    exit(status::PANIC)
}

/// The precompiled `alloc` for the Linux code generator is built to unwind and names these
/// two symbols; with `panic = "abort"` nothing ever calls them.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(status::PANIC)
}

/// See [`_Unwind_Resume`].
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
