//! One vCPU: its boot registers, the thread that runs it, and the exit loop.
//!
//! A vCPU is stopped from outside by setting its stop flag and sending its thread
//! [`kick_signal`]. The handler sets `kvm_run.immediate_exit`, so a kick that lands just before
//! `KVM_RUN` is not lost: the ioctl returns `EINTR` at once and the loop sees the flag.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::x86_64::regs;
use crate::devices::{IoBus, IoResult};

/// Why a vCPU could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create { index: u64, source: kvm_ioctls::Error },
    #[error("cannot query the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's {what}")]
    SetRegisters { what: &'static str, source: kvm_ioctls::Error },
    #[error(
        "this CPU lacks {missing}; Cella's guest images are built for x86-64-v2 \
         (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT)"
    )]
    CpuFeatures { missing: String },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest wrote its exit status to the exit port.
    GuestExit(u32),
    /// The guest faulted with no IDT to handle it (`KVM_EXIT_SHUTDOWN`).
    TripleFault { rip: u64 },
    /// KVM could not emulate a guest instruction (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError { suberror: u32, rip: u64 },
    /// The guest touched a port or address no device answers.
    UnhandledIo { what: String, rip: u64 },
    /// The guest broke a device's contract.
    DeviceFailure { device: &'static str, reason: String },
    /// A KVM exit this VMM does not expect from its guest.
    UnexpectedExit { exit: &'static str, rip: u64 },
    /// VM entry failed: the VMM set up a state the CPU refuses.
    EntryFailed { reason: u64 },
    /// Someone outside the vCPU asked it to stop.
    Kicked,
    /// The vCPU thread ended without reporting why.
    ThreadLost,
    /// `KVM_RUN` itself failed.
    Kvm(kvm_ioctls::Error),
    /// The thread could not install its seccomp filter, so the guest never ran.
    Seccomp(crate::seccomp::SeccompError),
}

/// When the vCPU did what; the basis of `launch_us` and `run_us`.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTimes {
    /// Just before the first `KVM_RUN`.
    pub entered: Instant,
    /// When the first exit came back (any exit).
    pub first_exit: Option<Instant>,
    /// When the vCPU stopped.
    pub stopped: Instant,
    /// Exits handled.
    pub exits: u64,
}

impl VcpuTimes {
    /// Times for a vCPU that never entered the guest.
    fn now() -> Self {
        let now = Instant::now();
        VcpuTimes { entered: now, first_exit: None, stopped: now, exits: 0 }
    }
}

/// What a vCPU thread hands back when it ends.
#[derive(Debug)]
pub struct VcpuOutcome {
    pub stop: VcpuStop,
    pub times: VcpuTimes,
}

/// A configured vCPU that has not started yet.
#[derive(Debug)]
pub struct Vcpu {
    index: u64,
    fd: VcpuFd,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// The bus's kick eventfd, so a kick also ends a wait exit that is blocked in poll(2).
    static KICK_FD: Cell<libc::c_int> = const { Cell::new(-1) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's live kvm_run mapping (cleared before the vCPU fd is
            // dropped); a volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
    let _ = KICK_FD.try_with(|fd| {
        let fd = fd.get();
        if fd >= 0 {
            let one = 1u64;
            // SAFETY: write(2) of 8 bytes to an eventfd is async-signal-safe; `fd` stays open
            // while this thread runs (the bus outlives the vCPU thread).
            unsafe { libc::write(fd, (&raw const one).cast(), 8) };
        }
    });
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALL.call_once(|| {
        let _ = RESULT.set(register_signal_handler(kick_signal(), handle_kick));
    });
    RESULT.get().cloned().unwrap_or(Ok(())).map_err(VcpuError::Signal)
}

/// The CPUID KVM supports on this host, asked once per process.
fn supported_cpuid(vm: &Vm) -> Result<CpuId, VcpuError> {
    static CACHE: OnceLock<CpuId> = OnceLock::new();
    if let Some(cpuid) = CACHE.get() {
        return Ok(cpuid.clone());
    }
    let cpuid = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VcpuError::SupportedCpuid)?;
    check_guest_features()?;
    Ok(CACHE.get_or_init(|| cpuid).clone())
}

/// The guest images use x86-64-v2 instructions (`scripts/guest-env.sh`): refuse a host that
/// cannot run them, rather than let the guest die of an invalid opcode. The check asks this
/// CPU, not KVM's supported CPUID: ring-3 guest code runs on the CPU as it is, and this host's
/// KVM (PVM) leaves SSE3–SSE4.2 out of the CPUID it offers although guests execute them.
fn check_guest_features() -> Result<(), VcpuError> {
    let features = [
        ("SSE3", std::arch::is_x86_feature_detected!("sse3")),
        ("SSSE3", std::arch::is_x86_feature_detected!("ssse3")),
        ("SSE4.1", std::arch::is_x86_feature_detected!("sse4.1")),
        ("SSE4.2", std::arch::is_x86_feature_detected!("sse4.2")),
        ("POPCNT", std::arch::is_x86_feature_detected!("popcnt")),
    ];
    let missing: Vec<&str> = features.iter().filter(|(_, ok)| !ok).map(|(name, _)| *name).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(VcpuError::CpuFeatures { missing: missing.join(", ") })
    }
}

impl Vcpu {
    /// Creates vCPU `index` and gives it the host's supported CPUID.
    pub fn new(vm: &Vm, index: u64) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let fd = vm.fd().create_vcpu(index).map_err(|source| VcpuError::Create { index, source })?;
        fd.set_cpuid2(&supported_cpuid(vm)?)
            .map_err(|source| VcpuError::SetRegisters { what: "CPUID", source })?;
        Ok(Vcpu { index, fd })
    }

    /// The KVM vCPU, for saving and restoring its state (`snapshot::vcpu_state`).
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets the registers for the guest's first instruction at `entry`.
    pub fn configure(&self, entry: u64, stack_top: u64) -> Result<(), VcpuError> {
        let set = |what| move |source| VcpuError::SetRegisters { what, source };
        let sregs = self.fd.get_sregs().map_err(set("special registers"))?;
        self.fd.set_sregs(&regs::special(sregs)).map_err(set("special registers"))?;
        self.fd.set_regs(&regs::general(entry, stack_top)).map_err(set("general registers"))?;
        self.fd.set_fpu(&regs::fpu()).map_err(set("FPU state"))?;
        Ok(())
    }

    /// Starts the vCPU on its own thread, handling port I/O through `bus`.
    pub fn start(self, bus: Arc<IoBus>) -> Result<VcpuHandle, VcpuError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                // Seccomp before the guest's first instruction runs on this thread.
                let outcome = match crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    Ok(()) => self.run(&bus, &thread_stop),
                    Err(e) => VcpuOutcome { stop: VcpuStop::Seccomp(e), times: VcpuTimes::now() },
                };
                let _ = tx.send(outcome);
            })
            .map_err(VcpuError::Thread)?;
        Ok(VcpuHandle { thread: Some(thread), stop, outcome: rx })
    }

    fn run(mut self, bus: &IoBus, stop: &AtomicBool) -> VcpuOutcome {
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_page));
        KICK_FD.with(|cell| cell.set(bus.kick_fd()));
        let entered = Instant::now();
        let mut times = VcpuTimes { entered, first_exit: None, stopped: entered, exits: 0 };
        let stop_reason = loop {
            if stop.load(Ordering::Acquire) {
                break VcpuStop::Kicked;
            }
            let result = self.fd.run();
            times.first_exit.get_or_insert_with(Instant::now);
            times.exits += 1;
            let step = match result {
                Ok(exit) => handle_exit(exit, bus),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    Step::Continue
                }
                Err(e) => Step::Stop(VcpuStop::Kvm(e)),
            };
            match step {
                Step::Continue => {}
                Step::Stop(stop) => break stop,
                Step::StopAtRip(make) => break make(self.rip()),
                Step::InternalError => {
                    let suberror = self.internal_suberror();
                    break VcpuStop::InternalError { suberror, rip: self.rip() };
                }
            }
        };
        times.stopped = Instant::now();
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        KICK_FD.with(|cell| cell.set(-1));
        VcpuOutcome { stop: stop_reason, times }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, when `internal` is the union
        // member the kernel filled in.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }
}

enum Step {
    Continue,
    Stop(VcpuStop),
    /// Stop with a reason that needs the guest's RIP (read after the exit borrow ends).
    StopAtRip(Box<dyn FnOnce(u64) -> VcpuStop>),
    /// `KVM_EXIT_INTERNAL_ERROR`: read its suberror and RIP.
    InternalError,
}

fn handle_exit(exit: VcpuExit<'_>, bus: &IoBus) -> Step {
    let io = |result: IoResult| match result {
        IoResult::Done => Step::Continue,
        IoResult::GuestExit(code) => Step::Stop(VcpuStop::GuestExit(code)),
        IoResult::DeviceFailure { device, reason } => Step::Stop(VcpuStop::DeviceFailure { device, reason }),
        IoResult::Unhandled(what) => {
            Step::StopAtRip(Box::new(move |rip| VcpuStop::UnhandledIo { what, rip }))
        }
    };
    match exit {
        VcpuExit::IoOut(port, data) => io(bus.port_write(port, data)),
        VcpuExit::IoIn(port, data) => io(bus.port_read(port, data)),
        VcpuExit::MmioRead(addr, data) => io(bus.mmio_read(addr, data)),
        VcpuExit::MmioWrite(addr, data) => io(bus.mmio_write(addr, data)),
        VcpuExit::Shutdown => Step::StopAtRip(Box::new(|rip| VcpuStop::TripleFault { rip })),
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, _) => Step::Stop(VcpuStop::EntryFailed { reason }),
        VcpuExit::Hlt => Step::StopAtRip(Box::new(|rip| VcpuStop::UnexpectedExit { exit: "hlt", rip })),
        VcpuExit::Intr => Step::Continue,
        other => {
            let exit = exit_name(&other);
            Step::StopAtRip(Box::new(move |rip| VcpuStop::UnexpectedExit { exit, rip }))
        }
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(_) => "hypercall",
        VcpuExit::Debug(_) => "debug",
        VcpuExit::SystemEvent(..) => "system event",
        VcpuExit::X86Rdmsr(_) => "rdmsr",
        VcpuExit::X86Wrmsr(_) => "wrmsr",
        VcpuExit::Nmi => "nmi",
        _ => "unknown",
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    outcome: Receiver<VcpuOutcome>,
}

impl VcpuHandle {
    /// Waits up to `timeout` for the vCPU to stop on its own.
    pub fn wait(&mut self, timeout: Duration) -> Option<VcpuOutcome> {
        match self.outcome.recv_timeout(timeout) {
            Ok(outcome) => {
                self.join();
                Some(outcome)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // The thread ended without a report (it panicked): that is the outcome.
                self.join();
                Some(VcpuOutcome { stop: VcpuStop::ThreadLost, times: VcpuTimes::now() })
            }
        }
    }

    /// Stops the vCPU (kicking it out of `KVM_RUN`) and waits for it.
    pub fn stop(&mut self) -> Option<VcpuOutcome> {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = &self.thread {
            let _ = thread.kill(kick_signal());
        }
        let outcome = self.outcome.recv().ok();
        self.join();
        outcome
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}
