//! Jails made ahead of their launch. Copying the VMM binary into a fresh jail is the slowest
//! step of a launch (~2 ms for a 5 MB static binary, as much as all the other steps together).
//! `cella-jailer prepare --id SPARE` makes a jail folder with its copy while nothing waits (a
//! worker does it between jobs); a launch with `--from-prepared SPARE` renames that folder to
//! its own id and goes on from the mount points. A spare is one launch's: the rename takes it.
//! A launch that finds its spare missing or unusable says why and makes its jail as usual.
//!
//! A spare also brings a new, empty network namespace, bind-mounted at `<spare>/netns`: making
//! one costs ~0.5 ms at clone time, joining one made ahead a few µs. The jail's VMM is its only
//! process; the mount goes with the jail folder.
//!
//! A spare records what it was copied from (device, inode, size and change time of the
//! exec-file): a launch whose exec-file is not that file, or was changed since, refuses the
//! spare rather than run an old binary. The spare lives in the root-only jail base, so no one
//! but root can change it in between.

use std::fs::{self, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::JailConfig;
use crate::exec_copy;
use crate::supervisor::{exec_dir, make_jail_folder, step, JailError};

/// The file in a spare's folder (beside `root`, out of the VMM's sight) naming its source.
pub const SOURCE_FILE: &str = "copied-from";

/// The file in a spare's folder where its network namespace is bind-mounted.
pub const NETNS_FILE: &str = "netns";

/// What identifies the exec-file a copy was made from.
fn source_identity(meta: &Metadata) -> String {
    format!("{} {} {} {}.{:09}", meta.dev(), meta.ino(), meta.size(), meta.ctime(), meta.ctime_nsec())
}

/// Makes the spare jail `<base>/<exec-name>/<id>` with its copy of `exec_file` (checked by the
/// caller: see [`crate::config::check_prepare`]). Nothing is left behind on failure.
pub fn prepare(
    id: &str,
    exec_file: &Path,
    exec_name: &str,
    chroot_base: &Path,
) -> Result<PathBuf, JailError> {
    let dir = exec_dir(chroot_base, exec_name)?.join(id);
    let mut made = false;
    let result = make_jail_folder(&dir, || made = true).and_then(|()| fill_spare(&dir, exec_file, exec_name));
    if result.is_err() && made {
        let _ = release_netns(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
    result.map(|()| dir)
}

fn fill_spare(dir: &Path, exec_file: &Path, exec_name: &str) -> Result<(), JailError> {
    let source = fs::symlink_metadata(exec_file).map_err(step("prepare-copy", exec_file))?;
    let copy = dir.join("root").join(exec_name);
    exec_copy::copy_now(exec_file, &copy).map_err(step("prepare-copy", &copy))?;
    let netns = dir.join(NETNS_FILE);
    make_netns(&netns).map_err(step("prepare-netns", &netns))?;
    let record = dir.join(SOURCE_FILE);
    fs::write(&record, source_identity(&source)).map_err(step("prepare-copy", &record))
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

/// Takes the spare `spare_id` as `config`'s jail folder: checks it, renames it to the jail's
/// id (never over an existing folder) and checks its copy. `taken` runs once the folder is the
/// jail's, so the caller removes it from then on, whatever fails next. A spare made from
/// another exec-file is removed.
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
    let recorded = fs::read_to_string(spare.join(SOURCE_FILE))
        .map_err(|_| refuse("does not say what it was copied from"))?;
    let source =
        fs::symlink_metadata(&config.exec_file).map_err(step("take-prepared-jail", &config.exec_file))?;
    if recorded != source_identity(&source) {
        // Of no use to any launch of this exec-file: it goes.
        let _ = release_netns(&spare);
        let _ = fs::remove_dir_all(&spare);
        return Err(refuse("was copied from another exec-file, or the exec-file changed since (removed it)"));
    }
    let jail_dir = config.jail_dir();
    rename_no_replace(&spare, &jail_dir).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => JailError::JailExists(jail_dir.clone()),
        _ => step("take-prepared-jail", &spare)(e),
    })?;
    taken();
    let copy = config.root().join(&config.exec_name);
    let ok = fs::symlink_metadata(&copy).is_ok_and(|m| {
        m.is_file() && m.uid() == 0 && m.permissions().mode() & 0o7777 == 0o555 && m.len() == source.len()
    });
    if !ok {
        return Err(JailError::Prepared {
            spare: jail_dir,
            problem: "holds no complete copy of the exec-file",
        });
    }
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
