//! Snapshots: a paused microVM written to a directory, and a microVM rebuilt from one.
//!
//! A snapshot directory holds two files:
//! - `state.bin` ([`format`]): magic, format version, the VMM version, then a JSON body with
//!   the vCPU state (and the CPU features it needs), every device's state, the guest memory
//!   size and launch details, and a SHA-256 of all of it. Read with a size limit.
//! - `memory.bin` ([`memory_file`]): guest memory as a sparse file the size of guest memory;
//!   only pages that are not all zeros hold blocks.
//!
//! [`create`] writes both under temporary names, fsyncs them, renames them into place and
//! fsyncs the directory, so a crash leaves either the previous snapshot or the new one. A
//! restore ([`restore::load`]) maps `memory.bin` privately as the new VM's memory, so it costs
//! milliseconds whatever the memory size; the guest's pages come in from the file when it
//! touches them. Files are never rewritten in place: a VM restored from a snapshot keeps
//! reading its file, so a new snapshot into the same directory replaces the names, not the
//! bytes. [`remove`] deletes a snapshot (zeroing and punching out the memory file first).
//!
//! Building blocks, in the order a snapshot is taken: [`vcpu_state::save`] on the parked vCPU
//! thread, [`IoBus::save_state`], then [`create`]. The vCPU must have been parked by a
//! `KVM_RUN` with `immediate_exit` set after its last handled exit, so that KVM has completed
//! that exit's I/O (see [`vcpu_state`]).

pub mod bench;
pub mod cpu;
pub mod format;
pub mod memory_file;
pub mod restore;
pub mod vcpu_state;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::devices::{IoBus, StateError};
use crate::scrub::ScrubError;
use crate::vstate::memory::{GuestMemfd, MemoryError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::VmError;

pub use format::{SnapshotState, FORMAT_VERSION, MAX_STATE_FILE};
pub use restore::{load, load_files, Ahead, RestoreOptions, SnapshotFiles};

pub use vcpu_state::VcpuState;

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = cella_host::client::SNAPSHOT_STATE;
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = cella_host::client::SNAPSHOT_MEMORY;
/// The state file's name while it is written (renamed to [`STATE_FILE`] once complete).
const STATE_TMP: &str = cella_host::client::SNAPSHOT_STATE_TMP;
/// The memory file's name while it is written (renamed to [`MEMORY_FILE`] once complete).
const MEMORY_TMP: &str = cella_host::client::SNAPSHOT_MEMORY_TMP;

/// Why a snapshot could not be taken, read or restored. Each names the file and says what to
/// do; a failed snapshot leaves the VM untouched and no partial file behind.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    // --- reading the state file ---
    #[error("no snapshot state file at {path}; is this a snapshot directory?")]
    MissingStateFile { path: PathBuf },
    #[error("cannot read the snapshot state file {path}")]
    ReadState { path: PathBuf, source: io::Error },
    #[error("{path} is {size} bytes, over the {max}-byte limit for a snapshot state file; it is not one Cella wrote")]
    Oversize { path: PathBuf, size: u64, max: u64 },
    #[error("{path} is not a Cella snapshot state file (wrong magic number)")]
    BadMagic { path: PathBuf },
    #[error(
        "{path} has snapshot format version {found}; this VMM reads version {supported} only: \
         restore it with the VMM version that wrote it"
    )]
    UnsupportedFormat { path: PathBuf, found: u32, supported: u32 },
    #[error("{path} is truncated: {size} bytes, the header says {expected}; the snapshot is incomplete, take a new one")]
    Truncated { path: PathBuf, size: u64, expected: u64 },
    #[error("{path} is corrupt (checksum mismatch); take a new snapshot")]
    Corrupt { path: PathBuf },
    #[error(
        "{path} was written by cella-vmm {snapshot}, this is cella-vmm {running}; restore it with \
         cella-vmm {snapshot}"
    )]
    VmmVersion { path: PathBuf, snapshot: String, running: String },
    #[error(
        "{path} passes its checksum but its contents do not parse ({reason}); it was not written by this VMM"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "this host lacks CPU features the snapshot was taken with: {missing}; restore it on a \
         host with the same CPU model (or newer, same vendor)"
    )]
    CpuFeaturesMissing { missing: String },

    // --- the memory file ---
    #[error("the snapshot memory file {path} is missing; the snapshot is incomplete and cannot be restored")]
    MissingMemoryFile { path: PathBuf },
    #[error(
        "the snapshot memory file {path} is {actual} bytes but the guest had {expected}; the \
         snapshot is damaged, take a new one"
    )]
    MemoryFileSize { path: PathBuf, expected: u64, actual: u64 },
    #[error(
        "no space left on the device for {path}; the partial snapshot was removed and the VM \
         keeps running: free space or choose another snapshot directory"
    )]
    NoSpace { path: PathBuf },
    #[error("cannot write {path}; the partial snapshot was removed and the VM keeps running")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read guest memory at offset {offset:#x} for the snapshot")]
    ReadMemory { offset: u64, source: io::Error },
    #[error("cannot list the guest pages that hold data")]
    MemoryRanges(#[source] ScrubError),
    #[error("cannot create the snapshot directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot remove the snapshot file {path}")]
    Remove { path: PathBuf, source: io::Error },

    // --- the vCPU ---
    #[error("cannot read the vCPU's {what} from KVM")]
    GetVcpu { what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM refused the saved {what} for the vCPU")]
    SetVcpu { what: &'static str, source: kvm_ioctls::Error },
    #[error(
        "KVM refused to restore MSR {index:#x}; the host's KVM differs from the one that took the snapshot"
    )]
    SetMsr { index: u32 },
    #[error("the saved vCPU state is inconsistent: {0}")]
    BadVcpuState(String),

    // --- rebuilding the VM ---
    #[error("cannot create the VM")]
    Vm(#[from] VmError),
    #[error("cannot map the snapshot's memory")]
    Memory(#[from] MemoryError),
    #[error("cannot create the vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("cannot restore the devices")]
    Device(#[from] StateError),
    #[error("cannot create the device bus")]
    Bus(#[source] io::Error),
    #[error("the snapshot's VM has a {0}, but no descriptor for it came with the load; hand it over")]
    NotHandedOver(&'static str),
}

impl SnapshotError {
    /// An error for a failed write to `path`, naming a full disk as such.
    fn write(path: &Path, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            SnapshotError::NoSpace { path: path.to_owned() }
        } else {
            SnapshotError::Write { path: path.to_owned(), source }
        }
    }
}

/// What the caller knows about the VM that the snapshot should carry (informational: a restore
/// needs only the state and memory files).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The guest image the VM was launched from.
    pub image: Option<PathBuf>,
    /// The guest's boot arguments.
    pub args: Vec<String>,
    /// Free text (a session id, say).
    pub label: Option<String>,
}

/// What [`create`] wrote and how long it took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    /// Size of `state.bin`.
    pub state_bytes: u64,
    /// Guest memory size (the apparent size of `memory.bin`).
    pub mem_bytes: u64,
    /// Bytes of non-zero pages written to `memory.bin`.
    pub memory_bytes_written: u64,
    /// Pages written to `memory.bin`.
    pub memory_pages: u64,
    /// What `memory.bin` occupies on disk (`st_blocks * 512`).
    pub memory_disk_bytes: u64,
    /// Time to write and fsync `memory.bin`, in ms.
    pub memory_ms: f64,
    /// Time to encode, write and fsync `state.bin`, in ms.
    pub state_ms: f64,
    /// Wall time of the whole snapshot, in ms.
    pub total_ms: f64,
}

/// Writes a snapshot of a paused VM into `dir` (created if needed): `memory.bin` from
/// `memory`, then `state.bin` from `vcpu`, the devices on `bus` and `meta`. Both are written
/// under temporary names and fsynced, then renamed into place (memory first: a `state.bin`
/// always names a complete memory file) and the directory is fsynced. On error nothing new is
/// left in `dir` and the VM is untouched.
pub fn create(
    dir: &Path,
    vcpu: VcpuState,
    bus: &IoBus,
    memory: &GuestMemfd,
    meta: SnapshotMeta,
) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir)
        .map_err(|source| SnapshotError::CreateDir { path: dir.to_owned(), source })?;
    let (memory_tmp, state_tmp) = (dir.join(MEMORY_TMP), dir.join(STATE_TMP));
    let result = (|| {
        let written = memory_file::write(memory, &memory_tmp)?;
        let state_started = Instant::now();
        let state = SnapshotState::new(vcpu, bus.save_state(), memory.size(), meta);
        let state_bytes = format::write(&state_tmp, &state)?;
        let state_ms = state_started.elapsed().as_secs_f64() * 1e3;
        rename(&memory_tmp, &dir.join(MEMORY_FILE))?;
        rename(&state_tmp, &dir.join(STATE_FILE))?;
        sync_dir(dir)?;
        Ok(SnapshotInfo {
            dir: dir.to_owned(),
            state_bytes,
            mem_bytes: memory.size(),
            memory_bytes_written: written.bytes_written,
            memory_pages: written.pages,
            memory_disk_bytes: written.disk_bytes,
            memory_ms: written.ms,
            state_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&memory_tmp);
        let _ = std::fs::remove_file(&state_tmp);
    }
    result
}

/// [`create`] into two files handed over as descriptors (new, empty, writable regular files,
/// e.g. `memory.bin.tmp` and `state.bin.tmp` that the caller made): both are written and
/// fsynced here; renaming them into place and syncing their folder is the caller's (a VMM
/// confined to no paths cannot). On error the files may hold part of a snapshot: the caller
/// removes them. `dir` is only reported.
pub fn create_into(
    files: SnapshotOutput,
    vcpu: VcpuState,
    bus: &IoBus,
    memory: &GuestMemfd,
    meta: SnapshotMeta,
) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    let SnapshotOutput { memory: memory_out, state: state_out } = files;
    let (memory_name, state_name) =
        (Path::new("(the memory descriptor)"), Path::new("(the state descriptor)"));
    for (file, name) in [(&memory_out, memory_name), (&state_out, state_name)] {
        let meta = file.metadata().map_err(|source| SnapshotError::write(name, source))?;
        if !meta.is_file() || meta.len() != 0 {
            let why = io::Error::other("not an empty regular file");
            return Err(SnapshotError::Write { path: name.to_owned(), source: why });
        }
    }
    let written = memory_file::write_to(memory, &memory_out, memory_name)?;
    let state_started = Instant::now();
    let state = SnapshotState::new(vcpu, bus.save_state(), memory.size(), meta);
    let state_bytes = format::write_to(&state_out, state_name, &state)?;
    Ok(SnapshotInfo {
        dir: PathBuf::new(),
        state_bytes,
        mem_bytes: memory.size(),
        memory_bytes_written: written.bytes_written,
        memory_pages: written.pages,
        memory_disk_bytes: written.disk_bytes,
        memory_ms: written.ms,
        state_ms: state_started.elapsed().as_secs_f64() * 1e3,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// The two files a snapshot is written into by [`create_into`].
#[derive(Debug)]
pub struct SnapshotOutput {
    pub memory: File,
    pub state: File,
}

fn rename(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    std::fs::rename(from, to).map_err(|source| SnapshotError::write(to, source))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| SnapshotError::write(dir, source))
}

/// What [`remove`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoveReport {
    /// Bytes of the memory file overwritten with zeros before it was punched out.
    pub bytes_zeroed: u64,
    pub ms: f64,
}

/// Deletes the snapshot in `dir` (call it when the session ends, after every VM restored from
/// it has ended: their clean pages are the file's). The memory file is the guest's memory at
/// rest, so it is not simply unlinked: its data ranges are overwritten with zeros first (so
/// the page-cache pages and, on a file system that writes in place, the blocks that held the
/// image hold zeros when freed; this host does not zero freed pages), then the whole file is
/// hole-punched and unlinked. Then `state.bin`, leftover temporary files and, if it is then
/// empty, the directory go. A missing file is not an error.
pub fn remove(dir: &Path) -> Result<RemoveReport, SnapshotError> {
    let started = Instant::now();
    let memory_path = dir.join(MEMORY_FILE);
    let mut bytes_zeroed = 0;
    for path in [dir.join(MEMORY_TMP), memory_path] {
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => {
                bytes_zeroed += zero_and_punch(&file)
                    .map_err(|source| SnapshotError::Remove { path: path.clone(), source })?;
                drop(file);
                remove_file(&path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SnapshotError::Remove { path, source }),
        }
    }
    for name in [STATE_FILE, STATE_TMP] {
        remove_file(&dir.join(name))?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(RemoveReport { bytes_zeroed, ms: started.elapsed().as_secs_f64() * 1e3 })
}

fn remove_file(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SnapshotError::Remove { path: path.to_owned(), source }),
    }
}

/// Overwrites every data range of `file` with zeros, syncs, then punches out the whole file.
fn zero_and_punch(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata()?.len();
    let ranges = crate::scrub::touched_ranges(file, size).map_err(io::Error::other)?;
    let zeros = vec![0u8; 1 << 20];
    let mut total = 0;
    for range in ranges {
        let mut offset = range.start;
        while offset < range.end {
            let n = ((range.end - offset) as usize).min(zeros.len());
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        total += range.end - range.start;
    }
    file.sync_data()?;
    // SAFETY: fallocate on a descriptor we own; the result is checked.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            size as libc::off_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(total)
}
