//! The read-only block device: reads go straight from the host file into guest memory with
//! `pread`, many requests per notify.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use cella_abi::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::request::{self, Request, SECTOR};
use crate::devices::virtio::chain::{self, Buffer};
use crate::devices::virtio::{read_config_bytes, DeviceError, DeviceState, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::StateError;

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;

/// A read-only virtio-blk device over one file.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    size: u64,
    id: [u8; 20],
}

/// The block device in a snapshot: which file backs it and how big it was. The guest may hold
/// cached sectors and offsets, so a restore needs the same file at the same size.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub size: u64,
}

impl Block {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut block = Block::from_file(File::open(path)?)?;
        block.path = path.to_owned();
        Ok(block)
    }

    /// Serves `file`, already open (handed over as a descriptor), which must be a regular file.
    /// It has no path; a snapshot of its VM records an empty one.
    pub fn from_file(file: File) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the disk is not a regular file",
            ));
        }
        let mut id = [0u8; 20];
        let name = b"cella-artifact";
        id[..name.len()].copy_from_slice(name);
        Ok(Block { file, path: PathBuf::new(), size: meta.len(), id })
    }

    /// Reopens the disk a snapshot names (or `path_override`, the same content at another
    /// path). A missing disk or one whose size changed is refused: the guest's view of it
    /// (capacity, what it already read) would no longer hold.
    pub fn restore(state: &BlockState, path_override: Option<&Path>) -> Result<Self, StateError> {
        let path = path_override.unwrap_or(&state.path);
        let block = Block::open(path).map_err(|source| StateError::Disk { path: path.to_owned(), source })?;
        block.same_size_as(state, path)
    }

    /// [`Block::restore`] on a disk file handed over as a descriptor.
    pub fn restore_file(state: &BlockState, file: File) -> Result<Self, StateError> {
        let path = Path::new("(the disk descriptor)");
        let block =
            Block::from_file(file).map_err(|source| StateError::Disk { path: path.to_owned(), source })?;
        block.same_size_as(state, path)
    }

    /// The restored disk, if it is as large as the saved one.
    fn same_size_as(self, state: &BlockState, path: &Path) -> Result<Self, StateError> {
        let block = self;
        if block.size != state.size {
            return Err(StateError::DiskResized {
                path: path.to_owned(),
                saved: state.size,
                now: block.size,
            });
        }
        Ok(block)
    }

    /// Size of the backing file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn capacity_sectors(&self) -> u64 {
        self.size.div_ceil(SECTOR)
    }

    /// Carries out one request; returns the status byte and the bytes written to the guest.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        match req.kind {
            request::TYPE_IN => {
                let len = req.data_len();
                let start = req.sector.checked_mul(SECTOR);
                let fits = start
                    .and_then(|s| s.checked_add(len))
                    .is_some_and(|end| end <= self.capacity_sectors() * SECTOR);
                if !len.is_multiple_of(SECTOR) || !fits {
                    return (request::STATUS_IOERR, 0);
                }
                let mut offset = start.unwrap_or(0);
                for buffer in &req.data {
                    if self.read_into(mem, buffer, offset).is_err() {
                        return (request::STATUS_IOERR, 0);
                    }
                    offset += u64::from(buffer.len);
                }
                (request::STATUS_OK, len as u32)
            }
            request::TYPE_GET_ID => match req.data.first() {
                Some(b) if b.writable => {
                    let n = (b.len as usize).min(self.id.len());
                    match mem.write_slice(&self.id[..n], b.addr) {
                        Ok(()) => (request::STATUS_OK, n as u32),
                        Err(_) => (request::STATUS_IOERR, 0),
                    }
                }
                _ => (request::STATUS_IOERR, 0),
            },
            request::TYPE_FLUSH => (request::STATUS_OK, 0),
            request::TYPE_OUT => (request::STATUS_IOERR, 0),
            _ => (request::STATUS_UNSUPP, 0),
        }
    }

    /// Reads file bytes at `offset` into `buffer`; past the end of the file reads as zeros.
    fn read_into(&self, mem: &GuestMemoryMmap, buffer: &Buffer, offset: u64) -> std::io::Result<()> {
        let slice = mem
            .get_slice(buffer.addr, buffer.len as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let guard = slice.ptr_guard_mut();
        let mut done = 0usize;
        while done < buffer.len as usize {
            // SAFETY: `guard` points at `buffer.len` bytes of mapped guest memory (checked by
            // get_slice); pread writes at most the remaining length into it.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    buffer.len as usize - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    let rest = buffer.len as usize - done;
                    let zeros = vec![0u8; rest];
                    mem.write_slice(&zeros, GuestAddress(buffer.addr.0 + done as u64))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    return Ok(());
                }
                _ => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.capacity_sectors().to_le_bytes(), offset, data);
    }

    fn notify(
        &mut self,
        queue: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        let q = &mut queues[queue];
        for (head, buffers) in chain::take_all(q, mem, queue)? {
            let req = Request::parse(mem, &buffers)?;
            let (status, written) = self.execute(mem, &req);
            mem.write_obj(status, req.status.addr).map_err(|e| DeviceError::Memory(e.to_string()))?;
            chain::complete(q, mem, queue, head, written + 1)?;
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Block(BlockState { path: self.path.clone(), size: self.size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_refuses_a_missing_or_resized_disk() {
        let dir = std::env::temp_dir().join(format!("cella-blk-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("artifact.tar");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let DeviceState::Block(state) = Block::open(&path).unwrap().save_state() else {
            panic!("not a block state")
        };
        assert_eq!(state, BlockState { path: path.clone(), size: 5000 });
        assert_eq!(Block::restore(&state, None).unwrap().size(), 5000);

        let copy = dir.join("copy.tar");
        std::fs::copy(&path, &copy).unwrap();
        assert!(Block::restore(&state, Some(&copy)).is_ok());

        std::fs::write(&path, vec![7u8; 6000]).unwrap();
        let err = Block::restore(&state, None).unwrap_err();
        assert!(matches!(err, StateError::DiskResized { saved: 5000, now: 6000, .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = Block::restore(&state, None).unwrap_err();
        assert!(matches!(err, StateError::Disk { .. }), "{err}");
        assert!(err.to_string().contains("cannot open the disk"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
