//! The last steps before exec: Landlock over the jail's own paths, then every capability gone,
//! no-new-privs, and the target uid/gid.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::config::{KVM_DEVICE, PROC_DIR};

/// The newest Landlock ABI the rules are written for (this host has 7; older kernels get the
/// subset they support).
const LANDLOCK_ABI: ABI = ABI::V6;

fn landlock_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Restricts this process, and the VMM it becomes, to: executing (and so reading) its own
/// binary (`exec`, the descriptor it is exec'd from: a rule on that very file, which lies
/// outside the jail), reading the read-only files, reading, writing and ioctl on `/dev/kvm`; with `rw_dir`
/// (`--bind-rw`), reading, listing, creating, writing, truncating and removing files, folders
/// and sockets under that folder; with `proc` (`--mount-proc`), reading files under `/proc`. No
/// other path, no TCP, no abstract Unix sockets or signals outside the sandbox. Everything
/// else, including the rest of the jail, is refused.
///
/// `/proc` is granted as a whole, for reading files only (not listing): a rule on
/// `/proc/self/pagemap` itself would attach to that file's current inode, and procfs makes a
/// new inode for a process's files whenever their cached entry is dropped, so the rule could
/// silently stop matching. The jail's procfs shows the VMM's own process only (see
/// `child::mount_proc`), so what this grants is reading the VMM's own `/proc/self/*`.
pub fn landlock(
    exec: BorrowedFd<'_>,
    ro_files: &[PathBuf],
    rw_dir: Option<&Path>,
    proc: bool,
) -> io::Result<()> {
    let fs_all = AccessFs::from_all(LANDLOCK_ABI);
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> =
        vec![(KVM_DEVICE.into(), AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev)];
    rules.extend(ro_files.iter().map(|p| (p.clone(), AccessFs::ReadFile.into())));
    if let Some(dir) = rw_dir {
        let rw = AccessFs::ReadFile
            | AccessFs::ReadDir
            | AccessFs::WriteFile
            | AccessFs::Truncate
            | AccessFs::MakeReg
            | AccessFs::MakeDir
            | AccessFs::MakeSock
            | AccessFs::RemoveFile
            | AccessFs::RemoveDir;
        rules.push((dir.to_owned(), rw));
    }
    if proc {
        rules.push((PROC_DIR.into(), AccessFs::ReadFile.into()));
    }

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(fs_all)
        .map_err(landlock_error)?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))
        .map_err(landlock_error)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(landlock_error)?
        .create()
        .map_err(landlock_error)?
        // exec opens the binary for reading as well as executing.
        .add_rule(PathBeneath::new(exec, AccessFs::Execute | AccessFs::ReadFile))
        .map_err(landlock_error)?;
    for (path, access) in rules {
        let fd = PathFd::new(&path).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(landlock_error)?;
    }
    let status = ruleset.restrict_self().map_err(landlock_error)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(io::Error::other("this kernel does not enforce Landlock"));
    }
    Ok(())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(step: &'static str, r: libc::c_long) -> Result<(), (&'static str, io::Error)> {
    if r < 0 {
        Err((step, io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Sets no-new-privs, empties the bounding and ambient sets, switches to `uid`/`gid` with no
/// supplementary groups, and clears the effective, permitted and inheritable sets.
pub fn drop_privileges(uid: u32, gid: u32, last_cap: u32) -> Result<(), (&'static str, io::Error)> {
    // SAFETY: prctl, setgroups, setresgid, setresuid and capset with integer
    // arguments or pointers to values that live for the call.
    unsafe {
        check("no-new-privs", libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
        for cap in 0..=last_cap {
            let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            // EINVAL: a capability this kernel does not know; nothing to drop.
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(("drop-bounding-capabilities", io::Error::last_os_error()));
            }
        }
        check(
            "clear-ambient-capabilities",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).into(),
        )?;
        check("switch-gid", libc::setgroups(0, std::ptr::null()).into())?;
        check("switch-gid", libc::setresgid(gid, gid, gid).into())?;
        check("switch-uid", libc::setresuid(uid, uid, uid).into())?;
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [CapData::default(); 2];
        check("clear-capabilities", libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;
    }
    Ok(())
}
