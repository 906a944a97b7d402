//! Jails made ahead of their launch. `cella-jailer prepare --id SPARE` makes a jail folder
//! while nothing waits (a worker does it between jobs); a launch with `--from-prepared SPARE`
//! renames that folder to its own id and goes on from the mount points. A spare is one
//! launch's: the rename takes it. A launch that finds its spare missing or unusable says why
//! and makes its jail as usual.
//!
//! What a spare saves is its network namespace, bind-mounted at `<spare>/netns`: making one
//! costs ~0.5 ms at clone time, joining one made ahead a few µs. The jail's VMM is its only
//! process; the mount goes with the jail folder. (The VMM binary is not in the jail at all: the
//! launch execs it from a descriptor, see `child`.)

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::JailConfig;
use crate::supervisor::{exec_dir, make_jail_folder, step, JailError};

/// The file in a spare's folder where its network namespace is bind-mounted.
pub const NETNS_FILE: &str = "netns";

/// Makes the spare jail `<base>/<exec-name>/<id>` (`exec_name`, the exec-file's, checked by the
/// caller: see [`crate::config::check_prepare`]). Nothing is left behind on failure.
pub fn prepare(id: &str, exec_name: &str, chroot_base: &Path) -> Result<PathBuf, JailError> {
    let dir = exec_dir(chroot_base, exec_name)?.join(id);
    let mut made = false;
    let result = make_jail_folder(&dir, || made = true).and_then(|()| fill_spare(&dir));
    if result.is_err() && made {
        let _ = release_netns(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
    result.map(|()| dir)
}

fn fill_spare(dir: &Path) -> Result<(), JailError> {
    let netns = dir.join(NETNS_FILE);
    make_netns(&netns).map_err(step("prepare-netns", &netns))
}

/// Makes a new network namespace (only a loopback device, down) and bind-mounts it at `path`,
/// leaving this thread in the namespace it was in.
fn make_netns(path: &Path) -> io::Result<()> {
    fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(path)?;
    let own = fs::File::open("/proc/thread-self/ns/net")?;
    // SAFETY: unshare only changes this thread's network namespace; it is restored below.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mounted = bind_mount(Path::new("/proc/thread-self/ns/net"), path);
    // SAFETY: setns back to the namespace this thread was in, from a descriptor opened above.
    let back = unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) };
    if back < 0 {
        return Err(io::Error::last_os_error());
    }
    mounted
}

fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: NUL-terminated paths that live across the call; no file system type or data.
    let r =
        unsafe { libc::mount(from.as_ptr(), to.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The network namespace a jail taken from a spare brings, if it has one.
pub fn netns_of(jail_dir: &Path) -> Option<PathBuf> {
    let path = jail_dir.join(NETNS_FILE);
    path.exists().then_some(path)
}

/// Unmounts a jail folder's network namespace, if it has one, so the folder can be removed.
pub fn release_netns(jail_dir: &Path) -> io::Result<()> {
    let path = c_path(&jail_dir.join(NETNS_FILE))?;
    // SAFETY: a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } < 0 {
        let e = io::Error::last_os_error();
        // Not mounted (EINVAL) or no such file: nothing to release.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(e);
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Takes the spare `spare_id` as `config`'s jail folder: checks it and renames it to the jail's
/// id (never over an existing folder). `taken` runs once the folder is the jail's, so the
/// caller removes it from then on, whatever fails next.
pub(crate) fn take(config: &JailConfig, spare_id: &str, taken: impl FnOnce()) -> Result<(), JailError> {
    let spare = config.chroot_base.join(&config.exec_name).join(spare_id);
    let refuse = |problem| JailError::Prepared { spare: spare.clone(), problem };
    let meta = match fs::symlink_metadata(&spare) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(refuse("does not exist")),
        Err(e) => return Err(step("take-prepared-jail", &spare)(e)),
    };
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o777 != 0o700 {
        return Err(refuse("is not a root-owned folder closed to others"));
    }
    let jail_dir = config.jail_dir();
    rename_no_replace(&spare, &jail_dir).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => JailError::JailExists(jail_dir.clone()),
        _ => step("take-prepared-jail", &spare)(e),
    })?;
    taken();
    Ok(())
}

/// `renameat2(RENAME_NOREPLACE)`: fails with `EEXIST` rather than replace `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
