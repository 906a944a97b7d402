//! Sending a signal to a child process (the one system call the service makes directly).
#![allow(unsafe_code)]

/// Sends SIGTERM to `pid`: a `cella-vmm` stops its VM, scrubs its memory and reports.
pub fn terminate(pid: u32) -> std::io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is a child we
    // spawned and have not yet reaped, so it cannot name a recycled process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes a child started from `cmd` receive SIGTERM when the thread that started it (a
/// runtime thread of this process) dies, so a VMM never outlives a worker killed with SIGKILL.
pub fn terminate_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // getppid(2), both async-signal-safe; it allocates nothing and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may already have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the worker exited while starting the VMM"));
            }
            Ok(())
        });
    }
}

/// Starts a child from `cmd` in a session of its own (setsid): it gets its own process group,
/// no controlling terminal, and no signal from this process's end, so a session VMM outlives a
/// restart (or a SIGKILL) of `cella serve` and is re-adopted by the next one.
pub fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe; it allocates nothing and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to a detached session VMM (`pid`), or with `kill`, SIGKILL to its whole
/// process group (it leads one, see [`detach`]). The caller has just checked that `pid` is
/// that VMM (its command line names the session's socket).
pub fn signal_session(pid: u32, kill: bool) -> std::io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    if pid <= 1 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let (target, sig) = if kill { (-pid, libc::SIGKILL) } else { (pid, libc::SIGTERM) };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(target, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
