//! Entry point, the modes' bodies, exit and the panic handler.

use core::fmt::Write;

use cella_abi::{layout, ports, split_args, status, BootInfo};

use super::console::Console;
use super::{heap, io, modes};
use cella_runner::mode::Mode;

/// The VMM enters here at CPL 3, with the stack at `BootInfo::stack_top - 8`.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    // SAFETY: the VMM writes the boot-info block at this fixed, mapped address before the
    // first instruction; it is read once, by value.
    let boot = unsafe { core::ptr::read_volatile(layout::BOOT_INFO_ADDR as *const BootInfo) };
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
    // SAFETY: the VMM wrote `args_len` bytes of arguments at `args_addr`, inside mapped memory,
    // and nothing writes them while we run.
    let args = unsafe { core::slice::from_raw_parts(boot.args_addr as *const u8, boot.args_len as usize) };
    match Mode::parse(split_args(args)) {
        Ok(mode) => modes::run(mode, &boot, &mut console),
        Err(e) => {
            let _ = writeln!(console, "cella-runner: {e}");
            exit(status::USAGE)
        }
    }
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
