//! The few system calls the service makes directly: signals to child processes, and raising
//! its open-file limit.
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

/// Starts a child from `cmd` in a process group of its own: no signal from this process's
/// terminal or process group reaches it (a Ctrl-C, a hang-up), so a session VMM outlives a
/// restart (or a SIGKILL) of `cella serve` and is re-adopted by the next one. Its standard
/// input, output and error are never the terminal (the caller gives it the session's log).
///
/// A process group, not a session (`setsid`): std starts a child with `posix_spawn` (a
/// `vfork`-style clone) when the only thing asked of the child is a process group, but must
/// `fork` the whole server (copying its page tables, a few ms) to run a `setsid` hook first.
pub fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
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

/// Sends SIGCONT to `pid`'s process group and to every process under `pid` (children, their
/// children, ...: a jailed VMM runs under its supervisor, in a group of its own). Harmless to a
/// process that is not stopped. Best effort: a process it cannot reach is left.
pub fn continue_tree(pid: u32) {
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        let Ok(p_t) = libc::pid_t::try_from(p) else { continue };
        if p_t <= 1 {
            continue;
        }
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(-p_t, libc::SIGCONT);
            libc::kill(p_t, libc::SIGCONT);
        }
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit`, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one `rlimit`, which `raised` is.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}
