//! Serving the API over TLS: accept, handshake (rustls), HTTP/1.1 (hyper), with timeouts so a
//! slow or silent client cannot hold a connection, and a cap on open connections kept well
//! under the process's open-file limit.
//!
//! Connections are counted: up to [`ConnectionLimits::max`] are served; past that, a few more
//! (the answer reserve) are accepted for one request each, which is answered `503` with
//! `Retry-After` (but for the health check and the operator's calls: a flood must not make the
//! server look dead, nor lock out the operator who would stop it) and closed; past
//! those, nothing is accepted until a connection ends (new ones wait in the kernel's backlog,
//! costing this process no file descriptor). A connection whose answer is out gives its place
//! back at once; if its client may still be sending (an answer given before the request's body
//! was read), it lingers in a place of its own ([`Linger`]) to read and drop the rest, so the
//! client gets the answer. Per-tenant caps (requests and uploads in flight, see
//! [`crate::limits`]) keep one tenant from holding the served ones.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::limits::Pace;

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection beyond the served ones gets this long for its handshake, and as long again for
/// its headers: these places are few, and a slow client must not keep them.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// What a refused connection is told to wait.
const REFUSED_RETRY_AFTER: Duration = Duration::from_secs(2);
/// A connection beyond the served ones is done within this: its handshake, its headers, and
/// its one request (a refusal at once; a health check or an operator's call, which must get
/// through a full server, quickly).
const REFUSE_WITHIN: Duration = Duration::from_secs(15);
/// Our side of a connection (TLS close_notify, FIN) must be closed within this.
const SHUT_TIMEOUT: Duration = Duration::from_secs(1);

/// How many connections are served, and how fast their requests must come.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once.
    pub max: usize,
    /// Connections accepted beyond `max` only to be answered 503.
    pub answer_reserve: usize,
    /// Closed connections that read and drop what their client still sends ([`Linger`]); with
    /// all of these taken, a connection closes without.
    pub lingering: usize,
    /// Request headers must arrive within this (also the wait for the next request on a kept
    /// open connection).
    pub header_timeout: Duration,
    /// How long and how fast a lingering connection's client may go on sending.
    pub linger: Pace,
}

impl ConnectionLimits {
    /// Limits for a process that may open `open_files` files: `limits.max_connections` if set
    /// (non-zero), else 3/8 of them (between 16 and 8192) served, 1/8 of that answered 503 and
    /// 1/4 of it lingering, the rest left for PostgreSQL, VMM control sockets, session guest
    /// connections, uploads and artifacts.
    pub fn for_open_files(open_files: u64, limits: &LimitsConfig) -> Self {
        let max = match limits.max_connections {
            0 => (open_files.saturating_mul(3) / 8).clamp(16, 8192) as usize,
            max => max,
        };
        ConnectionLimits {
            max,
            answer_reserve: (max / 8).clamp(4, 256),
            lingering: (max / 4).clamp(4, 2048),
            header_timeout: limits.header_timeout(),
            linger: Pace::linger(limits),
        }
    }
}

/// The kernel's largest `listen(2)` backlog, and what is used if it cannot be read.
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";
const FALLBACK_BACKLOG: u32 = 4096;

/// Listens on `addr` with a backlog of `backlog` connections (0: the kernel's maximum).
///
/// The backlog is where connections wait while every place is taken. Once it is full the kernel
/// drops new SYNs, and a dropped client retries only on its own exponential schedule; so the
/// backlog must be deep enough to hold a flood's connections *and* the health check behind
/// them: that one is then accepted when its turn comes, within the time the server takes to
/// get through the queue, rather than whenever a retry happens to find room.
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(effective_backlog(backlog, std::fs::read_to_string(SOMAXCONN).ok().as_deref()))
}

/// The backlog to ask for: `configured`, or the kernel's maximum (`somaxconn`, the contents of
/// [`SOMAXCONN`]) when that is 0.
fn effective_backlog(configured: u32, somaxconn: Option<&str>) -> u32 {
    match configured {
        0 => somaxconn.and_then(|s| s.trim().parse().ok()).filter(|n| *n > 0).unwrap_or(FALLBACK_BACKLOG),
        n => n,
    }
}

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
    let linger = Linger { places: Arc::new(Semaphore::new(limits.lingering)), pace: limits.linger };
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
        let linger = linger.clone();
        match place {
            Place::Served(permit) => {
                let app = app.clone();
                tokio::spawn(async move {
                    let closed = serve_connection(acceptor, tcp, app, limits.header_timeout).await;
                    drop(permit);
                    if let Some(stream) = closed {
                        linger.drain(stream).await;
                    }
                });
            }
            Place::Refused(permit) => {
                let app = app.clone();
                tokio::spawn(async move {
                    let refuse = refuse_connection(acceptor, tcp, app);
                    let closed = tokio::time::timeout(REFUSE_WITHIN, refuse).await;
                    drop(permit);
                    if let Ok(Some(stream)) = closed {
                        linger.drain(stream).await;
                    }
                });
            }
        }
    }
}

/// Serves one connection's requests until it ends; returns it with our side closed when its
/// client may still send (see [`Linger`]).
async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    app: Router,
    header_timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await.ok()?.ok()?;
    let service = TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let parts = connection.without_shutdown().await.ok()?;
    shut(parts.io.into_inner()).await
}

/// A request that came on a connection beyond the served ones (the answer reserve): the API
/// answers it `503` with `Retry-After`, unless it is one that must get through a server that is
/// full (see `api::only_health_and_operator_beyond_the_limit`).
#[derive(Debug, Clone, Copy)]
pub struct BeyondTheLimit {
    /// What a refused request is told to wait.
    pub retry_after: Duration,
}

/// Serves one request of a connection beyond the served ones, marked [`BeyondTheLimit`], and
/// closes it.
async fn refuse_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    app: Router,
) -> Option<TlsStream<TcpStream>> {
    let stream = tokio::time::timeout(REFUSE_TIMEOUT, acceptor.accept(tcp)).await.ok()?.ok()?;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(BeyondTheLimit { retry_after: REFUSED_RETRY_AFTER });
        tower::ServiceExt::oneshot(app.clone(), request.map(axum::body::Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let parts = connection.without_shutdown().await.ok()?;
    shut(parts.io.into_inner()).await
}

/// Closes our side of `stream` (TLS close_notify, then FIN), so the client reads the answer to
/// its end; `None` if that did not go through in time.
async fn shut<S: AsyncWrite + Unpin>(mut stream: S) -> Option<S> {
    tokio::time::timeout(SHUT_TIMEOUT, stream.shutdown()).await.ok()?.ok()?;
    Some(stream)
}

/// Where closed connections read and drop what their client still sends.
///
/// A request can be answered before its body is read: refused by its size, a parameter, its
/// key or a quota, or with 503 because the database is away or the server is full. Many clients
/// (Python's `requests`, for one) send the whole body before they read anything, and over TLS
/// a send that fails because the server closed its socket is an error they do not get past:
/// Python reports it as "EOF occurred in violation of protocol", never reading the answer that
/// was waiting for it. Closing with unread bytes also makes the kernel reset the connection.
/// So our side is closed first and then what the client sends is read and dropped, for as long
/// as it keeps the pace ([`Pace::linger`]: a client done sending closes at once, having read
/// the answer; one that trickles is cut after a second), in a bounded number of places:
/// with none free, the connection closes at once.
#[derive(Debug, Clone)]
struct Linger {
    places: Arc<Semaphore>,
    pace: Pace,
}

/// How a lingering connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lingered {
    /// Every place was taken: closed at once.
    NoPlace,
    /// The client closed (or broke off) after sending `bytes` more.
    ClientDone { bytes: u64 },
    /// The client fell behind the pace (or ran out of time) after `bytes`.
    Cut { bytes: u64 },
}

impl Linger {
    async fn drain<S: AsyncRead + Unpin>(&self, mut stream: S) -> Lingered {
        let Ok(_place) = self.places.try_acquire() else { return Lingered::NoPlace };
        let start = Instant::now();
        let (mut last, mut bytes) = (start, 0u64);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let (due, _) = self.pace.due(start, last, bytes);
            match tokio::time::timeout_at(due, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    bytes += n as u64;
                    last = Instant::now();
                }
                Ok(_) => return Lingered::ClientDone { bytes },
                Err(_) => return Lingered::Cut { bytes },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lingering(places: usize) -> Linger {
        let pace = Pace {
            idle: Duration::from_millis(200),
            grace: Duration::from_millis(200),
            min_rate: 64 << 10,
            deadline: Duration::from_secs(5),
        };
        Linger { places: Arc::new(Semaphore::new(places)), pace }
    }

    #[tokio::test]
    async fn a_client_still_sending_its_body_is_read_to_its_end() {
        let (mut client, server) = tokio::io::duplex(4096);
        let linger = lingering(1);
        let drain = tokio::spawn(async move { linger.drain(server).await });
        // 4 MiB, far more than any buffer on the way, at the client's pace, then it closes.
        for _ in 0..256 {
            client.write_all(&[7u8; 16 << 10]).await.unwrap();
        }
        drop(client);
        assert_eq!(drain.await.unwrap(), Lingered::ClientDone { bytes: 4 << 20 });
    }

    #[tokio::test]
    async fn a_client_that_trickles_or_falls_silent_is_cut() {
        let (mut client, server) = tokio::io::duplex(4096);
        let linger = lingering(1);
        let started = Instant::now();
        let drain = tokio::spawn(async move { linger.drain(server).await });
        for _ in 0..3 {
            client.write_all(b"a").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(drain.await.unwrap(), Lingered::Cut { bytes: 3 });
        // Cut at the grace (200 ms), not at the deadline (5 s).
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let (_client, server) = tokio::io::duplex(4096);
        assert_eq!(lingering(1).drain(server).await, Lingered::Cut { bytes: 0 });
    }

    #[tokio::test]
    async fn without_a_free_place_a_connection_closes_at_once() {
        let linger = lingering(1);
        let (_a, held) = tokio::io::duplex(64);
        let busy = tokio::spawn({
            let linger = linger.clone();
            async move { linger.drain(held).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_b, other) = tokio::io::duplex(64);
        assert_eq!(linger.drain(other).await, Lingered::NoPlace);
        busy.await.unwrap();
        let (c, other) = tokio::io::duplex(64);
        drop(c);
        assert_eq!(linger.drain(other).await, Lingered::ClientDone { bytes: 0 }, "the place came back");
    }

    #[test]
    fn the_backlog_is_the_kernels_maximum_unless_configured() {
        assert_eq!(effective_backlog(0, Some("4096\n")), 4096);
        assert_eq!(effective_backlog(0, Some("65535")), 65535);
        assert_eq!(effective_backlog(0, None), FALLBACK_BACKLOG);
        assert_eq!(effective_backlog(0, Some("garbage")), FALLBACK_BACKLOG);
        assert_eq!(effective_backlog(0, Some("0")), FALLBACK_BACKLOG);
        assert_eq!(effective_backlog(300, Some("4096")), 300);
    }

    /// Opens `n` connections to `addr` at once; returns how many were connected within `wait`.
    async fn connected_within(addr: std::net::SocketAddr, n: usize, wait: Duration) -> usize {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            set.spawn(async move { tokio::time::timeout(wait, TcpStream::connect(addr)).await });
        }
        let mut open = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok(Ok(stream)) = done.unwrap() {
                open.push(stream);
            }
        }
        open.len()
    }

    /// Connections nobody accepts wait in the backlog; those that find it full have their SYNs
    /// dropped (a client then waits a second or more before it tries again). With the kernel's
    /// maximum, 400 of them (more than the 128 `std` and tokio listen with) all get in at once.
    #[tokio::test]
    async fn a_deep_backlog_holds_connections_nobody_has_accepted_yet() {
        let local = "127.0.0.1:0".parse().unwrap();
        let deep = listen(local, 0).unwrap();
        let n = 400;
        let wait = Duration::from_secs(2);
        assert_eq!(connected_within(deep.local_addr().unwrap(), n, wait).await, n);
        // The same with a shallow one: most are left outside (so the above can fail).
        let shallow = listen(local, 16).unwrap();
        let got = connected_within(shallow.local_addr().unwrap(), n, wait).await;
        assert!(got < n / 2, "{got} of {n} connected to a listener with a backlog of 16");
    }
}
