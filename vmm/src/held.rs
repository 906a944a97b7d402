//! A VMM started ahead, in a jail `cella-jailer --hold` made, waits here for its launch.
//!
//! The jailer starts such a VMM with `--await-go` and its standard input a Unix stream socket
//! whose other end the jailer's supervisor keeps. The VMM builds what needs nothing from its
//! launch ([`crate::builder::Prebuilt`]), says it is ready with one byte, `R`, and waits. The
//! launch is one byte, `G`, carrying the launcher's standard input, output and error and the
//! jail's Landlock ruleset (`SCM_RIGHTS`). The VMM enforces the ruleset on itself first (the
//! jailer could not: the rules hold on to the files the launch brought, which did not exist
//! when the VMM was started), puts the three in place of its own 0, 1 and 2, and runs as if
//! it had just been started. If the supervisor goes away instead (the spare was discarded), the wait ends
//! with [`AwaitError::Discarded`].

use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The byte a held VMM sends when it is ready.
pub const READY: u8 = b'R';
/// The byte that launches it, with four descriptors: its new stdin, stdout and stderr, and
/// the Landlock ruleset to enforce.
pub const GO: u8 = b'G';
/// `landlock_restrict_self(2)`.
const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = 446;

/// Why a held VMM did not get its launch.
#[derive(Debug, thiserror::Error)]
pub enum AwaitError {
    #[error("standard input is not the held jail's socket (--await-go is for cella-jailer --hold)")]
    NotASocket,
    #[error("cannot talk to the held jail's supervisor")]
    Io(#[source] io::Error),
    #[error("the held jail's supervisor discarded this spare before launching it")]
    Discarded,
    #[error("the held jail's supervisor sent {0} descriptors and byte {1:#04x}, not 4 and `G`")]
    BadGo(usize, u8),
    #[error("cannot enforce the jail's Landlock ruleset")]
    Landlock(#[source] io::Error),
}

/// The held jail's socket: this process's standard input.
fn socket() -> Result<ManuallyDrop<UnixStream>, AwaitError> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes into `stat`, which is large enough.
    let r = unsafe { libc::fstat(0, stat.as_mut_ptr()) };
    // SAFETY: fstat succeeded, so it initialised `stat`.
    if r < 0 || unsafe { stat.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(AwaitError::NotASocket);
    }
    // SAFETY: descriptor 0 is a socket (checked above) that stays open; ManuallyDrop keeps this
    // wrapper from closing it, and the caller replaces it with dup3.
    Ok(ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(0) }))
}

/// Says this VMM is ready, waits for its launch, and puts the launcher's standard input,
/// output and error in place of its own.
pub fn await_go() -> Result<(), AwaitError> {
    let socket = socket()?;
    (&*socket).write_all(&[READY]).map_err(AwaitError::Io)?;
    let mut byte = [0u8; 1];
    let mut fds: [RawFd; 4] = [-1; 4];
    let mut iov = [libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 }];
    let (n, count) = loop {
        // SAFETY: `iov` points at `byte`, which lives for the call and may hold any value.
        match unsafe { socket.recv_with_fds(&mut iov, &mut fds) } {
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(AwaitError::Io(io::Error::from_raw_os_error(e.errno()))),
            Ok(got) => break got,
        }
    };
    // SAFETY: recv_with_fds made the first `count` entries new descriptors this process owns.
    let received: Vec<File> = fds[..count].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
    if n == 0 {
        return Err(AwaitError::Discarded);
    }
    if count != 4 || byte[0] != GO {
        return Err(AwaitError::BadGo(count, byte[0]));
    }
    // This process has one thread yet, and no-new-privs (the jailer set it): the ruleset holds
    // for it and every thread it starts.
    // SAFETY: landlock_restrict_self with a ruleset descriptor and no flags.
    if unsafe { libc::syscall(SYS_LANDLOCK_RESTRICT_SELF, received[3].as_raw_fd(), 0u32) } < 0 {
        return Err(AwaitError::Landlock(io::Error::last_os_error()));
    }
    for (target, file) in received[..3].iter().enumerate() {
        // SAFETY: dup3 onto 0, 1 and 2: the socket (0) and the held stdout and stderr are
        // replaced; `file` is closed when `received` drops.
        if unsafe { libc::dup3(file.as_raw_fd(), target as RawFd, 0) } < 0 {
            return Err(AwaitError::Io(io::Error::last_os_error()));
        }
    }
    Ok(())
}
