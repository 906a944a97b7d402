//! Serving the API over TLS: accept, handshake (rustls), HTTP/1.1 (hyper), with timeouts so a
//! slow or silent client cannot hold a connection, and a cap on open connections kept well
//! under the process's open-file limit.
//!
//! Connections are counted: up to [`ConnectionLimits::max`] are served; past that, a few more
//! (the answer reserve) are accepted only to answer `503` with `Retry-After` and closed; past
//! those, nothing is accepted until a connection ends (new ones wait in the kernel's backlog,
//! costing this process no file descriptor). Per-tenant caps (requests and uploads in flight,
//! see [`crate::limits`]) keep one tenant from holding the served ones.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection accepted only to be refused gets this long for its handshake and headers.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// What a refused connection is told to wait.
const REFUSED_RETRY_AFTER: Duration = Duration::from_secs(2);

/// How many connections are served, and how fast their requests must come.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once.
    pub max: usize,
    /// Connections accepted beyond `max` only to be answered 503.
    pub answer_reserve: usize,
    /// Request headers must arrive within this (also the wait for the next request on a kept
    /// open connection).
    pub header_timeout: Duration,
}

impl ConnectionLimits {
    /// Limits for a process that may open `open_files` files: `max` if set (non-zero), else 3/8
    /// of them (between 16 and 8192), the rest left for PostgreSQL, VMM control sockets,
    /// session guest connections, uploads and artifacts.
    pub fn for_open_files(open_files: u64, max: usize, header_timeout: Duration) -> Self {
        let max = if max > 0 { max } else { (open_files.saturating_mul(3) / 8).clamp(16, 8192) as usize };
        ConnectionLimits { max, answer_reserve: (max / 8).clamp(4, 256), header_timeout }
    }
}
/// When a connection closes, what the client still sends is read and dropped for at most this
/// long and this much (see [`close_lingering`]).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 4 << 20;

/// A connection's place: served, or accepted only to be refused.
enum Place {
    Served(OwnedSemaphorePermit),
    Refused(OwnedSemaphorePermit),
}

/// Serves `app` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let served = Arc::new(Semaphore::new(limits.max));
    let refused = Arc::new(Semaphore::new(limits.answer_reserve));
    let mut log = crate::error::QuietLog::new("cella serve");
    loop {
        // A place first, then a connection: at the cap, nothing is accepted.
        let place = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            p = served.clone().acquire_owned() => p.map(Place::Served),
            p = refused.clone().acquire_owned() => p.map(Place::Refused),
        };
        let Ok(place) = place else { break };
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    log.log("accept", &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // A served place may have come free while this one waited as a refusal.
        let place = match place {
            Place::Refused(p) => match served.clone().try_acquire_owned() {
                Ok(s) => {
                    drop(p);
                    Place::Served(s)
                }
                Err(_) => Place::Refused(p),
            },
            served => served,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        match place {
            Place::Served(permit) => {
                let app = app.clone();
                tokio::spawn(async move {
                    serve_connection(acceptor, tcp, app, limits.header_timeout).await;
                    drop(permit);
                });
            }
            Place::Refused(permit) => {
                tokio::spawn(async move {
                    let refuse = refuse_connection(acceptor, tcp);
                    let _ = tokio::time::timeout(REFUSE_TIMEOUT + LINGER_TIME, refuse).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_connection(acceptor: TlsAcceptor, tcp: TcpStream, app: Router, header_timeout: Duration) {
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    let service = TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    if let Ok(parts) = connection.without_shutdown().await {
        close_lingering(parts.io.into_inner()).await;
    }
}

/// Answers the connection's first request `503` with `Retry-After` and closes it: the server
/// serves as many connections as it may.
async fn refuse_connection(acceptor: TlsAcceptor, tcp: TcpStream) {
    let Ok(Ok(stream)) = tokio::time::timeout(REFUSE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    let service = hyper::service::service_fn(|_request| async {
        let error = crate::error::ServiceError::Overloaded {
            detail: "the server is at its connection limit; try again shortly".to_owned(),
            retry_after: REFUSED_RETRY_AFTER,
        };
        let mut response = axum::response::IntoResponse::into_response(error);
        response
            .headers_mut()
            .insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        Ok::<_, std::convert::Infallible>(response)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    if let Ok(parts) = connection.without_shutdown().await {
        close_lingering(parts.io.into_inner()).await;
    }
}

/// Closes a connection so that a client still sending a request body gets the response: a
/// rejected upload (too large, a bad parameter, no key) is answered before its body is read,
/// and closing with the body unread would make the client's write fail before it reads the
/// answer. Our side is closed first (TLS close_notify and FIN, so the response reads to its
/// end), then what the client still sends is read and dropped, for a bounded time and amount.
async fn close_lingering<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    if tokio::time::timeout(LINGER_TIME, stream.shutdown()).await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 << 10];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n as u64),
            _ => break,
        }
    }
}
