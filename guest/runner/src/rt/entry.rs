//! Entry point, the modes' bodies, exit and the panic handler.

use alloc::string::String;
use core::arch::asm;
use core::fmt::Write;

use cella_abi::{layout, ports, split_args, status, BootInfo};

use super::console::Console;
use super::{heap, io};
use cella_runner::mode::{Mode, CANARY};

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
        Ok(mode) => run(mode, &boot, &mut console),
        Err(e) => {
            let _ = writeln!(console, "cella-runner: {e}");
            exit(status::USAGE)
        }
    }
}

fn run(mode: Mode, boot: &BootInfo, console: &mut Console) -> ! {
    match mode {
        Mode::Hello => {
            let mut line = String::with_capacity(32);
            line.push_str("hello from cella-runner\n");
            let _ = console.write_str(&line);
            drop(line);
            exit(0)
        }
        Mode::Exit(code) => exit(code),
        Mode::Fault => {
            let unmapped = boot.mem_size + layout::LARGE_PAGE_SIZE;
            // SAFETY: not safe at all, on purpose: the load from an unmapped address raises a
            // page fault, which with no IDT is a triple fault that ends the VM.
            unsafe {
                asm!("mov {tmp}, qword ptr [{addr}]", addr = in(reg) unmapped, tmp = out(reg) _, options(nostack))
            };
            exit(status::PANIC)
        }
        Mode::Spin => loop {
            core::hint::spin_loop();
        },
        Mode::Flood(lines) => {
            let filler = [b'~'; 3980];
            let filler = core::str::from_utf8(&filler).unwrap_or_default();
            for i in 0..lines {
                let _ = writeln!(console, "flood {i:>10} {filler}");
            }
            exit(0)
        }
        Mode::FillCanary => {
            let (start, end) = (boot.heap_start, boot.heap_end);
            let words = ((end - start) / 8) as usize;
            // SAFETY: [heap_start, heap_end) is mapped and ours; nothing allocates after this,
            // so overwriting the allocator's own bookkeeping is harmless.
            let heap = unsafe { core::slice::from_raw_parts_mut(start as *mut u64, words) };
            heap.fill(CANARY);
            let _ = writeln!(console, "filled {} bytes with the canary", words * 8);
            exit(0)
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
