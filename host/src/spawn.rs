//! Starting a spare's process with `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`), not
//! `fork`: the launcher is the service, a large multi-threaded process, and forking it copied
//! its page tables and then tore them down at the child's exec — 6% of the CPU of the whole
//! host at 45 jobs/s. Everything the child needs before its exec is a file action: stdin and
//! stdout on `/dev/null`, stderr on a pipe (or inherited), the control socket on descriptor
//! [`API_FD`]. What `pre_exec` did besides (the parent-death signal) the child does itself, at
//! its start: it finds the launcher's pid in [`DIE_WITH_PARENT_ENV`] (see [`die_with_parent`]).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

pub use cella_abi::DIE_WITH_PARENT_ENV;

/// The descriptor a spare gets its control socket on.
pub const API_FD: RawFd = 3;
/// The descriptor a jailer started with `--hand-off` reports the VMM's pid on.
pub const HAND_OFF_FD: RawFd = 4;

/// Where a started process's stdout and stderr go.
#[derive(Clone, Copy, Debug)]
enum Output {
    /// stdout to /dev/null, stderr this process's.
    Inherited,
    /// stdout to /dev/null, stderr to a pipe this process reads.
    Captured,
    /// Both to this descriptor (a log file), in a process group of its own.
    Detached(RawFd),
}

/// A started process, reaped by [`Spawned::wait`] or [`Spawned::try_wait`].
#[derive(Debug)]
pub struct Spawned {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
    /// The read end of its stderr, when captured.
    pub stderr: Option<File>,
}

impl Spawned {
    /// Runs `command`'s program with its arguments (and this process's environment plus
    /// [`DIE_WITH_PARENT_ENV`]); `api` becomes its descriptor [`API_FD`].
    pub fn start(command: &Command, api: RawFd, capture_stderr: bool) -> io::Result<Spawned> {
        Self::start_with(command, &[(api, API_FD)], capture_stderr)
    }

    /// A child this process did not start itself: the VMM a jailer started with `--hand-off`
    /// (`CLONE_PARENT`), whose pid the jailer reported. `stderr` is the pipe it shares with the
    /// jailer, if captured.
    pub fn adopt(pid: libc::pid_t, stderr: Option<File>) -> Spawned {
        Spawned { pid, status: None, stderr }
    }

    /// [`Spawned::start`] with descriptors `(here, there)`: each `here` becomes the child's
    /// `there`.
    pub fn start_with(
        command: &Command,
        fds: &[(RawFd, RawFd)],
        capture_stderr: bool,
    ) -> io::Result<Spawned> {
        Self::spawn(command, fds, if capture_stderr { Output::Captured } else { Output::Inherited })
    }

    /// A process that outlives this one (a session's VMM, which a restarted service adopts): the
    /// leader of a process group of its own, without [`DIE_WITH_PARENT_ENV`], stdout and stderr
    /// on `log`; each `here` of `fds` becomes its `there`. Reap it with [`Spawned::wait`] while
    /// this process runs.
    pub fn start_detached(command: &Command, fds: &[(RawFd, RawFd)], log: &File) -> io::Result<Spawned> {
        Self::spawn(command, fds, Output::Detached(log.as_raw_fd()))
    }

    fn spawn(command: &Command, fds: &[(RawFd, RawFd)], output: Output) -> io::Result<Spawned> {
        let capture_stderr = matches!(output, Output::Captured);
        let detached = matches!(output, Output::Detached(_));
        let c =
            |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"));
        let program = c(command.get_program())?;
        let mut argv = vec![program.clone()];
        for arg in command.get_args() {
            argv.push(c(arg)?);
        }
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            // Captured words end up in messages for people: they stay text whatever format
            // this process logs in.
            let text_only = capture_stderr && key == cella_log::FORMAT_ENV;
            if key != DIE_WITH_PARENT_ENV && !text_only && !(detached && key == cella_log::FORMAT_ENV) {
                let mut pair = key.as_bytes().to_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                env.push(CString::new(pair).map_err(|_| io::Error::other("a NUL byte in the environment"))?);
            }
        }
        if !detached {
            // SAFETY: getpid(2) has no preconditions.
            env.push(c(OsStr::new(&format!("{DIE_WITH_PARENT_ENV}={}", unsafe { libc::getpid() })))?);
        }
        let argv_ptrs: Vec<*mut libc::c_char> =
            argv.iter().map(|a| a.as_ptr().cast_mut()).chain([std::ptr::null_mut()]).collect();
        let env_ptrs: Vec<*mut libc::c_char> =
            env.iter().map(|e| e.as_ptr().cast_mut()).chain([std::ptr::null_mut()]).collect();

        // A descriptor must not already be one of the targets: a dup2 onto itself would leave
        // its close-on-exec flag set, and one onto another's would close that one. A copy above
        // them all (closed when this returns) is neither.
        let above = fds.iter().map(|&(_, there)| there).max().unwrap_or(2) + 1;
        let mut moved = Vec::new();
        let mut sources = Vec::with_capacity(fds.len());
        for &(here, there) in fds {
            if fds.iter().any(|&(_, t)| t == here) {
                // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the caller holds open.
                let fd = unsafe { libc::fcntl(here, libc::F_DUPFD_CLOEXEC, above) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor nothing else owns.
                moved.push(unsafe { OwnedFd::from_raw_fd(fd) });
                sources.push((fd, there));
            } else {
                sources.push((here, there));
            }
        }
        let pipe = if capture_stderr { Some(pipe()?) } else { None };

        let mut actions = FileActions::new()?;
        let null = c(OsStr::new("/dev/null"))?;
        actions.open(0, &null, libc::O_RDONLY)?;
        match output {
            Output::Detached(log) => {
                actions.dup2(log, 1)?;
                actions.dup2(log, 2)?;
            }
            _ => actions.open(1, &null, libc::O_WRONLY)?,
        }
        if let Some((_, write)) = &pipe {
            actions.dup2(write.as_raw_fd(), 2)?;
        }
        for (here, there) in sources {
            actions.dup2(here, there)?;
        }
        let mut attr = SpawnAttr::new()?;
        attr.reset_signals(detached)?;

        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer is valid for the call: the path and the NULL-terminated argv
        // and envp arrays point into CStrings that live until it returns; the file actions and
        // attributes are initialised.
        let r = unsafe {
            libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                &actions.0,
                &attr.0,
                argv_ptrs.as_ptr(),
                env_ptrs.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(Spawned { pid, status: None, stderr: pipe.map(|(read, _)| File::from(read)) })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Its status if it has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.reap(libc::WNOHANG)?;
        }
        Ok(self.status)
    }

    /// Waits for it to exit (reaping it) and returns its status.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        while self.status.is_none() {
            self.reap(0)?;
        }
        Ok(self.status.unwrap_or_else(|| ExitStatus::from_raw(0)))
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<()> {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child's pid, with a local status word.
        let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        match r {
            r if r == self.pid => self.status = Some(ExitStatus::from_raw(status)),
            0 => {}
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// A pipe whose two ends close on exec; (read, write).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero posix_spawn_file_actions_t is valid storage for init.
        let mut actions = FileActions(unsafe { std::mem::zeroed() });
        // SAFETY: initialising the storage we own.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions.0) })?;
        Ok(actions)
    }

    fn open(&mut self, fd: RawFd, path: &CString, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: initialised actions; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addopen(&mut self.0, fd, path.as_ptr(), flags, 0) })
    }

    fn dup2(&mut self, from: RawFd, to: RawFd) -> io::Result<()> {
        // SAFETY: initialised actions.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from, to) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero posix_spawnattr_t is valid storage for init.
        let mut attr = SpawnAttr(unsafe { std::mem::zeroed() });
        // SAFETY: initialising the storage we own.
        check(unsafe { libc::posix_spawnattr_init(&mut attr.0) })?;
        Ok(attr)
    }

    /// The child starts with no signal blocked and SIGPIPE at its default (Rust programs
    /// ignore it, and an ignored signal stays ignored across exec), as `Command` would.
    /// With `own_group`, the child also leads a new process group.
    fn reset_signals(&mut self, own_group: bool) -> io::Result<()> {
        // SAFETY: sigset_t storage we own, filled by sigemptyset/sigaddset; initialised attr.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut self.0, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut self.0, &pipe))?;
            let mut flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            if own_group {
                check(libc::posix_spawnattr_setpgroup(&mut self.0, 0))?;
                flags |= libc::POSIX_SPAWN_SETPGROUP;
            }
            check(libc::posix_spawnattr_setflags(&mut self.0, flags as libc::c_short))
        }
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// For a spare's process at its start (`cella-vmm`, `cella-jailer`): if its launcher named
/// itself in [`DIE_WITH_PARENT_ENV`], ask for SIGTERM when the launcher's thread ends, and
/// return false if the launcher is already gone (the caller then exits). The variable is
/// removed, so nothing this process starts inherits it.
pub fn die_with_parent() -> bool {
    let Some(value) = std::env::var_os(DIE_WITH_PARENT_ENV) else { return true };
    // At the start of a single-threaded process: nothing reads the environment meanwhile.
    std::env::remove_var(DIE_WITH_PARENT_ENV);
    let Some(parent) = value.to_str().and_then(|v| v.parse::<libc::pid_t>().ok()) else { return true };
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid(2) have no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        libc::getppid() == parent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_child_gets_the_socket_on_descriptor_3_its_launchers_pid_and_no_other_descriptor() {
        // Captured words stay text: the log format is not passed on.
        std::env::set_var(cella_log::FORMAT_ENV, "json");
        let dir = std::env::temp_dir().join(format!("cella-spawn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let mut command = Command::new("/bin/sh");
        command.args([
            "-c",
            "readlink /proc/self/fd/3 >&2; echo \"parent=$CELLA_DIE_WITH_PARENT\" >&2; \
             echo \"format=${CELLA_LOG_FORMAT-unset}\" >&2; exec ls /proc/self/fd >&2",
        ]);
        let mut child = Spawned::start(&command, listener.as_raw_fd(), true).unwrap();
        let mut said = String::new();
        child.stderr.take().unwrap().read_to_string(&mut said).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        assert!(child.try_wait().unwrap().is_some());
        let lines: Vec<&str> = said.lines().collect();
        assert!(lines[0].starts_with("socket:["), "{said}");
        assert_eq!(lines[1], format!("parent={}", std::process::id()), "{said}");
        assert_eq!(lines[2], "format=unset", "{said}");
        // 0, 1, 2 and 3, but not the socket's own descriptor here (close-on-exec); the test
        // harness may pass on descriptors of its own without the flag.
        let fds: Vec<&str> = lines[3..].to_vec();
        assert!(["0", "1", "2", "3"].iter().all(|f| fds.contains(f)), "{fds:?}");
        let own = listener.as_raw_fd().to_string();
        assert!(listener.as_raw_fd() == API_FD || !fds.contains(&own.as_str()), "{fds:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
