//! Identity-mapped page tables for a CPL-3 guest: every byte of guest memory is mapped at its
//! own address with the user bit set, except page 0 (so a null access faults) and the helper
//! vCPU's stack guard ([`HELPER_STACK_GUARD`], so its overflow faults). Memory is
//! mapped with 2 MiB pages, and with 4 KiB pages in the first 2 MiB and in a partial last
//! 2 MiB. Beyond the end of memory only the device window is mapped (one 2 MiB page at
//! [`cella_abi::layout::mmio_base`], whose accesses exit to the VMM); any other access faults.

use cella_abi::layout::{
    mmio_base, HELPER_STACK_GUARD, LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_END, PDPT_ADDR, PD_BASE_ADDR,
    PML4_ADDR, PT_LOW_ADDR, PT_TAIL_ADDR,
};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
const GIB: u64 = 1 << 30;

/// The largest guest memory these tables can map (page directories, one per GiB plus one for
/// the device window, must fit below 1 MiB).
pub const MAX_MAPPED: u64 = ((PAGE_TABLES_END - PD_BASE_ADDR) / PAGE_SIZE - 1) * GIB;

/// One 4 KiB table and the guest address it goes to.
#[derive(Debug)]
pub struct Table {
    pub addr: u64,
    pub entries: Box<[u64; 512]>,
}

impl Table {
    fn new(addr: u64) -> Self {
        Table { addr, entries: Box::new([0; 512]) }
    }

    /// The table as the bytes to write into guest memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

/// Builds the tables that map `mem_size` bytes. `mem_size` must be a multiple of 4 KiB,
/// above 2 MiB and at most [`MAX_MAPPED`] (the VMM's configuration check ensures it).
pub fn build(mem_size: u64) -> Vec<Table> {
    assert!(mem_size.is_multiple_of(PAGE_SIZE) && mem_size > LARGE_PAGE_SIZE && mem_size <= MAX_MAPPED);
    let mut pml4 = Table::new(PML4_ADDR);
    let mut pdpt = Table::new(PDPT_ADDR);
    pml4.entries[0] = PDPT_ADDR | TABLE_FLAGS;

    let mut tables = Vec::new();
    let mut pt_low = Table::new(PT_LOW_ADDR);
    let mut pt_tail = None;
    let gibs = mem_size.div_ceil(GIB);
    for gib in 0..gibs {
        let mut pd = Table::new(PD_BASE_ADDR + gib * PAGE_SIZE);
        pdpt.entries[gib as usize] = pd.addr | TABLE_FLAGS;
        for slot in 0..512u64 {
            let start = gib * GIB + slot * LARGE_PAGE_SIZE;
            if start >= mem_size {
                break;
            }
            pd.entries[slot as usize] = if start == 0 {
                fill_small_pages(&mut pt_low, 0, mem_size, PAGE_SIZE);
                PT_LOW_ADDR | TABLE_FLAGS
            } else if start + LARGE_PAGE_SIZE > mem_size {
                let mut pt = Table::new(PT_TAIL_ADDR);
                fill_small_pages(&mut pt, start, mem_size, start);
                pt_tail = Some(pt);
                PT_TAIL_ADDR | TABLE_FLAGS
            } else {
                start | TABLE_FLAGS | LARGE
            };
        }
        tables.push(pd);
    }
    let window = mmio_base(mem_size);
    let mut pd = Table::new(PD_BASE_ADDR + (window / GIB) * PAGE_SIZE);
    pdpt.entries[(window / GIB) as usize] = pd.addr | TABLE_FLAGS;
    pd.entries[0] = window | TABLE_FLAGS | LARGE;
    tables.push(pd);
    tables.extend([pml4, pdpt, pt_low]);
    tables.extend(pt_tail);
    tables
}

/// Maps the 4 KiB pages of the 2 MiB chunk at `chunk` from `first` up to `mem_size`.
fn fill_small_pages(pt: &mut Table, chunk: u64, mem_size: u64, first: u64) {
    for page in 0..512u64 {
        let addr = chunk + page * PAGE_SIZE;
        if addr >= first && addr < mem_size && addr != HELPER_STACK_GUARD {
            pt.entries[page as usize] = addr | TABLE_FLAGS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does; returns the physical address or `None`.
    fn translate(tables: &[Table], va: u64) -> Option<u64> {
        let table = |addr: u64| tables.iter().find(|t| t.addr == addr).expect("table exists");
        let pick = |e: u64| (e & PRESENT == 1).then_some(e & !0xFFF & ((1 << 52) - 1));
        let pml4e = table(PML4_ADDR).entries[((va >> 39) & 511) as usize];
        let pdpte = table(pick(pml4e)?).entries[((va >> 30) & 511) as usize];
        let pde = table(pick(pdpte)?).entries[((va >> 21) & 511) as usize];
        if pde & LARGE != 0 {
            assert_eq!(pde & USER, USER);
            return Some(pick(pde)? + (va & (LARGE_PAGE_SIZE - 1)));
        }
        let pte = table(pick(pde)?).entries[((va >> 12) & 511) as usize];
        assert!(pte == 0 || pte & USER == USER);
        Some(pick(pte)? + (va & 0xFFF))
    }

    #[test]
    fn maps_all_memory_at_its_own_address_but_page_zero() {
        let mem = 128 << 20;
        let tables = build(mem);
        assert_eq!(translate(&tables, 0x10), None);
        assert_eq!(translate(&tables, HELPER_STACK_GUARD + 0x10), None, "the helper stack's guard");
        assert_eq!(translate(&tables, HELPER_STACK_GUARD - 8), Some(HELPER_STACK_GUARD - 8));
        assert_eq!(translate(&tables, HELPER_STACK_GUARD + 0x1000), Some(HELPER_STACK_GUARD + 0x1000));
        for va in [0x1000, 0x3008, 0x1F_FFFF, 0x20_0000, 0x543_2100, mem - 8] {
            assert_eq!(translate(&tables, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&tables, mem), None);
        assert_eq!(translate(&tables, mem + LARGE_PAGE_SIZE), None);
    }

    #[test]
    fn device_window_is_mapped_after_memory_and_nothing_else() {
        let mem = 128 << 20;
        let tables = build(mem);
        assert_eq!(translate(&tables, GIB + 0x1050), Some(GIB + 0x1050));
        assert_eq!(translate(&tables, GIB + LARGE_PAGE_SIZE), None);
        let big = build(4 * GIB);
        assert_eq!(translate(&big, 4 * GIB + 0x10), Some(4 * GIB + 0x10));
    }

    #[test]
    fn partial_last_chunk_is_mapped_exactly() {
        let mem = (129 << 20) + 0x5000;
        let tables = build(mem);
        assert_eq!(translate(&tables, mem - 0x1000), Some(mem - 0x1000));
        assert_eq!(translate(&tables, mem), None);
    }

    #[test]
    fn memory_above_one_gib_uses_more_directories() {
        let mem = 3 * GIB + (2 << 20);
        let tables = build(mem);
        assert_eq!(translate(&tables, 2 * GIB + 0x1234), Some(2 * GIB + 0x1234));
        assert_eq!(translate(&tables, mem - 1), Some(mem - 1));
        assert_eq!(translate(&tables, mem), None);
        assert!(tables.iter().all(|t| t.addr < PAGE_TABLES_END));
    }
}
