//! One vCPU: its boot registers, the thread that runs it, the exit loop, and its
//! running/paused state machine.
//!
//! The VMM steers a vCPU through its [`VcpuHandle`] by setting what it wants (run, pause, stop)
//! and sending the thread [`kick_signal`]. The handler sets `kvm_run.immediate_exit`, so a kick
//! that lands just before `KVM_RUN` is not lost: the ioctl returns `EINTR` at once and the loop
//! sees the request. It also writes the I/O bus's kick eventfd, which ends a wait exit blocked
//! in poll(2).
//!
//! Pausing: the loop sees the request, runs `KVM_RUN` once more with `immediate_exit` set, which
//! lets KVM finish the last I/O exit (the value of an `in`, the instruction pointer past an
//! `out`) and return `EINTR` without entering the guest, so the registers rest at an instruction
//! boundary. Then the thread parks: it blocks on its request channel and uses no CPU. While
//! parked it serves [`VcpuHandle::with_paused_vcpu`] (run a closure with the `VcpuFd` on the
//! vCPU thread, e.g. to save registers for a snapshot), resume and stop.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
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

/// Why a pause, resume or paused-vCPU request was not carried out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuControlError {
    #[error("the vCPU is paused already")]
    AlreadyPaused,
    #[error("the vCPU is not paused; pause it first")]
    NotPaused,
    #[error("the vCPU has stopped (the guest ended or the VM is being torn down)")]
    Ended,
    #[error("the vCPU did not {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the VM runs a helper vCPU, whose state a snapshot does not hold")]
    HelperRunning,
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

/// The kick eventfd of the vCPU running on this thread (-1 on any other thread): a wait exit
/// polls it, so a kick ends the wait.
pub(crate) fn current_kick_fd() -> RawFd {
    KICK_FD.try_with(Cell::get).unwrap_or(-1)
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

    /// Sets the registers for the guest's first instruction at `entry` (`rsi` = this vCPU's
    /// index, so a helper knows it is one).
    pub fn configure(&self, entry: u64, stack_top: u64) -> Result<(), VcpuError> {
        let set = |what| move |source| VcpuError::SetRegisters { what, source };
        let sregs = self.fd.get_sregs().map_err(set("special registers"))?;
        self.fd.set_sregs(&regs::special(sregs)).map_err(set("special registers"))?;
        self.fd.set_regs(&regs::general(entry, stack_top, self.index)).map_err(set("general registers"))?;
        self.fd.set_fpu(&regs::fpu()).map_err(set("FPU state"))?;
        Ok(())
    }

    /// The vCPU's KVM handle, e.g. to load restored registers before [`Vcpu::start`].
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM handle alone, for code that runs the vCPU itself (the snapshot tests).
    pub(crate) fn into_fd(self) -> VcpuFd {
        self.fd
    }

    /// Starts the vCPU on its own thread, handling port I/O through `bus`.
    pub fn start(self, bus: Arc<IoBus>) -> Result<VcpuHandle, VcpuError> {
        self.start_linked(bus, None)
    }

    /// Starts a helper vCPU beside `boot`: if it stops on its own (the guest crashed or
    /// exited on it, KVM failed), `boot` stops too and reports that as its own end, so the VM
    /// ends with the helper's reason. Stop the helper before `boot` is stopped or dropped.
    pub fn start_helper(self, bus: Arc<IoBus>, boot: &VcpuHandle) -> Result<VcpuHandle, VcpuError> {
        let thread = boot.thread.as_ref().map(|t| t.as_pthread_t());
        let link = thread.map(|thread| BootLink {
            wanted: boot.wanted.clone(),
            abort: boot.abort.clone(),
            requests: boot.requests.clone(),
            thread,
        });
        self.start_linked(bus, link)
    }

    fn start_linked(self, bus: Arc<IoBus>, boot: Option<BootLink>) -> Result<VcpuHandle, VcpuError> {
        let wanted = Arc::new(AtomicU8::new(WANT_RUN));
        let abort: Arc<Mutex<Option<VcpuStop>>> = Arc::default();
        let thread_abort = abort.clone();
        let (event_tx, events) = mpsc::channel();
        let (requests, request_rx) = mpsc::channel();
        let exit_evt =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VcpuError::Thread)?);
        let thread_wanted = wanted.clone();
        let thread_exit_evt = exit_evt.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                // Seccomp before the guest's first instruction runs on this thread.
                let outcome = match crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    Ok(()) => {
                        let control = ThreadControl {
                            wanted: &thread_wanted,
                            requests: &request_rx,
                            events: &event_tx,
                            abort: &thread_abort,
                        };
                        self.run(&bus, &control)
                    }
                    Err(e) => VcpuOutcome { stop: VcpuStop::Seccomp(e), times: VcpuTimes::now() },
                };
                let outcome = match boot {
                    Some(boot) if !matches!(outcome.stop, VcpuStop::Kicked) => boot.hand_over(outcome),
                    _ => outcome,
                };
                let _ = event_tx.send(VcpuEvent::Ended(outcome));
                let _ = thread_exit_evt.write(1);
            })
            .map_err(VcpuError::Thread)?;
        Ok(VcpuHandle {
            thread: Some(thread),
            wanted,
            abort,
            requests,
            events,
            exit_evt,
            parked: false,
            ended: None,
        })
    }

    fn run(mut self, bus: &IoBus, control: &ThreadControl<'_>) -> VcpuOutcome {
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_page));
        KICK_FD.with(|cell| cell.set(bus.kick_fd(self.index)));
        let entered = Instant::now();
        let mut times = VcpuTimes { entered, first_exit: None, stopped: entered, exits: 0 };
        // Set once a KVM_RUN with immediate_exit has returned EINTR: no I/O completion is
        // pending, the registers are at an instruction boundary, and the thread may park.
        let mut settled = false;
        let stop_reason = loop {
            let pausing = match control.wanted.load(Ordering::Acquire) {
                WANT_STOP => break control.stop_reason(),
                WANT_PAUSE if settled => {
                    settled = false;
                    match self.park(control) {
                        Parked::Resumed => continue,
                        Parked::Stop => break control.stop_reason(),
                    }
                }
                WANT_PAUSE => true,
                _ => false,
            };
            if pausing {
                // KVM completes the pending I/O exit, then returns EINTR without entering the
                // guest (a string I/O may come back as one more exit, handled below).
                self.fd.set_kvm_immediate_exit(1);
            }
            let result = self.fd.run();
            if !pausing {
                times.first_exit.get_or_insert_with(Instant::now);
                times.exits += 1;
            }
            let step = match result {
                Ok(exit) => handle_exit(exit, bus),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    // Any kick wrote the eventfd too; drain it so later wait exits block again.
                    drain_eventfd(bus.kick_fd(self.index));
                    settled = pausing;
                    Step::Continue
                }
                Err(e) => Step::Stop(VcpuStop::Kvm(e)),
            };
            match step {
                Step::Continue => {}
                // The guest's park: settle and park as for a pause, unless a stop came first.
                Step::Park => {
                    let _ = control.wanted.compare_exchange(
                        WANT_RUN,
                        WANT_PAUSE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
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

    /// Parks the thread until it is resumed or stopped, serving closures meanwhile. Uses no
    /// CPU: the thread blocks in the channel's futex.
    fn park(&mut self, control: &ThreadControl<'_>) -> Parked {
        let _ = control.events.send(VcpuEvent::Parked);
        loop {
            match control.requests.recv() {
                Ok(VcpuRequest::WithFd(f)) => f(&self.fd),
                Ok(VcpuRequest::Resume) => {
                    if control.wanted.load(Ordering::Acquire) == WANT_STOP {
                        return Parked::Stop;
                    }
                    let _ = control.events.send(VcpuEvent::Resumed);
                    return Parked::Resumed;
                }
                // A stop, or the handle is gone: nobody can resume this vCPU any more.
                Ok(VcpuRequest::Stop) | Err(_) => return Parked::Stop,
            }
        }
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

/// What the handle wants of the thread (`VcpuHandle::wanted`).
const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;

/// A request a parked vCPU thread serves.
enum VcpuRequest {
    Resume,
    Stop,
    /// Run this on the vCPU thread with the vCPU's fd (it sends its own result back).
    WithFd(Box<dyn FnOnce(&VcpuFd) + Send>),
}

/// What the vCPU thread reports to its handle.
#[derive(Debug)]
enum VcpuEvent {
    Parked,
    Resumed,
    Ended(VcpuOutcome),
}

/// The thread's end of the handle's channels.
struct ThreadControl<'a> {
    wanted: &'a AtomicU8,
    requests: &'a Receiver<VcpuRequest>,
    events: &'a Sender<VcpuEvent>,
    /// Where a helper vCPU leaves the reason it stopped on its own (see [`BootLink`]).
    abort: &'a Mutex<Option<VcpuStop>>,
}

impl ThreadControl<'_> {
    /// Why a stop request ends this vCPU: a helper's reason if one left it, else a kick.
    fn stop_reason(&self) -> VcpuStop {
        self.abort.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or(VcpuStop::Kicked)
    }
}

/// A helper vCPU's hold on the boot vCPU it works beside.
struct BootLink {
    wanted: Arc<AtomicU8>,
    abort: Arc<Mutex<Option<VcpuStop>>>,
    /// Wakes the boot vCPU if it is parked (paused).
    requests: Sender<VcpuRequest>,
    thread: libc::pthread_t,
}

impl BootLink {
    /// The helper stopped on its own: hand its reason to the boot vCPU and stop that one, so
    /// the VM ends with it. The helper's own outcome becomes a plain stop.
    fn hand_over(self, outcome: VcpuOutcome) -> VcpuOutcome {
        *self.abort.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.stop);
        self.wanted.store(WANT_STOP, Ordering::Release);
        // A parked boot vCPU takes this; a running one ignores it (the signal below ends its
        // `KVM_RUN` or wait exit, and it sees the stop it was asked for).
        let _ = self.requests.send(VcpuRequest::Stop);
        // SAFETY: `thread` is the boot vCPU's, which is neither joined nor detached while the
        // helper runs (the VM stops its helper first); a signal to a thread that has already
        // returned is harmless.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        VcpuOutcome { stop: VcpuStop::Kicked, times: outcome.times }
    }
}

/// How a park ended.
enum Parked {
    Resumed,
    Stop,
}

/// Reads an eventfd's counter back to zero (it is non-blocking; an empty one is fine).
fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: an 8-byte read into a local u64 from a non-blocking eventfd the bus keeps open
    // while this thread runs; EAGAIN (already zero) is fine.
    unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
}

enum Step {
    Continue,
    /// The guest asked to be parked (a template build's snapshot point).
    Park,
    Stop(VcpuStop),
    /// Stop with a reason that needs the guest's RIP (read after the exit borrow ends).
    StopAtRip(Box<dyn FnOnce(u64) -> VcpuStop>),
    /// `KVM_EXIT_INTERNAL_ERROR`: read its suberror and RIP.
    InternalError,
}

fn handle_exit(exit: VcpuExit<'_>, bus: &IoBus) -> Step {
    let io = |result: IoResult| match result {
        IoResult::Done => Step::Continue,
        IoResult::Park => Step::Park,
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

/// A running vCPU thread, and the only way to steer it. Pause, resume and stop come from one
/// thread (the VMM thread); [`VcpuHandle::with_paused_vcpu`] from any.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    wanted: Arc<AtomicU8>,
    /// A helper's reason for stopping, handed to this (boot) vCPU.
    abort: Arc<Mutex<Option<VcpuStop>>>,
    requests: Sender<VcpuRequest>,
    events: Receiver<VcpuEvent>,
    /// Written by the vCPU thread when it ends, so an event loop can poll for it.
    exit_evt: Arc<EventFd>,
    parked: bool,
    /// The outcome, once the thread has reported it and until [`VcpuHandle::wait`] hands it over.
    ended: Option<VcpuOutcome>,
}

impl std::fmt::Debug for VcpuRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VcpuRequest::Resume => "Resume",
            VcpuRequest::Stop => "Stop",
            VcpuRequest::WithFd(_) => "WithFd",
        })
    }
}

impl VcpuHandle {
    /// A descriptor that becomes readable when the vCPU thread has ended (poll it for `POLLIN`).
    pub fn exit_fd(&self) -> RawFd {
        self.exit_evt.as_raw_fd()
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.parked
    }

    /// Whether the vCPU thread has ended (its outcome waits in [`VcpuHandle::wait`]).
    pub fn has_ended(&mut self) -> bool {
        while self.ended.is_none() {
            match self.events.try_recv() {
                Ok(event) => self.note(event),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => self.note_lost(),
            }
        }
        self.ended.is_some()
    }

    fn note(&mut self, event: VcpuEvent) {
        match event {
            VcpuEvent::Parked => self.parked = true,
            VcpuEvent::Resumed => self.parked = false,
            VcpuEvent::Ended(outcome) => {
                self.parked = false;
                self.ended = Some(outcome);
            }
        }
    }

    fn note_lost(&mut self) {
        // The thread ended without a report (it panicked): that is the outcome.
        self.parked = false;
        self.ended = Some(VcpuOutcome { stop: VcpuStop::ThreadLost, times: VcpuTimes::now() });
    }

    /// Waits up to `timeout` for the next event; false on timeout.
    fn next_event(&mut self, deadline: Instant) -> bool {
        match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(event) => {
                self.note(event);
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                self.note_lost();
                true
            }
        }
    }

    /// Pauses the vCPU: kicks it out of `KVM_RUN` (or out of a wait exit) and returns once it
    /// is parked at an instruction boundary, or `Timeout` after `timeout`.
    pub fn pause(&mut self, timeout: Duration) -> Result<(), VcpuControlError> {
        if self.has_ended() {
            return Err(VcpuControlError::Ended);
        }
        if self.parked {
            return Err(VcpuControlError::AlreadyPaused);
        }
        self.wanted.store(WANT_PAUSE, Ordering::Release);
        self.kick();
        let deadline = Instant::now() + timeout;
        while !self.parked {
            if self.ended.is_some() {
                return Err(VcpuControlError::Ended);
            }
            if !self.next_event(deadline) {
                return Err(VcpuControlError::Timeout { what: "pause", after: timeout });
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the guest to park itself (see [`IoBus::allow_park`]).
    pub fn wait_guest_park(&mut self, timeout: Duration) -> Result<(), VcpuControlError> {
        let deadline = Instant::now() + timeout;
        while !self.parked {
            if self.has_ended() {
                return Err(VcpuControlError::Ended);
            }
            if !self.next_event(deadline) {
                return Err(VcpuControlError::Timeout { what: "park", after: timeout });
            }
        }
        Ok(())
    }

    /// Resumes a parked vCPU; returns once its thread is about to enter the guest again.
    pub fn resume(&mut self, timeout: Duration) -> Result<(), VcpuControlError> {
        if self.has_ended() {
            return Err(VcpuControlError::Ended);
        }
        if !self.parked {
            return Err(VcpuControlError::NotPaused);
        }
        self.wanted.store(WANT_RUN, Ordering::Release);
        if self.requests.send(VcpuRequest::Resume).is_err() {
            self.note_lost();
            return Err(VcpuControlError::Ended);
        }
        let deadline = Instant::now() + timeout;
        while self.parked {
            if !self.next_event(deadline) {
                return Err(VcpuControlError::Timeout { what: "resume", after: timeout });
            }
        }
        if self.ended.is_some() {
            return Err(VcpuControlError::Ended);
        }
        Ok(())
    }

    /// Runs `f` on the parked vCPU's thread with its `VcpuFd` (e.g. to save its registers for
    /// a snapshot; the vCPU seccomp filter allows the `KVM_GET_*` ioctls) and returns what it
    /// returned. The vCPU must be paused.
    pub fn with_paused_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
    ) -> Result<R, VcpuControlError> {
        if !self.parked {
            return Err(VcpuControlError::NotPaused);
        }
        let (tx, rx) = mpsc::channel();
        let job: Box<dyn FnOnce(&VcpuFd) + Send> = Box::new(move |fd| {
            let _ = tx.send(f(fd));
        });
        self.requests.send(VcpuRequest::WithFd(job)).map_err(|_| VcpuControlError::Ended)?;
        // The thread drops the job unrun only if it ends, which closes the channel.
        rx.recv().map_err(|_| VcpuControlError::Ended)
    }

    /// Waits up to `timeout` for the vCPU to stop on its own (a paused vCPU does not), and
    /// hands over its outcome.
    pub fn wait(&mut self, timeout: Duration) -> Option<VcpuOutcome> {
        if !self.wait_end(timeout) {
            return None;
        }
        self.join();
        self.ended.take()
    }

    /// Waits up to `timeout` for the vCPU to stop on its own; true if it has. The outcome stays
    /// here for [`VcpuHandle::stop`] or [`VcpuHandle::wait`].
    pub fn wait_end(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ended.is_none() {
            if !self.next_event(deadline) {
                return false;
            }
        }
        true
    }

    /// Stops the vCPU (kicking it out of `KVM_RUN`, or waking it if parked) and waits for it.
    pub fn stop(&mut self) -> Option<VcpuOutcome> {
        if self.ended.is_none() && self.thread.is_some() {
            self.wanted.store(WANT_STOP, Ordering::Release);
            let _ = self.requests.send(VcpuRequest::Stop);
            self.kick();
            while self.ended.is_none() {
                match self.events.recv() {
                    Ok(event) => self.note(event),
                    Err(_) => self.note_lost(),
                }
            }
        }
        self.join();
        self.ended.take()
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            let _ = thread.kill(kick_signal());
        }
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

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use kvm_bindings::*;

    /// `_IOC(dir, 0xAE, nr, size)`: 1 write, 2 read, 3 both.
    fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
    }

    /// The ioctls filter `name` (policy text `json`) allows: each request's name (its comment's
    /// first word) and number.
    fn ioctls(json: &str, name: &str) -> Vec<(String, u64)> {
        let policy: serde_json::Value = serde_json::from_str(json).unwrap();
        policy[name]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["syscall"] == "ioctl")
            .map(|rule| {
                let arg = &rule["args"][0];
                let name = arg["comment"].as_str().unwrap().split(' ').next().unwrap().to_owned();
                (name, arg["val"].as_u64().unwrap())
            })
            .collect()
    }

    /// The `vcpu` seccomp filter lets through each ioctl a snapshot needs, by the number the
    /// kernel sees (computed here from kvm-bindings' struct sizes, not copied from the JSON).
    #[test]
    fn the_vcpu_filter_allows_the_state_ioctls_by_their_real_numbers() {
        let allowed = ioctls(include_str!("../../../seccomp/filters/vcpu.json"), "vcpu");
        let wanted = [
            ("KVM_RUN", 0x80 | (0xAE << 8)),
            ("KVM_GET_REGS", kvm_ioc(2, 0x81, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", kvm_ioc(2, 0x83, size_of::<kvm_sregs>())),
            ("KVM_GET_FPU", kvm_ioc(2, 0x8c, size_of::<kvm_fpu>())),
            ("KVM_GET_MSRS", kvm_ioc(3, 0x88, size_of::<kvm_msrs>())),
            ("KVM_GET_CPUID2", kvm_ioc(3, 0x91, size_of::<kvm_cpuid2>())),
            ("KVM_GET_MP_STATE", kvm_ioc(2, 0x98, size_of::<kvm_mp_state>())),
            ("KVM_GET_VCPU_EVENTS", kvm_ioc(2, 0x9f, size_of::<kvm_vcpu_events>())),
            ("KVM_GET_DEBUGREGS", kvm_ioc(2, 0xa1, size_of::<kvm_debugregs>())),
            ("KVM_GET_TSC_KHZ", kvm_ioc(0, 0xa3, 0)),
            ("KVM_GET_XSAVE", kvm_ioc(2, 0xa4, size_of::<kvm_xsave>())),
            ("KVM_GET_XCRS", kvm_ioc(2, 0xa6, size_of::<kvm_xcrs>())),
            ("KVM_GET_XSAVE2", kvm_ioc(2, 0xcf, size_of::<kvm_xsave>())),
        ];
        for (name, number) in wanted {
            assert!(
                allowed.iter().any(|(n, v)| n == name && *v == number),
                "vcpu.json does not allow {name} = {number}; it has {allowed:?}"
            );
        }
    }

    /// The `restore` filter (a spare session VMM's) lets through each ioctl that loading a
    /// snapshot into the VM and vCPU made ahead takes, by the number the kernel sees.
    #[test]
    fn the_restore_filter_allows_the_set_ioctls_by_their_real_numbers() {
        let allowed = ioctls(include_str!("../../../seccomp/filters/restore.json"), "restore");
        let wanted = [
            ("KVM_SET_USER_MEMORY_REGION", kvm_ioc(1, 0x46, size_of::<kvm_userspace_memory_region>())),
            ("KVM_SET_MSRS", kvm_ioc(1, 0x89, size_of::<kvm_msrs>())),
            ("KVM_SET_MP_STATE", kvm_ioc(1, 0x99, size_of::<kvm_mp_state>())),
            ("KVM_SET_VCPU_EVENTS", kvm_ioc(1, 0xa0, size_of::<kvm_vcpu_events>())),
            ("KVM_SET_DEBUGREGS", kvm_ioc(1, 0xa2, size_of::<kvm_debugregs>())),
            ("KVM_SET_TSC_KHZ", kvm_ioc(0, 0xa2, 0)),
            ("KVM_SET_XSAVE", kvm_ioc(1, 0xa5, size_of::<kvm_xsave>())),
            ("KVM_SET_XCRS", kvm_ioc(1, 0xa7, size_of::<kvm_xcrs>())),
        ];
        for (name, number) in wanted {
            assert!(
                allowed.iter().any(|(n, v)| n == name && *v == number),
                "restore.json does not allow {name} = {number}; it has {allowed:?}"
            );
        }
    }
}
