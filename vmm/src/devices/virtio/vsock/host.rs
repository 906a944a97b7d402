//! The host side: the VM's Unix listener, the `CONNECT <port>` handshake, and the epoll set
//! the wait exit blocks on. A VM whose channels were handed over as descriptors (a spare's job,
//! see `control`) has no listener: a guest connection to a host port takes the stream given
//! for that port, once, and never a path.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest `CONNECT <port>\n` line accepted.
const CONNECT_LINE_MAX: usize = 64;
/// Host clients that may be mid-handshake at once.
const MAX_PENDING: usize = 64;

/// A host client that connected but has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct Pending {
    pub stream: UnixStream,
    pub line: Vec<u8>,
}

/// What a pending client's input came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// More bytes needed.
    Incomplete,
    /// `CONNECT <port>`.
    Connect(u32),
    /// Garbage, too long, or closed: drop the client.
    Refused,
}

impl Pending {
    /// Reads what is available and checks for a complete line.
    pub fn advance(&mut self) -> Handshake {
        let mut byte = [0u8; CONNECT_LINE_MAX];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Handshake::Refused,
                Ok(n) => {
                    self.line.extend_from_slice(&byte[..n]);
                    if let Some(end) = self.line.iter().position(|b| *b == b'\n') {
                        // Anything after the newline would be data; a client must wait for OK.
                        if end + 1 != self.line.len() {
                            return Handshake::Refused;
                        }
                        return parse_connect(&self.line[..end]);
                    }
                    if self.line.len() > CONNECT_LINE_MAX {
                        return Handshake::Refused;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Handshake::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Handshake::Refused,
            }
        }
    }
}

/// Parses `CONNECT <port>`.
pub fn parse_connect(line: &[u8]) -> Handshake {
    let text = std::str::from_utf8(line).unwrap_or("");
    match text.trim_end_matches('\r').strip_prefix("CONNECT ").map(str::parse::<u32>) {
        Some(Ok(port)) => Handshake::Connect(port),
        _ => Handshake::Refused,
    }
}

/// The VM's listener (or the channels handed over instead), the clients mid-handshake, and
/// the epoll set.
#[derive(Debug)]
pub struct HostSide {
    /// Where the listener is bound; empty for a VM with handed-over channels.
    pub uds_path: PathBuf,
    listener: Option<UnixListener>,
    /// Streams handed over for guest connections to these host ports, each taken once.
    channels: Vec<(u32, UnixStream)>,
    pub pending: Vec<Pending>,
    epoll: OwnedFd,
}

/// A new epoll descriptor.
fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl HostSide {
    /// Binds the VM's socket at `uds_path` (replacing a stale one).
    pub fn bind(uds_path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(uds_path);
        let mut host = Self::listening(UnixListener::bind(uds_path)?)?;
        host.uds_path = uds_path.to_owned();
        Ok(host)
    }

    /// Serves the VM on `listener`, a listening Unix stream socket bound by whoever handed it
    /// over (who also removes its file: this side knows no path).
    pub fn listening(listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let host = HostSide {
            uds_path: PathBuf::new(),
            listener: Some(listener),
            channels: Vec::new(),
            pending: Vec::new(),
            epoll: epoll()?,
        };
        if let Some(listener) = &host.listener {
            host.watch(listener.as_raw_fd(), true, false)?;
        }
        Ok(host)
    }

    /// No listener and no path: the guest's connection to each `(port, stream)` gets that
    /// stream (once); a connection to any other port is refused, and the host cannot connect in.
    pub fn with_channels(channels: Vec<(u32, UnixStream)>) -> io::Result<Self> {
        for (_, stream) in &channels {
            stream.set_nonblocking(true)?;
        }
        Ok(HostSide {
            uds_path: PathBuf::new(),
            listener: None,
            channels,
            pending: Vec::new(),
            epoll: epoll()?,
        })
    }

    /// The epoll descriptor: readable when any host-side socket has something.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Adds `fd` to the epoll set (or changes its interest).
    pub fn watch(&self, fd: RawFd, readable: bool, writable: bool) -> io::Result<()> {
        let mut events = 0;
        if readable {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if writable {
            events |= libc::EPOLLOUT as u32;
        }
        let mut event = libc::epoll_event { events, u64: fd as u64 };
        // SAFETY: valid epoll and target descriptors; `event` outlives the call.
        let mut r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            // SAFETY: as above.
            r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut event) };
        }
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `fd` from the epoll set (closing it does too; this is for clarity).
    pub fn unwatch(&self, fd: RawFd) {
        // SAFETY: valid descriptors; a null event is allowed for EPOLL_CTL_DEL.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Accepts every waiting host client into `pending`.
    pub fn accept_all(&mut self) {
        let Some(listener) = &self.listener else { return };
        while let Ok((stream, _)) = listener.accept() {
            if self.pending.len() >= MAX_PENDING || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.watch(stream.as_raw_fd(), true, false).is_ok() {
                self.pending.push(Pending { stream, line: Vec::new() });
            }
        }
    }

    /// The host end of a guest connection to `port`: the stream handed over for it, or (with a
    /// listener) a connection to `<uds_path>_<port>`.
    pub fn connect_out(&mut self, port: u32) -> io::Result<UnixStream> {
        if let Some(at) = self.channels.iter().position(|(p, _)| *p == port) {
            return Ok(self.channels.swap_remove(at).1);
        }
        if self.listener.is_none() {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "no channel for this port"));
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        let stream = UnixStream::connect(&path)?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        if self.listener.is_some() && !self.uds_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_gets_each_handed_over_channel_once_and_no_other_port() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let mut host = HostSide::with_channels(vec![(1024, theirs)]).unwrap();
        assert!(host.uds_path.as_os_str().is_empty(), "no socket file");
        let stream = host.connect_out(1024).unwrap();
        drop(mine);
        // The stream is the handed-over one: its peer is gone.
        let mut byte = [0u8; 1];
        assert_eq!((&stream).read(&mut byte).unwrap(), 0);
        // A second connection to the same port, and one to any other, is refused.
        for port in [1024, 1025, 1] {
            let e = host.connect_out(port).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "port {port}");
        }
        // Nothing to accept: there is no listener.
        host.accept_all();
        assert!(host.pending.is_empty());
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Handshake::Connect(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Handshake::Connect(52));
        assert_eq!(parse_connect(b"CONNECT -1"), Handshake::Refused);
        assert_eq!(parse_connect(b"GET / HTTP/1.1"), Handshake::Refused);
    }
}
