//! The host side of a spare VMM (`cella-vmm spare`): start one ahead of its job, then run the
//! job in it. The launcher makes the control socket and hands it over as the VMM's descriptor
//! 3, so the VMM binds nothing and is reachable at once; a job is the artifact and one end of a
//! socket pair handed over with `PUT /vm`, the job protocol served here on the other end, and
//! `finish` for the VM's final report. No file is written and nothing is parsed from the VMM's
//! output.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::client::{ControlClient, ControlError};
use crate::job::{serve_channel, JobError, JobFrames, JobReport};
use crate::report::RunReport;
pub use crate::spawn::API_FD;
use crate::spawn::{Spawned, HAND_OFF_FD};
use cella_jailer::supervisor::HandedOff;
use std::os::unix::process::ExitStatusExt;

/// The control socket's file name in the spare's folder.
const API_SOCKET: &str = "api.sock";
/// How long `finish` waits for the guest to end on its own after the job's results.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// The cell a jailed spare is made in by `cella-jailer`: its uid/gid, cgroup limits, and the
/// guest image bound read-only at `/image`. The control socket goes in as descriptor 3
/// (`--keep-fd`); nothing else of the host is reachable from the jail.
#[derive(Clone, Debug)]
pub struct SpareJail {
    /// The `cella-jailer` binary.
    pub jailer: PathBuf,
    /// The jail's id (letters, digits and hyphens).
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    /// Where jails are made (default: the jailer's).
    pub chroot_base: Option<PathBuf>,
    /// The jail's memory limit (guest memory plus the VMM's own).
    pub memory_limit_mib: u64,
    /// CPU quota, in CPUs.
    pub cpus: Option<f64>,
    /// The most tasks the jail may have.
    pub pids_max: u32,
    /// A spare jail folder made by `cella-jailer prepare` to take (`--from-prepared`).
    pub from_prepared: Option<String>,
}

/// Where the guest image is in a jailed spare.
const JAIL_IMAGE: &str = "/image";
/// Where a template's files are in a jailed spare.
const JAIL_TEMPLATE: &str = "/template";
/// A template folder's files (`cella_vmm::template`): the snapshot and the identity.
const TEMPLATE_FILES: [&str; 3] = ["state.bin", "memory.bin", "template.json"];

/// How to start a spare.
#[derive(Clone, Debug)]
pub struct SpareOptions {
    /// The `cella-vmm` binary (statically linked when jailed: the jail has no libraries).
    pub vmm: PathBuf,
    /// Make the spare in a cell (`cella-jailer`); unjailed if none.
    pub jail: Option<SpareJail>,
    /// Guest image (default: the VMM's own default).
    pub image: Option<PathBuf>,
    /// Restore the VM from the template in this folder (`cella-vmm template`) instead of
    /// loading `image`; `mem_mib` is then the template's.
    pub template: Option<PathBuf>,
    pub mem_mib: u64,
    /// The job's time limit, counted from its start.
    pub timeout: Duration,
    /// `--seccomp` (default enforce).
    pub seccomp: Option<String>,
    /// Guest arguments (default `scan`).
    pub guest_args: Vec<String>,
    /// Where the spare's private folder (its control socket) is made.
    pub run_dir: PathBuf,
    /// Keep the tail of the spare's stderr (the VMM's and the jailer's messages and the
    /// guest's sanitised console) for [`SpareEnd::stderr`] instead of passing it to this
    /// process's stderr.
    pub capture_stderr: bool,
}

/// The most of a spare's stderr kept when it is captured (its tail).
const STDERR_TAIL: usize = 4096;

/// Why a spare could not be started or a job run in it.
#[derive(Debug, thiserror::Error)]
pub enum SpareError {
    #[error("cannot make the spare's folder {path}")]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("cannot make the spare's control socket {path}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("cannot start {vmm}")]
    Spawn { vmm: PathBuf, source: std::io::Error },
    #[error("cella-jailer could not make the spare's cell ({status}): {words}")]
    Jail { status: ExitStatus, words: String },
    #[error("a jailed spare needs its guest image named")]
    NoImage(#[source] crate::images::ImageNotFound),
    #[error("cannot make the job channel")]
    Channel(#[source] std::io::Error),
    #[error("the spare refused its launch")]
    Start(#[source] ControlError),
}

/// A spare VMM process, waiting for its job.
#[derive(Debug)]
pub struct Spare {
    child: Spawned,
    /// A pidfd of the process, for signals that can never reach a recycled pid.
    signals: SpareSignals,
    api: ControlClient,
    dir: PathBuf,
    timeout: Duration,
    /// The thread keeping the tail of a captured stderr.
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// The VMM's cell, when jailed: the jailer handed the VMM off and is gone, so removing the
    /// cell when the VMM ends is this process's work ([`Spare::wait`], or dropping it).
    jail: Option<HandedOff>,
}

/// How a spare's process ended.
#[derive(Debug)]
pub struct SpareEnd {
    /// As `cella-jailer --help` defines it when jailed (the VMM's own status, or 245–248: a
    /// seccomp kill, another signal, a cell that could not be removed), else the VMM's.
    pub status: ExitStatus,
    /// The tail of its stderr, if it was captured (as the VMM wrote it: escape it before it is
    /// shown).
    pub stderr: String,
}

/// How a job in a spare went: the job's result over its channel, and the VM's final report.
#[derive(Debug)]
pub struct SpareRun {
    pub job: Result<JobReport, JobError>,
    pub vm: Result<RunReport, ControlError>,
}

/// Removes the folders in `run_dir` of spares whose launcher process is gone (one killed before
/// it could remove them: they hold only a control socket nobody serves any more).
pub fn sweep_stale(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().to_str().is_some_and(left_by_a_gone_process) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes the cells under `<chroot_base>/<exec_name>` of jailed spares whose launcher is gone
/// (one killed before it could remove them; its VMM died with it). Returns what was removed.
pub fn sweep_stale_jails(chroot_base: &Path, exec_name: &str) -> Vec<PathBuf> {
    cella_jailer::owner::sweep(chroot_base, exec_name, None)
}

/// Whether `name` (`spare-<pid>-…`, a spare's folder or jail) was made by a process known to be
/// gone (`/proc/<pid>` does not exist; one that cannot be looked at counts as alive).
pub fn left_by_a_gone_process(name: &str) -> bool {
    let Some(pid) = name.strip_prefix("spare-").and_then(|r| r.split('-').next()) else { return false };
    pid.parse::<u32>().is_ok_and(|pid| {
        std::fs::metadata(format!("/proc/{pid}")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    })
}

impl Spare {
    /// Starts a spare (the first in this process sweeps what killed launchers left in the
    /// same folder, see [`sweep_stale`]). It is ready for [`Spare::run_job`] at once (a request waits in the
    /// socket's queue until the VMM serves it).
    pub fn start(options: &SpareOptions) -> Result<Spare, SpareError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            sweep_stale(&options.run_dir);
            if let Some(jail) = &options.jail {
                let cell = jail.cell(&options.vmm);
                sweep_stale_jails(&cell.chroot_base, &cell.exec_name);
            }
        }
        let dir = options.run_dir.join(format!("spare-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| SpareError::Folder { path: dir.clone(), source })?;
        let path = dir.join(API_SOCKET);
        let listener =
            UnixListener::bind(&path).map_err(|source| SpareError::Socket { path: path.clone(), source })?;
        let command = spare_command(options)?;
        // posix_spawn, not fork: see `crate::spawn`. The process asks for its parent-death
        // signal itself (a spare outlives no launcher: SIGTERM stops it, scrubbing, if it runs
        // a VM; a jailed one is killed); the signal comes when the *thread* that started it
        // ends, so start spares from a thread that lives as long as they should.
        let spawn_error = |source| SpareError::Spawn { vmm: options.vmm.clone(), source };
        let (mut child, jail) = match &options.jail {
            None => (
                Spawned::start(&command, listener.as_raw_fd(), options.capture_stderr)
                    .map_err(spawn_error)?,
                None,
            ),
            Some(jail) => {
                let cell = jail.cell(&options.vmm);
                let child = start_jailed(&command, &listener, options.capture_stderr, &cell)?;
                (child, Some(cell))
            }
        };
        drop(listener);
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut pipe, &mut chunk) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&chunk[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                tail.split_off(tail.len().saturating_sub(STDERR_TAIL))
            })
        });
        let signals = SpareSignals::open(child.id());
        let api = ControlClient::new(path).with_timeout(options.timeout + Duration::from_secs(10));
        Ok(Spare { child, signals, api, dir, timeout: options.timeout, stderr, jail })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its control client.
    pub fn api(&self) -> &ControlClient {
        &self.api
    }

    /// A handle that signals this spare's process, valid (and harmless) even after it was
    /// reaped.
    pub fn signals(&self) -> SpareSignals {
        self.signals.clone()
    }

    /// Whether the process still runs (a spare that died while waiting is of no use).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Runs one job: the artifact and the VM's end of the job channel go to the VMM with
    /// `PUT /vm`, the job is served here, then `finish` returns the VM's report.
    pub fn run_job(&self, artifact: &File, frames: &JobFrames) -> Result<SpareRun, SpareError> {
        let (host_end, vm_end) = UnixStream::pair().map_err(SpareError::Channel)?;
        self.api
            .start_vm(Some(artifact.as_fd()), &[(cella_proto::JOB_PORT, vm_end.as_fd())])
            .map_err(SpareError::Start)?;
        // The VMM has its own copy: the channel ends when the VM's end closes.
        drop(vm_end);
        let job = serve_channel(host_end, frames, self.timeout + Duration::from_secs(1));
        let vm = self.api.finish(FINISH_GRACE);
        Ok(SpareRun { job, vm })
    }

    /// Waits for the spare's process to exit (and for its captured stderr to end), and removes
    /// its cell when jailed.
    pub fn wait(mut self) -> std::io::Result<SpareEnd> {
        let mut status = self.child.wait()?;
        let stderr = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
        let mut stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        if let Some(jail) = self.jail.take() {
            let outcome = jail.ended(self.child.id() as i32, status.into_raw());
            for line in outcome.report_lines(&jail.id) {
                if !stderr.is_empty() {
                    stderr.push('\n');
                }
                stderr.push_str(&line);
            }
            status = ExitStatus::from_raw(i32::from(outcome.exit_code()) << 8);
        }
        Ok(SpareEnd { status, stderr })
    }

    /// Its private folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs the jailer `command` (with `--hand-off`), which makes the cell, starts the VMM there as
/// this process's child and exits: the VMM it reports is returned, ready. If the jailer fails,
/// whatever it started is killed and reaped, and the cell removed (the jailer removes it itself
/// unless it was killed).
fn start_jailed(
    command: &Command,
    listener: &UnixListener,
    capture_stderr: bool,
    cell: &HandedOff,
) -> Result<Spawned, SpareError> {
    let spawn_error = |source| SpareError::Spawn { vmm: command.get_program().into(), source };
    let (read, write) = crate::spawn::pipe().map_err(spawn_error)?;
    let fds = [(listener.as_raw_fd(), API_FD), (write.as_raw_fd(), HAND_OFF_FD)];
    let mut jailer = Spawned::start_with(command, &fds, capture_stderr).map_err(spawn_error)?;
    drop(write);
    let mut said = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::Read::take(File::from(read), 64), &mut said);
    let status = jailer.wait().map_err(spawn_error)?;
    let pid = cella_jailer::supervisor::parse_hand_off(&said);
    if let (true, Some(pid)) = (status.success(), pid) {
        return Ok(Spawned::adopt(pid, jailer.stderr.take()));
    }
    if let Some(pid) = pid {
        let mut vmm = Spawned::adopt(pid, None);
        // SAFETY: kill(2) of our own child, not yet reaped (so its pid is still its own).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = vmm.wait();
    }
    let _ = cell.remove();
    let mut words = String::new();
    if let Some(stderr) = jailer.stderr.take() {
        let _ =
            std::io::Read::read_to_string(&mut std::io::Read::take(stderr, STDERR_TAIL as u64), &mut words);
    }
    Err(SpareError::Jail { status, words: words.trim().to_owned() })
}

impl SpareJail {
    /// The cell the jailer makes for this spare of `vmm`, as this process names it to remove it.
    fn cell(&self, vmm: &Path) -> HandedOff {
        HandedOff {
            id: self.id.clone(),
            chroot_base: self
                .chroot_base
                .clone()
                .unwrap_or_else(|| cella_jailer::config::DEFAULT_CHROOT_BASE.into()),
            exec_name: vmm.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            cgroup_parent: None,
        }
    }
}

/// The command that starts the spare: `cella-vmm spare`, or `cella-jailer … -- spare` when
/// jailed.
fn spare_command(options: &SpareOptions) -> Result<Command, SpareError> {
    let mut spare_args: Vec<std::ffi::OsString> =
        vec!["spare".into(), "--api-fd".into(), API_FD.to_string().into()];
    spare_args.extend(["--mem-mib".into(), options.mem_mib.to_string().into()]);
    spare_args.extend(["--timeout-ms".into(), options.timeout.as_millis().max(1).to_string().into()]);
    if let Some(mode) = &options.seccomp {
        spare_args.extend(["--seccomp".into(), mode.into()]);
    }
    let Some(jail) = &options.jail else {
        let mut command = Command::new(&options.vmm);
        command.args(&spare_args);
        if let Some(template) = &options.template {
            command.arg("--template").arg(template);
        } else if let Some(image) = &options.image {
            command.arg("--image").arg(image);
        }
        if !options.guest_args.is_empty() {
            command.arg("--").args(&options.guest_args);
        }
        return Ok(command);
    };
    let mut command = Command::new(&jail.jailer);
    command.arg("--id").arg(&jail.id).arg("--exec-file").arg(&options.vmm);
    if let Some(prepared) = &jail.from_prepared {
        command.arg("--from-prepared").arg(prepared);
    }
    command.arg("--uid").arg(jail.uid.to_string()).arg("--gid").arg(jail.gid.to_string());
    if let Some(base) = &jail.chroot_base {
        command.arg("--chroot-base").arg(base);
    }
    command.arg("--new-pid-ns");
    command.arg("--cgroup").arg(format!("memory={}M", jail.memory_limit_mib));
    command.arg("--cgroup").arg(format!("pids={}", jail.pids_max));
    if let Some(cpus) = jail.cpus {
        command.arg("--cgroup").arg(format!("cpu={cpus}"));
    }
    let ro_file = |command: &mut Command, host: PathBuf, jail: &str| {
        let mut spec = std::path::absolute(&host).unwrap_or(host).into_os_string();
        spec.push(format!("={jail}"));
        command.arg("--ro-file").arg(spec);
    };
    let vm_source: [&str; 2] = match &options.template {
        Some(template) => {
            for name in TEMPLATE_FILES {
                ro_file(&mut command, template.join(name), &format!("{JAIL_TEMPLATE}/{name}"));
            }
            // The restored memory's scrub reads /proc/self/pagemap (opened before the spare
            // confines itself).
            command.arg("--mount-proc");
            ["--template", JAIL_TEMPLATE]
        }
        None => {
            let image = match &options.image {
                Some(image) => image.clone(),
                None => crate::images::default_scanner_image().map_err(SpareError::NoImage)?,
            };
            ro_file(&mut command, image, JAIL_IMAGE);
            ["--image", JAIL_IMAGE]
        }
    };
    command.arg("--keep-fd").arg(API_FD.to_string());
    command.arg("--hand-off").arg(HAND_OFF_FD.to_string());
    command.arg("--").args(&spare_args).args(vm_source);
    if !options.guest_args.is_empty() {
        command.arg("--").args(&options.guest_args);
    }
    Ok(command)
}

/// Signals to one spare's process through a pidfd (`pidfd_send_signal`): once the process is
/// gone, a signal fails instead of reaching whatever process got its pid.
#[derive(Clone, Debug)]
pub struct SpareSignals(Option<std::sync::Arc<std::os::fd::OwnedFd>>);

impl SpareSignals {
    fn open(pid: u32) -> Self {
        // SAFETY: pidfd_open(2) with a pid of our own unreaped child and no flags; it returns a
        // new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return SpareSignals(None);
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        SpareSignals(Some(std::sync::Arc::new(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })))
    }

    /// Sends `signal`; false if the process is gone (or no pidfd could be had).
    pub fn send(&self, signal: libc::c_int) -> bool {
        let Some(fd) = &self.0 else { return false };
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, with no siginfo and no flags.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        };
        r == 0
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM stops it (scrubbed); SIGKILL if it takes longer than a jailer would. Sent
            // again every 50 ms: a jailed VMM is PID 1 of its namespace, which ignores a signal
            // that comes before it has its handler.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let mut n = 0u32;
            while matches!(self.child.try_wait(), Ok(None)) {
                if std::time::Instant::now() > deadline {
                    self.signals.send(libc::SIGKILL);
                    let _ = self.child.wait();
                    break;
                }
                if n.is_multiple_of(5) {
                    self.signals.send(libc::SIGTERM);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(jail) = self.jail.take() {
            let _ = jail.remove();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
