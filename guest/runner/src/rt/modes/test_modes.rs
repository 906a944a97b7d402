//! The test modes (`fault`, `spin`, `flood`, `heap-hash`, `fill-canary`, `read-disk`,
//! `vsock-echo`, `vsock-serve`, `hostile`): guests that misbehave on purpose, or report what
//! they see, for the VMM's tests. Built only with the `test-modes` feature: into the
//! `cella-runner` and `cella-scanner-test` images, never into the `cella-scanner` image the
//! service runs.

use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::Write;

use cella_abi::{layout, status, BootInfo};
use core::sync::atomic::{AtomicU64, Ordering};

use cella_runner::mode::{fnv1a64, HelperTest, Hostile, Mode, CANARY, FNV_OFFSET, HELPER_SUM_TERMS};

use super::{fail, CLOSE_TIMEOUT_MS};
use crate::rt::console::Console;
use crate::rt::entry::exit;
use crate::rt::virtio::blk::Blk;
use crate::rt::virtio::vsock::Vsock;
use crate::rt::virtio::Mmio;

/// Runs one of the test modes (the caller sends every other mode elsewhere).
pub fn run(mode: Mode<'_>, boot: &BootInfo, console: &mut Console) -> ! {
    match mode {
        Mode::ReadDisk => read_disk(boot, console),
        Mode::VsockEcho(port) => echo(boot, console, port, false),
        Mode::VsockServe(port) => echo(boot, console, port, true),
        Mode::Hostile(kind) => hostile(boot, console, kind),
        Mode::Helper(kind) => helper(boot, console, kind),
        Mode::Fault => fault(boot),
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
        Mode::HeapHash => heap_hash(boot, console),
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
        _ => {
            let _ = writeln!(console, "cella-runner: not a test mode");
            exit(status::USAGE)
        }
    }
}

/// Loads from an unmapped address: a page fault, which with no IDT is a triple fault that
/// ends the VM.
fn fault(boot: &BootInfo) -> ! {
    let unmapped = boot.mem_size + layout::LARGE_PAGE_SIZE;
    // SAFETY: not safe at all, on purpose: the load faults and the VM ends.
    unsafe {
        asm!("mov {tmp}, qword ptr [{addr}]", addr = in(reg) unmapped, tmp = out(reg) _, options(nostack))
    };
    exit(status::PANIC)
}

/// `helper KIND`: a task on every vCPU; the helper's part sums, faults or spins.
fn helper(boot: &BootInfo, console: &mut Console, kind: HelperTest) -> ! {
    let vcpus = crate::rt::helper::count();
    let sums = [AtomicU64::new(0), AtomicU64::new(0)];
    crate::rt::helper::run(&|w| match (kind, w) {
        (HelperTest::Fault, 1) => fault(boot),
        (HelperTest::Spin, 1) => loop {
            core::hint::spin_loop();
        },
        _ => {
            // Worker w adds the terms w, w + vcpus, ...: together, every term once.
            let (mut sum, mut term) = (0u64, w as u64);
            while term < HELPER_SUM_TERMS {
                sum = core::hint::black_box(sum.wrapping_add(term));
                term += vcpus as u64;
            }
            sums[w].store(sum, Ordering::Release);
        }
    });
    let [a, b] = sums.map(|s| s.load(Ordering::Acquire));
    let _ = writeln!(console, "vcpus {vcpus}: sums {a} {b}");
    exit(0)
}

/// Hashes the heap word by word (volatile reads: live allocations are in there) before
/// allocating anything, and counts the words that hold the canary.
fn heap_hash(boot: &BootInfo, console: &mut Console) -> ! {
    let (mut hash, mut canary_words) = (FNV_OFFSET, 0u64);
    let mut addr = boot.heap_start;
    while addr + 8 <= boot.heap_end {
        // SAFETY: [heap_start, heap_end) is mapped guest memory; an aligned volatile read of
        // a word there has no effect on anything else.
        let word = unsafe { core::ptr::read_volatile(addr as *const u64) };
        hash = fnv1a64(hash, &word.to_le_bytes());
        canary_words += u64::from(word == CANARY);
        addr += 8;
    }
    let _ = writeln!(
        console,
        "heap: {} bytes, fnv1a64 {hash:#018x}, canary words {canary_words}",
        boot.heap_end - boot.heap_start
    );
    exit(0)
}

fn read_disk(boot: &BootInfo, console: &mut Console) -> ! {
    let mut disk = Blk::open(boot).unwrap_or_else(|e| fail(console, "virtio-blk", e));
    let mut buf = alloc::vec![0u8; 4 << 20];
    let (mut offset, mut hash) = (0u64, FNV_OFFSET);
    while offset < disk.capacity() {
        let n = ((disk.capacity() - offset) as usize).min(buf.len());
        disk.read(offset, &mut buf[..n]).unwrap_or_else(|e| fail(console, "virtio-blk read", e));
        hash = fnv1a64(hash, &buf[..n]);
        offset += n as u64;
    }
    let _ = writeln!(console, "disk: {} bytes, fnv1a64 {hash:#018x}", disk.capacity());
    exit(0)
}

/// Echoes one connection: outgoing to host `port`, or (`listen`) accepted on guest `port`.
fn echo(boot: &BootInfo, console: &mut Console, port: u32, listen: bool) -> ! {
    let mut vsock = Vsock::open(boot).unwrap_or_else(|e| fail(console, "virtio-vsock", e));
    let conn = if listen {
        vsock.listen(port);
        vsock.accept(30_000)
    } else {
        vsock.connect(port, 5_000)
    }
    .unwrap_or_else(|e| fail(console, "vsock connect", e));
    let mut total = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match vsock.recv(conn, &mut buf, 1 << 20, 30_000) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                vsock.send(conn, &buf).unwrap_or_else(|e| fail(console, "vsock send", e));
            }
            Err(e) => fail(console, "vsock recv", e),
        }
    }
    vsock.close(conn, CLOSE_TIMEOUT_MS);
    let _ = writeln!(console, "echoed {total} bytes");
    exit(0)
}

fn hostile(boot: &BootInfo, console: &mut Console, kind: Hostile) -> ! {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    if kind == Hostile::QueueSize {
        let mmio =
            Mmio::find(boot, cella_abi::VIRTIO_ID_BLOCK).unwrap_or_else(|e| fail(console, "virtio-blk", e));
        mmio.negotiate();
        mmio.select_queue(0);
        mmio.setup_queue(100, (0x10_0000, 0x10_1000, 0x10_2000));
        mmio.set_status(Mmio::driver_ok_status());
        exit(status::PANIC)
    }
    let mut disk = Blk::open(boot).unwrap_or_else(|e| fail(console, "virtio-blk", e));
    let header = [0u8; 16];
    let mut status_byte = [0u8; 1];
    let (h, s) = (header.as_ptr() as u64, status_byte.as_mut_ptr() as u64);
    let (mmio, queue) = disk.parts();
    match kind {
        Hostile::LoopChain => {
            queue.write_desc(0, h, 16, NEXT, 1);
            queue.write_desc(1, s, 1, WRITE | NEXT, 0);
        }
        Hostile::OutsideMemory => {
            queue.write_desc(0, boot.mem_size + 0x1000, 16, NEXT, 1);
            queue.write_desc(1, s, 1, WRITE, 0);
        }
        Hostile::LengthOverflow => {
            queue.write_desc(0, u64::MAX - 8, 4096, NEXT, 1);
            queue.write_desc(1, s, 1, WRITE, 0);
        }
        Hostile::WrongDirection => {
            queue.write_desc(0, h, 16, WRITE | NEXT, 1);
            queue.write_desc(1, s, 1, WRITE, 0);
        }
        Hostile::BadNotify => {
            mmio.notify(5);
            exit(status::PANIC)
        }
        Hostile::QueueSize => unreachable!(),
    }
    queue.publish(0);
    mmio.notify(0);
    let _ = writeln!(console, "cella-runner: the device accepted a hostile request ({kind:?})");
    exit(status::PANIC)
}
