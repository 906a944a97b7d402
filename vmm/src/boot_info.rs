//! Writes what the guest finds at boot: the GDT and TSS, the page tables, the boot-info block
//! and the argument block, all at the fixed addresses of [`cella_abi::layout`].

use cella_abi::{layout, BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{gdt, paging};

/// Why the boot structures could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    #[error(
        "guest image ends at {image_end:#x}; with a {}-KiB stack and a {}-KiB heap it needs at \
         least {needed_mib} MiB of guest memory, but the VM has {mem_mib} MiB",
        layout::STACK_SIZE >> 10,
        layout::MIN_HEAP_SIZE >> 10
    )]
    ImageDoesNotFit { image_end: u64, needed_mib: u64, mem_mib: u64 },
    #[error("cannot write the {what} into guest memory")]
    Write { what: &'static str, source: vm_memory::GuestMemoryError },
}

/// Where the image, heap and stack go in `mem_size` bytes, as the guest will be told.
pub fn plan(
    mem_size: u64,
    image_start: u64,
    image_end: u64,
    args_len: usize,
    argc: usize,
) -> Result<BootInfo, BootInfoError> {
    let heap_start = image_end.next_multiple_of(layout::PAGE_SIZE);
    let needed = heap_start + layout::MIN_HEAP_SIZE + layout::STACK_SIZE;
    if needed > mem_size {
        return Err(BootInfoError::ImageDoesNotFit {
            image_end,
            needed_mib: needed.div_ceil(1 << 20),
            mem_mib: mem_size >> 20,
        });
    }
    Ok(BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        size: BootInfo::SIZE as u32,
        mem_size,
        image_start,
        image_end,
        heap_start,
        heap_end: mem_size - layout::STACK_SIZE,
        stack_top: mem_size,
        args_addr: layout::ARGS_ADDR,
        args_len: args_len as u32,
        argc: argc as u32,
        ..Default::default()
    })
}

/// Writes the descriptor tables, page tables, boot-info and arguments.
pub fn write(memory: &GuestMemoryMmap, info: &BootInfo, args: &[u8]) -> Result<(), BootInfoError> {
    let put = |what, addr: u64, bytes: &[u8]| {
        memory.write_slice(bytes, GuestAddress(addr)).map_err(|source| BootInfoError::Write { what, source })
    };
    put("GDT", layout::GDT_ADDR, &gdt::table_bytes())?;
    put("TSS", layout::TSS_ADDR, &gdt::tss_bytes())?;
    for table in paging::build(info.mem_size) {
        put("page tables", table.addr, &table.to_bytes())?;
    }
    put("boot-info block", layout::BOOT_INFO_ADDR, &info.to_bytes())?;
    put("arguments", layout::ARGS_ADDR, args)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_puts_heap_after_the_image_and_stack_at_the_top() {
        let info = plan(128 << 20, 0x20_0000, 0x20_6a00, 7, 2).unwrap();
        assert_eq!(info.heap_start, 0x20_7000);
        assert_eq!(info.heap_end, (128 << 20) - layout::STACK_SIZE);
        assert_eq!(info.stack_top, 128 << 20);
        assert!(info.is_valid());
    }

    #[test]
    fn plan_refuses_an_image_that_does_not_fit() {
        let err = plan(8 << 20, 0x20_0000, 0x70_0000, 0, 0).unwrap_err();
        assert!(err.to_string().contains("needs at least 9 MiB"), "{err}");
    }
}
