//! The vsock device: the guest's transmit queue becomes writes to host streams, host streams
//! and handshakes become packets in the guest's receive queue.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use cella_abi::vsock::{self, op, Header, HEADER_LEN, MAX_PAYLOAD};
use cella_abi::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::connection::{Connection, State, HOST_BUF_ALLOC};
use super::host::{Handshake, HostSide};
use crate::devices::virtio::chain::{self, Buffer};
use crate::devices::virtio::{read_config_bytes, DeviceError, DeviceState, VirtioDevice, VIRTIO_F_VERSION_1};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];
/// Open streams one VM may have.
const MAX_CONNECTIONS: usize = 64;
/// Control packets that may wait for receive buffers; beyond this a guest that sends to
/// nowhere without reading its replies gets no more RSTs (its memory use on the host is bounded).
const MAX_QUEUED_REPLIES: usize = 1024;
/// Host ports for host-initiated streams are handed out from here up.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// (host port, guest port).
type Key = (u32, u32);

/// The vsock device in a snapshot. Host streams cannot be saved (their peers are other
/// processes), so only their keys are kept: on restore each is reset, which tells the guest to
/// drop it; the guest's listeners live in guest memory and go on accepting.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// Where the host socket was bound (a restore binds here unless told otherwise).
    pub uds_path: std::path::PathBuf,
    /// The next host port for a host-initiated stream (never reused within one VM's life).
    pub next_host_port: u32,
    /// `(host port, guest port)` of every stream open or opening when the snapshot was taken.
    pub connections: Vec<(u32, u32)>,
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    host: HostSide,
    conns: HashMap<Key, Connection>,
    /// Control packets waiting for a receive buffer.
    to_guest: VecDeque<Header>,
    next_host_port: u32,
}

impl Vsock {
    /// Creates the device and binds its host socket at `uds_path`.
    pub fn new(uds_path: &Path) -> std::io::Result<Self> {
        Ok(Vsock {
            host: HostSide::bind(uds_path)?,
            conns: HashMap::new(),
            to_guest: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        })
    }

    /// Creates the device with no host socket: the guest's connections to the given host ports
    /// get the given streams (see [`HostSide::with_channels`]).
    pub fn with_channels(channels: Vec<(u32, std::os::unix::net::UnixStream)>) -> std::io::Result<Self> {
        Ok(Vsock {
            host: HostSide::with_channels(channels)?,
            conns: HashMap::new(),
            to_guest: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        })
    }

    /// Rebuilds the device from a snapshot with its host socket bound at `uds_path` (which may
    /// differ from the saved VM's), and queues a RST to the guest for every stream that was
    /// open, delivered at the guest's next notify or wait.
    pub fn restore(uds_path: &Path, state: &VsockState) -> std::io::Result<Self> {
        Ok(Vsock::new(uds_path)?.adopt(state))
    }

    /// [`Vsock::restore`] on a listening socket handed over instead of a path.
    pub fn restore_listening(
        listener: std::os::unix::net::UnixListener,
        state: &VsockState,
    ) -> std::io::Result<Self> {
        let vsock = Vsock {
            host: HostSide::listening(listener)?,
            conns: HashMap::new(),
            to_guest: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        };
        Ok(vsock.adopt(state))
    }

    /// Takes over a snapshot's device state (its host port counter; a RST queued for every
    /// stream that was open) for a device made for the restored VM, e.g. with the job's
    /// channels ([`Vsock::with_channels`]).
    pub fn adopt(mut self, state: &VsockState) -> Self {
        self.next_host_port = state.next_host_port.max(FIRST_HOST_PORT);
        for key in state.connections.iter().take(MAX_CONNECTIONS) {
            self.reply(*key, op::RST, 0);
        }
        self
    }

    /// Where the host socket is bound.
    pub fn uds_path(&self) -> &Path {
        &self.host.uds_path
    }

    fn header(&self, key: Key, op: u16, flags: u32) -> Header {
        Header {
            src_cid: vsock::HOST_CID,
            dst_cid: vsock::GUEST_CID,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: vsock::TYPE_STREAM,
            op,
            flags,
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt),
        }
    }

    fn reply(&mut self, key: Key, op: u16, flags: u32) {
        if op == op::RST && self.to_guest.len() >= MAX_QUEUED_REPLIES {
            return;
        }
        let header = self.header(key, op, flags);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.fwd_cnt_reported = conn.fwd_cnt;
        }
        self.to_guest.push_back(header);
    }

    fn reset(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.host.unwatch(conn.stream.as_raw_fd());
        }
        self.reply(key, op::RST, 0);
    }

    /// Takes every packet the guest queued for transmission.
    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        for (head, buffers) in chain::take_all(q, mem, TX)? {
            if buffers.iter().any(|b| b.writable) {
                return Err(DeviceError::WrongDirection {
                    what: "a vsock transmit buffer",
                    expected: "read-only",
                    actual: "write-only",
                });
            }
            let total: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
            if total < HEADER_LEN as u64 || total > (HEADER_LEN + MAX_PAYLOAD) as u64 {
                return Err(DeviceError::BadRequest(format!(
                    "vsock packet of {total} bytes (a header is {HEADER_LEN}, payload at most {MAX_PAYLOAD})"
                )));
            }
            let bytes = gather(mem, &buffers, total as usize)?;
            let header = Header::from_bytes(&bytes).unwrap_or_default();
            let payload = &bytes[HEADER_LEN..];
            if header.len as usize != payload.len() {
                return Err(DeviceError::BadRequest(format!(
                    "vsock header says {} payload bytes, the packet carries {}",
                    header.len,
                    payload.len()
                )));
            }
            if header.src_cid != vsock::GUEST_CID {
                return Err(DeviceError::BadRequest(format!("vsock packet from cid {}", header.src_cid)));
            }
            self.handle(&header, payload);
            chain::complete(q, mem, TX, head, 0)?;
        }
        Ok(())
    }

    /// Acts on one guest packet.
    fn handle(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != vsock::HOST_CID || h.kind != vsock::TYPE_STREAM {
            if h.op != op::RST {
                self.reply(key, op::RST, 0);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => self.guest_connects(key, h),
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(conn) if conn.state == State::Connecting => {
                    conn.state = State::Established;
                    let ok = format!("OK {}\n", key.0);
                    conn.to_host.extend(ok.as_bytes());
                    // The OK line is not guest data: keep it out of the credit count.
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_sub(ok.len() as u32);
                    conn.fwd_cnt_reported = conn.fwd_cnt;
                    self.flush(key);
                }
                _ => self.reset(key),
            },
            op::RW => match self.conns.get_mut(&key) {
                Some(conn) if conn.state == State::Established && !conn.guest_done_sending => {
                    if conn.push_to_host(payload) {
                        self.flush(key);
                    } else {
                        self.reset(key);
                    }
                }
                _ => self.reset(key),
            },
            op::SHUTDOWN => match self.conns.get_mut(&key) {
                Some(conn) => {
                    if h.flags & vsock::SHUTDOWN_SEND != 0 {
                        conn.guest_done_sending = true;
                    }
                    let both = vsock::SHUTDOWN_SEND | vsock::SHUTDOWN_RCV;
                    if h.flags & both == both || (conn.guest_done_sending && conn.host_done_sending) {
                        conn.guest_closed = true;
                    }
                    self.flush(key);
                }
                None => self.reply(key, op::RST, 0),
            },
            op::RST => {
                if let Some(conn) = self.conns.remove(&key) {
                    self.host.unwatch(conn.stream.as_raw_fd());
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reply(key, op::CREDIT_UPDATE, 0);
                }
            }
            _ => self.reset(key),
        }
    }

    fn guest_connects(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reply(key, op::RST, 0);
            return;
        }
        match self.host.connect_out(key.0) {
            Ok(stream) if self.host.watch(stream.as_raw_fd(), true, false).is_ok() => {
                let mut conn = Connection::new(stream, State::Established);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, conn);
                self.reply(key, op::RESPONSE, 0);
            }
            _ => self.reply(key, op::RST, 0),
        }
    }

    /// Moves buffered guest data to the host stream; when the guest is done and all is
    /// written, half-closes the host stream.
    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match conn.flush_to_host() {
            Ok(_) => {
                if conn.guest_done_sending && conn.to_host.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    if conn.guest_closed {
                        self.reset(key);
                        return;
                    }
                }
                if conn.credit_update_due() {
                    self.reply(key, op::CREDIT_UPDATE, 0);
                }
            }
            Err(_) => self.reset(key),
        }
    }

    /// Flushes every connection with buffered guest data (and reports freed credit).
    fn flush_all(&mut self) {
        let keys: Vec<Key> =
            self.conns.iter().filter(|(_, c)| !c.to_host.is_empty()).map(|(k, _)| *k).collect();
        for key in keys {
            self.flush(key);
        }
    }

    /// Watches each host stream for what the device can act on now: reading while the guest
    /// has credit (otherwise a readable stream would wake every wait for nothing), writing
    /// while guest data is buffered.
    fn refresh_interest(&self) {
        for conn in self.conns.values() {
            let readable = match conn.state {
                State::Established => conn.peer_credit() > 0 && !conn.host_done_sending,
                State::Connecting => true,
            };
            let _ = self.host.watch(conn.stream.as_raw_fd(), readable, !conn.to_host.is_empty());
        }
    }

    /// Host clients: accept, read their `CONNECT` lines, and ask the guest for each.
    fn handshakes(&mut self) {
        self.host.accept_all();
        let mut i = 0;
        while i < self.host.pending.len() {
            match self.host.pending[i].advance() {
                Handshake::Incomplete => i += 1,
                Handshake::Refused => {
                    let p = self.host.pending.swap_remove(i);
                    self.host.unwatch(p.stream.as_raw_fd());
                }
                Handshake::Connect(port) => {
                    let p = self.host.pending.swap_remove(i);
                    if self.conns.len() >= MAX_CONNECTIONS {
                        self.host.unwatch(p.stream.as_raw_fd());
                        continue;
                    }
                    let key = (self.next_host_port, port);
                    self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                    self.conns.insert(key, Connection::new(p.stream, State::Connecting));
                    self.reply(key, op::REQUEST, 0);
                }
            }
        }
    }

    /// Fills receive buffers: control packets first, then host data within the guest's credit.
    /// Returns whether anything was delivered.
    fn deliver(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut delivered = false;
        while let Some((head, buffers)) = chain::take_one(q, mem, RX)? {
            if buffers.iter().any(|b| !b.writable) {
                return Err(DeviceError::WrongDirection {
                    what: "a vsock receive buffer",
                    expected: "write-only",
                    actual: "read-only",
                });
            }
            let room: usize = buffers.iter().map(|b| b.len as usize).sum();
            if room < HEADER_LEN {
                return Err(DeviceError::BadRequest(format!("vsock receive buffer of {room} bytes")));
            }
            let Some(packet) = self.next_packet(room - HEADER_LEN) else {
                q.go_to_previous_position();
                break;
            };
            let written = scatter(mem, &buffers, &packet)?;
            chain::complete(q, mem, RX, head, written as u32)?;
            delivered = true;
        }
        Ok(delivered)
    }

    /// The next packet for the guest, with at most `room` payload bytes.
    fn next_packet(&mut self, room: usize) -> Option<Vec<u8>> {
        if let Some(h) = self.to_guest.pop_front() {
            return Some(h.to_bytes().to_vec());
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let conn = self.conns.get_mut(&key)?;
            if conn.state != State::Established || conn.host_done_sending {
                continue;
            }
            let max = (conn.peer_credit() as usize).min(room).min(MAX_PAYLOAD);
            if max == 0 {
                continue;
            }
            match conn.read_from_host(max) {
                Ok(None) => continue,
                Ok(Some(data)) if data.is_empty() => {
                    // The host will send no more; it may still read what the guest sends.
                    conn.host_done_sending = true;
                    return Some(self.header(key, op::SHUTDOWN, vsock::SHUTDOWN_SEND).to_bytes().to_vec());
                }
                Ok(Some(data)) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(data.len() as u32);
                    conn.fwd_cnt_reported = conn.fwd_cnt;
                    let mut header = self.header(key, op::RW, 0);
                    header.len = data.len() as u32;
                    let mut packet = header.to_bytes().to_vec();
                    packet.extend_from_slice(&data);
                    return Some(packet);
                }
                Err(_) => {
                    self.reset(key);
                    return self.to_guest.pop_front().map(|h| h.to_bytes().to_vec());
                }
            }
        }
        None
    }
}

/// Copies a chain's readable bytes out of guest memory.
fn gather(mem: &GuestMemoryMmap, buffers: &[Buffer], total: usize) -> Result<Vec<u8>, DeviceError> {
    let mut bytes = vec![0u8; total];
    let mut at = 0;
    for b in buffers {
        let end = at + b.len as usize;
        mem.read_slice(&mut bytes[at..end], b.addr).map_err(|e| DeviceError::Memory(e.to_string()))?;
        at = end;
    }
    Ok(bytes)
}

/// Copies `data` into a chain's buffers; returns the bytes written.
fn scatter(mem: &GuestMemoryMmap, buffers: &[Buffer], data: &[u8]) -> Result<usize, DeviceError> {
    let mut at = 0;
    for b in buffers {
        if at == data.len() {
            break;
        }
        let n = (b.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], b.addr).map_err(|e| DeviceError::Memory(e.to_string()))?;
        at += n;
    }
    Ok(at)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&vsock::GUEST_CID.to_le_bytes(), offset, data);
    }

    fn notify(
        &mut self,
        queue: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        if queue == TX {
            self.transmit(&mut queues[TX], mem)?;
        }
        self.flush_all();
        self.deliver(&mut queues[RX], mem)?;
        self.refresh_interest();
        Ok(())
    }

    fn poll(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        self.handshakes();
        self.flush_all();
        let delivered = self.deliver(&mut queues[RX], mem)?;
        self.refresh_interest();
        Ok(delivered)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.host.epoll_fd())
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn save_state(&self) -> DeviceState {
        let mut connections: Vec<Key> = self.conns.keys().copied().collect();
        connections.sort_unstable();
        DeviceState::Vsock(VsockState {
            uds_path: self.host.uds_path.clone(),
            next_host_port: self.next_host_port,
            connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_spraying_packets_at_closed_ports_cannot_grow_the_reply_queue() {
        let dir = std::env::temp_dir().join(format!("cella-vsock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut vsock = Vsock::new(&dir.join("v.sock")).unwrap();
        for port in 0..10_000u32 {
            let h = Header {
                src_cid: vsock::GUEST_CID,
                dst_cid: vsock::HOST_CID,
                src_port: port,
                dst_port: 7,
                kind: vsock::TYPE_STREAM,
                op: op::RW,
                ..Default::default()
            };
            vsock.handle(&h, b"x");
        }
        assert_eq!(vsock.to_guest.len(), MAX_QUEUED_REPLIES);
        assert!(vsock.conns.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restored_vsock_resets_every_saved_stream_and_keeps_its_port_counter() {
        let dir = std::env::temp_dir().join(format!("cella-vsock-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = VsockState {
            uds_path: dir.join("old.sock"),
            next_host_port: FIRST_HOST_PORT + 7,
            connections: vec![(FIRST_HOST_PORT + 3, 1025), (5, 1234)],
        };
        let vsock = Vsock::restore(&dir.join("v2.sock"), &state).unwrap();
        assert!(dir.join("v2.sock").exists());
        let resets: Vec<(u16, u32, u32)> =
            vsock.to_guest.iter().map(|h| (h.op, h.src_port, h.dst_port)).collect();
        assert_eq!(resets, vec![(op::RST, FIRST_HOST_PORT + 3, 1025), (op::RST, 5, 1234)]);
        match vsock.save_state() {
            DeviceState::Vsock(saved) => {
                assert_eq!(saved.next_host_port, FIRST_HOST_PORT + 7);
                assert_eq!(saved.uds_path, dir.join("v2.sock"));
                assert!(saved.connections.is_empty());
            }
            other => panic!("not a vsock state: {other:?}"),
        }
        drop(vsock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
