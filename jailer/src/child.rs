//! The steps that run in the VMM's own process, between `clone` and `exec`.
//!
//! The supervisor clones the child straight into new mount, IPC and UTS namespaces (and new
//! PID and network namespaces unless told otherwise), so nothing the child mounts is ever
//! visible on the host, and all of it disappears with the VMM. The child then joins its
//! cgroups, sets rlimits, binds its files, pivots into the jail, makes `/dev/kvm` and gives it
//! to the VMM's uid/gid, makes the root read-only, joins a netns if asked, applies Landlock,
//! drops every capability, switches uid/gid, and execs the VMM binary from the descriptor the
//! supervisor opened on the host (`execveat`: the binary is never in the jail, and no path to
//! it is), with the supervisor's standard input, output and error. It
//! reports either the step that failed or its step timings to the supervisor over a
//! close-on-exec pipe: end-of-file without a failure means the exec happened.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::confine;
use crate::timing::Timings;

/// Exit status of a child that failed before exec (the pipe says why).
pub const CHILD_FAILED: i32 = 120;

/// Everything the child needs, prepared by the supervisor before `clone`.
#[derive(Debug)]
pub struct ChildPlan {
    /// The jail's root on the host.
    pub root: PathBuf,
    pub procs_files: Vec<PathBuf>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// Host file → where its mount point is on the host (inside `root`).
    pub ro_binds: Vec<(PathBuf, PathBuf)>,
    /// The netns to join: its descriptor, and its path for messages.
    pub netns: Option<(RawFd, PathBuf)>,
    pub uid: u32,
    pub gid: u32,
    /// The exec-file, opened `O_PATH` on the host by the supervisor (close-on-exec).
    pub exec_fd: RawFd,
    /// Its host path, for messages.
    pub exec_file: PathBuf,
    pub ro_jail_paths: Vec<PathBuf>,
    /// The `--bind-rw` folder and its mount point on the host (inside `root`); the jail sees
    /// it at the folder's own path.
    pub rw_bind: Option<(PathBuf, PathBuf)>,
    /// Mount a fresh procfs at `/proc` (`--mount-proc`).
    pub mount_proc: bool,
    pub argv: Vec<OsString>,
    pub keep_fds: Vec<RawFd>,
    pub last_cap: u32,
    /// The signal mask the supervisor blocked, to restore before exec.
    pub old_mask: libc::sigset_t,
}

/// A step that failed in the child: its name, the path it worked on, and the OS error.
#[derive(Debug)]
pub struct ChildFailure {
    pub step: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

fn fail(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ChildFailure {
    let path = path.into();
    move |error| ChildFailure { step, path, error }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map(cstr);
    let target = cstr(target);
    // SAFETY: all strings are NUL-terminated and live for the call; no data argument.
    check(unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// Binds `source` onto `target`, then remounts the bind with `flags` (read-only etc.).
fn bind(source: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    mount(Some(source), target, libc::MS_BIND)?;
    mount(None, target, libc::MS_REMOUNT | libc::MS_BIND | flags)
}

/// Mounts a procfs for this process's PID namespace (the jail's own: the supervisor asks for
/// `--mount-proc` only with `--new-pid-ns`) at `/proc`: read-only, no devices, set-uid or
/// executables, and with `subset=pid` (only process folders: no `/proc/sys`, `/proc/kcore`,
/// ...) and `hidepid=invisible` (only processes the reader may trace). Inside the namespace the
/// VMM is the only process, so `/proc` shows `/proc/1` (`/proc/self`) and nothing else.
fn mount_proc() -> io::Result<()> {
    let options = c"hidepid=invisible,subset=pid";
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all strings are NUL-terminated literals that live for the call.
    check(unsafe {
        libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), flags, options.as_ptr().cast())
    })
}

/// Runs the child's steps. Never returns: it execs the VMM, or exits with [`CHILD_FAILED`]
/// after writing the failure to `report`.
pub fn main(plan: &ChildPlan, report: RawFd) -> ! {
    // SAFETY: `report` is the write end of the supervisor's pipe, owned by this process now.
    let mut report = unsafe { File::from_raw_fd(report) };
    let mut timings = Timings::default();
    let failure = match steps(plan, &mut timings) {
        Ok(()) => {
            let _ = report.write_all(timings.encode().as_bytes());
            exec(plan).unwrap_err()
        }
        Err(failure) => failure,
    };
    let message = format!(
        "E {} {} {}\n",
        failure.step,
        failure.error.raw_os_error().unwrap_or(0),
        failure.path.display()
    );
    let _ = report.write_all(message.as_bytes());
    // SAFETY: _exit ends this process without running the supervisor's atexit handlers.
    unsafe { libc::_exit(CHILD_FAILED) }
}

fn steps(plan: &ChildPlan, t: &mut Timings) -> Result<(), ChildFailure> {
    // If the supervisor dies, so does the VMM (set again after the uid switch, which clears it).
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })
        .map_err(fail("parent-death-signal", "/"))?;

    let start = Instant::now();
    for file in &plan.procs_files {
        std::fs::write(file, "0").map_err(fail("join-cgroup", file))?;
    }
    t.record("join-cgroups", start);

    let start = Instant::now();
    for &(resource, value) in &plan.rlimits {
        // A limit is a ceiling, never a raise: the VMM gets no more than the jailer was given.
        // (Raising a hard limit needs CAP_SYS_RESOURCE, which root in a container often lacks:
        // a `cella serve` started with a low open-file limit could then start no VM at all.)
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one `rlimit`, which `current` is.
        check(unsafe { libc::getrlimit(resource, &mut current) })
            .map_err(fail("set-rlimits", format!("resource {resource}")))?;
        let value = value.min(current.rlim_max);
        let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit reads `limit`, which lives for the call.
        check(unsafe { libc::setrlimit(resource, &limit) })
            .map_err(fail("set-rlimits", format!("resource {resource}")))?;
    }
    t.record("rlimits", start);

    let start = Instant::now();
    // Nothing mounted from here on propagates back to the host.
    mount(None, Path::new("/"), libc::MS_REC | libc::MS_PRIVATE).map_err(fail("make-mounts-private", "/"))?;
    mount(Some(&plan.root), &plan.root, libc::MS_BIND).map_err(fail("bind-jail-root", &plan.root))?;
    let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (host, target) in &plan.ro_binds {
        bind(host, target, ro).map_err(fail("bind-read-only-file", host))?;
    }
    if let Some((host, target)) = &plan.rw_bind {
        let rw = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        bind(host, target, rw).map_err(fail("bind-read-write-folder", host))?;
    }
    t.record("mounts", start);

    let start = Instant::now();
    let root = cstr(&plan.root);
    // SAFETY: chdir/pivot_root/umount2 take NUL-terminated paths that live for each call.
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then
    // removes the old root and leaves the jail as `/`.
    unsafe {
        check(libc::chdir(root.as_ptr())).map_err(fail("pivot-root", &plan.root))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)
            .map_err(fail("pivot-root", &plan.root))?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)).map_err(fail("unmount-old-root", "/"))?;
        check(libc::chdir(c"/".as_ptr())).map_err(fail("pivot-root", "/"))?;
    }
    t.record("pivot-root", start);

    let start = Instant::now();
    let kvm = Path::new(crate::config::KVM_DEVICE);
    // SAFETY: mknod takes a NUL-terminated path; 10:232 is /dev/kvm.
    check(unsafe { libc::mknod(c"/dev/kvm".as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) })
        .map_err(fail("mknod", kvm))?;
    t.record("mknod", start);

    if plan.mount_proc {
        let start = Instant::now();
        mount_proc().map_err(fail("mount-proc", crate::config::PROC_DIR))?;
        t.record("mount-proc", start);
    }

    let start = Instant::now();
    // The VMM opens /dev/kvm (mode 0600) as its own uid.
    std::os::unix::fs::chown(kvm, Some(plan.uid), Some(plan.gid)).map_err(fail("chown", kvm))?;
    // The jail's root becomes read-only; only a `--bind-rw` folder stays writable.
    mount(None, Path::new("/"), libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID)
        .map_err(fail("remount-root-read-only", "/"))?;
    t.record("chown", start);

    if let Some((fd, path)) = &plan.netns {
        let (fd, start) = (*fd, Instant::now());
        // SAFETY: setns on a descriptor the supervisor opened for this purpose.
        check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }).map_err(fail("join-netns", path))?;
        // SAFETY: the descriptor is ours and not used again.
        unsafe { libc::close(fd) };
        t.record("join-netns", start);
    }

    let start = Instant::now();
    let rw_dir = plan.rw_bind.as_ref().map(|(host, _)| host.as_path());
    // SAFETY: the supervisor opened `exec_fd` for this child and keeps it open until the child
    // has exec'd or failed.
    let exec = unsafe { BorrowedFd::borrow_raw(plan.exec_fd) };
    confine::landlock(exec, &plan.ro_jail_paths, rw_dir, plan.mount_proc).map_err(fail("landlock", "/"))?;
    t.record("landlock", start);

    let start = Instant::now();
    confine::drop_privileges(plan.uid, plan.gid, plan.last_cap).map_err(|(step, error)| ChildFailure {
        step,
        path: PathBuf::from("/"),
        error,
    })?;
    t.record("drop-privileges", start);

    // A new session: no controlling terminal to push input into.
    // SAFETY: setsid/prctl/sigprocmask/fcntl with plain arguments or pointers to live values.
    unsafe {
        libc::setsid();
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))
            .map_err(fail("parent-death-signal", "/"))?;
        check(libc::sigprocmask(libc::SIG_SETMASK, &plan.old_mask, std::ptr::null_mut()))
            .map_err(fail("restore-signal-mask", "/"))?;
        for &fd in &plan.keep_fds {
            check(libc::fcntl(fd, libc::F_SETFD, 0)).map_err(fail("keep-fd", format!("fd {fd}")))?;
        }
    }
    Ok(())
}

/// Execs the VMM from its descriptor with an empty environment. Returns only on failure.
fn exec(plan: &ChildPlan) -> Result<std::convert::Infallible, ChildFailure> {
    let args: Vec<CString> =
        plan.argv.iter().map(|a| CString::new(a.as_bytes()).unwrap_or_default()).collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: execveat(2) on a descriptor this process holds, with an empty NUL-terminated path
    // (AT_EMPTY_PATH: the descriptor itself), and argv and envp NULL-terminated arrays of live
    // NUL-terminated strings.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            plan.exec_fd,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Err(ChildFailure { step: "exec", path: plan.exec_file.clone(), error: io::Error::last_os_error() })
}
