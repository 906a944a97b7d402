//! What a launch hands a spare VMM: the devices' host ends as file descriptors, sent with the
//! `PUT /vm` request over the control socket (`SCM_RIGHTS`), so a VMM that is already confined
//! never opens a path. The request's body says which descriptor is which ([`StartVm`]); the
//! VMM checks each one's kind (a regular file for the disk, a connected stream socket for a
//! vsock channel) before using it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::builder::HostEnds;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::vsock::Vsock;

pub use cella_host::fds::MAX_FDS;

/// Descriptors that came with one request, each taken once by the action that uses it; the
/// rest close when the last clone drops. Two are equal only if they are the same handover.
#[derive(Clone, Debug, Default)]
pub struct Handover(Arc<Mutex<Vec<Option<OwnedFd>>>>);

impl PartialEq for Handover {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Handover {}

impl Handover {
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        Handover(Arc::new(Mutex::new(fds.into_iter().map(Some).collect())))
    }

    /// How many descriptors came.
    pub fn len(&self) -> usize {
        self.0.lock().map_or(0, |fds| fds.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes descriptor `index` (None if there is none, or it was taken).
    fn take(&self, index: usize) -> Option<OwnedFd> {
        self.0.lock().ok()?.get_mut(index)?.take()
    }

    /// [`Handover::take`], or why not.
    fn taken(&self, index: usize) -> Result<OwnedFd, String> {
        self.take(index).ok_or_else(|| format!("descriptor {index} is gone"))
    }

    /// Checks that `named` names every descriptor that came, each exactly once.
    fn check_named(&self, named: &[usize]) -> Result<(), String> {
        let count = self.len();
        if let Some(bad) = named.iter().find(|&&fd| fd >= count) {
            return Err(format!("descriptor {bad} was named but {count} came with the request"));
        }
        let mut sorted = named.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != named.len() {
            return Err("a descriptor was named twice".into());
        }
        if named.len() != count {
            return Err(format!("{count} descriptors came with the request but {} were named", named.len()));
        }
        Ok(())
    }
}

/// `PUT /snapshot/create` into files handed over (new and empty; the caller renames them into
/// place): which descriptor is which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedSnapshotOutput {
    pub memory_fd: usize,
    pub state_fd: usize,
    pub fds: Handover,
}

impl HandedSnapshotOutput {
    /// Checks that both descriptors are named, each once.
    pub fn check(&self) -> Result<(), String> {
        self.fds.check_named(&[self.memory_fd, self.state_fd])
    }

    /// The two files (taken: a second call finds none).
    pub fn files(&self) -> Result<crate::snapshot::SnapshotOutput, String> {
        self.check()?;
        let memory = File::from(self.fds.taken(self.memory_fd)?);
        let state = File::from(self.fds.taken(self.state_fd)?);
        Ok(crate::snapshot::SnapshotOutput { memory, state })
    }
}

/// `PUT /snapshot/load` with the snapshot's files handed over: which descriptor is which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedSnapshot {
    /// The state file (`state.bin`).
    pub state_fd: usize,
    /// The memory file (`memory.bin`), mapped privately.
    pub memory_fd: usize,
    /// The disk, if the snapshot's VM had one.
    pub disk_fd: Option<usize>,
    /// A listening Unix stream socket for the vsock device, if the VM had one.
    pub vsock_fd: Option<usize>,
    pub fds: Handover,
}

impl HandedSnapshot {
    /// Checks that every descriptor is named exactly once.
    pub fn check(&self) -> Result<(), String> {
        let mut named = vec![self.state_fd, self.memory_fd];
        named.extend(self.disk_fd);
        named.extend(self.vsock_fd);
        self.fds.check_named(&named)
    }

    /// The files, each checked for its kind (taken: a second call finds none).
    pub fn files(&self) -> Result<crate::snapshot::SnapshotFiles, String> {
        self.check()?;
        let file = |index: usize, what: &str| -> Result<File, String> {
            let file = File::from(self.fds.taken(index)?);
            match file.metadata() {
                Ok(meta) if meta.is_file() => Ok(file),
                _ => Err(format!("descriptor {index} ({what}) is not a regular file")),
            }
        };
        let state = file(self.state_fd, "the state file")?;
        let memory = file(self.memory_fd, "the memory file")?;
        let disk = self.disk_fd.map(|index| file(index, "the disk")).transpose()?;
        let vsock = match self.vsock_fd {
            Some(index) => {
                let fd = self.fds.taken(index)?;
                check_listening_socket(&fd).map_err(|why| format!("descriptor {index} (vsock): {why}"))?;
                Some(std::os::unix::net::UnixListener::from(fd))
            }
            None => None,
        };
        Ok(crate::snapshot::SnapshotFiles { state, memory, disk, vsock })
    }
}

/// `PUT /vm` on a spare: attach these descriptors and start the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartVm {
    /// The descriptor to attach read-only as the disk (virtio-blk).
    pub disk_fd: Option<usize>,
    /// `(host port, descriptor)`: the guest's connection to that host port gets that stream.
    pub vsock_channels: Vec<(u32, usize)>,
    pub fds: Handover,
}

impl StartVm {
    /// Checks that every descriptor is named exactly once and every port once.
    pub fn check(&self) -> Result<(), String> {
        let mut named: Vec<usize> = self.disk_fd.into_iter().collect();
        named.extend(self.vsock_channels.iter().map(|(_, fd)| *fd));
        self.fds.check_named(&named)?;
        let mut ports: Vec<u32> = self.vsock_channels.iter().map(|(port, _)| *port).collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() != self.vsock_channels.len() {
            return Err("a vsock port was given two channels".into());
        }
        Ok(())
    }

    /// The devices' host ends, made from the descriptors (taken: a second call finds none).
    pub fn host_ends(&self) -> Result<HostEnds, String> {
        self.check()?;
        let take = |index: usize| self.fds.taken(index);
        let disk = match self.disk_fd {
            Some(index) => Some(
                Block::from_file(File::from(take(index)?))
                    .map_err(|e| format!("descriptor {index} cannot be the disk: {e}"))?,
            ),
            None => None,
        };
        let vsock = if self.vsock_channels.is_empty() {
            None
        } else {
            let mut channels = Vec::new();
            for &(port, index) in &self.vsock_channels {
                let fd = take(index)?;
                check_stream_socket(&fd).map_err(|why| format!("descriptor {index} (port {port}): {why}"))?;
                channels.push((port, UnixStream::from(fd)));
            }
            Some(
                Vsock::with_channels(channels)
                    .map_err(|e| format!("cannot set up the vsock channels: {e}"))?,
            )
        };
        Ok(HostEnds { disk, vsock })
    }
}

/// A vsock listener must be a listening Unix stream socket.
fn check_listening_socket(fd: &OwnedFd) -> Result<(), String> {
    check_stream_socket(fd)?;
    if socket_option(fd, libc::SO_ACCEPTCONN)? != 1 {
        return Err("not a listening socket".into());
    }
    Ok(())
}

/// An integer option of socket `fd`.
fn socket_option(fd: &OwnedFd, name: libc::c_int) -> Result<libc::c_int, String> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut len)
    };
    if r < 0 {
        Err("not a socket".to_owned())
    } else {
        Ok(value)
    }
}

/// A vsock channel must be a Unix stream socket.
fn check_stream_socket(fd: &OwnedFd) -> Result<(), String> {
    let option = |name| socket_option(fd, name);
    if option(libc::SO_DOMAIN)? != libc::AF_UNIX || option(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a Unix stream socket".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handover(n: usize) -> Handover {
        let fds = (0..n).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0)).collect();
        Handover::new(fds)
    }

    #[test]
    fn every_descriptor_is_named_exactly_once() {
        let start = |disk_fd, channels: Vec<(u32, usize)>, n| StartVm {
            disk_fd,
            vsock_channels: channels,
            fds: handover(n),
        };
        assert!(start(Some(0), vec![(1024, 1)], 2).check().is_ok());
        let e = start(Some(0), vec![(1024, 0)], 1).check().unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = start(Some(0), vec![], 2).check().unwrap_err();
        assert!(e.contains("2 descriptors came") && e.contains("1 were named"), "{e}");
        let e = start(Some(3), vec![], 1).check().unwrap_err();
        assert!(e.contains("descriptor 3 was named but 1 came"), "{e}");
        let e = start(None, vec![(1024, 0), (1024, 1)], 2).check().unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn a_disk_must_be_a_file_and_a_channel_a_unix_stream() {
        // A socket as the disk.
        let start = StartVm { disk_fd: Some(0), vsock_channels: vec![], fds: handover(1) };
        let e = start.host_ends().unwrap_err();
        assert!(e.contains("cannot be the disk"), "{e}");
        // A file as a channel.
        let file = tempfile_in_target();
        let start =
            StartVm { disk_fd: None, vsock_channels: vec![(1024, 0)], fds: Handover::new(vec![file.into()]) };
        let e = start.host_ends().unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        // A datagram socket as a channel.
        let (dgram, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let start = StartVm {
            disk_fd: None,
            vsock_channels: vec![(1024, 0)],
            fds: Handover::new(vec![dgram.into()]),
        };
        assert_eq!(start.host_ends().unwrap_err(), "descriptor 0 (port 1024): not a Unix stream socket");
        // Both right.
        let file = tempfile_in_target();
        let (stream, _) = UnixStream::pair().unwrap();
        let start = StartVm {
            disk_fd: Some(1),
            vsock_channels: vec![(1024, 0)],
            fds: Handover::new(vec![stream.into(), file.into()]),
        };
        let ends = start.host_ends().unwrap();
        assert!(ends.disk.is_some() && ends.vsock.is_some());
        assert!(start.host_ends().unwrap_err().contains("is gone"), "taken once");
    }

    fn tempfile_in_target() -> File {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("cella-handover-{}-{n}", std::process::id()));
        let file = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }
}
