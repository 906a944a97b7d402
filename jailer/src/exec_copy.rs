//! The jail's own copy of the VMM binary, made in parallel with the rest of the launch.
//!
//! Every jail gets a fresh copy of the exec-file (never a link: nothing a VMM could reach is
//! shared with another jail or with the host's binary). Copying a 4 MB static binary into a
//! tmpfs costs ~1–2 ms, as much as all the other jail steps together, so a short-lived forked
//! copier makes it while the supervisor creates the cgroups and clones the VMM's process, and
//! the child runs its steps. The supervisor lets the child exec only once the copier has exited:
//! the copy is then complete and no one holds it open for writing (exec would fail with
//! `ETXTBSY`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

/// A copy under way in a forked process.
#[derive(Debug)]
pub struct Copier {
    pid: libc::pid_t,
    started: Instant,
}

impl Copier {
    /// Creates `to` (must not exist yet; the caller's, mode 0555) and starts copying `from`
    /// into it.
    pub fn start(from: &Path, to: &Path) -> io::Result<Copier> {
        let started = Instant::now();
        let (src, dst, len) = open_pair(from, to)?;
        // SAFETY: the copier only makes async-signal-safe system calls on the two descriptors
        // it inherits and leaves with `_exit`: it takes no lock another thread could hold at
        // the fork, runs no destructors and touches no state shared with the supervisor.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let (src, dst) = (src.as_raw_fd(), dst.as_raw_fd());
            // Hold nothing else open, such as the caller's end of the VMM's stdout pipe.
            close_all_but(src.min(dst), src.max(dst));
            let code = copy(src, dst, len);
            // SAFETY: ends the copier; its descriptors close with it.
            unsafe { libc::_exit(code) }
        }
        // `src` and `dst` close here: from now on only the copier has the copy open.
        Ok(Copier { pid, started })
    }

    /// Waits for the copier to finish; returns how long the copy took, from [`Copier::start`],
    /// in milliseconds. Once this returns `Ok`, the copy is complete and closed.
    pub fn finish(mut self) -> io::Result<f64> {
        let pid = std::mem::replace(&mut self.pid, 0);
        let status = reap(pid)?;
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        if libc::WIFEXITED(status) {
            match libc::WEXITSTATUS(status) {
                0 => Ok(ms),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        } else {
            Err(io::Error::other(format!("the copier was killed by signal {}", libc::WTERMSIG(status))))
        }
    }
}

impl Drop for Copier {
    /// A launch that fails before the copy is waited for stops the copier, so it does not
    /// outlive the jail.
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: kill(2) to our own child, which has not been reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = reap(self.pid);
        }
    }
}

/// Copies `from` to `to` (which must not exist yet; made mode 0555) in this process, to the end.
/// For jails made ahead of their launch (`cella-jailer prepare`), where no launch waits.
pub fn copy_now(from: &Path, to: &Path) -> io::Result<()> {
    let (src, dst, len) = open_pair(from, to)?;
    match copy(src.as_raw_fd(), dst.as_raw_fd(), len) {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Opens the source (never through a symlink: the exec-file was checked not to be one, and it
/// must not have become one since) and creates the copy, mode 0555; returns the source's length.
fn open_pair(from: &Path, to: &Path) -> io::Result<(File, File, u64)> {
    let src = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(from)?;
    let len = src.metadata()?.len();
    let dst = OpenOptions::new().write(true).create_new(true).mode(0o555).open(to)?;
    dst.set_permissions(std::fs::Permissions::from_mode(0o555))?;
    Ok((src, dst, len))
}

/// Closes every descriptor except `a` and `b` (`a < b`).
fn close_all_but(a: RawFd, b: RawFd) {
    for (from, to) in [(0, a - 1), (a + 1, b - 1), (b + 1, RawFd::MAX)] {
        if from <= to {
            // SAFETY: close_range only closes descriptors; the copier uses no others.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32) };
        }
    }
}

fn reap(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies `len` bytes from `src` to `dst` in the kernel: `copy_file_range` (a reflink where the
/// file system can), else `sendfile`. Returns 0, or the errno that stopped it (the copier's exit
/// status).
fn copy(src: RawFd, dst: RawFd, len: u64) -> i32 {
    let mut left = len;
    let mut in_kernel_copy = true;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the call; null offsets use and advance the
        // files' own offsets, the same ones for both calls.
        let n = unsafe {
            if in_kernel_copy {
                libc::copy_file_range(src, std::ptr::null_mut(), dst, std::ptr::null_mut(), chunk, 0)
            } else {
                libc::sendfile(dst, src, std::ptr::null_mut(), chunk)
            }
        };
        if n < 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            match errno {
                libc::EINTR => continue,
                libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM
                    if in_kernel_copy =>
                {
                    in_kernel_copy = false;
                    continue;
                }
                _ => return errno,
            }
        }
        if n == 0 {
            // The file shrank while it was being copied.
            return libc::EIO;
        }
        left -= n as u64;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_whole_file_read_only() {
        let dir = std::env::temp_dir().join(format!("cella-exec-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let from = dir.join("from");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&from, &data).unwrap();
        let to = dir.join("to");
        Copier::start(&from, &to).unwrap().finish().unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), data);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&to).unwrap().permissions());
        assert_eq!(mode & 0o7777, 0o555);
        let again = Copier::start(&from, &to).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
