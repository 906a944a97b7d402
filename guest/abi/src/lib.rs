//! The contract between the Cella VMM and `cella-runner`: where things sit in guest memory,
//! the versioned boot-info block the VMM writes for the guest, and the I/O ports the guest
//! uses to talk to the VMM. Both sides compile this one crate, so they cannot disagree.
//!
//! The guest runs at CPL 3 with identity-mapped paging (guest virtual = guest physical), so
//! every address below is both.
#![no_std]
#![forbid(unsafe_code)]

/// Fixed guest-physical addresses of the boot structures the VMM builds.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 0x1000;
    /// Size of a large (2 MiB) page.
    pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
    /// The global descriptor table (see [`super::gdt`]).
    pub const GDT_ADDR: u64 = 0x1000;
    /// The 64-bit task-state segment: required by VM entry, and its I/O permission bitmap
    /// names the ports the guest may use (see [`super::ports::GUEST_PORTS`]).
    pub const TSS_ADDR: u64 = 0x2000;
    /// The [`super::BootInfo`] block.
    pub const BOOT_INFO_ADDR: u64 = 0x3000;
    /// The guest's arguments: `argc` NUL-terminated strings back to back.
    pub const ARGS_ADDR: u64 = 0x4000;
    /// Room for the arguments, terminators included.
    pub const ARGS_MAX_LEN: u64 = 0x4000;
    /// Top-level page table (PML4).
    pub const PML4_ADDR: u64 = 0x8000;
    /// The one page-directory-pointer table (covers 512 GiB).
    pub const PDPT_ADDR: u64 = 0x9000;
    /// 4 KiB page table for the first 2 MiB (its page 0 is left unmapped to catch null).
    pub const PT_LOW_ADDR: u64 = 0xA000;
    /// 4 KiB page table for a last, partial 2 MiB of memory.
    pub const PT_TAIL_ADDR: u64 = 0xB000;
    /// First page directory; one follows per GiB of guest memory.
    pub const PD_BASE_ADDR: u64 = 0xC000;
    /// Page directories must end below this address.
    pub const PAGE_TABLES_END: u64 = 0x10_0000;
    /// An unmapped guard page below the helper vCPU's stack: an overflow faults (and ends the
    /// VM) instead of running into the page tables.
    pub const HELPER_STACK_GUARD: u64 = PAGE_TABLES_END;
    /// The helper vCPU's stack (see [`super::BootInfo::helpers`]) grows down from here, to just
    /// above its guard page: the space between the page tables and the image.
    pub const HELPER_STACK_TOP: u64 = IMAGE_BASE;
    /// The runner is linked to run from here (`--image-base`).
    pub const IMAGE_BASE: u64 = 0x20_0000;
    /// Stack at the top of guest memory.
    pub const STACK_SIZE: u64 = 0x10_0000;
    /// The least heap the VMM will give the guest.
    pub const MIN_HEAP_SIZE: u64 = 0x10_0000;
    /// Device register windows start at the first GiB boundary at or above the end of memory
    /// (see [`mmio_base`]); each device gets [`MMIO_DEVICE_SIZE`] bytes, all inside one 2 MiB
    /// page the VMM maps for the guest.
    pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
    /// Most devices one VM can have.
    pub const MMIO_MAX_DEVICES: u64 = 16;

    /// Base of the device window for a VM with `mem_size` bytes of memory.
    pub const fn mmio_base(mem_size: u64) -> u64 {
        mem_size.div_ceil(1 << 30) * (1 << 30)
    }
}

/// Segment selectors and descriptors of the GDT at [`layout::GDT_ADDR`].
pub mod gdt {
    /// Ring-0 64-bit code (present so the table is conventional; the guest never runs at CPL 0).
    pub const KERNEL_CODE: u16 = 0x08;
    /// Ring-0 data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Ring-3 64-bit code, with RPL 3.
    pub const USER_CODE: u16 = 0x18 | 3;
    /// Ring-3 data, with RPL 3.
    pub const USER_DATA: u16 = 0x20 | 3;
    /// The 16-byte 64-bit TSS descriptor.
    pub const TSS: u16 = 0x28;
    /// Number of 8-byte slots in the table (the TSS takes two).
    pub const ENTRIES: usize = 7;
}

/// I/O ports the guest uses. Each port access is one VM exit (~60 µs on nested KVM), and on
/// this host KVM emulates `rep outsb` one byte (one exit) at a time, so the guest hands whole
/// console lines over with [`CONSOLE_LINE`] instead of writing the UART byte by byte.
pub mod ports {
    /// The 8250 UART (COM1) used as the guest console; 8 registers from here.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// Number of UART registers.
    pub const SERIAL_LEN: u16 = 8;
    /// The guest ends the VM by writing its 32-bit exit status here (`out dx, eax`).
    pub const EXIT: u16 = 0x0f4;
    /// The guest writes (`out dx, eax`) the address of a [`super::ConsoleLine`] here; the VMM
    /// feeds its bytes to the UART's transmit register in one exit. The address must be below
    /// 4 GiB (the runner keeps the line in its image).
    pub const CONSOLE_LINE: u16 = 0x0f0;
    /// The guest writes (`out dx, eax`) a timeout in milliseconds here when it has nothing to
    /// do; the VMM blocks the vCPU until a device has work for the guest or the timeout
    /// passes, so an idle guest burns no CPU. 0 returns at once after polling the devices.
    pub const WAIT: u16 = 0x0e8;
    /// A runner building a template (`cella-runner template`) writes here (`out dx, eax`)
    /// once it is ready: the VMM that builds the template stops the vCPU after the write and
    /// snapshots the VM; each VM restored from that snapshot continues after the write, with
    /// its own arguments and devices. Any other VMM ends a VM that writes here.
    pub const PARK: u16 = 0x0ec;
    /// The helper vCPU (see [`super::BootInfo::helpers`]) writes (`out dx, eax`) a timeout in
    /// milliseconds here when it has no work: the VMM blocks it until the boot vCPU writes
    /// [`HELPER_WAKE`] (a wake written before the wait is not lost), a stop, or the timeout.
    pub const HELPER_WAIT: u16 = 0x0e4;
    /// The boot vCPU writes (`out dx, eax`, any value) here after posting work for the
    /// helper vCPU; a VM without a helper ignores it.
    pub const HELPER_WAKE: u16 = 0x0e0;
    /// Every port the guest may touch; all others fault in the guest. Kept below
    /// [`PORT_LIMIT`] so the TSS I/O bitmap stays small.
    pub const GUEST_PORTS: [(u16, u16); 7] = [
        (SERIAL_COM1, SERIAL_LEN),
        (EXIT, 4),
        (CONSOLE_LINE, 4),
        (WAIT, 4),
        (PARK, 4),
        (HELPER_WAIT, 4),
        (HELPER_WAKE, 4),
    ];
    /// Ports at or above this are never allowed.
    pub const PORT_LIMIT: u16 = 0x400;
}

/// Exit statuses the runner itself uses for conditions it detects.
pub mod status {
    /// The boot-info block is missing or of another version.
    pub const BAD_BOOT_INFO: u32 = 120;
    /// The arguments were not understood.
    pub const USAGE: u32 = 121;
    /// The guest panicked.
    pub const PANIC: u32 = 101;
    /// A device could not be used (the console says which and why).
    pub const DEVICE_FAILED: u32 = 122;
    /// The scanner or session refused the artifact (unsafe or corrupt); the host has the
    /// reason. `cella-vmm scan` exits with [`crate::exit::SCAN_REFUSED`] for it.
    pub const ARTIFACT_REFUSED: u32 = 3;
}

/// Exit statuses of Cella's host processes: `cella-vmm` (`run`, `scan`, `session`) and
/// `cella-jailer`, which passes the VMM's own on and adds its own above them. The one
/// definition: the processes that run them (the jailer, `cella-vmm --jailed`, the worker) read
/// them from here.
pub mod exit {
    /// `scan --fail-on LEVEL`: unsuppressed findings at or above the level.
    pub const FINDINGS: u8 = 1;
    /// Bad command line, configuration, artifact path, policy or guest image.
    pub const BAD_INPUT: u8 = 2;
    /// `scan`: the runner refused the artifact (unsafe or corrupt archive) and said why.
    pub const SCAN_REFUSED: u8 = 3;
    /// `run`: guest statuses up to this pass through unchanged.
    pub const GUEST_STATUS_MAX: u32 = 239;
    /// `run`: the guest exited with a status above [`GUEST_STATUS_MAX`].
    pub const GUEST_STATUS_OUT_OF_RANGE: u8 = 240;
    /// The guest crashed or broke a virtio device's contract.
    pub const CRASHED: u8 = 241;
    /// The wall-clock limit passed.
    pub const TIMED_OUT: u8 = 242;
    /// The VMM failed (KVM, memory, the scrub could not be verified, no result).
    pub const VMM_FAILED: u8 = 243;
    /// Stopped by SIGINT or SIGTERM (memory still scrubbed).
    pub const STOPPED: u8 = 244;
    /// `cella-jailer`: the VMM was killed by SIGSYS (its seccomp filter caught a call).
    pub const VMM_KILLED_BY_SECCOMP: u8 = 245;
    /// `cella-jailer`: the VMM was killed by another signal (SIGKILL, an OOM kill, a crash).
    pub const VMM_KILLED: u8 = 246;
    /// `cella-jailer`: a jail step failed; everything it had created was removed.
    pub const JAIL_FAILED: u8 = 247;
    /// `cella-jailer`: the VMM ended but its jail could not be removed completely.
    pub const CLEANUP_FAILED: u8 = 248;
}

/// The environment variable in which a launcher that starts a spare with `posix_spawn` (no
/// code runs in the child before its exec) names its own pid: the spare's process (`cella-vmm`,
/// `cella-jailer`) asks for SIGTERM when that launcher's thread ends, and exits at once if the
/// launcher is already gone.
pub const DIE_WITH_PARENT_ENV: &str = "CELLA_DIE_WITH_PARENT";

/// Most bytes in one [`ConsoleLine`].
pub const CONSOLE_LINE_MAX: usize = 4092;

/// A console line handed to the VMM through [`ports::CONSOLE_LINE`]: a length, then the bytes.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct ConsoleLine {
    /// Valid bytes in `bytes` (at most [`CONSOLE_LINE_MAX`]).
    pub len: u32,
    /// The text.
    pub bytes: [u8; CONSOLE_LINE_MAX],
}

/// `BootInfo::magic`: "CELLABI1" read as a little-endian `u64`.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"CELLABI1");
/// `BootInfo::version`. Any change to [`BootInfo`]'s fields bumps it.
pub const BOOT_INFO_VERSION: u32 = 2;
/// Slots for device descriptions in [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 8;

/// What the VMM tells the guest, written at [`layout::BOOT_INFO_ADDR`] before the first
/// instruction runs. All addresses are guest-physical (= guest-virtual).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()` as the VMM saw it.
    pub size: u32,
    /// Bytes of guest memory, all mapped, from address 0 (page 0 excepted).
    pub mem_size: u64,
    /// First byte of the loaded image.
    pub image_start: u64,
    /// One past the last byte of the loaded image (bss included).
    pub image_end: u64,
    /// First byte the guest may use as heap (page-aligned).
    pub heap_start: u64,
    /// One past the last heap byte (page-aligned); the stack starts here.
    pub heap_end: u64,
    /// Initial stack pointer + 8 (16-byte aligned).
    pub stack_top: u64,
    /// Where the arguments are ([`layout::ARGS_ADDR`]).
    pub args_addr: u64,
    /// Total bytes of argument data, terminators included.
    pub args_len: u32,
    /// Number of arguments.
    pub argc: u32,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// Helper vCPUs running beside the boot vCPU (0 or 1). Each enters the image's entry
    /// point with `rsi` = its index (the boot vCPU's is 0) and its stack at
    /// [`layout::HELPER_STACK_TOP`], and takes work the boot vCPU posts in guest memory
    /// ([`ports::HELPER_WAIT`], [`ports::HELPER_WAKE`]). A VM restored from a template gets
    /// its own value, like its arguments.
    pub helpers: u32,
    /// Devices the guest can drive.
    pub devices: [DeviceInfo; MAX_DEVICES],
}

/// The virtio-mmio (version 2) register window, shared by the VMM's transport and the runner's
/// drivers: offsets, magic, and status bits.
pub mod virtio_mmio {
    pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
    pub const VERSION: u32 = 2;

    pub const STATUS_ACKNOWLEDGE: u32 = 1;
    pub const STATUS_DRIVER: u32 = 2;
    pub const STATUS_DRIVER_OK: u32 = 4;
    pub const STATUS_FEATURES_OK: u32 = 8;
    pub const STATUS_FAILED: u32 = 128;

    pub const MAGIC: u64 = 0x000;
    pub const VERSION_REG: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// `DeviceInfo::kind` for a virtio-mmio device (`id` is its virtio device id).
pub const DEVICE_KIND_VIRTIO_MMIO: u32 = 1;
/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device id of a socket (vsock) device.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// One device the VMM attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// What kind of device (`DEVICE_KIND_*`).
    pub kind: u32,
    /// Kind-specific identifier (for virtio-mmio: the virtio device id).
    pub id: u32,
    /// Base guest-physical address of its registers.
    pub base: u64,
    /// Size of its register window.
    pub size: u64,
}

impl BootInfo {
    /// Size of the block in bytes.
    pub const SIZE: usize = core::mem::size_of::<BootInfo>();

    /// Whether magic, version and size are the ones this build expects.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC && self.version == BOOT_INFO_VERSION && self.size as usize == Self::SIZE
    }

    /// The block as the bytes the VMM writes into guest memory.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = Writer { out: &mut out, at: 0 };
        w.u64(self.magic);
        w.u32(self.version);
        w.u32(self.size);
        for v in [
            self.mem_size,
            self.image_start,
            self.image_end,
            self.heap_start,
            self.heap_end,
            self.stack_top,
            self.args_addr,
        ] {
            w.u64(v);
        }
        w.u32(self.args_len);
        w.u32(self.argc);
        w.u32(self.device_count);
        w.u32(self.helpers);
        for d in &self.devices {
            w.u32(d.kind);
            w.u32(d.id);
            w.u64(d.base);
            w.u64(d.size);
        }
        debug_assert_eq!(w.at, Self::SIZE);
        out
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn u32(&mut self, v: u32) {
        self.out[self.at..self.at + 4].copy_from_slice(&v.to_le_bytes());
        self.at += 4;
    }
    fn u64(&mut self, v: u64) {
        self.out[self.at..self.at + 8].copy_from_slice(&v.to_le_bytes());
        self.at += 8;
    }
}

/// Splits an argument block (NUL-terminated strings back to back) into its strings.
pub fn split_args(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = block.strip_suffix(b"\0").unwrap_or(block);
    body.split(|b| *b == 0).filter(move |_| !block.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_bytes_match_the_repr_c_layout() {
        assert_eq!(BootInfo::SIZE, 8 + 4 + 4 + 7 * 8 + 4 * 4 + MAX_DEVICES * 24);
        let info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: BootInfo::SIZE as u32,
            mem_size: 0x1122_3344_5566_7788,
            argc: 3,
            ..Default::default()
        };
        let bytes = info.to_bytes();
        assert_eq!(&bytes[0..8], b"CELLABI1");
        assert_eq!(&bytes[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[76..80], &3u32.to_le_bytes());
        assert!(info.is_valid());
    }

    #[test]
    fn split_args_returns_each_string() {
        let args: [&[u8]; 2] = [b"exit", b"7"];
        assert!(split_args(b"exit\x007\x00").eq(args));
        assert_eq!(split_args(b"").count(), 0);
    }

    #[test]
    fn page_tables_fit_below_the_image() {
        const { assert!(layout::PD_BASE_ADDR < layout::PAGE_TABLES_END) };
        const { assert!(layout::PAGE_TABLES_END <= layout::IMAGE_BASE) };
        const { assert!(layout::ARGS_ADDR + layout::ARGS_MAX_LEN <= layout::PML4_ADDR) };
    }
}

/// The virtio-vsock packet header (virtio spec 5.10.6), shared by the VMM's device and the
/// runner's driver. Little-endian on the wire, 44 bytes.
pub mod vsock {
    /// Bytes in a header.
    pub const HEADER_LEN: usize = 44;
    /// The host's context id.
    pub const HOST_CID: u64 = 2;
    /// The guest's context id in every Cella VM.
    pub const GUEST_CID: u64 = 3;
    /// Stream sockets, the only type Cella uses.
    pub const TYPE_STREAM: u16 = 1;
    /// Most payload bytes in one packet.
    pub const MAX_PAYLOAD: usize = 64 * 1024;

    /// Operations.
    pub mod op {
        pub const REQUEST: u16 = 1;
        pub const RESPONSE: u16 = 2;
        pub const RST: u16 = 3;
        pub const SHUTDOWN: u16 = 4;
        pub const RW: u16 = 5;
        pub const CREDIT_UPDATE: u16 = 6;
        pub const CREDIT_REQUEST: u16 = 7;
    }

    /// SHUTDOWN flags: the sender will receive / send no more.
    pub const SHUTDOWN_RCV: u32 = 1;
    pub const SHUTDOWN_SEND: u32 = 2;

    /// One packet header.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Header {
        pub src_cid: u64,
        pub dst_cid: u64,
        pub src_port: u32,
        pub dst_port: u32,
        pub len: u32,
        pub kind: u16,
        pub op: u16,
        pub flags: u32,
        pub buf_alloc: u32,
        pub fwd_cnt: u32,
    }

    impl Header {
        /// The header as wire bytes.
        pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
            let mut b = [0u8; HEADER_LEN];
            b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
            b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
            b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
            b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
            b[24..28].copy_from_slice(&self.len.to_le_bytes());
            b[28..30].copy_from_slice(&self.kind.to_le_bytes());
            b[30..32].copy_from_slice(&self.op.to_le_bytes());
            b[32..36].copy_from_slice(&self.flags.to_le_bytes());
            b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
            b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
            b
        }

        /// Parses wire bytes; `None` if fewer than [`HEADER_LEN`].
        pub fn from_bytes(b: &[u8]) -> Option<Header> {
            let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
            let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
            let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
            Some(Header {
                src_cid: u64_at(0),
                dst_cid: u64_at(8),
                src_port: u32_at(16),
                dst_port: u32_at(20),
                len: u32_at(24),
                kind: u16_at(28),
                op: u16_at(30),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn header_round_trips() {
            let h = Header {
                src_cid: 3,
                dst_cid: 2,
                src_port: 7,
                dst_port: 1024,
                len: 9,
                kind: 1,
                op: op::RW,
                flags: 0,
                buf_alloc: 1 << 20,
                fwd_cnt: 77,
            };
            assert_eq!(Header::from_bytes(&h.to_bytes()), Some(h));
            assert_eq!(Header::from_bytes(&[0; 43]), None);
        }
    }
}
