//! The virtio descriptor-chain checks (`devices::virtio::chain`) and what consumes their chains,
//! on guest memory the fuzzer writes: the descriptor table and the rings, where the driver puts
//! them, and the driver's register writes. Driven through the real virtio-mmio transport with
//! the real block device (requests parsed and carried out against a small disk file) or the real
//! vsock device (packets parsed from the transmit queue; a host listener on port 1024 takes the
//! guest's connections there, and with bit 1 of the device byte a host client asks the guest
//! for port 1025 first). Also walks one chain directly and checks what it accepts.
//!
//! Input: `[device, queue size, desc, avail, used (3 × u16), ops, op × (register, u32)…,
//! notifies, head (u16), memory image…]`; short inputs are padded with zeros. The queues of a
//! device with several (vsock: receive, transmit, event) have their rings `QUEUE_STRIDE` apart.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use cella_abi::virtio_mmio::{
    self as reg, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use cella_vmm::devices::virtio::block::Block;
use cella_vmm::devices::virtio::chain;
use cella_vmm::devices::virtio::mmio::MmioTransport;
use cella_vmm::devices::virtio::vsock::Vsock;
use cella_vmm::devices::virtio::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: room for a 256-entry queue's table and rings, and buffers.
const MEM: u64 = 32 << 10;
/// How far apart the rings of a device's queues are (the input places queue 0's).
const QUEUE_STRIDE: u64 = 0x800;
/// The registers an op may write, by index.
const OPS: [u64; 14] = [
    reg::QUEUE_SEL,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_AVAIL_LOW,
    reg::QUEUE_AVAIL_HIGH,
    reg::QUEUE_USED_LOW,
    reg::QUEUE_USED_HIGH,
    reg::QUEUE_NOTIFY,
    reg::STATUS,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::INTERRUPT_ACK,
];

/// A small disk for the block device, made once per process.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("cella-fuzz-disk-{}", std::process::id()));
        let content: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, content).expect("write the fuzz disk");
        path
    })
}

/// The vsock device's socket path, and a host listener for guest connections to port 1024
/// (`<path>_1024`) whose streams are read to their end, made once per process.
fn vsock_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("cella-fuzz-vsock-{}", std::process::id()));
        let port = PathBuf::from(format!("{}_1024", path.display()));
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).expect("bind the fuzz host listener");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || std::io::copy(&mut &stream, &mut std::io::sink()));
            }
        });
        path
    })
}

/// Input bytes, read in order, zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let device = input.u8();
    let size = 1u32 << (input.u8() % 9);
    let rings = [input.u16(), input.u16(), input.u16()].map(|at| u64::from(at) % MEM);
    let ops: Vec<(u64, u32)> =
        (0..input.u8() % 9).map(|_| (OPS[usize::from(input.u8()) % OPS.len()], input.u32())).collect();
    let notifies = input.u8() % 4 + 1;
    let head = input.u16();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
    let image = &input.0[..input.0.len().min(MEM as usize)];
    mem.write_slice(image, GuestAddress(0)).expect("the image fits");

    // One chain, walked directly: what it accepts lies in guest memory and ends in time.
    if let Ok(buffers) = chain::walk(&mem, GuestAddress(rings[0]), size as u16, head) {
        assert!(!buffers.is_empty() && buffers.len() <= size as usize, "{} buffers", buffers.len());
        for b in &buffers {
            assert!(
                b.addr.0.checked_add(u64::from(b.len)).is_some_and(|end| end <= MEM),
                "{b:?} leaves memory"
            );
        }
    }

    let mut host_client = None;
    let mut transport = if device % 2 == 0 {
        MmioTransport::new(Box::new(Block::open(disk()).expect("open the fuzz disk")), mem.clone())
    } else {
        let uds = vsock_path();
        let _ = std::fs::remove_file(uds);
        let vsock = Vsock::new(uds).expect("bind the fuzz vsock socket");
        if device & 2 != 0 {
            let mut client = UnixStream::connect(uds).expect("connect to the fuzz vsock socket");
            client.write_all(b"CONNECT 1025\n").expect("write the CONNECT line");
            host_client = Some(client);
        }
        MmioTransport::new(Box::new(vsock), mem.clone())
    };
    let queues = if device % 2 == 0 { 1 } else { 3 };
    // The driver's bring-up, as the runner does it, with the fuzzer's queue size and rings.
    let mut writes = vec![
        (reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER),
        (reg::DRIVER_FEATURES_SEL, 1),
        (reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32),
        (reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
    ];
    for q in 0..queues {
        // Queue q's rings lie QUEUE_STRIDE × q further on.
        let at = |ring: u64| ((ring + u64::from(q) * QUEUE_STRIDE) % MEM) as u32;
        writes.extend([
            (reg::QUEUE_SEL, q),
            (reg::QUEUE_NUM, size),
            (reg::QUEUE_DESC_LOW, at(rings[0])),
            (reg::QUEUE_AVAIL_LOW, at(rings[1])),
            (reg::QUEUE_USED_LOW, at(rings[2])),
            (reg::QUEUE_READY, 1),
        ]);
    }
    writes.push((reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
    writes.extend(ops);
    for n in 0..notifies {
        writes.push((reg::QUEUE_NOTIFY, u32::from(n) % queues));
    }
    for (offset, value) in writes {
        // A refusal ends the VM: nothing after it would run.
        if transport.write(offset, &value.to_le_bytes()).is_err() {
            return;
        }
        if transport.poll().is_err() {
            return;
        }
    }
    let mut config = [0u8; 8];
    transport.read(reg::CONFIG, &mut config);
    drop(host_client);
});
