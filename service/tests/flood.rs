//! One tenant floods `cella serve` with slow uploads (issue 14): the real binary (its release
//! build), started with a low open-file limit, jailed session VMMs and scan VMs on /dev/kvm, a
//! fresh PostgreSQL database. The flooding tenant keeps 2,000 connections going, each a chunked
//! `POST /v1/jobs` whose body trickles, opening another as soon as the server ends one. While it
//! does, the other tenant's health checks answer 200, its job runs, its session answers every
//! call, the reaper suspends its idle session and fails none; every flood connection is refused
//! (429 over the tenant's requests or uploads in flight, 503 beyond the connection limit, 408
//! for the few uploads let in, which crawl) and ended by the server within its limits. Then the
//! flood stops, and everything answers at once.
//!
//! Connections are taken before anyone is known, first come first served, so the other tenant's
//! connections wait in the listen backlog behind the flood's: its calls are slower while the
//! flood runs (the test prints the figures), and a few are told 503 and sent again after the
//! `Retry-After`, as HTTP clients do.
//!
//! Needs root, /dev/kvm, the guest images (`bash scripts/build-guest.sh`) and `DATABASE_URL`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cella_service::client::ApiClient;
use common::{cella, sample_tar, test_db_url, Scratch, Serve, Server};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// `serve`'s soft and hard open-file limit: it serves 3/8 of it (192 connections), answers 24
/// more 503 (but the health check and the operator) and lets 48 closing ones linger.
const OPEN_FILES: u64 = 512;
/// Flood connections kept open at once; each one the server ends is opened again.
const FLOOD_CONNECTIONS: usize = 2_000;
/// How long the flood runs.
const FLOOD_FOR: Duration = Duration::from_secs(20);
/// A flood connection sends one byte of its body this often.
const TRICKLE: Duration = Duration::from_secs(1);
/// The server's limits in this test (`cella.toml`): a request's headers within
/// `HEADER_TIMEOUT`; an upload must average 16 KiB/s after `UPLOAD_GRACE`; what a client still
/// sends after an early answer is read for at most `LINGER` (`server::Linger`; after our side is
/// closed, so the client sees the end before that).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const UPLOAD_GRACE: Duration = Duration::from_secs(2);
const LINGER: Duration = Duration::from_secs(30);
/// A flood connection not accepted by then (waiting in the server's listen backlog) is given
/// up, as clients give up a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest a health probe may take during the flood: the time the server may take to get
/// through a backlog full of the flood's connections on a busy host, with room to spare.
const PROBE_MAX: Duration = Duration::from_secs(10);
/// The median health probe: within an HTTP load balancer's usual health-check timeout (5 s).
const PROBE_MEDIAN_MAX: Duration = Duration::from_secs(5);
/// Far beyond every limit of the server's: a connection still open that long after its
/// handshake has been left hanging.
const HANG: Duration = Duration::from_secs(60);

/// How one flood connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// Answered with this status, then closed by the server.
    Answered(u16),
    /// Closed by the server without an answer.
    Closed,
    /// The TLS handshake failed: the server closed the connection before it was done.
    NotConnected,
    /// Not accepted within `CONNECT_TIMEOUT` (the server never saw it).
    NotAccepted,
    /// Still open `HANG` after its handshake: the server never ended it.
    Hung,
}

/// What the flood saw.
#[derive(Debug, Default)]
struct Tally {
    endings: BTreeMap<Ending, usize>,
    /// The longest a connection stayed open after its TLS handshake.
    longest_open: Duration,
    /// The longest a TLS handshake took, from the TCP connect (queued in the listen backlog
    /// included).
    longest_handshake: Duration,
}

impl Tally {
    fn count(&self, ending: Ending) -> usize {
        self.endings.get(&ending).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.endings.values().sum()
    }

    fn answered(&self, status: u16) -> usize {
        self.count(Ending::Answered(status))
    }
}

/// The flooding tenant: `FLOOD_CONNECTIONS` connections, each a chunked `POST /v1/jobs` whose
/// body trickles until the server ends the connection; then the next.
struct Flood {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    thread: std::thread::JoinHandle<()>,
}

impl Flood {
    /// Starts it on a runtime of its own (so the test's own measurements are not queued behind
    /// thousands of flood tasks).
    fn start(server: &Server, key: &str) -> Flood {
        let addr: SocketAddr = server.url.trim_start_matches("https://").parse().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &server.ca[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(tls));
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop2, tally2) = (stop.clone(), tally.clone());
        let thread = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let mut slots = tokio::task::JoinSet::new();
                for _ in 0..FLOOD_CONNECTIONS {
                    let (connector, head, stop, tally) =
                        (connector.clone(), head.clone(), stop2.clone(), tally2.clone());
                    slots.spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            one_connection(addr, &connector, head.as_bytes(), &tally).await;
                        }
                    });
                }
                while slots.join_next().await.is_some() {}
            });
        });
        Flood { stop, tally, thread }
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap()
    }

    /// Opens no more connections and waits until the server has ended every open one.
    fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        Arc::try_unwrap(self.tally).unwrap().into_inner().unwrap()
    }
}

/// One flood connection: connect, send the request head, send a byte of chunked body every
/// `TRICKLE` (never the last chunk) while reading what the server answers, until the server
/// closes the connection.
async fn one_connection(addr: SocketAddr, connector: &TlsConnector, head: &[u8], tally: &Mutex<Tally>) {
    let start = Instant::now();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => return record(tally, Ending::NotConnected, start.elapsed(), None),
            Err(_) => return record(tally, Ending::NotAccepted, start.elapsed(), None),
        },
        _ => return record(tally, Ending::NotAccepted, start.elapsed(), None),
    };
    let handshaken = Instant::now();
    let mut writing = stream.write_all(head).await.is_ok();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TRICKLE, TRICKLE);
    let deadline = tokio::time::Instant::now() + HANG;
    let ending = loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(n) if n > 0 => {
                    if answer.len() < 4096 {
                        answer.extend_from_slice(&buf[..n]);
                    }
                }
                _ => break status_of(&answer).map_or(Ending::Closed, Ending::Answered),
            },
            _ = tick.tick(), if writing => {
                writing = stream.write_all(b"1\r\na\r\n").await.is_ok() && stream.flush().await.is_ok();
            }
            _ = tokio::time::sleep_until(deadline) => break Ending::Hung,
        }
    };
    record(tally, ending, handshaken - start, Some(handshaken.elapsed()));
}

/// Counts a connection that took `connect` to connect (TCP and TLS) and then stayed `open`.
fn record(tally: &Mutex<Tally>, ending: Ending, connect: Duration, open: Option<Duration>) {
    let mut tally = tally.lock().unwrap();
    *tally.endings.entry(ending).or_insert(0) += 1;
    tally.longest_open = tally.longest_open.max(open.unwrap_or_default());
    tally.longest_handshake = tally.longest_handshake.max(connect);
}

/// The status of an HTTP/1.1 answer's first line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\r').next()?;
    std::str::from_utf8(line.strip_prefix(b"HTTP/1.1 ")?).ok()?.get(..3)?.parse().ok()
}

/// Latencies of `/healthz`, each on a new connection.
#[derive(Debug, Default)]
struct Probes {
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

impl Probes {
    /// The latency at quantile `q` (0-1).
    fn at(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        self.at(0.5)
    }

    fn summary(&self) -> String {
        let at = |q: f64| self.at(q);
        format!(
            "{} probes, p50 {:?}, p90 {:?}, max {:?}, failed: {:?}",
            self.latencies.len(),
            at(0.5),
            at(0.9),
            at(1.0),
            self.failures
        )
    }
}

/// `GET /healthz` on a new connection every 250 ms until `stop`.
async fn probe_health(server_url: String, ca: Vec<u8>, stop: Arc<AtomicBool>) -> Probes {
    let mut probes = Probes::default();
    while !stop.load(Ordering::Relaxed) {
        let client = ApiClient::new(&server_url, "none", Some(&ca)).unwrap();
        let t0 = Instant::now();
        match client.send(client.request(Method::GET, "/healthz")).await {
            Ok(r) if r.status() == 200 => probes.latencies.push(t0.elapsed()),
            Ok(r) => probes.failures.push(format!("status {}", r.status())),
            Err(e) => probes.failures.push(format!("{e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    probes
}

/// Creates a session of the sample app; returns its id.
async fn create_session(client: &ApiClient, query: &str) -> String {
    let req = client.request(Method::POST, &format!("/v1/sessions{query}")).body(sample_tar());
    let s: Value = client.send(req).await.unwrap().json().await.unwrap();
    assert_eq!(s["state"], "running", "{s}");
    s["id"].as_str().unwrap().to_owned()
}

/// Sends the request `build` makes until it is not refused for load: a 429 or 503 with
/// `Retry-After` is sent again after that wait, and a connection the overloaded server dropped
/// before its TLS handshake finished (its backlog full of the flood's) after a second, as HTTP
/// clients do (at most for a minute; every request here is safe to repeat). Returns the answer
/// and how many refusals came first.
async fn patiently(build: impl Fn() -> reqwest::RequestBuilder) -> (reqwest::Response, u32) {
    let start = Instant::now();
    let mut refused = 0;
    loop {
        let r = match build().send().await {
            Ok(r) => r,
            Err(e) if (e.is_connect() || e.is_timeout()) && start.elapsed() < Duration::from_secs(60) => {
                refused += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => panic!("{e:?}"),
        };
        let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match (r.status().as_u16(), wait) {
            (429 | 503, Some(secs)) if start.elapsed() < Duration::from_secs(60) => {
                refused += 1;
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            _ => return (r, refused),
        }
    }
}

/// The other tenant's calls, each on a new connection (a new client), queued with the flood's.
struct Victim<'a> {
    server: &'a Server,
    key: String,
    /// 503s and 429s its calls were answered before they went through.
    refusals: u32,
    calls: u32,
}

impl Victim<'_> {
    async fn call(&mut self, method: Method, path: &str, body: Option<Value>) -> Value {
        let client = self.server.client(&self.key);
        let (r, refused) = patiently(|| {
            let req = client.request(method.clone(), path);
            match &body {
                Some(b) => req.json(b),
                None => req,
            }
        })
        .await;
        self.refusals += refused;
        self.calls += 1;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {body}");
        body
    }

    async fn exec_stats(&mut self, id: &str) -> Value {
        self.call(Method::POST, &format!("/v1/sessions/{id}/exec"), Some(json!({"op": "stats"}))).await
    }

    /// Submits the sample app (with an idempotency key, so a retry is safe) and waits for its
    /// job to succeed; returns how long that took.
    async fn job(&mut self) -> Duration {
        let t0 = Instant::now();
        let client = self.server.client(&self.key);
        let tar = sample_tar();
        let key = cella_service::ids::new_id("try");
        let (r, refused) = patiently(|| {
            client.request(Method::POST, "/v1/jobs").header("Idempotency-Key", &key).body(tar.clone())
        })
        .await;
        self.refusals += refused;
        let job: Value = r.json().await.unwrap();
        let id = job["id"].as_str().unwrap_or_else(|| panic!("{job}")).to_owned();
        loop {
            let job = self.call(Method::GET, &format!("/v1/jobs/{id}?wait=30"), None).await;
            match job["state"].as_str() {
                Some("succeeded") => {
                    assert_eq!(job["findings"], 5, "{job}");
                    return t0.elapsed();
                }
                Some("queued" | "running") => assert!(t0.elapsed() < Duration::from_secs(90), "{job}"),
                _ => panic!("the other tenant's job did not succeed: {job}"),
            }
        }
    }
}

async fn session_state(pool: &PgPool, id: &str) -> (String, Option<i32>) {
    sqlx::query_as("SELECT state, vmm_pid FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Sessions failed, and `session.failed` events, in the whole database.
async fn failures(pool: &PgPool) -> (i64, i64) {
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE state = 'failed'")
        .fetch_one(pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'session.failed'")
        .fetch_one(pool)
        .await
        .unwrap();
    (failed, events)
}

/// `cella scan` of the sample app by `key`: it must run to the end with the five findings.
async fn scan(server: &Server, key: &str) -> Duration {
    let (data, key) = (server.data.clone(), key.to_owned());
    let t0 = Instant::now();
    let sample = common::repo().join("examples/sample-app");
    let sarif = data.join("../scan.sarif");
    let out = tokio::task::spawn_blocking(move || {
        let (sample, sarif) = (sample.to_str().unwrap(), sarif.to_str().unwrap());
        cella(&data, Some(&key), &["scan", sample, "--fail-on", "never", "--sarif", sarif])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 finding(s)"), "{stdout}");
    t0.elapsed()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_tenants_flood_of_slow_uploads_leaves_other_tenants_health_checks_jobs_and_sessions_working(
    pool: PgPool,
) {
    assert!(common::is_root(), "the flood test runs jailed VMs: run it as root");
    // The flood's connections are this process's files too.
    let own = cella_service::signal::raise_open_file_limit().unwrap();
    assert!(own > FLOOD_CONNECTIONS as u64 + 1_000, "this process may open only {own} files");
    let dir = Scratch::new("flood");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let limits = format!(
        "[limits]\nheader_timeout_secs = {}\nupload_grace_secs = {}\nlinger_secs = {}\n",
        HEADER_TIMEOUT.as_secs(),
        UPLOAD_GRACE.as_secs(),
        LINGER.as_secs()
    );
    std::fs::write(data.join("cella.toml"), limits).unwrap();
    // The release build: what a flood measures is how fast the server gets through connections.
    let server = Serve::binary(common::release_cella(), &data)
        .db(Some(&test_db_url(&pool)))
        .env("CELLA_JAILED", "1")
        .env("CELLA_SESSIONS_REAPER_INTERVAL_MS", "200")
        .open_files(OPEN_FILES)
        .start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    assert_eq!(nofile.split_whitespace().nth(3), Some("512"), "{nofile}");

    // The other tenant: a session in use, a job, and a session left idle for the reaper to
    // suspend during the flood.
    let (_, key, client) = server.tenant("victim").await;
    let (_, flood_key, _) = server.tenant("flood").await;
    let busy = create_session(&client, "?idle_suspend=0").await;
    let (state, busy_pid) = session_state(&pool, &busy).await;
    assert_eq!(state, "running");
    let mut victim = Victim { server: &server, key: key.clone(), refusals: 0, calls: 0 };
    let index = victim.exec_stats(&busy).await["result"]["index_id"].clone();
    scan(&server, &key).await;
    let idle = create_session(&client, "?idle_suspend=5").await;

    // The flood, and while it runs: health checks, the other tenant's job and session calls, the
    // sessions table.
    let flood_started = Instant::now();
    let flood = Flood::start(&server, &flood_key);
    let stop_probes = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(probe_health(server.url.clone(), server.ca.clone(), stop_probes.clone()));
    // Let it fill every place the server has.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut jobs = vec![victim.job().await];
    let mut suspended_during_flood = false;
    while flood_started.elapsed() < FLOOD_FOR {
        let stats = victim.exec_stats(&busy).await;
        assert_eq!(stats["result"]["index_id"], index, "{stats}");
        assert_eq!(session_state(&pool, &busy).await, ("running".to_owned(), busy_pid));
        suspended_during_flood |= session_state(&pool, &idle).await.0 == "suspended";
        assert_eq!(failures(&pool).await, (0, 0), "a session failed during the flood");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    jobs.push(victim.job().await);
    let during = flood.tally().total();
    stop_probes.store(true, Ordering::Relaxed);
    let probes = probes.await.unwrap();
    // Waiting for the flood's last connections blocks: not on this runtime's only thread.
    let tally = tokio::task::spawn_blocking(move || flood.stop()).await.unwrap();
    eprintln!(
        "flood: {} connections in {:?} ({during} while the other tenant worked), endings {:?}, \
         longest open {:?}, longest connect {:?}; /healthz during the flood: {}; the other \
         tenant: jobs in {jobs:?}, {} calls, {} answered 429/503 first",
        tally.total(),
        flood_started.elapsed(),
        tally.endings,
        tally.longest_open,
        tally.longest_handshake,
        probes.summary(),
        victim.calls,
        victim.refusals,
    );

    // The flood was refused, and every one of its connections was ended by the server within
    // its limits: answered 429 (over the tenant's requests or uploads in flight), 503 (beyond
    // the connection limit) or, for the few uploads let in, 408 (too slow); or closed before
    // its request came (its handshake or headers not done within the server's time).
    assert!(tally.total() >= FLOOD_CONNECTIONS, "{tally:?}");
    assert!(tally.answered(429) + tally.answered(503) >= FLOOD_CONNECTIONS, "{tally:?}");
    let other: Vec<_> = tally
        .endings
        .keys()
        .filter(|e| {
            !matches!(
                e,
                Ending::Answered(408 | 429 | 503)
                    | Ending::Closed
                    | Ending::NotConnected
                    | Ending::NotAccepted
            )
        })
        .collect();
    assert!(other.is_empty(), "flood connections ended otherwise: {tally:?}");
    assert!(tally.longest_open <= HEADER_TIMEOUT + UPLOAD_GRACE, "{tally:?}");
    // Every health check answered 200, none after more than the time it takes the server to
    // get through a listen backlog holding the flood's connections (about 2 s here).
    assert!(probes.failures.is_empty(), "{:?}", probes.failures);
    assert!(probes.latencies.len() >= 5, "{}", probes.summary());
    assert!(probes.median() < PROBE_MEDIAN_MAX, "{}", probes.summary());
    // The listen backlog is deeper than the flood (`limits.listen_backlog`, the kernel's
    // maximum), so a probe's SYN is never dropped: it waits its turn behind the flood's
    // connections. (With tokio's default backlog of 128 the flood kept it full, and a probe's
    // SYNs were dropped on every retry until its connect timed out after two minutes.)
    assert!(probes.latencies.iter().all(|l| *l < PROBE_MAX), "{}", probes.summary());
    assert_eq!(tally.count(Ending::NotAccepted), 0, "flood connections had their SYNs dropped: {tally:?}");
    // The reaper kept working and failed nothing: it suspended the idle session.
    assert!(suspended_during_flood, "the reaper did not suspend the idle session during the flood");
    assert_eq!(failures(&pool).await, (0, 0));

    // After the flood, everything still works, at once.
    let t0 = Instant::now();
    assert_eq!(client.json(Method::GET, "/healthz").await.unwrap()["status"], "ok");
    assert!(t0.elapsed() < Duration::from_secs(2), "/healthz took {:?} after the flood", t0.elapsed());
    scan(&server, &key).await;
    let (refusals, calls) = (victim.refusals, victim.calls);
    assert_eq!(victim.exec_stats(&busy).await["result"]["index_id"], index);
    assert_eq!((victim.refusals, victim.calls), (refusals, calls + 1), "refused after the flood");
    let resumed = client.json(Method::POST, &format!("/v1/sessions/{idle}/connect")).await.unwrap();
    assert_eq!(resumed["state"], "running");
    assert_eq!(session_state(&pool, &busy).await, ("running".to_owned(), busy_pid));
    for id in [&busy, &idle] {
        let gone = client.json(Method::DELETE, &format!("/v1/sessions/{id}")).await.unwrap();
        assert_eq!(gone["state"], "terminated");
    }
    assert_eq!(failures(&pool).await, (0, 0));
    drop(server);
}
