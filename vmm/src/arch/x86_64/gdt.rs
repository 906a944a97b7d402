//! The guest's GDT and TSS. The guest never reloads a segment and has no IDT, but VM entry
//! checks that the segment state KVM holds matches a real table, so the table is real.

use cella_abi::{gdt, layout, ports};
use kvm_bindings::kvm_segment;

/// Access byte bits.
const PRESENT: u64 = 1 << 47;
const DPL3: u64 = 3 << 45;
const CODE_OR_DATA: u64 = 1 << 44;
const EXEC_READ: u64 = 0xA << 40;
const READ_WRITE: u64 = 0x2 << 40;
/// Flag bits: 4 KiB granularity, 64-bit code, 32-bit default operand size (data).
const GRANULARITY: u64 = 1 << 55;
const LONG_MODE: u64 = 1 << 53;
const DEFAULT_32: u64 = 1 << 54;
/// Limit 0xFFFFF (with granularity: 4 GiB), split across the descriptor.
const FULL_LIMIT: u64 = 0xFFFF | (0xF << 48);

/// TSS type in the access byte: available (9) in the table, busy (11) in TR.
const TSS_AVAILABLE: u64 = 0x9 << 40;
const TSS_BUSY_TYPE: u8 = 0xB;
/// Bytes in a 64-bit TSS without its I/O bitmap.
const TSS_HEADER: usize = 104;
/// Offset of the I/O map base field in the TSS.
const IO_MAP_BASE_FIELD: usize = 102;
/// Bytes in the I/O permission bitmap: one bit per port below `PORT_LIMIT`.
const IO_BITMAP_LEN: usize = ports::PORT_LIMIT as usize / 8;
/// The TSS limit: header, bitmap, and the all-ones byte that must follow the bitmap.
const TSS_LIMIT: u64 = (TSS_HEADER + IO_BITMAP_LEN + 1 - 1) as u64;

fn code(dpl: u64) -> u64 {
    PRESENT | dpl | CODE_OR_DATA | EXEC_READ | GRANULARITY | LONG_MODE | FULL_LIMIT
}

fn data(dpl: u64) -> u64 {
    PRESENT | dpl | CODE_OR_DATA | READ_WRITE | GRANULARITY | DEFAULT_32 | FULL_LIMIT
}

/// The 16-byte TSS descriptor as two table slots.
fn tss(base: u64) -> [u64; 2] {
    let low =
        TSS_LIMIT | ((base & 0xFF_FFFF) << 16) | PRESENT | TSS_AVAILABLE | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

/// The table, slot by slot, in the order of the selectors in [`cella_abi::gdt`].
pub fn table() -> [u64; gdt::ENTRIES] {
    let [tss_low, tss_high] = tss(layout::TSS_ADDR);
    [0, code(0), data(0), code(DPL3), data(DPL3), tss_low, tss_high]
}

/// The table as bytes to write at [`layout::GDT_ADDR`].
pub fn table_bytes() -> Vec<u8> {
    table().iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The TSS, to write at [`layout::TSS_ADDR`]. Its I/O permission bitmap allows exactly
/// [`ports::GUEST_PORTS`]. With IOPL 3 real hardware would not consult it, but on this host
/// KVM's emulator does (PLATFORM.md: a PVM host), so without it every port above the 104-byte
/// TSS faults; with it, any port the guest should not touch faults in the guest.
pub fn tss_bytes() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_HEADER + IO_BITMAP_LEN + 1];
    tss[IO_MAP_BASE_FIELD..IO_MAP_BASE_FIELD + 2].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    tss[TSS_HEADER..].fill(0xFF);
    for (first, count) in ports::GUEST_PORTS {
        for port in first..first + count {
            tss[TSS_HEADER + usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    tss
}

/// Whether the TSS bitmap lets the guest use `port`.
pub fn port_allowed(tss: &[u8], port: u16) -> bool {
    let base = usize::from(u16::from_le_bytes([tss[IO_MAP_BASE_FIELD], tss[IO_MAP_BASE_FIELD + 1]]));
    tss.get(base + usize::from(port / 8)).is_some_and(|b| b & (1 << (port % 8)) == 0)
}

/// The hidden segment state KVM needs for the descriptor behind `selector`.
pub fn segment(selector: u16) -> kvm_segment {
    let index = usize::from(selector >> 3);
    let entry = table()[index];
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24);
    let raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16);
    let granular = bit(55) == 1;
    kvm_segment {
        base,
        limit: if granular { ((raw_limit << 12) | 0xFFF) as u32 } else { raw_limit as u32 },
        selector,
        type_: ((entry >> 40) & 0xF) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

/// TR: the TSS, marked busy as VM entry requires.
pub fn task_register() -> kvm_segment {
    let mut tr = segment(gdt::TSS);
    tr.base = layout::TSS_ADDR;
    tr.type_ = TSS_BUSY_TYPE;
    tr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_are_ring_3_long_mode_code_and_data() {
        let cs = segment(gdt::USER_CODE);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.s, cs.present, cs.type_), (3, 1, 0, 1, 1, 0xA));
        assert_eq!(cs.limit, 0xFFFF_FFFF);
        let ss = segment(gdt::USER_DATA);
        assert_eq!((ss.dpl, ss.l, ss.db, ss.type_), (3, 0, 1, 0x2));
        assert_eq!(segment(gdt::KERNEL_CODE).dpl, 0);
    }

    #[test]
    fn conventional_descriptors_have_their_known_encodings() {
        let t = table();
        assert_eq!(t[1], 0x00AF_9A00_0000_FFFF);
        assert_eq!(t[3], 0x00AF_FA00_0000_FFFF);
        assert_eq!(t[4], 0x00CF_F200_0000_FFFF);
    }

    #[test]
    fn task_register_points_at_the_tss() {
        let tr = task_register();
        assert_eq!((tr.base, tr.limit, tr.type_, tr.s), (layout::TSS_ADDR, TSS_LIMIT as u32, 0xB, 0));
        assert_eq!(tss_bytes().len(), TSS_LIMIT as usize + 1);
    }

    #[test]
    fn io_bitmap_allows_exactly_the_guest_ports() {
        let tss = tss_bytes();
        for port in [0x3f8, 0x3fd, 0x3ff, 0xf4, 0xf7, 0xe0, 0xe4, 0xe7, 0xe8, 0xec, 0xef, 0xf0] {
            assert!(port_allowed(&tss, port), "{port:#x}");
        }
        for port in [0x0, 0x80, 0xdf, 0xf8, 0x3f7, 0x400, 0xcf8, 0xffff] {
            assert!(!port_allowed(&tss, port), "{port:#x}");
        }
    }
}
