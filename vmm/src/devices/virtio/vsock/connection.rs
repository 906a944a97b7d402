//! One vsock stream between a guest port and a host Unix stream, with its credit accounting.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// Bytes of guest data the device buffers per connection (advertised to the guest as
/// `buf_alloc`): the guest may not send more until the host side has taken some.
pub const HOST_BUF_ALLOC: u32 = 1 << 20;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Connecting,
    /// Data flows (in the directions not shut down).
    Established,
}

/// A stream's state on the device side.
#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// The guest's receive buffer size and how much of what we sent it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest so far (wrapping, as the spec counts).
    pub tx_cnt: u32,
    /// Bytes of guest data handed to the host stream so far (wrapping).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub fwd_cnt_reported: u32,
    /// Guest data the host stream has not taken yet.
    pub to_host: VecDeque<u8>,
    /// The guest said it will send no more.
    pub guest_done_sending: bool,
    /// The host stream reached end of file (the guest has been told).
    pub host_done_sending: bool,
    /// The guest closed both ways: reset once buffered data reaches the host.
    pub guest_closed: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_reported: 0,
            to_host: VecDeque::new(),
            guest_done_sending: false,
            host_done_sending: false,
            guest_closed: false,
        }
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Takes guest data for the host stream. `false` if the guest overran its credit.
    pub fn push_to_host(&mut self, data: &[u8]) -> bool {
        if self.to_host.len() + data.len() > HOST_BUF_ALLOC as usize {
            return false;
        }
        self.to_host.extend(data);
        true
    }

    /// Writes as much buffered guest data to the host stream as it takes now.
    pub fn flush_to_host(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Reads up to `max` bytes from the host stream. `Ok(None)` if nothing is ready,
    /// `Ok(Some(empty))` at end of stream.
    pub fn read_from_host(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; max];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the guest should hear about freed buffer space.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_reported) >= HOST_BUF_ALLOC / 4
    }
}
