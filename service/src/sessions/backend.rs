//! What the session manager needs from a VM: start a VMM for a session (fresh or from a
//! snapshot), drive it through its control socket, and talk to the guest. Production uses
//! [`super::vmm::VmmBackend`]; the API tests use a stand-in, so the state machine, the fencing
//! and the audit trail are tested against PostgreSQL without KVM.
//!
//! Every method blocks; the manager calls them in `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cella_proto::SessionRequest;
use serde_json::Value;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
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
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// Where a session's VM starts from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Boot the scanner image on this artifact, which the guest indexes.
    Artifact { path: PathBuf, name: String },
    /// Restore this snapshot (memory mapped lazily), resumed.
    Snapshot { dir: PathBuf },
}

/// One VMM to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub session_id: String,
    pub api_sock: PathBuf,
    pub vsock: PathBuf,
    pub source: Source,
    pub mem_mib: u32,
    pub read_policy: String,
    /// The VMM stops itself after this long: the session's maximum lifetime left, a backstop
    /// behind the reaper (which enforces the deadline, which `connect` can move).
    pub max_duration: Duration,
    /// The VMM's stdout and stderr (its JSON report and diagnostics).
    pub log: PathBuf,
}

/// What the control API says the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    Stopped,
}

/// What may accompany a request to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// The compiled policy (for `scan`, and `read` under the redact policy).
    Policy,
    /// A file for `add`.
    Data,
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

/// An open connection to a session's guest; requests are answered in order.
pub trait GuestChannel: Send + std::fmt::Debug {
    /// Sends `request` with its attachment. A request the guest refuses is
    /// [`BackendError::Refused`] (the connection stays usable).
    fn exec(
        &mut self,
        request: &SessionRequest,
        attach: Option<(Attach, &[u8])>,
    ) -> Result<Reply, BackendError>;
}

/// A way to run session VMs.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    /// Starts the VMM as a process of its own (it must outlive a restart of this process);
    /// returns its pid once the process exists (not yet ready: see [`VmBackend::wait_ready`]).
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, BackendError>;

    /// Waits until the control API answers, up to `timeout`; gives up at
    /// once if the process `pid` ends.
    fn wait_ready(&self, pid: u32, api_sock: &Path, timeout: Duration) -> Result<(), BackendError>;

    fn state(&self, api_sock: &Path) -> Result<VmState, BackendError>;
    fn pause(&self, api_sock: &Path) -> Result<(), BackendError>;
    fn resume(&self, api_sock: &Path) -> Result<(), BackendError>;
    /// Snapshots the (paused) VM into `dir`; the answer's details go into the audit event.
    fn snapshot(&self, api_sock: &Path, dir: &Path) -> Result<Value, BackendError>;
    /// Stops the VM (the VMM scrubs its memory and exits); returns its run report.
    fn stop(&self, api_sock: &Path) -> Result<Value, BackendError>;

    /// Opens a connection to the guest (retrying while it does not listen yet, up to `timeout`).
    fn connect(&self, vsock: &Path, timeout: Duration) -> Result<Box<dyn GuestChannel>, BackendError>;

    /// Whether the VMM process `pid` (the one serving `api_sock`) still exists.
    fn alive(&self, pid: u32, api_sock: &Path) -> bool;

    /// Asks the VMM to stop by signal (SIGTERM: it scrubs and exits), or with `kill`, ends it
    /// (SIGKILL to its process group) when it did not.
    fn signal(&self, pid: u32, kill: bool);
}
