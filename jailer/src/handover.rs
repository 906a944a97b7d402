//! Handing a `--bind-rw` folder to the jail and back.
//!
//! A jailed VMM has no capabilities, so it can write its folder only if the folder and what is
//! in it belong to its uid/gid. Before the clone, the supervisor gives the folder and
//! everything in it to the VMM's uid/gid; when the jail ends, it gives them back to root, so
//! the folder rests root's between launches and the next launch may use another uid.
//!
//! The walk never follows a symbolic link: folders are opened with `O_NOFOLLOW` relative to
//! their parent's descriptor, and owners change with `fchownat(AT_SYMLINK_NOFOLLOW)`. Anything
//! other than folders, regular files and sockets is refused, and so is a regular file with
//! more than one name (a hard link could make a host file part of the hand-over); [`check`]
//! runs the same walk without changing anything, so a request is refused before anything is
//! created.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How deep a folder may nest below the `--bind-rw` folder (a session's holds one level).
pub const MAX_DEPTH: usize = 16;

/// Why a folder cannot be handed over (or back).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "--bind-rw holds {path}, {what}; the folder is handed to the VMM's uid with everything in \
         it, so it may hold only folders, regular files and sockets: remove it"
    )]
    Refused { path: PathBuf, what: &'static str },
    #[error("--bind-rw nests deeper than {MAX_DEPTH} folders at {0}")]
    TooDeep(PathBuf),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HandoverError {
    let path = path.to_owned();
    move |source| HandoverError::Io { action, path, source }
}

/// Checks that `dir` can be handed over, changing nothing.
pub fn check(dir: &Path) -> Result<(), HandoverError> {
    walk(dir, Walk { owner: None, strict: true })
}

/// Gives `dir` and everything in it to `uid`/`gid`.
pub fn give(dir: &Path, uid: u32, gid: u32) -> Result<(), HandoverError> {
    walk(dir, Walk { owner: Some((uid, gid)), strict: true })
}

/// Gives `dir` and everything in it back to root. Nothing is refused here: whatever the VMM made
/// inside (it can make folders, files, sockets and hard links between its own files, nothing
/// else) goes back to root, still without following a link.
pub fn take_back(dir: &Path) -> Result<(), HandoverError> {
    walk(dir, Walk { owner: Some((0, 0)), strict: false })
}

/// What a walk does: change owners (or only look), and refuse what may not be handed over.
#[derive(Clone, Copy)]
struct Walk {
    owner: Option<(u32, u32)>,
    strict: bool,
}

fn walk(dir: &Path, how: Walk) -> Result<(), HandoverError> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io_error("open", dir)(io::ErrorKind::InvalidInput.into()))?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: open with a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io_error("open", dir)(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    walk_dir(&fd, dir, how, 0)?;
    if let Some((uid, gid)) = how.owner {
        // SAFETY: fchown on a descriptor this function owns.
        if unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } < 0 {
            return Err(io_error("change the owner of", dir)(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The names in the folder open at `dir` (without `.` and `..`).
fn names(dir: &OwnedFd, path: &Path) -> Result<Vec<CString>, HandoverError> {
    // SAFETY: dup of a descriptor this process owns; fdopendir takes over the duplicate.
    let stream = unsafe {
        let copy = libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0);
        if copy < 0 {
            return Err(io_error("list", path)(io::Error::last_os_error()));
        }
        let stream = libc::fdopendir(copy);
        if stream.is_null() {
            let e = io::Error::last_os_error();
            libc::close(copy);
            return Err(io_error("list", path)(e));
        }
        stream
    };
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is a live directory stream; errno is cleared to tell an error from
        // the end of the folder.
        let entry = unsafe {
            *libc::__errno_location() = 0;
            libc::readdir64(stream)
        };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: the stream is closed once, here.
            unsafe { libc::closedir(stream) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(io_error("list", path)(e));
            }
            return Ok(names);
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it is copied
        // before the next readdir.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
}

fn walk_dir(dir: &OwnedFd, path: &Path, how: Walk, depth: usize) -> Result<(), HandoverError> {
    if depth > MAX_DEPTH {
        return Err(HandoverError::TooDeep(path.to_owned()));
    }
    for name in names(dir, path)? {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        // SAFETY: fstatat writes into `stat`, relative to a descriptor this process owns, on a
        // NUL-terminated name, without following a symbolic link.
        let stat = unsafe {
            let mut stat: libc::stat64 = std::mem::zeroed();
            if libc::fstatat64(dir.as_raw_fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) < 0 {
                return Err(io_error("inspect", &child)(io::Error::last_os_error()));
            }
            stat
        };
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
                // SAFETY: openat relative to a descriptor this process owns, on a NUL-terminated
                // name; the new descriptor is owned below.
                let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
                if fd < 0 {
                    return Err(io_error("open", &child)(io::Error::last_os_error()));
                }
                // SAFETY: `fd` was just opened and is owned by nothing else.
                let sub = unsafe { OwnedFd::from_raw_fd(fd) };
                walk_dir(&sub, &child, how, depth + 1)?;
            }
            _ if !how.strict => {}
            libc::S_IFREG if stat.st_nlink > 1 => {
                return Err(HandoverError::Refused {
                    path: child,
                    what: "a file with more than one name (a hard link)",
                });
            }
            libc::S_IFREG | libc::S_IFSOCK => {}
            libc::S_IFLNK => return Err(HandoverError::Refused { path: child, what: "a symbolic link" }),
            _ => {
                return Err(HandoverError::Refused {
                    path: child,
                    what: "a device, FIFO or other special file",
                })
            }
        }
        if let Some((uid, gid)) = how.owner {
            // SAFETY: fchownat relative to a descriptor this process owns, on a NUL-terminated
            // name, without following a symbolic link.
            let r = unsafe {
                libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
            };
            if r < 0 {
                return Err(io_error("change the owner of", &child)(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn folder(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cella-jailer-handover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("snapshot")).unwrap();
        std::fs::write(dir.join("app.tar"), "x").unwrap();
        std::fs::write(dir.join("snapshot/memory.bin"), "y").unwrap();
        dir
    }

    #[test]
    fn a_folder_is_handed_over_and_back_with_everything_in_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: changing owners needs root (the jailer always runs as root)");
            return;
        }
        let dir = folder("give");
        give(&dir, 64_091, 64_092).unwrap();
        for path in [dir.clone(), dir.join("app.tar"), dir.join("snapshot"), dir.join("snapshot/memory.bin")]
        {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (64_091, 64_092), "{}", path.display());
        }
        take_back(&dir).unwrap();
        for path in [dir.clone(), dir.join("app.tar"), dir.join("snapshot/memory.bin")] {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", path.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symlinks_and_hard_links_inside_are_refused_before_anything_changes() {
        let dir = folder("links");
        std::os::unix::fs::symlink("/etc/shadow", dir.join("snapshot/evil")).unwrap();
        let e = check(&dir).unwrap_err();
        assert!(e.to_string().contains("snapshot/evil, a symbolic link"), "{e}");
        std::fs::remove_file(dir.join("snapshot/evil")).unwrap();

        std::fs::hard_link(dir.join("app.tar"), dir.join("copy.tar")).unwrap();
        let e = check(&dir).unwrap_err();
        assert!(e.to_string().contains("a hard link"), "{e}");
        std::fs::remove_file(dir.join("copy.tar")).unwrap();
        check(&dir).unwrap();

        // The folder itself given as a symbolic link is not followed either.
        let link = dir.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(check(&link), Err(HandoverError::Io { action: "open", .. })));
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
