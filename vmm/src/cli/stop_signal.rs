//! SIGINT and SIGTERM as a descriptor: a VMM served over its control API (`session`, `spare`)
//! polls it in its loop and stops (scrubbing) when it becomes readable.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The stop eventfd the SIGINT/SIGTERM handler writes (-1 before it exists).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn request_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes to an eventfd is async-signal-safe; the eventfd lives
        // until the process exits.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Makes the stop eventfd (never closed: the handler may write it until the process exits)
/// and sends SIGINT and SIGTERM to it. Returns the descriptor to poll.
pub fn install() -> Result<RawFd, String> {
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| format!("cannot create the stop eventfd: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(Box::leak(Box::new(stop_evt)));
    STOP_FD.store(fd, Ordering::Release);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, request_stop)
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    Ok(fd)
}
