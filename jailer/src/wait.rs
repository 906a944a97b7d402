//! Waiting on several things at once without threads (the jailer is single-threaded): the
//! signals the supervisor handles, blocked and read from a signalfd, and descriptors, with
//! poll(2).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The signals the supervisor passes on to the VMM.
pub(crate) const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// A signal set with nothing in it.
pub(crate) fn empty_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

/// The signals the supervisor blocks and waits for: [`FORWARDED`] and SIGCHLD.
pub(crate) fn supervised_signals() -> libc::sigset_t {
    let mut set = empty_sigset();
    for signal in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: adds a valid signal number to an initialised set.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// A signalfd for the signals the supervisor handles (blocked already: see
/// `supervisor::run`).
pub(crate) fn signal_fd(set: &libc::sigset_t) -> io::Result<OwnedFd> {
    // SAFETY: signalfd with a valid set makes a new descriptor, owned below.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one signal from a signalfd.
pub(crate) fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: an all-zero signalfd_siginfo is valid; read fills it.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Waits until one of `fds` is readable (or `timeout` passes); returns which are.
pub(crate) fn poll_read(fds: &[RawFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: poll over `polls`, which lives for the call.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}
