//! What a VMM does to itself once it holds every descriptor it will need: no path access at
//! all (a Landlock domain that handles every filesystem right this kernel knows and allows
//! none; also no TCP bind or connect, no abstract Unix sockets and no signals outside the
//! domain, where the kernel can say so), and no new privileges. A spare (`cella-vmm spare`)
//! does this before it starts any thread, so every thread it ever runs is under it; whatever
//! it gets later arrives as descriptors (see [`crate::handover`]).

use std::io;

const SYS_LANDLOCK_CREATE_RULESET: libc::c_long = 444;
const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = 446;
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;

/// `struct landlock_ruleset_attr` (ABI 6 layout; older kernels are given a shorter size).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// Why the VMM could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("this kernel has no Landlock (it is needed to confine a spare VMM)")]
    NoLandlock(#[source] io::Error),
    #[error("cannot set no-new-privileges")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot create the Landlock ruleset")]
    Ruleset(#[source] io::Error),
    #[error("cannot enforce the Landlock ruleset")]
    Restrict(#[source] io::Error),
}

/// The Landlock ABI version this kernel speaks.
pub fn landlock_abi() -> io::Result<u32> {
    // SAFETY: the version query takes no attribute and no size.
    let abi = unsafe {
        libc::syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(abi as u32)
}

/// The ruleset for `abi`: every right of that ABI handled, and its size to pass.
fn deny_all(abi: u32) -> (RulesetAttr, usize) {
    // ABI 1: execute … make_sym (13 rights); 2: refer; 3: truncate; 5: ioctl_dev.
    let fs_bits = match abi {
        1 => 13,
        2 => 14,
        3 | 4 => 15,
        _ => 16,
    };
    let attr = RulesetAttr {
        handled_access_fs: (1u64 << fs_bits) - 1,
        // ABI 4: bind_tcp, connect_tcp.
        handled_access_net: if abi >= 4 { 0b11 } else { 0 },
        // ABI 6: abstract Unix sockets, signals.
        scoped: if abi >= 6 { 0b11 } else { 0 },
    };
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    (attr, size)
}

/// Sets no-new-privileges and enforces a Landlock domain that allows no path access at all on
/// the calling thread and every thread it starts from now on. Descriptors already open keep
/// working. Returns the ABI enforced.
pub fn deny_all_paths() -> Result<u32, ConfineError> {
    let abi = landlock_abi().map_err(ConfineError::NoLandlock)?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) only sets a flag on this thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(ConfineError::NoNewPrivs(io::Error::last_os_error()));
    }
    let (attr, size) = deny_all(abi);
    // SAFETY: `attr` is a valid ruleset attribute of at least `size` bytes for this ABI.
    let fd = unsafe { libc::syscall(SYS_LANDLOCK_CREATE_RULESET, &raw const attr, size, 0u32) };
    if fd < 0 {
        return Err(ConfineError::Ruleset(io::Error::last_os_error()));
    }
    let fd = fd as libc::c_int;
    // SAFETY: restrict_self with the ruleset just made and no flags.
    let r = unsafe { libc::syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0u32) };
    let error = io::Error::last_os_error();
    // SAFETY: `fd` is the ruleset descriptor made above, closed once.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(ConfineError::Restrict(error));
    }
    Ok(abi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_it_no_path_opens_but_open_descriptors_still_work() {
        let before = std::fs::File::open("/proc/self/exe").unwrap();
        // Landlock holds for the thread that enforces it (and threads it starts): confine a
        // thread of its own, not the test process.
        let probe = std::thread::spawn(move || {
            deny_all_paths().unwrap();
            let denied = std::fs::File::open("/etc/hostname").unwrap_err();
            assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
            assert!(std::fs::read_dir("/").is_err());
            assert!(std::fs::File::create(std::env::temp_dir().join("cella-confine-probe")).is_err());
            let inherited = std::thread::spawn(|| std::fs::File::open("/etc/hostname").is_err()).join();
            assert!(inherited.unwrap(), "a thread started later is confined too");
            assert!(before.metadata().is_ok(), "a descriptor open before still works");
        });
        probe.join().unwrap();
        assert!(std::fs::File::open("/proc/self/exe").is_ok(), "other threads are not confined");
    }
}
