//! `cella-vmm session`: one long-lived microVM with a tenant's artifact loaded, steered over
//! its control socket (`--api-sock`) and answering session requests over vsock (`--vsock`),
//! until a stop action, the guest's own exit, `--max-duration-secs`, or SIGINT/SIGTERM. The
//! teardown always scrubs guest memory; the socket is removed on the way out.
//!
//! Threads: the API thread (seccomp `api`) serves HTTP and passes actions on; this thread
//! becomes the VMM thread (seccomp `vmm`) once the vCPU starts, and runs
//! [`cella_vmm::control::run_vmm`].
//!
//! With `--jailed` ([`jailed`]) this process checks the command line and becomes
//! `cella-jailer` (exec, as `run --jailed` does), which runs the same `session` command in a
//! cell. A session has one host folder (`--session-dir`, default: the folder of `--api-sock`)
//! holding its sockets, its artifact and its snapshots; the jail gets it read-write at the same
//! path, so every path the host uses (`--api-sock`, `--vsock`, `--artifact`, `--restore`, the
//! control API's `snapshot_dir`, the disk path a snapshot saves) names the same file inside the
//! jail: nothing is translated. The guest image is bound read-only at `/image`; a restore also
//! gets the jail's own `/proc` (its memory scrub reads `/proc/self/pagemap`).
//!
//! Why exec and not a child: a session VMM must survive its launcher (the service re-adopts
//! running sessions after it restarts), so no process may tie the VM's life to the launcher's.
//! The process the launcher started *is* the jail's supervisor: SIGINT/SIGTERM to it reach the
//! VMM (stop, scrub, exit), its exit status is the session's (plus cella-jailer's 245-248), and
//! the VMM's `--json` report is written to the stdout it was given. If the launcher dies, the
//! supervisor and the VMM go on (the launcher must not set a parent-death signal on it); when
//! the VMM ends, however it ends, the supervisor removes the jail and gives the folder back to
//! root. Give it a stdout/stderr that outlive the launcher (files, not a pipe the launcher
//! reads) if the launcher may restart. Only a SIGKILL to the supervisor itself kills the VMM
//! unscrubbed (its parent-death signal) and leaves the jail for `cella-jailer cleanup`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cella_vmm::control::{action_channel, run_vmm, ApiServer, VmmLimits};
use cella_vmm::rpc_interface::{RestorePaths, VmState, VmmAction, VmmActionError, VmmController};
use cella_vmm::snapshot::SnapshotMeta;
use cella_vmm::{build, default_scanner_image, error_chain, scan, VmConfig};
use clap::{Args, ValueEnum};

use super::exit_code;
use super::jailed::{JailArgs, JailedCell, JailedLaunch};

/// Guest memory for a session unless told otherwise.
pub const SESSION_MEM_MIB: u64 = 256;
/// The longest a session VMM lives, running or paused: 8 hours.
pub const MAX_SESSION_SECS: u64 = 8 * 3600;

/// What the guest may return from `read`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ReadPolicy {
    /// No file bytes leave the VM
    #[default]
    Deny,
    /// File bytes leave the VM with the findings of the request's policy masked
    Redact,
    /// File bytes leave the VM as they are
    Allow,
}

impl ReadPolicy {
    fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::Deny => "deny",
            ReadPolicy::Redact => "redact",
            ReadPolicy::Allow => "allow",
        }
    }
}

#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket, mode 0600; removed at exit
    #[arg(long, value_name = "PATH", required_unless_present = "api_fd")]
    pub api_sock: Option<PathBuf>,
    /// Attach virtio-vsock with its host Unix socket at PATH (session requests: CONNECT 1025)
    #[arg(long, value_name = "PATH", required_unless_present = "api_fd")]
    pub vsock: Option<PathBuf>,
    /// Be a spare session VMM: serve the control API on the listening Unix socket inherited as
    /// descriptor N, make the VM and vCPU ahead, confine itself to no path access (Landlock; the
    /// `restore` seccomp filter on this thread) before it serves anything, and wait for `PUT
    /// /snapshot/load` with the snapshot's files and the vsock listener handed over.
    /// --max-duration-secs then counts from the load
    #[arg(long, value_name = "N", conflicts_with_all = ["api_sock", "vsock", "artifact", "restore", "jailed"])]
    pub api_fd: Option<std::os::fd::RawFd>,
    /// With --api-fd: the path the inherited control socket is bound at. The VMM never opens
    /// it; it is in the command line so that whoever looks for this VMM finds it by its socket,
    /// as with --api-sock
    #[arg(long, value_name = "PATH", requires = "api_fd")]
    pub api_sock_path: Option<PathBuf>,
    /// The artifact to load (tar, tar.gz, zip or plain file), attached read-only as the disk.
    /// With neither --artifact nor --restore the VMM starts with no VM and waits for
    /// `PUT /snapshot/load`
    #[arg(long, value_name = "FILE")]
    pub artifact: Option<PathBuf>,
    /// The artifact's name as the guest sees it (format detection, paths of a plain file)
    /// [default: the --artifact file's name]
    #[arg(long, value_name = "NAME", requires = "artifact")]
    pub artifact_name: Option<String>,
    /// Restore the session from a snapshot folder (`PUT /snapshot/create` wrote it) instead:
    /// its memory is mapped lazily, its vsock socket is bound at --vsock, open connections reset
    #[arg(long, value_name = "SNAPDIR", conflicts_with = "artifact")]
    pub restore: Option<PathBuf>,
    /// Guest image [default: the cella-scanner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, value_name = "N", default_value_t = SESSION_MEM_MIB)]
    pub mem_mib: u64,
    /// Stop the VM (scrubbed, reported as timed_out) this many seconds after it starts, running
    /// or paused, so an orphaned session cannot live forever (1-28800)
    #[arg(long, value_name = "N", default_value_t = MAX_SESSION_SECS,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SESSION_SECS))]
    pub max_duration_secs: u64,
    /// What the guest's `read` may return
    #[arg(long, value_enum, value_name = "P", default_value_t = ReadPolicy::Deny)]
    pub read_policy: ReadPolicy,
    /// Print the final run report (exit, timings, scrub) as one JSON line on stdout
    #[arg(long)]
    pub json: bool,
    /// With --jailed: the session's folder, bound read-write into the jail at the same path;
    /// --api-sock, --vsock, --artifact or --restore, and snapshot_dir in the control API must
    /// lie inside it. Mode 0700, root's; the jailed VMM's uid/gid own it while it runs
    /// [default: the folder of --api-sock]
    #[arg(long, value_name = "DIR", requires = "jailed")]
    pub session_dir: Option<PathBuf>,
    #[command(flatten)]
    pub jail: JailArgs,
    /// Guest arguments instead of `session SIZE READ_POLICY NAME` (tests: `--image
    /// target/cella/cella-runner -- spin`)
    #[arg(last = true, value_name = "GUEST-ARGS")]
    pub guest_args: Vec<String>,
}

pub fn main(args: SessionArgs, launch_start: Instant) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    if args.jail.jailed {
        return jailed(&args);
    }
    args.jail.apply_seccomp_mode();
    let (api_sock, vsock) = match (&args.api_sock, &args.vsock, args.api_fd) {
        (Some(api_sock), Some(vsock), None) => (api_sock.clone(), vsock.clone()),
        (None, None, Some(fd)) => return spare(fd, &args),
        _ => return fail(exit_code::BAD_INPUT, "give --api-sock and --vsock, or --api-fd".into()),
    };
    let stop_fd = match super::stop_signal::install() {
        Ok(fd) => fd,
        Err(message) => return fail(exit_code::VMM_FAILED, message),
    };

    let (actions, receiver) = match action_channel() {
        Ok(channel) => channel,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    let (controller, server) = match (&args.artifact, &args.restore) {
        (Some(artifact), _) => {
            let config = match config(&args, artifact, &vsock, launch_start) {
                Ok(config) => config,
                Err(message) => return fail(exit_code::BAD_INPUT, message),
            };
            let vm = match build(&config, Box::new(std::io::stderr())) {
                Ok(vm) => vm,
                Err(e) if e.is_bad_input() => return fail(exit_code::BAD_INPUT, error_chain(&e)),
                Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
            };
            // The API thread starts before the vCPU: once this thread is under the `vmm`
            // filter it can start no thread.
            let server = match ApiServer::start(&api_sock, actions) {
                Ok(server) => server,
                Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            };
            let meta =
                SnapshotMeta { image: Some(config.image.clone()), args: config.args.clone(), label: None };
            match vm.start() {
                Ok(running) => (VmmController::new(running).with_snapshot_meta(meta), server),
                Err(e) => {
                    server.shutdown();
                    return fail(exit_code::VMM_FAILED, error_chain(&e));
                }
            }
        }
        (None, Some(dir)) => {
            let server = match ApiServer::start(&api_sock, actions) {
                Ok(server) => server,
                Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            };
            let paths = RestorePaths { vsock_uds: Some(vsock.clone()), disk_override: None };
            let mut controller = VmmController::not_started().with_restore_paths(paths);
            let dir = match std::path::absolute(dir) {
                Ok(dir) => dir,
                Err(e) => return fail(exit_code::BAD_INPUT, format!("--restore {}: {e}", dir.display())),
            };
            if let Err(e) = controller.handle(VmmAction::LoadSnapshot { snapshot_dir: dir, resume: true }) {
                server.shutdown();
                let code = match e {
                    VmmActionError::BadRequest(_) => exit_code::BAD_INPUT,
                    _ => exit_code::VMM_FAILED,
                };
                return fail(code, e.to_string());
            }
            (controller, server)
        }
        (None, None) => {
            // No VM yet: the VMM waits for `PUT /snapshot/load`, Firecracker's way.
            let server = match ApiServer::start(&api_sock, actions) {
                Ok(server) => server,
                Err(e) => return fail(exit_code::BAD_INPUT, error_chain(&e)),
            };
            let paths = RestorePaths { vsock_uds: Some(vsock.clone()), disk_override: None };
            (VmmController::not_started().with_restore_paths(paths), server)
        }
    };
    tracing::info!("serving the control API on {}", api_sock.display());

    let started = controller.vm().map_or_else(Instant::now, |vm| vm.started());
    let limits = VmmLimits {
        max_duration: Some((started, Duration::from_secs(args.max_duration_secs))),
        stop_fd: Some(stop_fd),
        ..VmmLimits::default()
    };
    serve(controller, receiver, server, &limits, &args, started)
}

/// Serves actions until the VM has stopped (or the VMM is told to stop), then reports.
fn serve(
    mut controller: VmmController,
    receiver: cella_vmm::control::ActionReceiver,
    server: ApiServer,
    limits: &VmmLimits,
    args: &SessionArgs,
    started: Instant,
) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    run_vmm(&mut controller, &receiver, limits);
    // Requests that arrive from now on get "the VMM has stopped serving actions".
    drop(receiver);
    server.shutdown();

    let Some((cause, result)) = controller.take_final() else {
        if controller.state() == VmState::NotStarted {
            let timed_out = Instant::now() >= started + Duration::from_secs(args.max_duration_secs);
            tracing::info!("stopped before a snapshot was loaded");
            return ExitCode::from(if timed_out { exit_code::TIMED_OUT } else { exit_code::STOPPED });
        }
        return fail(exit_code::VMM_FAILED, "the VM ended without a report".into());
    };
    match result {
        Ok(report) => {
            if args.json {
                let line = serde_json::to_string(&report).unwrap_or_default();
                let _ = writeln!(std::io::stdout(), "{line}");
            } else {
                tracing::info!("{}", super::run::summary(&report));
            }
            exit_code::for_session(cause, &report.exit)
        }
        Err(e) => fail(exit_code::VMM_FAILED, error_chain(&e)),
    }
}

/// `session --api-fd`: a spare session VMM (see the option's help).
fn spare(api_fd: std::os::fd::RawFd, args: &SessionArgs) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    let stop_fd = match super::stop_signal::install() {
        Ok(fd) => fd,
        Err(message) => return fail(exit_code::VMM_FAILED, message),
    };
    let listener = match super::spare::inherited_listener(api_fd) {
        Ok(listener) => listener,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    let ahead = match cella_vmm::snapshot::Ahead::new() {
        Ok(ahead) => ahead,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    // Everything this process will open is open: from here on, no path, on any thread.
    if let Err(e) = cella_vmm::confine::deny_all_paths() {
        return fail(exit_code::VMM_FAILED, error_chain(&e));
    }
    let (actions, receiver) = match action_channel() {
        Ok(channel) => channel,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    let server = match ApiServer::serve_listener(listener, None, actions) {
        Ok(server) => server,
        Err(e) => return fail(exit_code::VMM_FAILED, error_chain(&e)),
    };
    if let Err(e) = cella_vmm::seccomp::install(cella_vmm::seccomp::ThreadKind::Restore) {
        server.shutdown();
        return fail(exit_code::VMM_FAILED, error_chain(&e));
    }
    let controller =
        VmmController::restore_spare(ahead).with_run_timeout(Duration::from_secs(args.max_duration_secs));
    let limits = VmmLimits { stop_fd: Some(stop_fd), ..VmmLimits::default() };
    serve(controller, receiver, server, &limits, args, Instant::now())
}

/// The VM for a session on `artifact`.
fn config(
    args: &SessionArgs,
    artifact: &std::path::Path,
    vsock: &Path,
    launch_start: Instant,
) -> Result<VmConfig, String> {
    let size = scan::check_artifact(artifact).map_err(|e| error_chain(&e))?;
    let image = match &args.image {
        Some(image) => image.clone(),
        None => default_scanner_image().map_err(|e| e.to_string())?,
    };
    let guest_args = if args.guest_args.is_empty() {
        vec![
            "session".to_owned(),
            size.to_string(),
            args.read_policy.as_str().to_owned(),
            args.artifact_name.clone().unwrap_or_else(|| scan::artifact_name(artifact)),
        ]
    } else {
        args.guest_args.clone()
    };
    Ok(VmConfig {
        mem_mib: args.mem_mib,
        launch_start,
        disk: Some(artifact.to_owned()),
        vsock_uds: Some(vsock.to_owned()),
        ..VmConfig::new(image, guest_args)
    })
}

/// Why `session --jailed` refused its command line.
#[derive(Debug, thiserror::Error)]
pub enum SessionJailError {
    #[error("{option} {path}: cannot make it absolute")]
    Absolute {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{option} {path} has a `.` or `..` component; give the path plainly (the jail sees it as written)"
    )]
    NotPlain { option: &'static str, path: PathBuf },
    #[error(
        "{option} {path} is not inside the session folder {dir}: with --jailed, a session's sockets, \
         artifact and snapshots must all lie in one folder (--session-dir, default: the folder of \
         --api-sock), which the jail sees at the same path; move it there or give --session-dir"
    )]
    Outside { option: &'static str, path: PathBuf, dir: PathBuf },
    #[error("--api-sock {0} has no parent folder to be the session folder; give --session-dir")]
    NoFolder(PathBuf),
    #[error("cannot find the guest image")]
    Image(#[source] cella_vmm::vmm_config::ConfigError),
}

/// `path` absolute (not resolving links: the jailer refuses a folder reached through one) and
/// made only of plain names.
fn plain_absolute(option: &'static str, path: &Path) -> Result<PathBuf, SessionJailError> {
    let absolute = std::path::absolute(path).map_err(|source| SessionJailError::Absolute {
        option,
        path: path.to_owned(),
        source,
    })?;
    let plain = absolute.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(SessionJailError::NotPlain { option, path: path.to_owned() });
    }
    Ok(absolute)
}

/// The jailed session's launch: the `session` command to run in the jail, and the jail's
/// read-write folder (and `/proc`, for a restore).
#[derive(Debug)]
pub struct SessionJail {
    pub launch: JailedLaunch,
    pub cell: JailedCell,
}

/// Plans `session --jailed`: every path absolute and inside one session folder, the image bound
/// read-only, the folder read-write, `/proc` for a restore.
pub fn plan_jail(args: &SessionArgs) -> Result<SessionJail, SessionJailError> {
    let api_sock = plain_absolute("--api-sock", args.api_sock.as_deref().unwrap_or(Path::new("")))?;
    let dir = match &args.session_dir {
        Some(dir) => plain_absolute("--session-dir", dir)?,
        None => api_sock
            .parent()
            .map(Path::to_owned)
            .ok_or_else(|| SessionJailError::NoFolder(api_sock.clone()))?,
    };
    let inside = |option: &'static str, path: &Path| -> Result<PathBuf, SessionJailError> {
        let path = plain_absolute(option, path)?;
        if path.starts_with(&dir) && path != dir {
            Ok(path)
        } else {
            Err(SessionJailError::Outside { option, path, dir: dir.clone() })
        }
    };
    let mut options: Vec<std::ffi::OsString> = Vec::new();
    let mut files = Vec::new();
    let mut mem_mib = args.mem_mib;
    options.extend(["--api-sock".into(), inside("--api-sock", &api_sock)?.into()]);
    let vsock = args.vsock.as_deref().unwrap_or(Path::new(""));
    options.extend(["--vsock".into(), inside("--vsock", vsock)?.into()]);
    if let Some(artifact) = &args.artifact {
        options.extend(["--artifact".into(), inside("--artifact", artifact)?.into()]);
        let image = match &args.image {
            Some(image) => image.clone(),
            None => default_scanner_image().map_err(SessionJailError::Image)?,
        };
        files.push(("--image", image));
    }
    if let Some(restore) = &args.restore {
        let restore = inside("--restore", restore)?;
        // The memory limit follows the snapshot's guest memory, not --mem-mib (a restore
        // ignores it); a snapshot that cannot be read is refused by the VMM, with its reason.
        let memory = restore.join(cella_vmm::snapshot::MEMORY_FILE);
        if let Ok(meta) = std::fs::metadata(&memory) {
            mem_mib = meta.len().div_ceil(1 << 20).max(1);
        }
        options.extend(["--restore".into(), restore.into()]);
    }
    options.extend([
        "--max-duration-secs".into(),
        args.max_duration_secs.to_string().into(),
        "--read-policy".into(),
        args.read_policy.as_str().into(),
    ]);
    if args.json {
        options.push("--json".into());
    }
    let launch =
        JailedLaunch { subcommand: "session", mem_mib, files, options, guest_args: args.guest_args.clone() };
    // Anything but a boot may restore a snapshot, whose scrub reads /proc/self/pagemap.
    let cell = JailedCell { bind_rw: Some(dir.clone()), mount_proc: args.artifact.is_none() };
    Ok(SessionJail { launch, cell })
}

/// `session --jailed`: becomes cella-jailer running this session in a cell (see the module
/// documentation for why this process does not stay). Returns only if that fails.
fn jailed(args: &SessionArgs) -> ExitCode {
    match plan_jail(args) {
        Ok(plan) => args.jail.exec_in(&plan.launch, &plan.cell),
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        session: SessionArgs,
    }

    fn args(list: &[&str]) -> SessionArgs {
        let mut argv = vec!["session", "--jailed", "--image", "/images/scanner"];
        argv.extend_from_slice(list);
        Cli::try_parse_from(argv).unwrap().session
    }

    #[test]
    fn a_jailed_session_binds_its_folder_at_the_same_path_and_passes_paths_unchanged() {
        let a = args(&[
            "--api-sock",
            "/s/1/api.sock",
            "--vsock",
            "/s/1/vsock.sock",
            "--artifact",
            "/s/1/app.tar",
        ]);
        let plan = plan_jail(&a).unwrap();
        assert_eq!(plan.cell.bind_rw.as_deref(), Some(Path::new("/s/1")));
        assert!(!plan.cell.mount_proc, "a booted session needs no /proc");
        let options: Vec<_> = plan.launch.options.iter().map(|o| o.to_string_lossy().into_owned()).collect();
        assert_eq!(
            options[..6],
            ["--api-sock", "/s/1/api.sock", "--vsock", "/s/1/vsock.sock", "--artifact", "/s/1/app.tar"]
        );
        assert_eq!(plan.launch.files, [("--image", PathBuf::from("/images/scanner"))]);

        let r = args(&[
            "--api-sock",
            "/s/1/api.sock",
            "--vsock",
            "/s/1/vsock.sock",
            "--restore",
            "/s/1/snapshot",
        ]);
        let plan = plan_jail(&r).unwrap();
        assert!(plan.cell.mount_proc, "a restore's scrub reads /proc/self/pagemap");
        assert!(plan.launch.files.is_empty(), "a restore needs no guest image");
    }

    #[test]
    fn a_jailed_session_refuses_paths_outside_its_one_folder() {
        let a = args(&[
            "--api-sock",
            "/s/1/api.sock",
            "--vsock",
            "/s/2/vsock.sock",
            "--artifact",
            "/s/1/app.tar",
        ]);
        let e = plan_jail(&a).unwrap_err();
        assert!(
            e.to_string().starts_with("--vsock /s/2/vsock.sock is not inside the session folder /s/1"),
            "{e}"
        );

        let a = args(&[
            "--session-dir",
            "/s/1",
            "--api-sock",
            "/s/1/api.sock",
            "--vsock",
            "/s/1/v.sock",
            "--restore",
            "/s/1",
        ]);
        assert!(matches!(plan_jail(&a), Err(SessionJailError::Outside { option: "--restore", .. })));

        let a =
            args(&["--api-sock", "/s/1/api.sock", "--vsock", "/s/1/../2/v.sock", "--artifact", "/s/1/a.tar"]);
        assert!(matches!(plan_jail(&a), Err(SessionJailError::NotPlain { option: "--vsock", .. })));
    }
}
