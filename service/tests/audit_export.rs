//! `GET /v1/audit/export` streamed, against a real PostgreSQL (a fresh database per test from
//! `sqlx::test`), driven through the router with tower's `oneshot`: a chain larger than the old
//! in-memory cap streams in bounded memory and verifies offline; seq and time ranges; a client
//! that goes away mid-download leaves no transaction open; a database failure mid-stream makes
//! the transfer fail instead of ending cleanly; events appended between the export's checkpoint
//! cut and its snapshot stay out and the bundle verifies; `cella audit download` streams to disk.

use std::future::IntoFuture;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use cella_audit::bundle::Bundle;
use cella_audit::checkpoint::CheckpointPolicy;
use cella_audit::event::{format_time, truncate_to_micros};
use cella_audit::export::{Export, ExportRequest, BATCH_ROWS};
use cella_audit::hash::{self, Hash};
use cella_audit::store::{append, cut_checkpoint};
use cella_audit::verify::{verify_bundle, verify_tar, Options, Report};
use cella_audit::{Actor, Chain, NewEvent, Resource, SigningKey, TenantId};
use cella_service::api::audit::{export_request, stream_bundle, ExportQuery};
use cella_service::api::{app, AppState};
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::metrics::Metrics;
use cella_service::sessions::vmm::Vmms;
use cella_service::sessions::SessionManager;
use cella_service::tenants;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use time::OffsetDateTime;
use tower::ServiceExt;

struct Api {
    state: AppState,
    tenant: String,
    key: String,
    admin: String,
    dir: std::path::PathBuf,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The API with one tenant, `acme`, and a checkpoint signer.
async fn api(pool: PgPool) -> Api {
    let dir = std::env::temp_dir().join(format!("cella-export-{}", cella_service::ids::new_id("t")));
    let data_dir = DataDir::at(&dir);
    data_dir.create().unwrap();
    let config = Config::default();
    let (_, admin) = tenants::create_admin_key(&pool).await.unwrap();
    let state = AppState {
        jobs_done: cella_service::api::wait::JobsDone::listen(pool.clone()),
        metrics: Arc::new(Metrics::default()),
        signer: Some(Arc::new(SigningKey::generate("k1").unwrap())),
        sessions: Arc::new(SessionManager::new(
            pool.clone(),
            config.sessions.clone(),
            data_dir.clone(),
            "test-host".into(),
            Vmms::new("/nonexistent/cella-vmm".into(), None, false),
        )),
        pool,
        config: Arc::new(config),
        data_dir,
        limits: Default::default(),
    };
    let req = Request::post("/v1/admin/tenants")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({ "name": "acme" }).to_string()))
        .unwrap();
    let r = app(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value =
        serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap();
    let tenant = v["tenant"]["id"].as_str().unwrap().to_owned();
    let key = v["key"]["api_key"].as_str().unwrap().to_owned();
    Api { state, tenant, key, admin, dir }
}

impl Api {
    fn chain(&self) -> Chain {
        Chain::Tenant(TenantId::new(self.tenant.clone()).unwrap())
    }

    async fn get(&self, uri: &str) -> Response {
        let req = Request::get(uri).header("authorization", format!("Bearer {}", self.key));
        app(self.state.clone()).oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
    }

    async fn bundle(&self, uri: &str) -> Bundle {
        let r = self.get(uri).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 30).await.unwrap();
        Bundle::read(&body[..]).unwrap()
    }

    /// Appends `n` events to the tenant's chain the fast way: hashed here, inserted 10,000 rows
    /// per statement, with strictly increasing times. Then cuts a checkpoint with the signer.
    async fn bulk_append(&self, n: u64) {
        let chain = self.chain();
        let pool = &self.state.pool;
        let mut left = n;
        while left > 0 {
            let batch = left.min(10_000);
            left -= batch;
            let mut tx = pool.begin().await.unwrap();
            let (seq, prev): (i64, Vec<u8>) =
                sqlx::query_as("SELECT seq, hash FROM audit_heads WHERE chain = $1 FOR UPDATE")
                    .bind(chain.key())
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            let last: OffsetDateTime =
                sqlx::query_scalar("SELECT max(event_time) FROM audit_events WHERE chain = $1")
                    .bind(chain.key())
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            let mut prev: Hash = prev.try_into().unwrap();
            let mut time = last;
            let (mut seqs, mut times, mut bodies, mut hashes) = (vec![], vec![], vec![], vec![]);
            for i in 1..=batch as i64 {
                let seq = seq + i;
                time =
                    truncate_to_micros(OffsetDateTime::now_utc()).max(time + time::Duration::microseconds(1));
                // The canonical encoding written out (as `NewEvent::encode` makes it, checked
                // below for the first event of each batch): much faster than building JSON.
                let body = format!(
                    "{{\"action\":\"job.created\",\"actor\":{{\"id\":\"key_1\",\"kind\":\"api_key\"}},\
                     \"chain\":\"{chain}\",\"details\":{{\"n\":{seq},\"note\":\"bulk\"}},\"prev_hash\":\"{prev}\",\
                     \"resource\":{{\"id\":\"job-{seq}\",\"type\":\"job\"}},\"seq\":{seq},\"tenant\":\"{tenant}\",\
                     \"time\":\"{time}\",\"v\":1}}",
                    chain = chain.key(),
                    prev = hash::to_hex(&prev),
                    tenant = self.tenant,
                    time = format_time(time),
                )
                .into_bytes();
                if i == 1 {
                    let e = NewEvent::tenant(
                        TenantId::new(self.tenant.clone()).unwrap(),
                        Actor::ApiKey("key_1".into()),
                        "job.created",
                        Resource::new("job", format!("job-{seq}")),
                        json!({"n": seq, "note": "bulk"}),
                    );
                    assert_eq!(
                        String::from_utf8_lossy(&e.encode(seq as u64, time, &prev)),
                        String::from_utf8_lossy(&body)
                    );
                }
                prev = hash::sha256(&body);
                seqs.push(seq);
                times.push(time);
                bodies.push(String::from_utf8(body).unwrap());
                hashes.push(prev.to_vec());
            }
            sqlx::query(
                "INSERT INTO audit_events (chain, seq, tenant, event_time, action, body, hash)
                 SELECT $1, s, $2, t, 'job.created', b, h
                 FROM unnest($3::int8[], $4::timestamptz[], $5::text[], $6::bytea[]) AS u(s, t, b, h)",
            )
            .bind(chain.key())
            .bind(&self.tenant)
            .bind(&seqs)
            .bind(&times)
            .bind(&bodies)
            .bind(&hashes)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE chain = $1")
                .bind(chain.key())
                .bind(seqs.last().unwrap())
                .bind(&prev[..])
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let key = self.state.signer.as_deref().unwrap();
        cut_checkpoint(pool, &chain, key, CheckpointPolicy::default(), true).await.unwrap().unwrap();
    }

    /// The chain's last seq.
    async fn head(&self) -> u64 {
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM audit_heads WHERE chain = $1")
            .bind(self.chain().key())
            .fetch_one(&self.state.pool)
            .await
            .unwrap();
        seq as u64
    }

    /// Backends of this test's database, other than the asking one, inside a transaction.
    async fn open_transactions(&self) -> Vec<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
        )
        .fetch_all(&self.state.pool)
        .await
        .unwrap()
    }
}

impl Api {
    /// Verification options pinning the service's signing key.
    fn pinned(&self) -> Options {
        Options::pinned(vec![self.state.signer.as_ref().unwrap().public()]).with_threads(2)
    }

    fn verify(&self, b: &Bundle) -> Report {
        let report = verify_bundle(b, &self.pinned()).unwrap_or_else(|f| panic!("{f}"));
        assert!(report.to_string().starts_with("OK: "), "{report}");
        report
    }

    /// Verifies the bundle file at `path` streamed, as `cella audit verify` does, and checks that
    /// verifying it in memory says the same.
    fn verify_file(&self, path: &std::path::Path) -> Report {
        let streamed =
            verify_tar(std::fs::File::open(path).unwrap(), &self.pinned()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(streamed, self.verify(&Bundle::read(std::fs::File::open(path).unwrap()).unwrap()));
        streamed
    }

    /// Appends `n` events to the tenant's chain, each in its own transaction, as the service does.
    async fn append(&self, n: u64) {
        let tenant = TenantId::new(self.tenant.clone()).unwrap();
        for i in 0..n {
            let event = NewEvent::tenant(
                tenant.clone(),
                Actor::ApiKey("key_1".into()),
                "job.created",
                Resource::new("job", format!("late-{i}")),
                json!({"late": i}),
            );
            let mut tx = self.state.pool.begin().await.unwrap();
            append(&mut tx, &event).await.unwrap();
            tx.commit().await.unwrap();
        }
    }
}

/// Runs `cella audit export` of the tenant's chain to `out` under `/usr/bin/time` and returns
/// its peak RSS in KiB (`None` where `/usr/bin/time` is missing: the export still runs).
fn cli_export_max_rss_kib(api: &Api, out: &std::path::Path) -> Option<u64> {
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.split_once('?').unwrap_or((&base, "")).0.rsplit_once('/').unwrap();
    let url = format!("{server}/{}", api.state.pool.connect_options().get_database().unwrap());
    let timed = std::path::Path::new("/usr/bin/time").exists();
    let mut cmd = if timed {
        let mut c = std::process::Command::new("/usr/bin/time");
        c.args(["-f", "max-rss-kib %M", env!("CARGO_BIN_EXE_cella")]);
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_cella"))
    };
    let o = cmd
        .args(["audit", "export", "--tenant", &api.tenant, "--out", out.to_str().unwrap()])
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    stderr.lines().find_map(|l| l.strip_prefix("max-rss-kib ")).map(|k| k.trim().parse().unwrap())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_chain_larger_than_the_old_cap_streams_in_bounded_memory_and_verifies(pool: PgPool) {
    let api = api(pool).await;
    let started = Instant::now();
    for _ in 0..3 {
        api.bulk_append(100_000).await;
    }
    let filled = started.elapsed();
    let head = api.head().await;
    assert!(head > 300_000);

    // Through the library: what the export holds at most.
    let request = ExportRequest { chain: api.chain(), from: None, to: None, ocsf: false };
    let export = Export::begin(&api.state.pool, &request).await.unwrap();
    let exported = export.write_to(tokio::io::sink()).await.unwrap();
    assert_eq!(exported.manifest.counts.events, head);
    assert_eq!(exported.peak_batch_rows, BATCH_ROWS);
    assert!(exported.peak_batch_bytes < 4 << 20, "peak batch {} bytes", exported.peak_batch_bytes);
    assert!(exported.subtrees_kept < 1000, "{} subtrees kept", exported.subtrees_kept);

    // Through HTTP: the body goes to a file as it arrives.
    let path = api.dir.join("big.tar");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let t = Instant::now();
    let r = api.get("/v1/audit/export").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body().into_data_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len() as u64;
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
    let streamed = t.elapsed();
    assert_eq!(bytes, exported.bytes, "same snapshot, same bundle size");

    // The same library function in its own process (`cella audit export`), where peak RSS is
    // the export's alone: far below the bundle's size.
    let max_rss_kib = cli_export_max_rss_kib(&api, &api.dir.join("cli.tar"));
    eprintln!(
        "{head} events: bulk insert {filled:?}; HTTP export of {bytes} bytes in {streamed:?}; \
         `cella audit export` max RSS {} MiB; peak batch {} rows / {} KiB; {} subtrees kept",
        max_rss_kib.map_or("?".into(), |k| (k / 1024).to_string()),
        exported.peak_batch_rows,
        exported.peak_batch_bytes / 1024,
        exported.subtrees_kept
    );
    if let Some(kib) = max_rss_kib {
        assert!(kib < 64 * 1024, "`cella audit export` peaked at {kib} KiB for a {bytes}-byte bundle");
    }

    let report = api.verify_file(&path);
    assert_eq!((report.events, report.first_seq, report.last_seq), (head, 1, head));
}

#[sqlx::test(migrations = "../migrations")]
async fn seq_and_time_ranges_stream_and_verify(pool: PgPool) {
    let api = api(pool).await;
    // Checkpoints every 1000 events: the ranges cross batches and checkpoints.
    for _ in 0..5 {
        api.bulk_append(1000).await;
    }
    let b = api.bundle("/v1/audit/export?from=1500&to=4200").await;
    let r = api.verify(&b);
    assert_eq!((r.events, r.first_seq, r.last_seq), (2701, 1500, 4200));

    let head = api.head().await;
    let b = api.bundle("/v1/audit/export?from=2049&ocsf=true").await;
    let r = api.verify(&b);
    assert_eq!((r.events, r.first_seq, r.last_seq, r.checkpoints), (head - 2048, 2049, head, 3));
    let ocsf = &b.files["ocsf.jsonl"];
    assert_eq!(ocsf.split(|c| *c == b'\n').filter(|l| !l.is_empty()).count() as u64, head - 2048);

    let time_of = |seq: i64| {
        let pool = api.state.pool.clone();
        let chain = api.chain().key();
        async move {
            let t: OffsetDateTime =
                sqlx::query_scalar("SELECT event_time FROM audit_events WHERE chain = $1 AND seq = $2")
                    .bind(chain)
                    .bind(seq)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            format_time(t)
        }
    };
    let (a, z) = (time_of(700).await, time_of(3300).await);
    let b = api.bundle(&format!("/v1/audit/export?from={a}&to={z}")).await;
    let r = api.verify(&b);
    assert_eq!((r.first_seq, r.last_seq), (700, 3300));

    let r = api.get("/v1/audit/export?from=2001-01-01T00:00:00Z&to=2001-01-02T00:00:00Z").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = api.get("/v1/audit/export?from=9000&to=9100").await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_client_that_disconnects_mid_download_leaves_no_transaction_open(pool: PgPool) {
    let api = api(pool).await;
    api.bulk_append(20_000).await;
    let r = api.get("/v1/audit/export").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body().into_data_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(api.open_transactions().await.len(), 1, "the export's snapshot is open while it streams");
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = api.open_transactions().await;
        if open.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "transactions still open: {open:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_database_failure_mid_stream_fails_the_transfer(pool: PgPool) {
    let api = api(pool).await;
    api.bulk_append(20_000).await;
    // Over a real HTTP/1.1 connection: what a client sees when the export dies after the 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/audit/export", listener.local_addr().unwrap());
    let server = tokio::spawn(axum::serve(listener, app(api.state.clone())).into_future());
    let r = reqwest::Client::new().get(&url).bearer_auth(&api.key).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let mut body = r.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().to_vec();
    let open = api.open_transactions().await;
    assert_eq!(open.len(), 1);
    sqlx::query("SELECT pg_terminate_backend($1)").bind(open[0]).execute(&api.state.pool).await.unwrap();
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => received.extend_from_slice(&c),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    server.abort();
    assert!(failed, "the transfer ended cleanly after the export's database connection died");
    // What did arrive is no bundle: no manifest.
    if let Ok(b) = Bundle::read(&received[..]) {
        assert!(!b.files.contains_key("manifest.json"));
    }
}

/// Serves the API over plain HTTP on a free port until dropped; returns its URL.
struct Served {
    url: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(api: &Api) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(axum::serve(listener, app(api.state.clone())).into_future());
    Served { url, task }
}

/// Runs `cella` with `env`, without any of the caller's Cella settings.
async fn cella(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cella"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("CELLA_CA")
        .env_remove("CELLA_URL")
        .env_remove("CELLA_DATA_DIR")
        .env_remove("CELLA_AUDIT_TRUSTED_KEY")
        .output()
        .await
        .unwrap()
}

/// Runs the `cella audit verify …` command line a command printed (paths without spaces).
async fn run_printed(command: &str) -> std::process::Output {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[..3], ["cella", "audit", "verify"], "{command}");
    cella(&words[1..], &[]).await
}

#[sqlx::test(migrations = "../migrations")]
async fn cella_audit_download_streams_the_bundle_to_disk_and_saves_the_key_that_verifies_it(pool: PgPool) {
    let api = api(pool).await;
    api.bulk_append(20_000).await;
    let served = serve(&api).await;
    let out = api.dir.join("dl.tar");
    let args = ["audit", "download", "--server", &served.url, "--out", out.to_str().unwrap()];
    let env = [("CELLA_API_KEY", api.key.as_str())];
    let download = || cella(&args, &env);
    let o = download().await;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    assert!(!out.with_extension("partial").exists());
    let public = api.state.signer.as_ref().unwrap().public();
    let saved = api.dir.join("cella-audit-k1.pub");
    assert_eq!(cella_audit::PublicKey::read(&saved).unwrap(), public);
    let command = format!("cella audit verify {} --trusted-key {}", out.display(), saved.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[1..],
        [
            format!("audit key k1: {} (saved as {})", public.fingerprint(), saved.display()).as_str(),
            "compare the fingerprint with the one your operator gives you, then verify with:",
            format!("  {command}").as_str(),
        ],
        "{stderr}"
    );
    assert!(lines[0].starts_with("wrote ") && lines[0].ends_with(&format!("bytes to {}", out.display())));
    let report = api.verify_file(&out);
    assert_eq!(report.events, api.head().await);
    let o = run_printed(&command).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let ok = format!("OK: {} events, seq 1..{}, ", report.events, report.last_seq);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&ok), "{}", String::from_utf8_lossy(&o.stdout));

    // Again: the same key is already there.
    let o = download().await;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(already saved as "),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A different key saved under the id before: kept, and said loudly.
    let other = SigningKey::generate("k1").unwrap().public();
    std::fs::write(&saved, other.to_file_text()).unwrap();
    let o = download().await;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "WARNING: {} already holds a different key under the id k1:\n  saved:  {}\n  server: {}\n",
            saved.display(),
            other.fingerprint(),
            public.fingerprint()
        )),
        "{stderr}"
    );
    assert_eq!(cella_audit::PublicKey::read(&saved).unwrap(), other, "the saved key was replaced");
    // Verifying against the kept key fails, naming the mismatch.
    let o = run_printed(&command).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "FAILED: keys.json: key k1 is not the trusted key k1\n");
}

#[sqlx::test(migrations = "../migrations")]
async fn cella_admin_audit_export_prints_the_verify_command_with_the_data_folders_key(pool: PgPool) {
    let api = api(pool).await;
    api.bulk_append(100).await;
    // What `cella serve` keeps in its data folder.
    let public = api.state.signer.as_ref().unwrap().public();
    let pub_file = api.dir.join("audit-signing.key.pub");
    std::fs::write(&pub_file, public.to_file_text()).unwrap();
    let served = serve(&api).await;
    let out = api.dir.join("admin.tar");
    let args = [
        "admin",
        "audit-export",
        "--tenant",
        &api.tenant,
        "--out",
        out.to_str().unwrap(),
        "--server",
        &served.url,
        "--data-dir",
        api.dir.to_str().unwrap(),
    ];
    let o = cella(&args, &[("CELLA_ADMIN_KEY", &api.admin)]).await;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    let command = format!("cella audit verify {} --trusted-key {}", out.display(), pub_file.display());
    assert!(
        stderr.ends_with(&format!(
            "audit key k1: {} ({})\n\
             verify with (give the reviewer the .pub file through another channel than the bundle):\n  {command}\n",
            public.fingerprint(),
            pub_file.display()
        )),
        "{stderr}"
    );
    let o = run_printed(&command).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The export's bundle read from a response.
async fn bundle_of(r: Response) -> Bundle {
    assert_eq!(r.status(), StatusCode::OK);
    Bundle::read(&axum::body::to_bytes(r.into_body(), 1 << 30).await.unwrap()[..]).unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn events_appended_between_the_checkpoint_cut_and_the_export_stay_out_and_it_verifies(pool: PgPool) {
    let api = api(pool).await;
    api.bulk_append(1000).await;
    api.append(5).await; // not yet covered
    let query = |from: Option<&str>, to: Option<&str>| ExportQuery {
        from: from.map(str::to_owned),
        to: to.map(str::to_owned),
        ocsf: None,
    };
    // (query, the range the bundle holds); the handler's cut covers 1..1005 + 5 per round.
    let cases = [
        (query(None, None), (1, 0)),
        (query(None, Some("99999")), (1, 0)),
        (query(Some("500"), None), (500, 0)),
        (query(Some("10"), Some("990")), (10, 990)),
    ];
    for (q, (from, to)) in cases {
        // What the handler does, with events appended between its checkpoint cut and its
        // snapshot: they stay out of the bundle.
        let head_at_cut = api.head().await;
        let request = export_request(&api.state, api.chain(), &q).await.unwrap();
        api.append(7).await;
        assert_eq!(api.head().await, head_at_cut + 7);
        let b = bundle_of(stream_bundle(&api.state, &request).await.unwrap()).await;
        let r = api.verify(&b);
        let to = if to == 0 { head_at_cut } else { to };
        assert_eq!((r.first_seq, r.last_seq), (from, to), "{:?}..{:?}", q.from, q.to);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn exports_while_events_are_appended_concurrently_always_verify(pool: PgPool) {
    let api = Arc::new(api(pool).await);
    api.bulk_append(2000).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = tokio::spawn({
        let (api, stop) = (api.clone(), stop.clone());
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                api.append(1).await;
                n += 1;
            }
            n
        }
    });
    for round in 0..12 {
        let uri = match round % 3 {
            0 => "/v1/audit/export".to_owned(),
            1 => "/v1/audit/export?to=999999999".to_owned(),
            _ => format!("/v1/audit/export?from={}&to={}", 1500 + round, 1990 + round),
        };
        let head_before = api.head().await;
        let b = bundle_of(api.get(&uri).await).await;
        let r = api.verify(&b);
        if round % 3 != 2 {
            assert!(r.last_seq >= head_before, "{uri}: {r}, head was {head_before} before the request");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let appended = appender.await.unwrap();
    assert!(appended > 0, "no event was appended while the exports ran");
}
