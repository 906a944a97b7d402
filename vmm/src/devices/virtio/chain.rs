//! Strict descriptor-chain walking. virtio-queue's own iterator stops quietly at a loop or a bad
//! address; here every such case is an error that names what the guest did.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::DeviceError;

/// One checked buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// The device writes it (the guest made it write-only).
    pub writable: bool,
}

/// Takes every chain the driver made available in queue `index`, each checked with [`walk`].
pub fn take_all(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
) -> Result<Vec<(u16, Vec<Buffer>)>, DeviceError> {
    let heads: Vec<u16> = q.iter(mem).map_err(|e| queue_error(index, e))?.map(|c| c.head_index()).collect();
    heads
        .into_iter()
        .map(|head| Ok((head, walk(mem, GuestAddress(q.desc_table()), q.size(), head)?)))
        .collect()
}

/// Takes the next available chain of queue `index`, if any, checked with [`walk`].
pub fn take_one(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
) -> Result<Option<(u16, Vec<Buffer>)>, DeviceError> {
    let head = q.iter(mem).map_err(|e| queue_error(index, e))?.next().map(|c| c.head_index());
    head.map(|head| Ok((head, walk(mem, GuestAddress(q.desc_table()), q.size(), head)?))).transpose()
}

/// Returns the chain at `head` to the driver with `len` bytes written.
pub fn complete(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    q.add_used(mem, head, len).map_err(|e| queue_error(index, e))
}

fn queue_error(index: usize, e: virtio_queue::Error) -> DeviceError {
    DeviceError::QueueInvalid { queue: index as u16, reason: e.to_string() }
}

/// Reads the chain that starts at `head` in the table at `table` of `size` entries, checking
/// every descriptor: index in range, no indirect, no loop, range inside guest memory.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Buffer>, DeviceError> {
    let mut buffers = Vec::new();
    let mut index = head;
    loop {
        if index >= size {
            return Err(DeviceError::IndexOutOfRange { index, size });
        }
        if buffers.len() >= usize::from(size) {
            return Err(DeviceError::ChainLoops { head, size });
        }
        let at = table.unchecked_add(u64::from(index) * 16);
        let raw: RawDescriptor = mem.read_obj(at).map_err(|e| DeviceError::Memory(e.to_string()))?;
        let desc = virtio_queue::desc::split::Descriptor::from(raw);
        let flags = u32::from(desc.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(DeviceError::Indirect);
        }
        let (addr, len) = (desc.addr().raw_value(), desc.len());
        let end = addr.checked_add(u64::from(len)).ok_or(DeviceError::LengthOverflow { index, addr, len })?;
        if len > 0 && !mem.address_in_range(GuestAddress(end - 1)) || !mem.address_in_range(desc.addr()) {
            return Err(DeviceError::OutOfMemory { index, addr, len });
        }
        buffers.push(Buffer { addr: desc.addr(), len, writable: flags & VRING_DESC_F_WRITE != 0 });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(buffers);
        }
        index = desc.next();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn put(mem: &GuestMemoryMmap, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = virtio_queue::desc::split::Descriptor::new(addr, len, flags, next);
        mem.write_obj(RawDescriptor::from(desc), GuestAddress(table + u64::from(index) * 16)).unwrap();
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn walks_a_valid_chain() {
        let m = mem();
        put(&m, 0x1000, 0, 0x8000, 16, NEXT, 1);
        put(&m, 0x1000, 1, 0x9000, 512, WRITE, 0);
        let chain = walk(&m, GuestAddress(0x1000), 8, 0).unwrap();
        assert_eq!(chain.len(), 2);
        assert!(!chain[0].writable && chain[1].writable);
    }

    #[test]
    fn refuses_a_loop() {
        let m = mem();
        put(&m, 0x1000, 0, 0x8000, 16, NEXT, 1);
        put(&m, 0x1000, 1, 0x9000, 16, NEXT, 0);
        assert_eq!(walk(&m, GuestAddress(0x1000), 8, 0), Err(DeviceError::ChainLoops { head: 0, size: 8 }));
    }

    #[test]
    fn refuses_out_of_memory_overflow_index_and_indirect() {
        let m = mem();
        put(&m, 0x1000, 0, 0xF_F000, 0x2000, 0, 0);
        assert!(matches!(walk(&m, GuestAddress(0x1000), 8, 0), Err(DeviceError::OutOfMemory { .. })));
        put(&m, 0x1000, 0, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(walk(&m, GuestAddress(0x1000), 8, 0), Err(DeviceError::LengthOverflow { .. })));
        put(&m, 0x1000, 0, 0x8000, 16, NEXT, 9);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(DeviceError::IndexOutOfRange { index: 9, size: 8 })
        );
        put(&m, 0x1000, 0, 0x8000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(walk(&m, GuestAddress(0x1000), 8, 0), Err(DeviceError::Indirect));
    }
}
