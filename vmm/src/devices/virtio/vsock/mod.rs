//! virtio-vsock in userspace (this host has no vhost-vsock). The host side follows
//! Firecracker's convention: one Unix socket per VM at `uds_path`; a host client connects and
//! writes `CONNECT <port>\n`, and gets `OK <host_port>\n` once the guest accepts. A guest
//! connection to host port P is connected to the Unix socket `<uds_path>_P`.
//!
//! Streams only, with credit-based flow control both ways, and RST when either end closes.

mod connection;
mod device;
mod host;

pub use device::{Vsock, VsockState};
