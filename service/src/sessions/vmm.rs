//! The production [`VmBackend`]: `cella-vmm session` processes, driven through their control
//! socket ([`cella_vmm::control::ControlClient`]), and the guest's session port over the VM's
//! vsock socket ([`cella_vmm::session_client::GuestSession`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cella_proto::{Kind, SessionRequest};
use cella_vmm::control::ControlClient;
use cella_vmm::rpc_interface::VmState as VmmState;
use cella_vmm::session_client::GuestSession;
use serde_json::Value;

use super::backend::{
    Attach, BackendError, Frame, GuestChannel, LaunchSpec, Reply, Source, VmBackend, VmState,
};
use crate::error::error_chain;

/// How long one request to the guest may take (a scan of a large index).
const EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `cella-vmm session`.
#[derive(Debug, Clone)]
pub struct VmmBackend {
    vmm: PathBuf,
    image: Option<PathBuf>,
}

impl VmmBackend {
    /// `vmm`: the `cella-vmm` binary; `image`: the scanner image (default: the VMM's own).
    pub fn new(vmm: PathBuf, image: Option<PathBuf>) -> Self {
        Self { vmm, image }
    }

    /// The command line for `spec`.
    pub fn command(&self, spec: &LaunchSpec) -> Command {
        let mut cmd = Command::new(&self.vmm);
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
        cmd
    }
}

fn control(api_sock: &Path) -> ControlClient {
    ControlClient::new(api_sock)
}

fn control_error(e: cella_vmm::control::ControlError) -> BackendError {
    BackendError::Control(error_chain(&e))
}

impl VmBackend for VmmBackend {
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, BackendError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| BackendError::Io(format!("cannot open {}", spec.log.display()), e))?;
        let log2 = log.try_clone().map_err(|e| BackendError::Io("cannot share the VMM log".into(), e))?;
        let mut cmd = self.command(spec);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        crate::signal::detach(&mut cmd);
        let mut child = cmd.spawn().map_err(BackendError::Spawn)?;
        let pid = child.id();
        // Reaps the VMM when it exits while this process runs (a restarted `serve` cannot: the
        // VMM is then init's child, which reaps it).
        let _ = std::thread::Builder::new().name(format!("vmm-{pid}")).spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }

    fn wait_ready(&self, pid: u32, api_sock: &Path, timeout: Duration) -> Result<(), BackendError> {
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
            if !self.alive(pid, api_sock) {
                return Err(BackendError::NotReady(format!("the VMM exited ({last})")));
            }
            if Instant::now() > until {
                return Err(BackendError::NotReady(format!(
                    "no answer within {} s ({last})",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn state(&self, api_sock: &Path) -> Result<VmState, BackendError> {
        let info = control(api_sock).state().map_err(control_error)?;
        Ok(match info.state {
            VmmState::NotStarted => VmState::NotStarted,
            VmmState::Running => VmState::Running,
            VmmState::Paused => VmState::Paused,
            VmmState::Stopped => VmState::Stopped,
        })
    }

    fn pause(&self, api_sock: &Path) -> Result<(), BackendError> {
        control(api_sock).pause().map_err(control_error)
    }

    fn resume(&self, api_sock: &Path) -> Result<(), BackendError> {
        control(api_sock).resume().map_err(control_error)
    }

    fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, BackendError> {
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| BackendError::Io(format!("cannot resolve {}", dir.display()), e))?;
        control(api_sock).with_timeout(Duration::from_secs(120)).snapshot_create(&dir).map_err(control_error)
    }

    fn stop(&self, api_sock: &Path) -> Result<Value, BackendError> {
        let report = control(api_sock).stop().map_err(control_error)?;
        serde_json::to_value(&report).map_err(|e| BackendError::Control(format!("the run report: {e}")))
    }

    fn connect(&self, vsock: &Path, timeout: Duration) -> Result<Box<dyn GuestChannel>, BackendError> {
        let mut session =
            GuestSession::connect(vsock, timeout).map_err(|e| BackendError::Guest(error_chain(&e)))?;
        session.set_timeout(EXEC_TIMEOUT);
        Ok(Box::new(Guest(session)))
    }

    fn alive(&self, pid: u32, api_sock: &Path) -> bool {
        process_serves(pid, api_sock)
    }

    fn signal(&self, pid: u32, kill: bool) {
        let _ = crate::signal::signal_session(pid, kill);
    }
}

/// Whether process `pid` exists, has not exited, and is the VMM of `api_sock` (its command
/// line names the socket), so a recycled pid is never taken for it.
pub fn process_serves(pid: u32, api_sock: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name: `pid (comm) S ...`.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    if zombie {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let sock = api_sock.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == sock)
}

/// An open connection to a session's guest.
#[derive(Debug)]
struct Guest(GuestSession);

impl GuestChannel for Guest {
    fn exec(
        &mut self,
        request: &SessionRequest,
        attach: Option<(Attach, &[u8])>,
    ) -> Result<Reply, BackendError> {
        let attach = attach.map(|(kind, bytes)| {
            let kind = match kind {
                Attach::Policy => Kind::Policy,
                Attach::Data => Kind::Data,
            };
            (kind, bytes)
        });
        let reply = self.0.exec(request, attach).map_err(|e| BackendError::Guest(error_chain(&e)))?;
        if let Some(err) = reply.response.error() {
            return Err(BackendError::Refused(format!(
                "the session refused it ({}): {}",
                err.kind, err.message
            )));
        }
        let response = serde_json::to_value(&reply.response.result)
            .map_err(|e| BackendError::Guest(format!("the response: {e}")))?;
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
