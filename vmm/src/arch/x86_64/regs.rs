//! The vCPU's registers at the guest's first instruction: long mode, paging on, CPL 3, IOPL 3,
//! SSE usable, no IDT.

use cella_abi::{gdt, layout};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt as table;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Special registers: segments from the GDT at ring 3, paging from the PML4, no IDT (so any
/// exception is a triple fault that ends the VM).
pub fn special(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = table::segment(gdt::USER_CODE);
    let data = table::segment(gdt::USER_DATA);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = table::task_register();
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt::ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers: start at `entry` with the stack at `stack_top - 8` (as if called), IOPL 3
/// so the guest may use `in`/`out`, interrupts off. `rdi` carries the boot-info address and
/// `rsi` the vCPU's index (0 for the boot vCPU, 1 for a helper).
pub fn general(entry: u64, stack_top: u64, index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top - 8,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        rdi: layout::BOOT_INFO_ADDR,
        rsi: index,
        ..Default::default()
    }
}

/// x87 and SSE control words at their reset values.
pub fn fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37F, mxcsr: 0x1F80, ..Default::default() }
}
