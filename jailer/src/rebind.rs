//! Binding host files and folders into a running jail: a held jail's launch brings its own
//! artifact and socket folder (see [`crate::held`]), and they are bound over what the jail was
//! made with, in the VMM's own mount namespace, before the VMM is told to go.
//!
//! With the mount API: `open_tree(OPEN_TREE_CLONE)` makes a detached copy of the host file's
//! mount while the supervisor still sees the host, `mount_setattr` makes it read-only (or at
//! least `nosuid,nodev,noexec`), then the supervisor enters the VMM's mount namespace, whose
//! root is the jail since its `pivot_root`, `move_mount`s each copy onto its jail path, and
//! goes back to its own namespace. Nothing of this is visible outside the VMM's namespace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::supervisor::{step, JailError};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `struct mount_attr` of mount_setattr(2), first version.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A host file or folder to bind at a path inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    pub jail: PathBuf,
    /// Read-only (a file the VMM reads), or writable (its socket folder).
    pub read_only: bool,
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A detached copy of `bind.host`'s mount, with the bind's flags set.
fn detached_copy(bind: &Bind) -> io::Result<OwnedFd> {
    let host = cstr(&bind.host)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree with a NUL-terminated path; the new descriptor is owned below.
    let fd = check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, host.as_ptr(), flags) })?;
    // SAFETY: `fd` is new and ours.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    if bind.read_only {
        set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr on our descriptor with an empty path; `attr` lives for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(tree)
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor this process opened.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } as libc::c_long).map(drop)
}

/// Binds each of `binds` into the mount namespace of process `pid` (the VMM), over what is at
/// its jail path, then runs `inside` there (it sees the jail as `/`). Must run in a
/// single-threaded process (setns of a mount namespace).
pub fn into_jail<T>(
    pid: i32,
    binds: &[Bind],
    inside: impl FnOnce() -> Result<T, JailError>,
) -> Result<T, JailError> {
    let trees = binds
        .iter()
        .map(|b| detached_copy(b).map_err(step("bind-launch-file", &b.host)))
        .collect::<Result<Vec<_>, _>>()?;
    let own = File::open("/proc/self/ns/mnt").map_err(step("bind-launch-file", "/proc/self/ns/mnt"))?;
    let theirs_path = format!("/proc/{pid}/ns/mnt");
    let theirs = File::open(&theirs_path).map_err(step("bind-launch-file", &theirs_path))?;
    setns(&theirs).map_err(step("bind-launch-file", &theirs_path))?;
    let mut result: Result<(), JailError> = Ok(());
    for (tree, bind) in trees.iter().zip(binds) {
        let moved = cstr(&bind.jail).and_then(|jail| {
            // SAFETY: move_mount of our detached tree onto a NUL-terminated path.
            check(unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    tree.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    jail.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                )
            })
        });
        if let Err(e) = moved {
            result = Err(step("bind-launch-file", &bind.jail)(e));
            break;
        }
    }
    let result = result.and_then(|()| inside());
    // Back home whatever happened: the supervisor removes host folders next.
    setns(&own).map_err(step("bind-launch-file", "/proc/self/ns/mnt"))?;
    result
}
