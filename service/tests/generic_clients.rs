//! Early refusals reach generic HTTP clients. Python's `requests` sends a request's whole body
//! before it reads anything, and over TLS a send that fails because the server closed the
//! connection is an error it does not get past ("EOF occurred in violation of protocol"): it
//! never reads the answer waiting for it. So an answer given before the body is read (413 by
//! size, 429 over a quota, 503 with the database away or the server full) must leave the
//! connection open to the end of the body: the real `cella serve`, a fresh PostgreSQL
//! database, and `requests` itself (`tests/clients/post.py`) posting bodies far larger than
//! anything buffered on the way, chunked and with Content-Length.
//!
//! Needs `python3` with `requests` (Debian: python3-requests, which `scripts/setup.sh` installs)
//! and `DATABASE_URL`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{test_db_url, Scratch, Serve, Server};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};

/// 16 MiB: more than the socket buffers on both sides and anything the server reads ahead.
const BIG: u64 = 16 << 20;

/// Runs `requests` with `plan` (see `clients/post.py`) against `server` with API key `key`;
/// returns what each request got, by name.
fn requests(server: &Server, key: &str, plan: Value) -> Vec<(String, Value)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/post.py");
    let ca = server.data.join("tls/ca.pem");
    let mut child = Command::new("python3")
        .arg(&script)
        .args([server.url.as_str(), ca.to_str().unwrap(), key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs (install python3 with requests)");
    child.stdin.take().unwrap().write_all(plan.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "post.py failed (is `requests` installed?)");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["name"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// Asserts that `got` is the problem document `kind` with `status` (and `Retry-After`).
fn assert_answer(got: &(String, Value), status: u16, kind: &str, retry_after: Option<&str>) {
    let (name, v) = got;
    assert_eq!(v["status"], status, "{name}: {v}");
    assert_eq!(v["problem"]["type"], format!("https://cella.dev/problems/{kind}"), "{name}: {v}");
    assert_eq!(v["problem"]["status"], status, "{name}: {v}");
    assert_eq!(v["retry_after"].as_str(), retry_after, "{name}: {v}");
}

fn sized(bytes: u64) -> Value {
    json!({"kind": "sized", "bytes": bytes})
}

fn chunked(bytes: u64, chunk: u64, every: f64) -> Value {
    json!({"kind": "chunked", "bytes": bytes, "chunk": chunk, "every": every})
}

/// `cella serve` without a worker on `db`, with `config` as its `cella.toml`.
fn serve(dir: &Scratch, db: &str, config: &str, env: &[(&str, &str)]) -> Server {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("cella.toml"), config).unwrap();
    Serve::new(&data).db(Some(db)).env("CELLA_WORKER", "0").envs(env).start()
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_gets_413_for_a_body_over_the_limit_sent_whole_chunked_or_slowly(pool: PgPool) {
    let dir = Scratch::new("generic-413");
    let server = serve(&dir, &test_db_url(&pool), "", &[("CELLA_MAX_ARTIFACT_BYTES", "65536")]);
    let (_, key, _) = server.tenant("acme").await;
    let got = requests(
        &server,
        &key,
        json!([
            {"name": "sized", "path": "/v1/jobs", "body": sized(BIG)},
            {"name": "chunked", "path": "/v1/jobs", "body": chunked(BIG, 64 << 10, 0.0)},
            // 3 s of a steady 400 KiB/s after the limit was passed.
            {"name": "chunked, slowly", "path": "/v1/jobs", "body": chunked(1200 << 10, 8 << 10, 0.02)},
        ]),
    );
    assert_eq!(got.len(), 3);
    for answer in &got {
        assert_answer(answer, 413, "too-large", None);
        assert_eq!(
            answer.1["problem"]["detail"], "the artifact is larger than the limit of 65536 bytes",
            "{answer:?}"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_gets_429_over_its_tenants_upload_quota(pool: PgPool) {
    let dir = Scratch::new("generic-429");
    let server = serve(&dir, &test_db_url(&pool), "[quotas]\nuploads = 1\n", &[]);
    let (_, key, _) = server.tenant("acme").await;
    let got = requests(
        &server,
        &key,
        json!([
            // The tenant's one upload in flight: 40 KiB over 4 s.
            {"name": "in flight", "path": "/v1/jobs", "body": chunked(40 << 10, 1 << 10, 0.1)},
            {"name": "sized", "path": "/v1/jobs", "after": 1.0, "body": sized(BIG)},
            {"name": "chunked", "path": "/v1/jobs", "after": 1.0, "body": chunked(BIG, 64 << 10, 0.0)},
        ]),
    );
    assert_eq!(got[0].1["status"], 201, "{:?}", got[0]);
    for answer in &got[1..] {
        assert_answer(answer, 429, "too-many-requests", Some("5"));
        assert!(
            answer.1["problem"]["detail"].as_str().unwrap().contains("too many uploads at once (at most 1"),
            "{answer:?}"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_gets_503_from_the_connection_reserve_when_the_server_is_full(pool: PgPool) {
    // One connection served: a client that connects and sends nothing holds it (10 s, the
    // header timeout); the next ones are answered 503 from the reserve.
    let dir = Scratch::new("generic-reserve");
    let server = serve(&dir, &test_db_url(&pool), "", &[("CELLA_MAX_CONNECTIONS", "1")]);
    let (_, key, _) = server.tenant("acme").await;
    let got = requests(
        &server,
        &key,
        json!([
            {"name": "holder", "hold": 8.0},
            {"name": "sized", "path": "/v1/jobs", "after": 1.0, "body": sized(BIG)},
            {"name": "chunked", "path": "/v1/jobs", "after": 1.0, "body": chunked(BIG, 64 << 10, 0.0)},
        ]),
    );
    for answer in &got[1..] {
        assert_answer(answer, 503, "overloaded", Some("2"));
        assert_eq!(answer.1["problem"]["detail"], "the server is at its connection limit; try again shortly");
    }
}

/// A TCP relay to PostgreSQL that the test can cut: then nothing listens on its port any more
/// and every connection through it is gone, as when the database host goes away. It runs on a
/// thread of its own (the test's runtime waits for `serve` to start by blocking).
struct DbRelay {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl DbRelay {
    fn start(target: String) -> DbRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let mut relays = tokio::task::JoinSet::new();
                let accept = async {
                    while let Ok((mut client, _)) = listener.accept().await {
                        let target = target.clone();
                        relays.spawn(async move {
                            if let Ok(mut db) = TcpStream::connect(&target).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut db).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = accept => {}
                }
                // Dropping the listener and the relays closes the port and every connection.
            });
        });
        DbRelay { addr, stop, thread }
    }

    /// `url` (a PostgreSQL URL) through this relay.
    fn url(&self, url: &str) -> String {
        let (scheme_and_user, rest) = url.split_once('@').unwrap();
        let (_, path) = rest.split_once('/').unwrap();
        format!("{scheme_and_user}@{}/{path}", self.addr)
    }

    fn cut(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn requests_gets_503_while_the_database_is_unreachable(pool: PgPool) {
    let db = test_db_url(&pool);
    let (_, rest) = db.split_once('@').unwrap();
    let relay = DbRelay::start(rest.split_once('/').unwrap().0.to_owned());
    let dir = Scratch::new("generic-503-db");
    let server = serve(&dir, &relay.url(&db), "", &[]);
    let (_, key, _) = server.tenant("acme").await;
    relay.cut();
    // Each waits for a database connection (10 s) before the answer, its body unread.
    let got = requests(
        &server,
        &key,
        json!([
            {"name": "sized", "path": "/v1/jobs", "body": sized(BIG)},
            {"name": "chunked", "path": "/v1/jobs", "body": chunked(BIG, 64 << 10, 0.0)},
        ]),
    );
    for answer in &got {
        assert_answer(answer, 503, "unavailable", Some("5"));
        assert_eq!(answer.1["problem"]["detail"], "the database is unavailable; try again");
    }
    // Without its database, a graceful stop waits on it for half a minute.
    let mut server = server;
    server.kill();
}
