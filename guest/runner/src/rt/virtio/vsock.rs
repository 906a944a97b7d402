//! The virtio-vsock driver: stream connections to and from the host, with credit-based flow
//! control. The runner polls: when it must wait for the host it makes a wait exit, and the VMM
//! blocks the vCPU until data, a connection, or the timeout arrives.
//!
//! A connection ends cleanly in every state: an RST (the host went away, or the VM was restored
//! from a snapshot and the VMM reset every open connection) or a SHUTDOWN marks it closed and
//! drops what it buffered; `recv` then reports the end (0) and `send` fails with `Closed`, so
//! the caller goes back to `accept`. Listeners are kept: a closed connection never touches them.
//! A packet for no connection is answered with RST (as a peer must), so a host that connects
//! before the runner listens is refused at once instead of waiting. A connection's slot is
//! reused once its owner [`Vsock::release`]s it, so serving connection after connection for
//! hours keeps the table small.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use cella_abi::vsock::{self, op, Header, HEADER_LEN, MAX_PAYLOAD};
use cella_abi::{BootInfo, VIRTIO_ID_VSOCK};

use super::queue::{Buf, VirtQueue};
use super::{InitError, Mmio};
use crate::rt::io;

const TX: u16 = 1;
const QUEUE_SIZE: u16 = 256;
const EVENT_QUEUE_SIZE: u16 = 16;
/// Receive buffers kept posted.
const RX_BUFFERS: usize = 32;
/// How much received data we buffer per connection (our `buf_alloc`).
const BUF_ALLOC: u32 = 4 << 20;
/// Guest ports for outgoing connections start here.
const FIRST_LOCAL_PORT: u32 = 49152;
/// The longest single wait exit the VMM grants; idle loops wait this long (any packet ends the
/// wait early), so an idle runner makes about one exit per second.
const IDLE_WAIT_MS: u32 = 1000;

/// A connection handle.
pub type ConnId = usize;

/// Why a vsock operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockError {
    /// The host refused the connection (RST).
    Refused,
    /// The connection was reset or closed.
    Closed,
    /// Nothing happened within the timeout.
    TimedOut,
    /// The device stopped taking packets.
    Device,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Established,
    /// The host takes nothing more (it shut down receiving, or reset).
    Closed,
    /// Released by its owner: the slot may carry a new connection.
    Free,
}

struct Conn {
    local: u32,
    peer: u32,
    state: State,
    data: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    fwd_reported: u32,
    /// The host will send nothing more; buffered data may remain.
    peer_done: bool,
}

impl Conn {
    fn new(local: u32, peer: u32, state: State) -> Conn {
        Conn {
            local,
            peer,
            state,
            data: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_reported: 0,
            peer_done: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// The host is gone (RST) or takes nothing more: nothing can be sent, and nothing more
    /// will arrive. Data already received stays readable (the host sent it before it left).
    fn close_locally(&mut self) {
        self.state = State::Closed;
        self.peer_done = true;
    }
}

/// A control packet (no payload) on `conn`.
fn reply(conn: &Conn, op: u16) -> Header {
    Header {
        src_cid: vsock::GUEST_CID,
        dst_cid: vsock::HOST_CID,
        src_port: conn.local,
        dst_port: conn.peer,
        len: 0,
        kind: vsock::TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

/// The vsock device and its connections.
pub struct Vsock {
    mmio: Mmio,
    rx: VirtQueue,
    tx: VirtQueue,
    _events: VirtQueue,
    rx_bufs: Vec<Box<[u8]>>,
    /// Which receive buffer each rx chain head carries.
    rx_buf_of_head: Vec<usize>,
    tx_headers: Box<[[u8; HEADER_LEN]]>,
    conns: Vec<Conn>,
    listening: Vec<u32>,
    accepted: VecDeque<ConnId>,
    next_port: u32,
}

/// Makes a wait exit: the VMM returns when it has something for us or after `ms`.
pub fn wait(ms: u32) {
    io::out_u32(cella_abi::ports::WAIT, ms);
}

impl Vsock {
    /// Finds and initialises the device, and posts the receive buffers.
    pub fn open(boot: &BootInfo) -> Result<Vsock, InitError> {
        let mmio = Mmio::find(boot, VIRTIO_ID_VSOCK)?;
        let mut queues =
            [VirtQueue::new(QUEUE_SIZE), VirtQueue::new(QUEUE_SIZE), VirtQueue::new(EVENT_QUEUE_SIZE)];
        mmio.init(&mut queues)?;
        let [rx, tx, events] = queues;
        let mut dev = Vsock {
            mmio,
            rx,
            tx,
            _events: events,
            rx_bufs: (0..RX_BUFFERS)
                .map(|_| vec![0u8; HEADER_LEN + MAX_PAYLOAD].into_boxed_slice())
                .collect(),
            rx_buf_of_head: vec![0; usize::from(QUEUE_SIZE)],
            tx_headers: vec![[0u8; HEADER_LEN]; usize::from(QUEUE_SIZE)].into_boxed_slice(),
            conns: Vec::new(),
            listening: Vec::new(),
            accepted: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
        };
        for i in 0..RX_BUFFERS {
            dev.post_rx(i);
        }
        Ok(dev)
    }

    fn post_rx(&mut self, index: usize) {
        let buf = Buf::write(&mut self.rx_bufs[index]);
        if let Some(head) = self.rx.add(&[buf]) {
            self.rx_buf_of_head[usize::from(head)] = index;
        }
    }

    fn header(&self, id: ConnId, op: u16, flags: u32, len: u32) -> Header {
        let c = &self.conns[id];
        Header {
            src_cid: vsock::GUEST_CID,
            dst_cid: vsock::HOST_CID,
            src_port: c.local,
            dst_port: c.peer,
            len,
            kind: vsock::TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// Sends packets (header, payload) in one notify.
    fn transmit(&mut self, packets: &[(Header, &[u8])]) -> Result<(), VsockError> {
        for (i, (header, payload)) in packets.iter().enumerate() {
            self.tx_headers[i] = header.to_bytes();
            let head = if payload.is_empty() {
                self.tx.add(&[Buf::read(&self.tx_headers[i])])
            } else {
                self.tx.add(&[Buf::read(&self.tx_headers[i]), Buf::read(payload)])
            };
            head.ok_or(VsockError::Device)?;
        }
        self.mmio.notify(TX);
        let mut done = 0;
        while self.tx.pop_used().is_some() {
            done += 1;
        }
        if done != packets.len() {
            return Err(VsockError::Device);
        }
        Ok(())
    }

    fn control(&mut self, id: ConnId, op: u16, flags: u32) -> Result<(), VsockError> {
        let h = self.header(id, op, flags, 0);
        if op == op::CREDIT_UPDATE || op == op::RESPONSE {
            self.conns[id].fwd_reported = self.conns[id].fwd_cnt;
        }
        self.transmit(&[(h, &[])])
    }

    /// Handles every packet the host delivered; returns whether there were any.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        let mut replies: Vec<Header> = Vec::new();
        while let Some((head, len)) = self.rx.pop_used() {
            any = true;
            let index = self.rx_buf_of_head[usize::from(head)];
            let bytes = &self.rx_bufs[index][..(len as usize).min(HEADER_LEN + MAX_PAYLOAD)];
            if let Some(h) = Header::from_bytes(bytes) {
                let payload_len = (h.len as usize).min(bytes.len() - HEADER_LEN);
                let payload = &bytes[HEADER_LEN..HEADER_LEN + payload_len];
                if let Some(reply) =
                    Self::dispatch(&mut self.conns, &self.listening, &mut self.accepted, &h, payload)
                {
                    replies.push(reply);
                }
            }
            self.post_rx(index);
        }
        if !replies.is_empty() {
            let packets: Vec<(Header, &[u8])> = replies.iter().map(|h| (*h, &[][..])).collect();
            let _ = self.transmit(&packets);
        }
        any
    }

    /// Applies one packet to the connections; returns a control packet to answer with, if any.
    fn dispatch(
        conns: &mut Vec<Conn>,
        listening: &[u32],
        accepted: &mut VecDeque<ConnId>,
        h: &Header,
        payload: &[u8],
    ) -> Option<Header> {
        let live = |c: &Conn| matches!(c.state, State::Connecting | State::Established);
        let found = conns.iter().position(|c| c.local == h.dst_port && c.peer == h.src_port && live(c));
        let Some(id) = found else {
            if h.op == op::REQUEST && listening.contains(&h.dst_port) {
                let mut conn = Conn::new(h.dst_port, h.src_port, State::Established);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                let id = match conns.iter().position(|c| c.state == State::Free) {
                    Some(free) => {
                        conns[free] = conn;
                        free
                    }
                    None => {
                        conns.push(conn);
                        conns.len() - 1
                    }
                };
                accepted.push_back(id);
                return Some(reply(&conns[id], op::RESPONSE));
            }
            // Nobody here (not listening, or the connection is gone): say so, except to an RST.
            if h.op == op::RST {
                return None;
            }
            let mut rst = Header {
                src_cid: vsock::GUEST_CID,
                dst_cid: vsock::HOST_CID,
                src_port: h.dst_port,
                dst_port: h.src_port,
                kind: vsock::TYPE_STREAM,
                op: op::RST,
                ..Header::default()
            };
            rst.buf_alloc = BUF_ALLOC;
            return Some(rst);
        };
        let conn = &mut conns[id];
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if conn.state == State::Connecting => conn.state = State::Established,
            // More than our buffer would be a VMM bug (it honours our credit): drop it.
            op::RW if conn.data.len() + payload.len() <= BUF_ALLOC as usize => conn.data.extend(payload),
            op::CREDIT_REQUEST => {
                conn.fwd_reported = conn.fwd_cnt;
                return Some(reply(conn, op::CREDIT_UPDATE));
            }
            op::SHUTDOWN => {
                if h.flags & vsock::SHUTDOWN_SEND != 0 {
                    conn.peer_done = true;
                }
                if h.flags & vsock::SHUTDOWN_RCV != 0 {
                    conn.close_locally();
                    return Some(reply(conn, op::RST));
                }
            }
            op::RST => conn.close_locally(),
            _ => {}
        }
        None
    }

    /// Connects to host port `port`, waiting up to `timeout_ms`.
    pub fn connect(&mut self, port: u32, timeout_ms: u32) -> Result<ConnId, VsockError> {
        let local = self.next_port;
        self.next_port += 1;
        let conn = Conn::new(local, port, State::Connecting);
        let id = match self.conns.iter().position(|c| c.state == State::Free) {
            Some(free) => {
                self.conns[free] = conn;
                free
            }
            None => {
                self.conns.push(conn);
                self.conns.len() - 1
            }
        };
        self.control(id, op::REQUEST, 0)?;
        let mut waited = 0;
        loop {
            self.poll();
            match self.conns[id].state {
                State::Established => return Ok(id),
                State::Closed | State::Free => return Err(VsockError::Refused),
                State::Connecting if waited >= timeout_ms => return Err(VsockError::TimedOut),
                State::Connecting => {
                    wait(100);
                    waited += 100;
                }
            }
        }
    }

    /// Starts accepting host connections to `port`.
    pub fn listen(&mut self, port: u32) {
        self.listening.push(port);
    }

    /// Waits up to `timeout_ms` for a host connection to a listening port. A connection the
    /// host already reset while it waited in the queue is skipped (and released).
    pub fn accept(&mut self, timeout_ms: u32) -> Result<ConnId, VsockError> {
        let mut waited = 0u32;
        loop {
            self.poll();
            while let Some(id) = self.accepted.pop_front() {
                if self.conns[id].state == State::Established || !self.conns[id].data.is_empty() {
                    return Ok(id);
                }
                self.release(id);
            }
            if waited >= timeout_ms {
                return Err(VsockError::TimedOut);
            }
            let step = (timeout_ms - waited).min(IDLE_WAIT_MS);
            wait(step);
            waited = waited.saturating_add(step);
        }
    }

    /// Gives a closed connection's slot back (after [`close`](Self::close), or once `recv`
    /// reported its end). `id` must not be used again.
    pub fn release(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id) {
            if conn.state == State::Established || conn.state == State::Connecting {
                // Still open on the host side: tell it.
                let h = reply(conn, op::RST);
                let _ = self.transmit(&[(h, &[])]);
            }
            let conn = &mut self.conns[id];
            conn.state = State::Free;
            conn.data = VecDeque::new();
        }
        self.accepted.retain(|&a| a != id);
    }

    /// Sends all of `data`, as fast as the host's credit allows.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<(), VsockError> {
        let mut at = 0;
        let mut asked = false;
        while at < data.len() {
            match self.conns[id].state {
                State::Established => {}
                _ => return Err(VsockError::Closed),
            }
            let mut credit = self.conns[id].credit() as usize;
            if credit == 0 {
                // Ask once, then really wait: the VMM blocks until the host side drains.
                if !asked {
                    self.control(id, op::CREDIT_REQUEST, 0)?;
                    asked = true;
                }
                wait(100);
                self.poll();
                continue;
            }
            asked = false;
            let mut packets: Vec<(Header, &[u8])> = Vec::new();
            while at < data.len() && credit > 0 && packets.len() < usize::from(QUEUE_SIZE / 2) {
                let n = (data.len() - at).min(MAX_PAYLOAD).min(credit);
                let h = self.header(id, op::RW, 0, n as u32);
                packets.push((h, &data[at..at + n]));
                self.conns[id].tx_cnt = self.conns[id].tx_cnt.wrapping_add(n as u32);
                credit -= n;
                at += n;
            }
            self.transmit(&packets)?;
            self.poll();
        }
        Ok(())
    }

    /// Moves up to `max` received bytes into `out`, waiting up to `timeout_ms` for the first.
    /// Returns 0 once the host has closed and everything was read.
    pub fn recv(
        &mut self,
        id: ConnId,
        out: &mut Vec<u8>,
        max: usize,
        timeout_ms: u32,
    ) -> Result<usize, VsockError> {
        let mut waited = 0;
        loop {
            self.poll();
            let conn = &mut self.conns[id];
            if !conn.data.is_empty() {
                let n = conn.data.len().min(max);
                out.extend(conn.data.drain(..n));
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                if conn.fwd_cnt.wrapping_sub(conn.fwd_reported) >= BUF_ALLOC / 4 {
                    self.control(id, op::CREDIT_UPDATE, 0)?;
                }
                return Ok(n);
            }
            if conn.peer_done || conn.state != State::Established {
                return Ok(0);
            }
            if waited >= timeout_ms {
                return Err(VsockError::TimedOut);
            }
            let step = (timeout_ms - waited).min(IDLE_WAIT_MS);
            wait(step);
            waited = waited.saturating_add(step);
        }
    }

    /// Closes the connection (SHUTDOWN both ways) and waits, up to `timeout_ms`, for the
    /// host's RST, which the VMM sends once everything we sent has reached the host socket.
    pub fn close(&mut self, id: ConnId, timeout_ms: u32) {
        if self.conns[id].state != State::Established {
            return;
        }
        if self.control(id, op::SHUTDOWN, vsock::SHUTDOWN_RCV | vsock::SHUTDOWN_SEND).is_err() {
            self.conns[id].state = State::Closed;
            return;
        }
        let mut waited = 0;
        // The RST often arrives during the SHUTDOWN's own exit: look before waiting.
        self.poll();
        while self.conns[id].state != State::Closed && waited < timeout_ms {
            wait(100);
            waited += 100;
            self.poll();
        }
        self.conns[id].state = State::Closed;
    }
}
