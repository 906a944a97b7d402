//! The supervisor: prepares the jail on the host, clones the VMM's process into its namespaces,
//! waits for it (forwarding SIGINT, SIGTERM and SIGHUP), and removes the jail folder and the
//! cgroups, and gives a `--bind-rw` folder back to root, when it ends, however it ends — its
//! own exit, a crash, `SIGKILL`, a seccomp kill or an OOM kill. Mounts need no cleanup: they
//! exist only in the VMM's mount namespace, which the kernel tears down with the VMM.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupError, Version};
use crate::child::{self, ChildPlan};
use crate::config::{JailConfig, KVM_DEVICE, PROC_DIR};
use crate::timing::Timings;
use crate::wait::{empty_sigset, supervised_signals, FORWARDED};

/// Why the jail could not be set up or taken down. Each names the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("step `{step}` failed on {path}")]
    Step {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("step `create-jail-folder` failed: {0} exists already (another VM with this id runs, or a supervisor died before cleaning up)")]
    JailExists(PathBuf),
    #[error("spare jail {spare} {problem}")]
    Prepared { spare: PathBuf, problem: &'static str },
    #[error("step `cgroups` failed")]
    Cgroup(#[from] CgroupError),
    #[error("step `{step}` failed")]
    Handover {
        step: &'static str,
        #[source]
        source: crate::handover::HandoverError,
    },
}

pub(crate) fn step(step: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> JailError {
    let path = path.as_ref().to_owned();
    move |source| JailError::Step { step, path, source }
}

/// How the VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmStatus {
    Exited(i32),
    Killed(i32),
}

/// What the supervisor reports when the VMM is gone and the jail removed.
#[derive(Debug)]
pub struct Outcome {
    pub status: VmmStatus,
    /// The VMM's pid (in the supervisor's PID namespace).
    pub pid: i32,
    /// A line for each cgroup limit the VMM ran into.
    pub limits_hit: Vec<String>,
    /// What each step cost, in milliseconds.
    pub timings: Timings,
    /// Set if the jail could not be removed completely.
    pub cleanup_error: Option<JailError>,
}

impl Outcome {
    /// One sentence on how the VMM ended, for people and for the worker's report.
    pub fn describe(&self, id: &str) -> String {
        let mut text = match self.status {
            VmmStatus::Exited(code) => format!("the VMM in jail {id} exited with status {code}"),
            VmmStatus::Killed(libc::SIGSYS) => format!(
                "the VMM in jail {id} was killed by SIGSYS: it made a system call its seccomp filter forbids \
                 (the kernel audit log, dmesg type 1326, names it)"
            ),
            VmmStatus::Killed(signal) => {
                format!("the VMM in jail {id} was killed by {}", signal_name(signal))
            }
        };
        for note in &self.limits_hit {
            text.push_str("; ");
            text.push_str(note);
        }
        text
    }
}

impl Outcome {
    /// The jailer's exit status for this outcome (`cella-jailer --help`): the VMM's own, 245
    /// for a seccomp kill, 246 for another signal, 248 if the jail could not be removed.
    pub fn exit_code(&self) -> u8 {
        use cella_abi::exit::{CLEANUP_FAILED, VMM_KILLED, VMM_KILLED_BY_SECCOMP};
        if self.cleanup_error.is_some() {
            return CLEANUP_FAILED;
        }
        match self.status {
            VmmStatus::Exited(code) => code.clamp(0, 255) as u8,
            VmmStatus::Killed(libc::SIGSYS) => VMM_KILLED_BY_SECCOMP,
            VmmStatus::Killed(_) => VMM_KILLED,
        }
    }

    /// What the jailer says about this outcome on stderr, one line each (none for a VMM that
    /// exited on its own within its limits).
    pub fn report_lines(&self, id: &str) -> Vec<String> {
        self.report_messages(id).into_iter().map(|message| format!("cella-jailer: {message}")).collect()
    }

    /// What [`report_lines`](Self::report_lines) says, without the program's name.
    pub fn report_messages(&self, id: &str) -> Vec<String> {
        let mut messages = Vec::new();
        if matches!(self.status, VmmStatus::Killed(_)) || !self.limits_hit.is_empty() {
            messages.push(self.describe(id));
        }
        if let Some(e) = &self.cleanup_error {
            messages
                .push(format!("the jail of {id} could not be removed completely: {}", crate::error_chain(e)));
        }
        messages
    }
}

/// A signal's name, e.g. `SIGKILL`.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSYS => "SIGSYS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGHUP => "SIGHUP",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// How [`run`] ended: the VMM ended and the jail is gone, or (`--hand-off`) the VMM runs as the
/// caller's child and the jail is the caller's to remove.
#[derive(Debug)]
pub enum Ran {
    Ended(Outcome),
    HandedOff {
        /// The VMM's pid (in the caller's PID namespace: the jailer's).
        pid: i32,
        timings: Timings,
    },
}

/// A jail whose VMM was handed off to the caller (`--hand-off`): what the caller needs to know
/// to read its limits and remove it once the VMM has ended — the same names it gave the jailer.
#[derive(Clone, Debug)]
pub struct HandedOff {
    pub id: String,
    pub chroot_base: PathBuf,
    pub exec_name: String,
    pub cgroup_parent: Option<String>,
}

impl HandedOff {
    /// A line for each cgroup limit the VMM ran into (read before [`HandedOff::remove`]).
    pub fn limits_hit(&self) -> Vec<String> {
        crate::cgroup::CgroupPlan::everywhere(&self.id, self.cgroup_parent.as_deref())
            .map(|plan| plan.limits_hit())
            .unwrap_or_default()
    }

    /// Removes the jail's cgroups (killing anything left in them) and its folder.
    pub fn remove(&self) -> Result<(), JailError> {
        cleanup(&self.id, &self.chroot_base, &self.exec_name, self.cgroup_parent.as_deref()).map(drop)
    }

    /// What the supervisor would have reported for the VMM `pid` that ended with `wait_status`
    /// (as waitpid(2) gives it), after reading the limits it hit and removing the jail.
    pub fn ended(&self, pid: i32, wait_status: i32) -> Outcome {
        let limits_hit = self.limits_hit();
        let cleanup_error = self.remove().err();
        Outcome {
            status: decode_status(wait_status),
            pid,
            limits_hit,
            timings: Timings::default(),
            cleanup_error,
        }
    }
}

/// What the jailer writes on its `--hand-off` descriptor: the VMM's pid, as soon as it exists.
pub fn hand_off_line(pid: i32) -> String {
    format!("{pid}\n")
}

/// The pid in what a jailer wrote on its `--hand-off` descriptor, if it wrote one.
pub fn parse_hand_off(text: &str) -> Option<i32> {
    text.lines().next()?.trim().parse().ok().filter(|pid: &i32| *pid > 0)
}

/// What exists on the host for this jail, so failure and exit remove exactly that.
struct Residue<'a> {
    config: &'a JailConfig,
    jail_dir: bool,
    cgroups: bool,
    /// The `--bind-rw` folder was handed to the VMM's uid/gid: give it back to root.
    handed_over: bool,
}

impl Residue<'_> {
    fn remove(&mut self, t: &mut Timings) -> Result<(), JailError> {
        let mut result = Ok(());
        let start = Instant::now();
        if self.cgroups {
            self.cgroups = false;
            if let Err(e) = self.config.cgroups.remove() {
                result = Err(JailError::Cgroup(e));
            }
        }
        t.record("remove-cgroups", start);
        let start = Instant::now();
        if self.jail_dir {
            self.jail_dir = false;
            let dir = self.config.jail_dir();
            let removed = crate::prepared::release_netns(&dir).and_then(|()| fs::remove_dir_all(&dir));
            if let Err(e) = removed {
                if e.kind() != io::ErrorKind::NotFound && result.is_ok() {
                    result = Err(JailError::Step { step: "remove-jail-folder", path: dir, source: e });
                }
            }
        }
        t.record("remove-jail-folder", start);
        if let Some(dir) = self.config.bind_rw.as_ref().filter(|_| self.handed_over) {
            self.handed_over = false;
            let start = Instant::now();
            if let Err(source) = crate::handover::take_back(dir) {
                if result.is_ok() {
                    result = Err(JailError::Handover { step: "hand-back-folder", source });
                }
            }
            t.record("hand-back-folder", start);
        }
        result
    }
}

impl Drop for Residue<'_> {
    fn drop(&mut self) {
        let _ = self.remove(&mut Timings::default());
    }
}

/// Closes every inherited descriptor above 2 except `keep`.
fn close_inherited_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep.iter().map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > from {
            let to = fd - 1;
            // SAFETY: close_range only closes descriptors; nothing in this process uses them.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
            if r < 0 {
                return Err(step("close-fds", "/proc/self/fd")(io::Error::last_os_error()));
            }
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

/// Makes the jail folder and what goes in it on the host, or takes a prepared one; the caller's
/// `Residue` removes it.
fn build_jail_folder(
    config: &JailConfig,
    residue: &mut Residue<'_>,
    t: &mut Timings,
) -> Result<(), JailError> {
    let start = Instant::now();
    exec_dir(&config.chroot_base, &config.exec_name)?;
    if let Some(spare) = &config.from_prepared {
        let mut taken = false;
        match crate::prepared::take(config, spare, || taken = true) {
            Ok(()) => {
                residue.jail_dir = true;
                t.record("take-prepared-jail", start);
                return make_mount_points(config, t);
            }
            // A spare that cannot be used costs this launch its head start, not its run.
            Err(e @ JailError::Prepared { .. }) if !taken => {
                tracing::warn!(
                    spare = %spare,
                    "not using the spare jail: {}; making the jail at launch",
                    crate::error_chain(&e)
                );
            }
            Err(e) => {
                residue.jail_dir = taken;
                return Err(e);
            }
        }
    }
    make_jail_folder(&config.jail_dir(), || residue.jail_dir = true)?;
    t.record("create-jail-folder", start);
    make_mount_points(config, t)
}

/// Opens the exec-file for the child to exec from (`O_PATH`, never following a link) and checks
/// what was opened: a regular, executable file that neither its group nor others can write.
/// The VMM runs this very file (no copy is made), and any local user who could write it could
/// change what every jail runs.
fn open_exec_file(path: &Path) -> Result<File, JailError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(step("open-exec-file", path))?;
    let meta = file.metadata().map_err(step("open-exec-file", path))?;
    let problem = if !meta.is_file() {
        Some("not a regular file")
    } else if meta.mode() & 0o111 == 0 {
        Some("not executable")
    } else if meta.mode() & 0o022 != 0 {
        Some("writable by its group or by others")
    } else {
        None
    };
    match problem {
        None => Ok(file),
        Some(what) => {
            Err(step("open-exec-file", path)(io::Error::new(io::ErrorKind::PermissionDenied, what)))
        }
    }
}

/// `<base>/<exec-name>`, made if missing. The base may sit in a world-writable place such as
/// /dev/shm: its folders must be root's own real folders, or someone else could steer where
/// jails are made.
pub(crate) fn exec_dir(chroot_base: &Path, exec_name: &str) -> Result<PathBuf, JailError> {
    let exec_dir = chroot_base.join(exec_name);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&exec_dir)
        .map_err(step("create-jail-folder", &exec_dir))?;
    for dir in [chroot_base, &exec_dir] {
        let meta = fs::symlink_metadata(dir).map_err(step("check-jail-base", dir))?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            let e =
                io::Error::new(io::ErrorKind::PermissionDenied, "not a root-owned folder closed to others");
            return Err(step("check-jail-base", dir)(e));
        }
    }
    Ok(exec_dir)
}

/// Makes `jail_dir` (mode 0700: closed to everyone but root; the VMM only sees its `root`,
/// made here too). `made` runs as soon as the folder exists, so the caller can remove it.
pub(crate) fn make_jail_folder(jail_dir: &Path, made: impl FnOnce()) -> Result<(), JailError> {
    match fs::DirBuilder::new().mode(0o700).create(jail_dir) {
        Ok(()) => made(),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(JailError::JailExists(jail_dir.to_owned()))
        }
        Err(e) => return Err(step("create-jail-folder", jail_dir)(e)),
    }
    let root = jail_dir.join("root");
    fs::DirBuilder::new().mode(0o755).create(&root).map_err(step("create-jail-folder", &root))
}

/// The jail's `/dev` and the mount points of its binds.
fn make_mount_points(config: &JailConfig, t: &mut Timings) -> Result<(), JailError> {
    let start = Instant::now();
    let dev = config.host_path(Path::new(KVM_DEVICE)).parent().map(Path::to_owned).unwrap_or_default();
    fs::DirBuilder::new().mode(0o755).create(&dev).map_err(step("create-dev-folder", &dev))?;
    for file in &config.ro_files {
        let target = config.host_path(&file.jail);
        if let Some(parent) = target.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(step("create-mount-point", parent))?;
        }
        File::create(&target).map_err(step("create-mount-point", &target))?;
    }
    let folders = config.bind_rw.iter().cloned().chain(config.mount_proc.then(|| PathBuf::from(PROC_DIR)));
    for folder in folders {
        let target = config.host_path(&folder);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(step("create-mount-point", &target))?;
    }
    t.record("create-mount-points", start);
    Ok(())
}

/// Sets up the jail, starts the VMM in it, waits for it, and removes the jail.
///
/// Must run in a single-threaded process (the `cella-jailer` binary): it forks, blocks signals
/// and closes inherited descriptors.
pub fn run(config: &JailConfig, t: &mut Timings) -> Result<Ran, JailError> {
    // The signals the supervisor handles are blocked before anything exists: one that arrives
    // while the jail is being made (a caller's SIGTERM, the parent-death signal a caller such as
    // `cella-vmm scan --jailed` sets) then waits and is forwarded to the VMM, instead of killing
    // the supervisor half-way and leaving the jail behind. The mask comes back only once the
    // jail is gone.
    let set = supervised_signals();
    let mut old_mask = empty_sigset();
    // SAFETY: sigprocmask with a valid set; `old_mask` receives the previous mask.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old_mask) };
    let result = run_blocked(config, t, old_mask);
    // SAFETY: restores the mask saved above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
    result
}

/// [`run`] with the supervised signals blocked; `old_mask` is what the VMM gets back.
fn run_blocked(config: &JailConfig, t: &mut Timings, old_mask: libc::sigset_t) -> Result<Ran, JailError> {
    let start = Instant::now();
    let kept: Vec<RawFd> = config.keep_fds.iter().chain(&config.hand_off).copied().collect();
    close_inherited_fds(&kept)?;
    // SAFETY: the descriptor was checked open (config) and kept above; it is owned here from
    // now on, and closes on the VMM's exec.
    let hand_off = config.hand_off.map(|fd| unsafe { File::from_raw_fd(fd) });
    if let Some(fd) = &hand_off {
        // SAFETY: fcntl(F_SETFD) on a descriptor owned here.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(step("hand-off", "descriptor")(io::Error::last_os_error()));
        }
    }
    t.record("close-fds", start);
    let start = Instant::now();
    let vars: Vec<OsString> = std::env::vars_os().map(|(k, _)| k).collect();
    for key in vars {
        std::env::remove_var(key);
    }
    t.record("clear-env", start);

    let mut residue = Residue { config, jail_dir: false, cgroups: false, handed_over: false };
    build_jail_folder(config, &mut residue, t)?;
    if config.hand_off.is_some() {
        crate::owner::record(&config.jail_dir()).map_err(step("record-owner", config.jail_dir()))?;
    }

    if let Some(dir) = &config.bind_rw {
        let start = Instant::now();
        residue.handed_over = true;
        crate::handover::give(dir, config.uid, config.gid)
            .map_err(|source| JailError::Handover { step: "hand-over-folder", source })?;
        t.record("hand-over-folder", start);
    }

    let start = Instant::now();
    config.cgroups.create()?;
    residue.cgroups = true;
    t.record("create-cgroups", start);

    let start = Instant::now();
    // A prepared jail brings a new, empty netns made ahead: joining it is cheaper than making one.
    let netns_path = config.netns.clone().or_else(|| crate::prepared::netns_of(&config.jail_dir()));
    let netns = match &netns_path {
        Some(path) => Some(File::open(path).map_err(step("open-netns", path))?),
        None => None,
    };
    let exec = open_exec_file(&config.exec_file)?;
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    let plan = ChildPlan {
        root: config.root(),
        procs_files: config.cgroups.procs_files(),
        rlimits: config.rlimits.clone(),
        ro_binds: config.ro_files.iter().map(|f| (f.host.clone(), config.host_path(&f.jail))).collect(),
        netns: netns.as_ref().zip(netns_path).map(|(f, path)| (f.as_raw_fd(), path)),
        uid: config.uid,
        gid: config.gid,
        exec_fd: exec.as_raw_fd(),
        exec_file: config.exec_file.clone(),
        ro_jail_paths: config.ro_files.iter().map(|f| f.jail.clone()).collect(),
        rw_bind: config.bind_rw.as_ref().map(|dir| (dir.clone(), config.host_path(dir))),
        mount_proc: config.mount_proc,
        argv: std::iter::once(OsString::from(&config.exec_name))
            .chain(config.vmm_args.iter().cloned())
            .collect(),
        keep_fds: config.keep_fds.clone(),
        last_cap,
        old_mask,
    };
    let (pid, report) = spawn(config, plan)?;
    drop(exec);
    // Handed off, the VMM is the caller's child from its first instant: the caller learns its
    // pid now, so that it can reap it however this launch ends, and the jailer watches it
    // through a pidfd (it cannot wait for a process that is not its child).
    let pidfd = match &hand_off {
        Some(fd) => {
            use std::io::Write;
            let _ = (&*fd).write_all(hand_off_line(pid).as_bytes());
            Some(pidfd_open(pid).map_err(step("hand-off", "pidfd"))?)
        }
        None => None,
    };
    t.record("clone", start);

    let start = Instant::now();
    // The child reports its step timings, then exec closes the pipe; or it reports a failure.
    let mut text = String::new();
    let _ = report.take(1 << 16).read_to_string(&mut text);
    let waited_ms = start.elapsed().as_secs_f64() * 1e3;
    if let Some(line) = text.lines().find(|l| l.starts_with("E ")) {
        match &pidfd {
            Some(pidfd) => while !crate::wait::poll_read(&[pidfd.as_raw_fd()], None)[0] {},
            None => drop(wait_for(pid)),
        }
        let mut parts = line[2..].splitn(3, ' ');
        let step_name = parts.next().unwrap_or("unknown");
        let errno: i32 = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
        let path = PathBuf::from(parts.next().unwrap_or(""));
        let step_name: &'static str =
            STEP_NAMES.iter().find(|s| **s == step_name).copied().unwrap_or("unknown");
        return Err(JailError::Step { step: step_name, path, source: io::Error::from_raw_os_error(errno) });
    }
    let child = Timings::decode(&text);
    let child_ms: f64 = child.steps.iter().map(|(_, ms)| ms).sum();
    for (name, ms) in child.steps {
        t.push(&name, ms);
    }
    // What the child's steps do not account for: the namespaces' first scheduling and exec.
    t.push("exec", (waited_ms - child_ms).max(0.0));
    drop(netns);

    if hand_off.is_some() {
        // The VMM runs: the jail is the caller's now.
        residue.jail_dir = false;
        residue.cgroups = false;
        residue.handed_over = false;
        return Ok(Ran::HandedOff { pid, timings: t.clone() });
    }

    let signals = crate::wait::signal_fd(&supervised_signals()).map_err(step("supervise", "signalfd"))?;

    let start = Instant::now();
    let status = supervise(pid, &signals);
    t.record("vmm-run", start);

    let limits_hit = config.cgroups.limits_hit();
    let cleanup_error = residue.remove(t).err();
    Ok(Ran::Ended(Outcome { status, pid, limits_hit, timings: t.clone(), cleanup_error }))
}

/// A pidfd of `pid` (pidfd_open(2)).
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Step names the child may report (so errors carry `&'static str`).
const STEP_NAMES: &[&str] = &[
    "parent-death-signal",
    "join-cgroup",
    "set-rlimits",
    "make-mounts-private",
    "bind-jail-root",
    "bind-read-only-file",
    "bind-read-write-folder",
    "mount-proc",
    "pivot-root",
    "unmount-old-root",
    "mknod",
    "chown",
    "remount-root-read-only",
    "join-netns",
    "landlock",
    "no-new-privs",
    "drop-bounding-capabilities",
    "clear-ambient-capabilities",
    "switch-gid",
    "switch-uid",
    "clear-capabilities",
    "restore-signal-mask",
    "keep-fd",
    "exec",
];

/// `CLONE_INTO_CGROUP`: start the child in the cgroup2 directory `clone_args.cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(File, File), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(step("clone", "pipe")(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and owned here.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Clones the child into its namespaces and runs [`child::main`] there. Returns the child's pid,
/// the read end of its report pipe and the write end of the pipe that lets it exec. The
/// supervised signals are blocked already (see [`run`]), so none is lost; the child restores
/// `plan.old_mask` before exec.
fn spawn(config: &JailConfig, mut plan: ChildPlan) -> Result<(i32, File), JailError> {
    let (read, write) = pipe()?;

    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if config.new_pid_ns {
        flags |= libc::CLONE_NEWPID;
    }
    if plan.netns.is_none() {
        flags |= libc::CLONE_NEWNET;
    }
    if config.hand_off.is_some() {
        // The VMM's parent is the jailer's: the caller waits for it, and the jailer can go.
        flags |= libc::CLONE_PARENT;
    }
    // On cgroup2 the child is born in its cgroup (clone3 with CLONE_INTO_CGROUP): writing
    // `cgroup.procs` afterwards would take the kernel's global threadgroup lock, whose write
    // side waits for an RCU grace period (~11 ms measured here). Falls back to plain clone and
    // the write where clone3 is refused.
    let v2 = config.cgroups.hierarchies.iter().find(|h| h.version == Version::V2);
    let v2_fd = v2.and_then(|h| File::open(&h.dir).ok());
    let mut pid = -1;
    if let (Some(h), Some(dir)) = (v2, &v2_fd) {
        let procs = h.dir.join("cgroup.procs");
        let all = std::mem::take(&mut plan.procs_files);
        plan.procs_files = all.iter().filter(|p| **p != procs).cloned().collect();
        let args = CloneArgs {
            flags: flags as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: a fork-style clone3 (no stack given, no shared memory) from a
        // single-threaded process; `args` lives for the call; the child only runs
        // `child::main`, which execs or exits.
        pid = unsafe { libc::syscall(libc::SYS_clone3, &args, std::mem::size_of::<CloneArgs>()) };
        if pid < 0 {
            plan.procs_files = all;
        }
    }
    if pid < 0 {
        // SAFETY: as above, with clone(2).
        pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
    }
    if pid < 0 {
        return Err(step("clone", "/")(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read);
        let fd = std::os::fd::IntoRawFd::into_raw_fd(write);
        child::main(&plan, fd);
    }
    drop(write);
    drop(v2_fd);
    Ok((pid as i32, read))
}

fn decode_status(status: i32) -> VmmStatus {
    if libc::WIFSIGNALED(status) {
        VmmStatus::Killed(libc::WTERMSIG(status))
    } else {
        VmmStatus::Exited(libc::WEXITSTATUS(status))
    }
}

pub(crate) fn wait_for(pid: i32) -> VmmStatus {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return decode_status(status);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return VmmStatus::Exited(-1);
        }
    }
}

/// The VMM's status if it has ended (reaped), without waiting.
pub(crate) fn try_wait(pid: i32) -> Option<VmmStatus> {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on our own child.
    (unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid).then(|| decode_status(status))
}

/// How often a forwarded signal is sent again until the VMM ends: a signal that reaches the
/// VMM before it has installed its handlers (as PID 1 of its namespace it ignores unhandled
/// signals from outside) is not lost.
const RESEND_EVERY: Duration = Duration::from_millis(50);
/// How long a VMM may take to stop after a forwarded signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Waits for the VMM, passing SIGINT/SIGTERM/SIGHUP/SIGQUIT on to it.
fn supervise(pid: i32, signals: &OwnedFd) -> VmmStatus {
    let mut forwarding: Option<(i32, Instant)> = None;
    let fds = [signals.as_raw_fd()];
    loop {
        if let Some(status) = try_wait(pid) {
            return status;
        }
        let ready = crate::wait::poll_read(&fds, forwarding.map(|_| RESEND_EVERY));
        if ready[0] {
            if let Some(signal) = crate::wait::read_signal(signals).filter(|s| FORWARDED.contains(s)) {
                forwarding.get_or_insert((signal, Instant::now()));
            }
        }
        if let Some((signal, since)) = forwarding {
            let signal = if since.elapsed() > STOP_GRACE { libc::SIGKILL } else { signal };
            // SAFETY: kill(2) to our own child.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Removes what a jail left behind when its supervisor could not (it was killed): kills
/// anything still in the jail's cgroups, removes them in every hierarchy, and removes the jail
/// folder. Mounts need nothing: they lived in the VMM's mount namespace. Returns what it removed.
pub fn cleanup(
    id: &str,
    chroot_base: &Path,
    exec_name: &str,
    cgroup_parent: Option<&str>,
) -> Result<Vec<PathBuf>, JailError> {
    let plan = crate::cgroup::CgroupPlan::everywhere(id, cgroup_parent)?;
    let mut removed: Vec<PathBuf> =
        plan.hierarchies.iter().filter(|h| h.dir.is_dir()).map(|h| h.dir.clone()).collect();
    plan.remove()?;
    let dir = chroot_base.join(exec_name).join(id);
    if fs::symlink_metadata(&dir).is_ok() {
        crate::prepared::release_netns(&dir).map_err(step("remove-jail-folder", &dir))?;
        fs::remove_dir_all(&dir).map_err(step("remove-jail-folder", &dir))?;
        removed.push(dir);
    }
    Ok(removed)
}
