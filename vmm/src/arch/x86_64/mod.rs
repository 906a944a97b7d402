//! x86-64 boot state for a guest that runs at CPL 3 in long mode (see PLATFORM.md): a GDT with
//! ring-3 segments, identity-mapped page tables with the U bit, and the registers to enter it.

pub mod gdt;
pub mod paging;
pub mod regs;
