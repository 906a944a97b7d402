//! [`ControlClient`]: the blocking client of a VMM's control socket, for the service and tests.
//! One connection per call; every call is bounded by the client's timeout.

use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::json;

use crate::http::{self, ClientResponse};
use crate::report::{RunReport, VmInfo, VmMetrics};

/// How long a call may take unless [`ControlClient::with_timeout`] says otherwise. A stop
/// includes the memory scrub (a fully touched 512 MiB guest takes a few hundred ms).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the VMM's control socket {path} (is the VMM running?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the control call {what} failed")]
    Io { what: String, source: std::io::Error },
    #[error("the control call {what} got an unreadable answer: {why}")]
    BadResponse { what: String, why: String },
    /// The VMM refused: `status` is the HTTP status (409: wrong state), `message` its
    /// `fault_message`.
    #[error("the VMM refused {what} ({status}): {message}")]
    Refused { what: String, status: u16, message: String },
}

impl ControlError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ControlError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the VMM refused because the VM is in the wrong state (e.g. pause when paused).
    pub fn is_wrong_state(&self) -> bool {
        self.status() == Some(409)
    }
}

/// A snapshot folder's files (`cella_vmm::snapshot` names them the same), and their names while
/// they are written.
pub const SNAPSHOT_STATE: &str = "state.bin";
pub const SNAPSHOT_MEMORY: &str = "memory.bin";
pub const SNAPSHOT_STATE_TMP: &str = "state.bin.tmp";
pub const SNAPSHOT_MEMORY_TMP: &str = "memory.bin.tmp";

/// A snapshot's files to hand over with [`ControlClient::snapshot_load_handed`].
#[derive(Clone, Copy, Debug)]
pub struct HandedSnapshotFiles<'a> {
    pub state: BorrowedFd<'a>,
    pub memory: BorrowedFd<'a>,
    pub disk: Option<BorrowedFd<'a>>,
    /// A listening Unix stream socket.
    pub vsock: Option<BorrowedFd<'a>>,
}

/// A client of one VMM's control socket (`cella-vmm session --api-sock PATH`).
#[derive(Clone, Debug)]
pub struct ControlClient {
    api_sock: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    pub fn new(api_sock: impl Into<PathBuf>) -> Self {
        ControlClient { api_sock: api_sock.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        ControlClient { timeout, ..self }
    }

    /// The socket this client talks to.
    pub fn api_sock(&self) -> &Path {
        &self.api_sock
    }

    /// `GET /vm`.
    pub fn state(&self) -> Result<VmInfo, ControlError> {
        self.call_json("GET", "/vm", None)
    }

    /// `PATCH /vm {"state":"paused"}`: returns once the vCPU is parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.call_empty("PATCH", "/vm", Some(json!({"state": "paused"})))
    }

    /// `PATCH /vm {"state":"running"}`.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.call_empty("PATCH", "/vm", Some(json!({"state": "running"})))
    }

    /// `PUT /snapshot/create` (the VM must be paused; `dir` absolute).
    pub fn snapshot_create(&self, dir: &Path) -> Result<serde_json::Value, ControlError> {
        self.call_json("PUT", "/snapshot/create", Some(json!({"snapshot_dir": dir})))
    }

    /// `PUT /snapshot/create` with the files handed over: this process makes `dir` (0700) and
    /// in it `memory.bin.tmp` and `state.bin.tmp` (0600), hands them to the VMM, which writes
    /// and fsyncs them, then renames them into place (memory first: a `state.bin` always names a
    /// complete memory file) and fsyncs `dir`. So a VMM confined to no paths can snapshot, and
    /// the files are this process's user's. On failure the temporary files are removed.
    pub fn snapshot_create_handed(&self, dir: &Path) -> Result<serde_json::Value, ControlError> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |what: String| move |source| ControlError::Io { what, source };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(format!("making {}", dir.display())))?;
        let (memory_tmp, state_tmp) = (dir.join(SNAPSHOT_MEMORY_TMP), dir.join(SNAPSHOT_STATE_TMP));
        let create = |path: &Path| {
            let _ = std::fs::remove_file(path);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(format!("making {}", path.display())))
        };
        let result = (|| {
            let (memory, state) = (create(&memory_tmp)?, create(&state_tmp)?);
            let body = json!({"memory_fd": 0, "state_fd": 1});
            let fds = [memory.as_fd(), state.as_fd()];
            let (status, bytes) = self.exchange("PUT", "/snapshot/create", Some(&body), &fds)?;
            refused_unless_ok("PUT", "/snapshot/create", status, &bytes)?;
            let mut info: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                ControlError::BadResponse { what: "PUT /snapshot/create".into(), why: e.to_string() }
            })?;
            for (from, to) in [(&memory_tmp, SNAPSHOT_MEMORY), (&state_tmp, SNAPSHOT_STATE)] {
                std::fs::rename(from, dir.join(to)).map_err(io(format!("renaming {}", from.display())))?;
            }
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("syncing {}", dir.display())))?;
            info["dir"] = json!(dir);
            Ok(info)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&memory_tmp);
            let _ = std::fs::remove_file(&state_tmp);
        }
        result
    }

    /// `PUT /snapshot/load` (only into a VMM that has no VM yet; `dir` absolute).
    pub fn snapshot_load(&self, dir: &Path, resume: bool) -> Result<serde_json::Value, ControlError> {
        self.call_json("PUT", "/snapshot/load", Some(json!({"snapshot_dir": dir, "resume": resume})))
    }

    /// `PUT /actions {"action_type":"stop"}`: stops the VM, scrubs it, returns the final report.
    /// The VMM process exits afterwards.
    pub fn stop(&self) -> Result<RunReport, ControlError> {
        self.call_json("PUT", "/actions", Some(json!({"action_type": "stop"})))
    }

    /// `PUT /vm`: starts a spare (`cella-vmm spare`) with `disk` attached read-only and the
    /// guest's connections to each port of `channels` given that stream (the VMM gets the
    /// descriptors; this process keeps its own).
    pub fn start_vm(
        &self,
        disk: Option<BorrowedFd<'_>>,
        channels: &[(u32, BorrowedFd<'_>)],
    ) -> Result<(), ControlError> {
        let mut fds: Vec<BorrowedFd<'_>> = disk.into_iter().collect();
        let disk_fd = disk.map(|_| 0);
        let mut vsock = Vec::new();
        for (port, fd) in channels {
            vsock.push(json!({"port": port, "fd": fds.len()}));
            fds.push(*fd);
        }
        let mut body = json!({"vsock_channels": vsock});
        if let Some(index) = disk_fd {
            body["disk_fd"] = json!(index);
        }
        let (status, bytes) = self.exchange("PUT", "/vm", Some(&body), &fds)?;
        refused_unless_ok("PUT", "/vm", status, &bytes)
    }

    /// `PUT /snapshot/load` into a spare session VMM (`cella-vmm session --api-fd`), with the
    /// snapshot's files handed over (the VMM gets the descriptors; this process keeps its own):
    /// the state and memory files, the disk if the VM had one, and a listening Unix socket for
    /// its vsock device. `max_duration`: stop the VM this long after it starts.
    pub fn snapshot_load_handed(
        &self,
        files: &HandedSnapshotFiles<'_>,
        resume: bool,
        max_duration: Option<Duration>,
    ) -> Result<serde_json::Value, ControlError> {
        let mut fds: Vec<BorrowedFd<'_>> = vec![files.state, files.memory];
        let mut body = json!({"state_fd": 0, "memory_fd": 1, "resume": resume});
        if let Some(disk) = files.disk {
            body["disk_fd"] = json!(fds.len());
            fds.push(disk);
        }
        if let Some(vsock) = files.vsock {
            body["vsock_fd"] = json!(fds.len());
            fds.push(vsock);
        }
        if let Some(max) = max_duration {
            body["max_duration_ms"] = json!(max.as_millis() as u64);
        }
        let (status, bytes) = self.exchange("PUT", "/snapshot/load", Some(&body), &fds)?;
        refused_unless_ok("PUT", "/snapshot/load", status, &bytes)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::BadResponse { what: "PUT /snapshot/load".into(), why: e.to_string() })
    }

    /// `PUT /actions {"action_type":"finish"}`: waits up to `grace` for the guest to end on its
    /// own (stopping it after that), and returns the final report. The VMM process exits
    /// afterwards.
    pub fn finish(&self, grace: Duration) -> Result<RunReport, ControlError> {
        let body = json!({"action_type": "finish", "grace_ms": grace.as_millis() as u64});
        self.call_json("PUT", "/actions", Some(body))
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Result<VmMetrics, ControlError> {
        self.call_json("GET", "/metrics", None)
    }

    /// One raw exchange: status and body, whatever the status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), ControlError> {
        self.exchange(method, path, body, &[])
    }

    /// One exchange, with `fds` sent along with the request's first bytes.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(u16, Vec<u8>), ControlError> {
        let what = format!("{method} {path}");
        let io = |source| ControlError::Io { what: what.clone(), source };
        let mut stream = UnixStream::connect(&self.api_sock)
            .map_err(|source| ControlError::Connect { path: self.api_sock.clone(), source })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if !body.is_empty() {
            raw.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(&body);
        let mut sent = 0;
        if !fds.is_empty() {
            sent = crate::fds::send_with_fds(&stream, raw.as_bytes(), fds).map_err(io)?;
        }
        stream.write_all(&raw.as_bytes()[sent..]).map_err(io)?;
        let ClientResponse { status, body } = http::read_response(&mut stream).map_err(|e| match e {
            http::HttpError::Io(source) => ControlError::Io { what: what.clone(), source },
            other => ControlError::BadResponse { what: what.clone(), why: other.to_string() },
        })?;
        Ok((status, body))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), ControlError> {
        let (status, bytes) = self.request(method, path, body.as_ref())?;
        refused_unless_ok(method, path, status, &bytes)?;
        Ok((status, bytes))
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ControlError> {
        let (_, bytes) = self.call(method, path, body)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ControlError::BadResponse { what: format!("{method} {path}"), why: e.to_string() })
    }

    fn call_empty(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(), ControlError> {
        self.call(method, path, body).map(|_| ())
    }
}

/// A 2xx answer, or the VMM's refusal with its `fault_message`.
fn refused_unless_ok(method: &str, path: &str, status: u16, bytes: &[u8]) -> Result<(), ControlError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
    Err(ControlError::Refused { what: format!("{method} {path}"), status, message })
}
