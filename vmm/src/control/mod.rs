//! The VMM's control socket: HTTP/1.1 + JSON on a Unix socket, served by its own API thread,
//! in front of the transport-independent contract in [`crate::rpc_interface`].
//!
//! ```text
//! client ─HTTP─▶ API thread (seccomp `api`) ── VmmAction ──▶ channel + wake eventfd
//!                     ▲                                          │
//!                     └──── Result<VmmData, VmmActionError> ◀── VMM thread (seccomp `vmm`):
//!                                                               run_vmm polls the wake fd, the
//!                                                               guest's exit fd, the stop fd
//!                                                               and the maximum duration
//! ```
//!
//! - `http.rs`: strict request parsing and response writing (no HTTP library in the VMM).
//! - `routes.rs`: request → action, result → response; the one status mapping.
//! - `client.rs`: [`ControlClient`], the blocking client the service uses.

pub use cella_host::{client, fds, http};
pub mod routes;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

pub use client::{ControlClient, ControlError, HandedSnapshotFiles};

use crate::microvm::GuestExit;
use crate::rpc_interface::{StopCause, VmmAction, VmmActionError, VmmController, VmmData, ACTION_TIMEOUT};

/// How long the API thread waits for a client to send its request or take its answer.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    #[error("{path} exists and is not a socket; remove it or choose another --api-sock")]
    NotASocket { path: PathBuf },
    #[error("another VMM answers on {path}; choose another --api-sock")]
    InUse { path: PathBuf },
    #[error("cannot listen on {path}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot create the control socket's eventfds")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    #[error("the API thread could not confine itself")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Why an action sent over the channel got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the VMM has stopped serving actions")]
    Gone,
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
}

/// One action and where its answer goes.
#[derive(Debug)]
pub struct ActionRequest {
    pub action: VmmAction,
    pub reply: Sender<Result<VmmData, VmmActionError>>,
}

/// The sending half of the action channel (the API thread's, or a test's).
#[derive(Clone, Debug)]
pub struct ActionSender {
    tx: Sender<ActionRequest>,
    wake: Arc<EventFd>,
}

/// The VMM thread's half: the channel and the eventfd that says something is in it.
#[derive(Debug)]
pub struct ActionReceiver {
    rx: Receiver<ActionRequest>,
    wake: Arc<EventFd>,
}

/// A channel for actions to the VMM thread.
pub fn action_channel() -> Result<(ActionSender, ActionReceiver), ControlServerError> {
    let wake =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ControlServerError::EventFd)?);
    let (tx, rx) = mpsc::channel();
    Ok((ActionSender { tx, wake: wake.clone() }, ActionReceiver { rx, wake }))
}

impl ActionSender {
    /// Sends `action` to the VMM thread and waits for its answer.
    pub fn call(
        &self,
        action: VmmAction,
        timeout: Duration,
    ) -> Result<Result<VmmData, VmmActionError>, CallError> {
        let (reply, answer) = mpsc::channel();
        self.tx.send(ActionRequest { action, reply }).map_err(|_| CallError::Gone)?;
        let _ = self.wake.write(1);
        match answer.recv_timeout(timeout) {
            Ok(result) => Ok(result),
            Err(RecvTimeoutError::Timeout) => Err(CallError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Gone),
        }
    }
}

/// The limits [`run_vmm`] enforces besides the guest's own exit and `Stop` actions.
#[derive(Debug, Default)]
pub struct VmmLimits {
    /// The VM stops (as `timed_out`) at `started + max_duration`.
    pub max_duration: Option<(Instant, Duration)>,
    /// A descriptor that becomes readable when the VM must stop (SIGINT/SIGTERM's eventfd).
    pub stop_fd: Option<RawFd>,
    /// Once the VM has stopped, go on serving until a `Finish` has been answered (the client
    /// gets its report over the API, not from this process's output), but no longer than this.
    pub await_finish: Option<Duration>,
}

/// The VMM thread's loop: serves actions until the VM has stopped (a `Stop` action, the
/// guest's own exit, the stop descriptor, or the maximum duration) and, with
/// [`VmmLimits::await_finish`], its report has been fetched; then returns. The final report
/// waits in [`VmmController::take_final`]. Blocks in poll(2) between events: a paused VM costs
/// no CPU here either.
pub fn run_vmm(controller: &mut VmmController, actions: &ActionReceiver, limits: &VmmLimits) {
    let mut stopped_at: Option<Instant> = None;
    loop {
        if controller.reap() {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            match limits.await_finish {
                Some(linger) if !controller.finished() && since.elapsed() < linger => {}
                _ => return,
            }
        }
        let mut deadlines: Vec<Instant> = Vec::new();
        if stopped_at.is_none() {
            deadlines.extend(limits.max_duration.map(|(started, max)| started + max));
            deadlines.extend(controller.run_deadline());
        }
        deadlines.extend(stopped_at.zip(limits.await_finish).map(|(at, linger)| at + linger));
        let mut fds = vec![pollin(actions.wake.as_raw_fd())];
        fds.extend(controller.exit_fd().map(pollin));
        fds.extend(limits.stop_fd.map(pollin));
        let timeout_ms = match deadlines.iter().min() {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up, so the loop does not wake just before the deadline and spin.
                left.as_millis()
                    .saturating_add(u128::from(left.subsec_nanos() % 1_000_000 != 0))
                    .min(3_600_000) as i32
            }
            None => 3_600_000,
        };
        // SAFETY: `fds` is a valid pollfd array for the call; the descriptors outlive it.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };

        // Drain the wake-up first: an action sent after this is seen by the next poll.
        let mut count = 0u64;
        // SAFETY: an 8-byte read from a non-blocking eventfd into a local.
        unsafe { libc::read(actions.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
        while let Ok(request) = actions.rx.try_recv() {
            let result = controller.handle(request.action);
            let _ = request.reply.send(result);
        }
        if limits.stop_fd.is_some_and(readable) {
            // A signal also ends the wait for a `Finish`: whoever sent it wants the VMM gone.
            controller.stop_for(StopCause::Signal, GuestExit::Stopped);
            return;
        }
        if stopped_at.is_some() {
            continue;
        }
        if controller.stop_if_over_run_timeout() {
            continue;
        }
        if let Some((started, max)) = limits.max_duration {
            if Instant::now() >= started + max {
                let timeout_ms = max.as_millis() as u64;
                controller.stop_for(StopCause::MaxDuration, GuestExit::TimedOut { timeout_ms });
                if limits.await_finish.is_none() {
                    return;
                }
            }
        }
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

/// Whether `fd` is readable now.
fn readable(fd: RawFd) -> bool {
    let mut p = [pollin(fd)];
    // SAFETY: a one-entry pollfd array, zero timeout.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) == 1 }
}

/// The API thread and its socket.
#[derive(Debug)]
pub struct ApiServer {
    thread: Option<JoinHandle<()>>,
    shutdown: Arc<EventFd>,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (mode 0600) and starts the API thread, which confines itself with the
    /// `api` seccomp filter before it reads any request. A stale socket file (nobody answers)
    /// is replaced; a live one is refused.
    pub fn start(path: &Path, actions: ActionSender) -> Result<ApiServer, ControlServerError> {
        let listener = bind(path)?;
        ApiServer::serve_listener(listener, Some(path), actions).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Starts the API thread on a listener this process already has (a spare's, made by its
    /// launcher and inherited). `path`, if given, is removed at shutdown.
    pub fn serve_listener(
        listener: UnixListener,
        path: Option<&Path>,
        actions: ActionSender,
    ) -> Result<ApiServer, ControlServerError> {
        let shutdown = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ControlServerError::EventFd)?,
        );
        let thread_shutdown = shutdown.clone();
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                serve(&listener, &actions, &thread_shutdown);
            })
            .map_err(ControlServerError::Thread)?;
        let path = path.map(Path::to_owned).unwrap_or_default();
        let server = ApiServer { thread: Some(thread), shutdown, path };
        match ready.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ControlServerError::Thread(std::io::Error::other("the API thread ended at start"))),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the API thread (after the request it is serving, if any) and removes the socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            if !self.path.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the control socket at `path`, mode 0600: a stale socket file (nobody answers) is
/// replaced; a live one, or anything else at `path`, is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ControlServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlServerError::NotASocket { path: path.to_owned() });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlServerError::InUse { path: path.to_owned() });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_error = |source| ControlServerError::Bind { path: path.to_owned(), source };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        let _ = std::fs::remove_file(path);
        bind_error(e)
    })?;
    Ok(listener)
}

/// The API thread: one connection at a time, one request per connection.
fn serve(listener: &UnixListener, actions: &ActionSender, shutdown: &EventFd) {
    loop {
        let mut fds = [pollin(listener.as_raw_fd()), pollin(shutdown.as_raw_fd())];
        // SAFETY: a valid pollfd array; EINTR (a signal landed on this thread) just loops.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => serve_connection(stream, actions),
            // A client that went away between connect and accept, or fd exhaustion: go on.
            Err(_) => continue,
        }
    }
}

fn serve_connection(mut stream: UnixStream, actions: &ActionSender) {
    let _ = stream.set_read_timeout(Some(CLIENT_IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_IO_TIMEOUT));
    let mut reader = fds::FdReader::new(&stream);
    let read = http::read_request(&mut reader);
    let (fds, too_many) = (std::mem::take(&mut reader.fds), reader.too_many);
    let response = match read {
        Err(http::HttpError::Closed) | Err(http::HttpError::Io(_)) => return,
        Err(e) => routes::for_http_error(&e),
        Ok(_) if too_many => http::Response::fault(
            400,
            format!("a request carries at most {} descriptors", crate::handover::MAX_FDS),
        ),
        Ok(request) => match routes::route_with(&request, crate::handover::Handover::new(fds)) {
            Err(response) => response,
            Ok(action) => match actions.call(action, ACTION_TIMEOUT) {
                Ok(result) => routes::respond(result),
                Err(e) => http::Response::fault(503, e.to_string()),
            },
        },
    };
    let _ = http::write_response(&mut stream, &response);
    // Let the client read the answer before the close: shut the write side, then drop.
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
