//! Session VMMs: `cella-vmm session` processes, each in a process group of its own so it
//! outlives a restart of `cella serve`, driven through their control socket
//! ([`cella_host::client::ControlClient`]), and the guest's session port over the VM's vsock
//! socket ([`cella_host::session::GuestSession`]).
//!
//! Jailed (`worker.jailed`, the default under root), `cella-vmm session --jailed` becomes
//! `cella-jailer`: the process this module starts is then the jail's supervisor, the VMM its
//! child in the jail, running as a uid/gid of its own with the session's folder bound
//! read-write at its own path. The supervisor stops the VM on SIGTERM, and removes the jail and
//! gives the folder back to root when the VMM ends; only if the supervisor itself dies
//! (SIGKILL) is the jail left behind, for [`Vmms::cleanup_jail`].
//!
//! Every method blocks; the manager calls them in `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_host::client::ControlClient;
use cella_host::session::GuestSession;
use cella_host::VmState as VmmState;
use cella_proto::{Kind, SessionRequest};
use serde_json::Value;

use crate::error::error_chain;
use crate::spares::Spares;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start the VMM")]
    Spawn(#[source] std::io::Error),
    #[error("the VMM did not come up: {0}")]
    NotReady(String),
    #[error("the VMM's control API: {0}")]
    Control(String),
    #[error("the guest: {0}")]
    Guest(String),
    /// The guest (or its protocol) refused the request itself: the caller's mistake.
    #[error("{0}")]
    Refused(String),
    #[error("cella-jailer cleanup of jail {id}: {message}")]
    Cleanup { id: String, message: String },
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// `/proc` could not be read, so the VMM's state is unknown.
    #[error("{0}")]
    Proc(String),
}

/// Where a session's VM starts from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Boot the scanner image on this artifact, which the guest indexes; `name` is the
    /// artifact's name as the tenant gave it (the guest detects formats by it).
    Artifact { path: PathBuf, name: String },
    /// Restore this snapshot (memory mapped lazily), resumed.
    Snapshot { dir: PathBuf },
}

/// The cell of a jailed session VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The jail's id ([`jail_id`]).
    pub id: String,
    /// The uid and gid the VMM runs as: one no other live VMM of this host has.
    pub uid: u32,
}

/// One VMM to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The session's folder: the sockets, the artifact and the snapshot lie in it; a jailed VMM
    /// gets it read-write at the same path (and nothing else of the host's files).
    pub dir: PathBuf,
    pub api_sock: PathBuf,
    pub vsock: PathBuf,
    pub source: Source,
    pub mem_mib: u32,
    pub read_policy: String,
    /// The VMM stops itself after this long: the session's maximum lifetime left, a backstop
    /// behind the reaper (which enforces the deadline, which `connect` can move).
    pub max_duration: Duration,
    /// The VMM's stdout and stderr (its JSON report and diagnostics), outside the session's
    /// folder: the jailed VMM cannot reach it except through the descriptors it is given.
    pub log: PathBuf,
    /// Run it jailed, in this cell.
    pub jail: Option<JailSpec>,
    /// The tenant's CPU quota per VM, percent of one CPU (a jailed VMM's cgroup).
    pub cpu_percent: u32,
}

/// A spare session VMM to start: `cella-vmm session --api-fd`, confined before it serves
/// anything and waiting, with no VM, for a snapshot's files ([`Vmms::restore_into`]).
#[derive(Debug, Clone)]
pub struct SpareSpec {
    /// Its own folder (root's, 0700; the VMM never opens it): its control socket is bound
    /// there by this process, and the folder's name is its jail's id.
    pub dir: PathBuf,
    /// Its stdout and stderr until a session takes it (then moved to the session's log).
    pub log: PathBuf,
    /// The guest memory it can take (its jail's memory limit follows).
    pub mem_mib: u32,
    /// Its jail's CPU quota, percent of one CPU.
    pub cpu_percent: u32,
    /// Jailed, as this uid/gid (the jail's id is the folder's name).
    pub jail_uid: Option<u32>,
}

/// A spare session VMM, started and waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpareVmm {
    /// The process this one started (jailed: the jail's supervisor).
    pub pid: u32,
    /// Its control socket (in its own folder; its command line names it).
    pub api_sock: PathBuf,
    pub log: PathBuf,
    pub mem_mib: u32,
    pub cpu_percent: u32,
}

impl SpareVmm {
    /// Its folder, whose name is its jail's id.
    pub fn dir(&self) -> &Path {
        self.api_sock.parent().unwrap_or(Path::new("/"))
    }
}

/// A snapshot to restore into a spare ([`Vmms::restore_into`]).
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// The snapshot folder (`state.bin`, `memory.bin`).
    pub snapshot: PathBuf,
    /// The session's artifact: the VM's disk.
    pub disk: PathBuf,
    /// Where the session's vsock socket is bound (by this process; the VMM gets the listener).
    pub vsock: PathBuf,
    /// The session's VMM log: the spare's log is moved there.
    pub log: PathBuf,
    /// The VMM stops the VM this long after it starts (a backstop behind the reaper).
    pub max_duration: Duration,
}

/// The control socket's name in a spare's folder.
pub const SPARE_API_SOCK: &str = "api.sock";

/// What the control API says the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    Stopped,
}

/// What may accompany a request to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// The compiled policy (the scan's for `scan`; the masking policy for `grep` and `read`).
    Policy(Vec<u8>),
    /// A file for `add`, streamed from disk as it is sent.
    File(PathBuf),
}

/// A bulk frame of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Sarif(Vec<u8>),
    Summary(Vec<u8>),
    Data(Vec<u8>),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Sarif(b) | Frame::Summary(b) | Frame::Data(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The guest's answer: its result (a `cella_proto::SessionResult` as JSON, tagged by `op`)
/// and the frames it announced.
#[derive(Debug, Clone)]
pub struct Reply {
    pub response: Value,
    pub frames: Vec<Frame>,
}

/// The jail id of session `session_id`'s VMM: `session-<hex>` (letters, digits and hyphens, as
/// `cella-jailer --id` wants). One per session: a session has at most one VMM at a time.
pub fn jail_id(session_id: &str) -> String {
    let suffix: String = session_id
        .trim_start_matches("session_")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(56)
        .collect();
    format!("session-{suffix}")
}

/// How long a spare session VMM may take to answer after it started.
const SPARE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What a VMM needs beyond its guest's memory (its jail's memory limit is the sum).
const VMM_OVERHEAD_MIB: u64 = 32;
/// The most tasks a spare session VMM's jail may have.
const PIDS_MAX: u32 = 16;

/// Runs `cella-vmm session`, jailed or not.
#[derive(Debug, Clone)]
pub struct Vmms {
    vmm: PathBuf,
    image: Option<PathBuf>,
    jailed: bool,
    /// A spare jail for the next jailed launch (see [`crate::spares`]).
    spares: Option<Arc<Spares>>,
}

impl Vmms {
    /// `vmm`: the `cella-vmm` binary (jailed: statically linked, with `cella-jailer` beside
    /// it); `image`: the scanner image (default: the VMM's own).
    pub fn new(vmm: PathBuf, image: Option<PathBuf>, jailed: bool) -> Self {
        Self { vmm, image, jailed, spares: None }
    }

    /// Jailed launches take their jail from `spares` when one is ready.
    pub fn with_spares(self, spares: Arc<Spares>) -> Self {
        Self { spares: Some(spares), ..self }
    }

    /// Whether session VMMs run jailed.
    pub fn jailed(&self) -> bool {
        self.jailed
    }

    /// The `cella-jailer` beside `cella-vmm`.
    pub fn jailer(&self) -> PathBuf {
        self.vmm.with_file_name("cella-jailer")
    }

    /// The command line for `spec`, taking the spare jail `spare` if it is jailed.
    pub fn command(&self, spec: &LaunchSpec, spare: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.vmm);
        cella_log::words_for_people(&mut cmd);
        cmd.arg("session").arg("--api-sock").arg(&spec.api_sock).arg("--vsock").arg(&spec.vsock);
        match &spec.source {
            Source::Artifact { path, name } => {
                cmd.arg("--artifact").arg(path).arg("--artifact-name").arg(name);
                cmd.arg("--mem-mib").arg(spec.mem_mib.to_string());
                cmd.arg("--read-policy").arg(&spec.read_policy);
            }
            Source::Snapshot { dir } => {
                cmd.arg("--restore").arg(dir);
            }
        }
        if let Some(image) = &self.image {
            cmd.arg("--image").arg(image);
        }
        cmd.arg("--max-duration-secs").arg(spec.max_duration.as_secs().max(1).to_string()).arg("--json");
        if let Some(jail) = &spec.jail {
            let uid = jail.uid.to_string();
            cmd.args(["--jailed", "--jail-id", &jail.id, "--jail-uid", &uid, "--jail-gid", &uid]);
            cmd.arg("--session-dir").arg(&spec.dir);
            cmd.arg("--cpus").arg(format!("{}", f64::from(spec.cpu_percent.max(1)) / 100.0));
            if let Some(spare) = spare {
                cmd.args(["--jail-prepared", spare]);
            }
        }
        cmd
    }

    /// Starts the VMM as a process of its own (it outlives a restart of this process; jailed,
    /// that process becomes the jail's supervisor); returns its pid once the process exists
    /// (not yet ready: see [`Vmms::wait_ready`]).
    pub fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError> {
        let log = open_log(&spec.log)?;
        let log2 = log.try_clone().map_err(|e| VmmError::Io("cannot share the VMM log".into(), e))?;
        let spares = self.spares.as_ref().filter(|_| spec.jail.is_some());
        let spare = spares.and_then(|s| s.take(0));
        let mut cmd = self.command(spec, spare.as_deref());
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        crate::signal::detach(&mut cmd);
        let spawned = cmd.spawn().map_err(VmmError::Spawn);
        if let Some(spares) = spares {
            spares.refill(0);
        }
        let mut child = spawned?;
        let pid = child.id();
        // Reaps the VMM when it exits while this process runs (a restarted `serve` cannot: the
        // VMM is then init's child, which reaps it).
        let _ = std::thread::Builder::new().name(format!("vmm-{pid}")).spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }

    /// Starts the spare session VMM of `spec`, detached like every session VMM (a process group
    /// of its own, no parent-death signal: once a session takes it, it must outlive a restart
    /// of this process), and waits until it answers on its control socket, confined, with no
    /// VM.
    pub fn start_spare(&self, spec: &SpareSpec) -> Result<SpareVmm, VmmError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::remove_dir_all(&spec.dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&spec.dir)
            .map_err(|e| VmmError::Io(format!("cannot make {}", spec.dir.display()), e))?;
        let api_sock = spec.dir.join(SPARE_API_SOCK);
        let listener = std::os::unix::net::UnixListener::bind(&api_sock)
            .map_err(|e| VmmError::Io(format!("cannot bind {}", api_sock.display()), e))?;
        let log = open_log(&spec.log)?;
        let fd = cella_host::spawn::API_FD.to_string();
        let session_args = |command: &mut Command| {
            command.args(["session", "--api-fd", &fd, "--api-sock-path"]).arg(&api_sock).arg("--json");
        };
        let mut command = match spec.jail_uid {
            Some(uid) => {
                let id = spec.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let vmm = std::fs::canonicalize(&self.vmm).unwrap_or_else(|_| self.vmm.clone());
                let uid = uid.to_string();
                let mut jailer = Command::new(self.jailer());
                jailer.args(["--id", &id, "--exec-file"]).arg(vmm);
                jailer.args(["--uid", &uid, "--gid", &uid, "--new-pid-ns", "--mount-proc"]);
                jailer.arg("--cgroup").arg(format!("memory={}M", u64::from(spec.mem_mib) + VMM_OVERHEAD_MIB));
                jailer.arg("--cgroup").arg(format!("pids={PIDS_MAX}"));
                jailer.arg("--cgroup").arg(format!("cpu={}", f64::from(spec.cpu_percent.max(1)) / 100.0));
                jailer.args(["--keep-fd", &fd, "--"]);
                session_args(&mut jailer);
                jailer
            }
            None => {
                let mut vmm = Command::new(&self.vmm);
                session_args(&mut vmm);
                vmm
            }
        };
        cella_log::words_for_people(&mut command);
        let mut child = cella_host::spawn::Spawned::start_detached(
            &command,
            &[(listener.as_raw_fd(), cella_host::spawn::API_FD)],
            &log,
        )
        .map_err(VmmError::Spawn)?;
        drop(listener);
        let pid = child.id();
        let spare = SpareVmm {
            pid,
            api_sock,
            log: spec.log.clone(),
            mem_mib: spec.mem_mib,
            cpu_percent: spec.cpu_percent,
        };
        let until = Instant::now() + SPARE_READY_TIMEOUT;
        let client = control(&spare.api_sock).with_timeout(Duration::from_secs(2));
        let ready = loop {
            match client.state() {
                Ok(info) if info.state == VmmState::NotStarted => break Ok(()),
                Ok(info) => break Err(format!("it says the VM is {:?}", info.state)),
                Err(_) if Instant::now() < until => {}
                Err(e) => break Err(error_chain(&e)),
            }
            if let Ok(Some(status)) = child.try_wait() {
                break Err(format!("it exited ({status})"));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // Reaps it when it exits while this process runs (a restarted `serve` cannot: it is
        // then init's child).
        let _ = std::thread::Builder::new().name(format!("spare-{pid}")).spawn(move || {
            let _ = child.wait();
        });
        match ready {
            Ok(()) => Ok(spare),
            Err(why) => {
                self.discard_spare(&spare);
                let log = std::fs::read(&spec.log).unwrap_or_default();
                let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(1000)..]).trim().to_owned();
                Err(VmmError::NotReady(format!(
                    "the spare session VMM did not come up: {why}; its log: {tail}"
                )))
            }
        }
    }

    /// Restores the snapshot of `spec` in `spare`: the snapshot's files, the disk and a vsock
    /// listener bound at `spec.vsock` go to it as descriptors (`PUT /snapshot/load`), and its
    /// log moves to the session's. The VM runs when this returns.
    pub fn restore_into(&self, spare: &SpareVmm, spec: &RestoreSpec) -> Result<(), VmmError> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a link: the artifact lies in the folder a booted VMM owned, which may
        // have left one there; what this process opens, the new VMM reads.
        let open =
            |path: &Path| {
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(
                    |e| VmmError::Io(format!("cannot open {} (not following links)", path.display()), e),
                )
            };
        let state = open(&spec.snapshot.join(cella_host::client::SNAPSHOT_STATE))?;
        let memory = open(&spec.snapshot.join(cella_host::client::SNAPSHOT_MEMORY))?;
        let disk = open(&spec.disk)?;
        let _ = std::fs::remove_file(&spec.vsock);
        let vsock = std::os::unix::net::UnixListener::bind(&spec.vsock)
            .map_err(|e| VmmError::Io(format!("cannot bind {}", spec.vsock.display()), e))?;
        let _ = std::fs::rename(&spare.log, &spec.log);
        let files = cella_host::client::HandedSnapshotFiles {
            state: state.as_fd(),
            memory: memory.as_fd(),
            disk: Some(disk.as_fd()),
            vsock: Some(vsock.as_fd()),
        };
        control(&spare.api_sock)
            .snapshot_load_handed(&files, true, Some(spec.max_duration))
            .map(|_| ())
            .map_err(control_error)
    }

    /// Ends a spare nobody took (SIGTERM: it exits; jailed, its supervisor removes the cell)
    /// and removes its folder.
    pub fn discard_spare(&self, spare: &SpareVmm) {
        if matches!(process_serves(spare.pid, &spare.api_sock), Liveness::Alive) {
            let _ = crate::signal::signal_session(spare.pid, false);
        }
        let _ = std::fs::remove_dir_all(spare.dir());
        let _ = std::fs::remove_file(&spare.log);
    }

    /// Ends the spare serving `api_sock` that a killed `cella serve` left (found by its command
    /// line, which names the socket): SIGTERM, so it exits and its supervisor removes its cell.
    pub fn end_stale_spare(&self, api_sock: &Path) {
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if matches!(process_serves(pid, api_sock), Liveness::Alive) {
                let _ = crate::signal::signal_session(pid, false);
            }
        }
    }

    /// Waits until the control API answers, up to `timeout`; gives up at once if the process
    /// `pid`, which [`Vmms::launch`] just started, ends.
    pub fn wait_ready(&self, pid: u32, api_sock: &Path, timeout: Duration) -> Result<(), VmmError> {
        let until = Instant::now() + timeout;
        let client = control(api_sock).with_timeout(Duration::from_secs(2));
        loop {
            let last = match client.state() {
                Ok(info) if info.state == VmmState::Running || info.state == VmmState::Paused => {
                    return Ok(())
                }
                Ok(info) => format!("the VM is {:?}", info.state),
                Err(e) => error_chain(&e),
            };
            // Not `alive`: the process this one just started may be between execs (`cella-vmm
            // session --jailed` becomes `cella-jailer`), its command line empty for a moment;
            // it is this process's child, reaped only once it exits.
            if matches!(read_proc(pid, "cmdline"), Ok(None)) {
                return Err(VmmError::NotReady(format!("the VMM exited ({last})")));
            }
            if Instant::now() > until {
                return Err(VmmError::NotReady(format!("no answer within {} s ({last})", timeout.as_secs())));
            }
            // A restored VMM answers within milliseconds: ask often (each ask is one short
            // exchange on a Unix socket).
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn state(&self, api_sock: &Path) -> Result<VmState, VmmError> {
        let info = control(api_sock).state().map_err(control_error)?;
        Ok(match info.state {
            VmmState::NotStarted => VmState::NotStarted,
            VmmState::Running => VmState::Running,
            VmmState::Paused => VmState::Paused,
            VmmState::Stopped => VmState::Stopped,
        })
    }

    pub fn pause(&self, api_sock: &Path) -> Result<(), VmmError> {
        control(api_sock).pause().map_err(control_error)
    }

    pub fn resume(&self, api_sock: &Path) -> Result<(), VmmError> {
        control(api_sock).resume().map_err(control_error)
    }

    /// Snapshots the (paused) VM into `dir`: this process makes the files and hands them over,
    /// the VMM writes them (it may be confined to no paths); the answer's details go into the
    /// audit event.
    pub fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, VmmError> {
        control(api_sock)
            .with_timeout(Duration::from_secs(120))
            .snapshot_create_handed(dir)
            .map_err(control_error)
    }

    /// Stops the VM (the VMM scrubs its memory and exits) if its control API answers within
    /// `timeout`; returns its run report.
    pub fn stop_within(&self, api_sock: &Path, timeout: Duration) -> Result<Value, VmmError> {
        let report = control(api_sock).with_timeout(timeout).stop().map_err(control_error)?;
        serde_json::to_value(&report).map_err(|e| VmmError::Control(format!("the run report: {e}")))
    }

    /// Continues the VMM `pid` and every process under it, should one have been stopped
    /// (SIGSTOP): a stopped VMM neither answers its control API nor acts on SIGTERM.
    pub fn continue_stopped(&self, pid: u32) {
        crate::signal::continue_tree(pid);
    }

    /// Opens a connection to the guest (retrying while it does not listen yet, up to
    /// `timeout`); each request on it may then take up to `exec_timeout`.
    pub fn connect(
        &self,
        vsock: &Path,
        timeout: Duration,
        exec_timeout: Duration,
    ) -> Result<Guest, VmmError> {
        let mut session =
            GuestSession::connect(vsock, timeout).map_err(|e| VmmError::Guest(error_chain(&e)))?;
        session.set_timeout(exec_timeout);
        Ok(Guest::new(VsockGuest(session)))
    }

    /// Whether the VMM process `pid` (the one serving `api_sock`; jailed, its supervisor) still
    /// exists.
    pub fn alive(&self, pid: u32, api_sock: &Path) -> Liveness {
        process_serves(pid, api_sock)
    }

    /// Asks the VMM to stop by signal (SIGTERM: it scrubs and exits; jailed, the supervisor
    /// passes it on), or with `kill`, ends it (SIGKILL to its process group) when it did not.
    pub fn signal(&self, pid: u32, kill: bool) {
        let _ = crate::signal::signal_session(pid, kill);
    }

    /// Removes what the jail `id` left when its supervisor died (its cgroups, with anything
    /// still in them, and its folder) and gives `dir`, the session's folder, back to root:
    /// `cella-jailer cleanup`. Returns what it reported; nothing left is not an error.
    pub fn cleanup_jail(&self, id: &str, dir: Option<&Path>) -> Result<String, VmmError> {
        let mut cmd = Command::new(self.jailer());
        cella_log::words_for_people(&mut cmd);
        cmd.arg("cleanup").arg("--id").arg(id);
        if let Some(dir) = dir {
            cmd.arg("--bind-rw").arg(dir);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| VmmError::Io(format!("cannot run {}", self.jailer().display()), e))?;
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            Ok(said)
        } else {
            Err(VmmError::Cleanup { id: id.to_owned(), message: format!("{} ({said})", out.status) })
        }
    }
}

/// A VMM's log (its stdout and stderr), appended to, readable by root only.
fn open_log(path: &Path) -> Result<std::fs::File, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VmmError::Io(format!("cannot open {}", path.display()), e))
}

fn control(api_sock: &Path) -> ControlClient {
    ControlClient::new(api_sock)
}

fn control_error(e: cella_host::client::ControlError) -> VmmError {
    VmmError::Control(error_chain(&e))
}

/// Whether a session's VMM process is there, as far as `/proc` can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// It exists, has not exited, and is that session's VMM.
    Alive,
    /// It has exited (or the pid now names another process).
    Gone,
    /// `/proc` could not be read (out of file descriptors, no permission): nothing is known,
    /// and nothing may be concluded: a session is failed only when its VMM is known gone.
    Unknown(String),
}

impl Liveness {
    /// Known to be gone.
    pub fn gone(&self) -> bool {
        matches!(self, Liveness::Gone)
    }
}

/// Reads a `/proc` file of process `pid`: `Ok(None)` when the process does not exist (any
/// more); `Err` when it cannot be told (EMFILE, EACCES, ...).
fn read_proc(pid: u32, file: &str) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read(format!("/proc/{pid}/{file}")) {
        Ok(bytes) => Ok(Some(bytes)),
        // ESRCH: the process exited while its file was read.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(format!("cannot read /proc/{pid}/{file}: {e}")),
    }
}

/// Whether process `pid` exists, has not exited, and is the VMM of `api_sock` (its command
/// line names the socket: `cella-vmm session`, or the `cella-jailer` it became), so a recycled
/// pid is never taken for it.
pub fn process_serves(pid: u32, api_sock: &Path) -> Liveness {
    let stat = match read_proc(pid, "stat") {
        Ok(Some(stat)) => stat,
        Ok(None) => return Liveness::Gone,
        Err(e) => return Liveness::Unknown(e),
    };
    // The state follows the parenthesised command name: `pid (comm) S ...`.
    let after_comm = stat.iter().rposition(|b| *b == b')').map_or(&stat[..], |i| &stat[i + 1..]);
    if matches!(after_comm.iter().find(|b| !b.is_ascii_whitespace()), Some(b'Z' | b'X')) {
        return Liveness::Gone;
    }
    let cmdline = match read_proc(pid, "cmdline") {
        Ok(Some(cmdline)) => cmdline,
        Ok(None) => return Liveness::Gone,
        Err(e) => return Liveness::Unknown(e),
    };
    let sock = api_sock.as_os_str().as_encoded_bytes();
    if cmdline.split(|b| *b == 0).any(|arg| arg == sock) {
        Liveness::Alive
    } else {
        Liveness::Gone
    }
}

/// Every uid a process of this host runs as (real, effective, saved or filesystem), from
/// `/proc/*/status`: a jailed VMM, re-adopted or not, shows there with its jail uid. An error
/// when `/proc` cannot be read whole: a uid seen free only because its process could not be
/// looked at must never be handed out.
pub fn uids_in_use() -> Result<std::collections::HashSet<u32>, String> {
    let mut uids = std::collections::HashSet::new();
    let entries = std::fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list /proc: {e}"))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Some(status) = read_proc(pid, "status")? else { continue };
        let status = String::from_utf8_lossy(&status);
        if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            uids.extend(line.split_whitespace().filter_map(|u| u.parse::<u32>().ok()));
        }
    }
    Ok(uids)
}

/// An open connection to a session's guest; requests are answered in order.
pub struct Guest(Box<dyn GuestLink>);

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guest")
    }
}

/// One connection to a guest, as [`Guest`] drives it: the vsock session of a real VM, or a
/// scripted one in the session manager's unit tests.
pub trait GuestLink: Send {
    /// Sends `request` with its attachment. A request the guest refuses is
    /// [`VmmError::Refused`] (the connection stays usable).
    fn exec(&mut self, request: &SessionRequest, attach: Option<&Attach>) -> Result<Reply, VmmError>;
}

impl Guest {
    pub fn new(link: impl GuestLink + 'static) -> Self {
        Guest(Box::new(link))
    }

    /// Sends `request` with its attachment. A request the guest refuses is
    /// [`VmmError::Refused`] (the connection stays usable).
    pub fn exec(&mut self, request: &SessionRequest, attach: Option<&Attach>) -> Result<Reply, VmmError> {
        self.0.exec(request, attach)
    }
}

/// The guest's end of a session, over the VMM's vsock socket.
struct VsockGuest(GuestSession);

impl GuestLink for VsockGuest {
    fn exec(&mut self, request: &SessionRequest, attach: Option<&Attach>) -> Result<Reply, VmmError> {
        let reply = match attach {
            None => self.0.exec(request, None),
            Some(Attach::Policy(policy)) => self.0.exec(request, Some((Kind::Policy, policy))),
            Some(Attach::File(path)) => {
                let mut file = std::fs::File::open(path)
                    .map_err(|e| VmmError::Io(format!("cannot open {}", path.display()), e))?;
                let len = file
                    .metadata()
                    .map_err(|e| VmmError::Io(format!("cannot stat {}", path.display()), e))?
                    .len();
                self.0.exec_streamed(request, Kind::Data, len, &mut file)
            }
        }
        .map_err(|e| VmmError::Guest(error_chain(&e)))?;
        if let Some(err) = reply.response.error() {
            let said = format!("the session refused it ({}): {}", err.kind, err.message);
            return Err(VmmError::Refused(crate::error::escape_controls(&said).into_owned()));
        }
        let response = serde_json::to_value(&reply.response.result)
            .map_err(|e| VmmError::Guest(format!("the response: {e}")))?;
        let frames = reply
            .frames
            .into_iter()
            .filter_map(|(kind, bytes)| match kind {
                Kind::Sarif => Some(Frame::Sarif(bytes)),
                Kind::Summary => Some(Frame::Summary(bytes)),
                Kind::Data => Some(Frame::Data(bytes)),
                _ => None,
            })
            .collect();
        Ok(Reply { response, frames })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_id_is_letters_digits_and_hyphens_within_64() {
        let id = jail_id("session_0123456789abcdef0123456789abcdef");
        assert_eq!(id, "session-0123456789abcdef0123456789abcdef");
        assert!(id.len() <= 64);
        let odd = jail_id(&format!("session_{}", "x_".repeat(60)));
        assert!(odd.len() <= 64 && odd.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{odd}");
    }

    #[test]
    fn a_jailed_launch_names_its_cell_and_session_folder() {
        let vmms = Vmms::new("/opt/cella/cella-vmm".into(), None, true);
        let spec = LaunchSpec {
            dir: "/d/sessions/s1".into(),
            api_sock: "/d/sessions/s1/api.sock".into(),
            vsock: "/d/sessions/s1/vsock.sock".into(),
            source: Source::Snapshot { dir: "/d/sessions/s1/snapshot".into() },
            mem_mib: 64,
            read_policy: "deny".into(),
            max_duration: Duration::from_secs(60),
            log: "/d/sessions/s1.vmm.log".into(),
            jail: Some(JailSpec { id: "session-s1".into(), uid: 65_007 }),
            cpu_percent: 50,
        };
        let line = |spare| {
            let cmd = vmms.command(&spec, spare);
            cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        };
        let cold = line(None);
        assert!(
            cold.ends_with(
                "--jailed --jail-id session-s1 --jail-uid 65007 --jail-gid 65007 --session-dir /d/sessions/s1 \
                 --cpus 0.5"
            ),
            "{cold}"
        );
        assert!(cold.contains("--restore /d/sessions/s1/snapshot"), "{cold}");
        assert!(line(Some("spare-1-0-0"))
            .ends_with("--session-dir /d/sessions/s1 --cpus 0.5 --jail-prepared spare-1-0-0"));
        assert_eq!(vmms.jailer(), Path::new("/opt/cella/cella-jailer"));
        // Its log is quoted to people: a JSON server log's format is not passed on.
        let removed = |cmd: &Command| cmd.get_envs().any(|(k, v)| k == cella_log::FORMAT_ENV && v.is_none());
        assert!(removed(&vmms.command(&spec, None)));
    }
}
