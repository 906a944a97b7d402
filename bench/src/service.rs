//! `cella-bench service`: end-to-end jobs/s and latency through the real service (HTTPS, PostgreSQL,
//! worker, jailed microVMs) for a small artifact at several concurrencies, side by side with the
//! same scans run directly with `cella-vmm scan` (no service) at the same concurrency, and the
//! queue alone with no-op jobs. Needs DATABASE_URL (it works in a scratch database). Not part of
//! the test suite.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use reqwest::Method;
use serde_json::json;

use crate::audit::load_average;
use cella_service::cli::CliError;
use cella_service::client::ApiClient;
use cella_service::config::Config;
use cella_service::data_dir::DataDir;
use cella_service::db::{self, ScratchDatabase};
use cella_service::queue::{self, Outcome};
use cella_service::{serve, tls};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs per concurrency level
    #[arg(long, default_value_t = 100)]
    jobs: u32,
    /// Concurrency levels (clients submitting at once = VMs running at once)
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    concurrency: Vec<u32>,
    /// No-op jobs for the queue-only figure (0 to skip)
    #[arg(long, default_value_t = 2000)]
    queue_jobs: u32,
    /// Run the VMMs without the jailer (default: jailed when root, as `cella serve` does)
    #[arg(long)]
    unjailed: bool,
    /// Also run each level with every job a `cella scan` process of its own over HTTPS, as a CI
    /// fleet does (process start, TLS handshake, policy check, upload, wait, results)
    #[arg(long)]
    cli: bool,
    /// Run every job under the built-in packs plus a pack the tenant uploads for the run (a
    /// policy of the tenant's own: its jobs run in VMs from its own template once made)
    #[arg(long)]
    tenant_pack: bool,
}

/// The pack `--tenant-pack` uploads: two rules in Cella's format.
const BENCH_PACK: &str = r#"[pack]
name = "benchpack"
category = "secret"
severity = "error"

[[rules]]
id = "benchpack-deploy-token"
description = "Bench Co deploy token"
regex = '''\b(bcdt_[a-z0-9]{32})\b'''
secret_group = 1
keywords = ["bcdt_"]
help = "Revoke it in the Bench Co console."

[[rules]]
id = "benchpack-signing-key"
description = "Bench Co signing key"
regex = '''\b(bcsk-[A-Za-z0-9]{40})\b'''
secret_group = 1
keywords = ["bcsk-"]
help = "Rotate it in the Bench Co console."
"#;

/// The policy jobs name with `--tenant-pack`.
const BENCH_PACK_POLICY: &str = "secrets,pii,licenses,benchpack";

/// How the bench's clients reach the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clients {
    /// Requests from this process, one HTTPS client.
    InProcess,
    /// One `cella scan` process per job.
    CliProcesses,
}

/// Latency percentiles of `v` (ms), sorted in place.
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.99))
}

#[derive(Debug, Default)]
struct Figures {
    jobs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A small artifact: the sample folder as tar.
pub(crate) fn small_artifact() -> Result<Vec<u8>, CliError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample-app");
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all("sample-app", &dir)
        .map_err(|e| CliError::File { path: dir.display().to_string(), source: e })?;
    tar.into_inner().map_err(|e| CliError::File { path: "tar".into(), source: e })
}

pub fn run(args: BenchArgs) -> Result<(), CliError> {
    cella_service::cli::runtime()?.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> Result<(), CliError> {
    let artifact = small_artifact()?;
    let db = ScratchDatabase::create("cella_service_bench").await.map_err(CliError::Usage)?;
    let result = async {
        let mut rows = Vec::new();
        for &c in &args.concurrency {
            let run = |clients, templates| {
                let policy = args.tenant_pack.then_some(BENCH_PACK_POLICY);
                service_run(&db.url, &artifact, c, args.jobs, args.unjailed, clients, templates, policy)
            };
            // Interleaved on this noisy machine: the same service with and without templates.
            let service = run(Clients::InProcess, true).await?;
            let booted = run(Clients::InProcess, false).await?;
            let fleet = match args.cli {
                true => Some((run(Clients::CliProcesses, true).await?, run(Clients::CliProcesses, false).await?)),
                false => None,
            };
            let direct = direct_run(&artifact, c, args.jobs, args.unjailed).await?;
            rows.push((c, service, booted, direct, fleet));
        }
        let queue_rate = if args.queue_jobs > 0 { Some(queue_only(&db.url, args.queue_jobs).await?) } else { None };
        let jailed = !args.unjailed && Config::default().worker.is_jailed();
        println!(
            "cella-bench service: {} jobs per level, artifact {} bytes (examples/sample-app as tar), VMs {}, policy {}, load avg {}",
            args.jobs,
            artifact.len(),
            if jailed { "jailed" } else { "unjailed" },
            match args.tenant_pack {
                true => format!("{BENCH_PACK_POLICY} (a tenant pack; the direct column runs the built-in packs)"),
                false => "the default".to_owned(),
            },
            load_average()
        );
        println!(
            "  {:>11} | {:>26} | {:>26} | {:>26} | {:>8}",
            "concurrency", "service, VMs from template", "service, VMs booted", "cella-vmm scan directly", "template/"
        );
        println!(
            "  {:>11} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8}",
            "", "jobs/s", "p50 ms", "p99 ms", "jobs/s", "p50 ms", "p99 ms", "jobs/s", "p50 ms", "p99 ms", "booted"
        );
        for (c, s, b, d, _) in &rows {
            println!(
                "  {c:>11} | {:>8.1} {:>8.1} {:>8.1} | {:>8.1} {:>8.1} {:>8.1} | {:>8.1} {:>8.1} {:>8.1} | {:>8.2}",
                s.jobs_per_sec,
                s.p50_ms,
                s.p99_ms,
                b.jobs_per_sec,
                b.p50_ms,
                b.p99_ms,
                d.jobs_per_sec,
                d.p50_ms,
                d.p99_ms,
                s.jobs_per_sec / b.jobs_per_sec.max(f64::MIN_POSITIVE)
            );
        }
        for (c, _, _, _, fleet) in &rows {
            if let Some((t, b)) = fleet {
                println!(
                    "  concurrency {c}: through `cella scan` processes (a CI fleet): {:.1} jobs/s, p50 {:.1} ms, p99 {:.1} ms from templates; {:.1} jobs/s, p50 {:.1} ms booted (client-side, process start to exit)",
                    t.jobs_per_sec, t.p50_ms, t.p99_ms, b.jobs_per_sec, b.p50_ms
                );
            }
        }
        if let Some(rate) = queue_rate {
            println!("  queue only (no-op jobs, lease + fenced finish + audit events, 8 workers): {rate:.0} jobs/s");
        }
        println!("  goal: >= 100 small jobs/s end to end on this 2-core machine (Firecracker publishes 5 VM creations per core per second)");
        Ok::<(), CliError>(())
    }
    .await;
    db.drop_now().await;
    result
}

/// A whole `cella serve` stack (API, worker, sessions) in this process, on a scratch data
/// folder and the given database, with one tenant.
pub(crate) struct Stack {
    pub dir: PathBuf,
    pub data: DataDir,
    pub running: serve::Running,
    pub pool: sqlx::PgPool,
    /// The tenant's client.
    pub client: ApiClient,
    pub key: String,
    pub tenant: String,
}

impl Stack {
    /// Starts one, its configuration the default changed by `configure`, with a tenant called
    /// `name` that may run `max_concurrent` jobs at once.
    pub(crate) async fn start(
        url: &str,
        name: &str,
        max_concurrent: u32,
        configure: impl FnOnce(&mut Config),
    ) -> Result<Stack, CliError> {
        let dir = std::env::temp_dir().join(format!("cella-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = DataDir::at(&dir);
        data.create().map_err(|e| CliError::Usage(e.to_string()))?;
        let mut config = Config { listen: ([127, 0, 0, 1], 0).into(), ..Config::default() };
        configure(&mut config);
        if config.worker.vmm.is_none() {
            config.worker.vmm = Some(cella_service::worker::launch::default_vmm());
        }
        cella_service::worker::launch::Launcher::new(&config.worker, config.quotas.vm_cpu_percent)
            .check()
            .map_err(serve::ServeError::from)?;
        let pool = db::connect(url, 16).await?;
        let tls_files = tls::ensure(&config.tls, data.root()).map_err(serve::ServeError::from)?;
        let tls_config = tls::server_config(&tls_files).map_err(serve::ServeError::from)?;
        let running = serve::start(config, data.clone(), pool.clone(), tls_config).await?;
        let admin_key = std::fs::read_to_string(data.admin_key_file()).unwrap_or_default();
        let ca = std::fs::read(tls::local_ca_path(data.root())).unwrap_or_default();
        let admin = ApiClient::new(&running.url, admin_key.trim(), Some(&ca))?;
        let created = admin
            .post_json("/v1/admin/tenants", &json!({ "name": name, "max_concurrent": max_concurrent }))
            .await?;
        let key = created["key"]["api_key"].as_str().unwrap_or_default().to_owned();
        let tenant = created["tenant"]["id"].as_str().unwrap_or_default().to_owned();
        let client = ApiClient::new(&running.url, &key, Some(&ca))?;
        Ok(Stack { dir, data, running, pool, client, key, tenant })
    }
}

/// `c` clients each submit and wait for jobs one after another through a real `cella serve`
/// stack with a worker of `c` slots, under `policy` (uploading [`BENCH_PACK`] first when it is
/// given) or the default. Latency is the job's own (created → finished, in the database);
/// throughput counts from the first submission to the last result.
#[allow(clippy::too_many_arguments)]
async fn service_run(
    url: &str,
    artifact: &[u8],
    c: u32,
    jobs: u32,
    unjailed: bool,
    clients: Clients,
    templates: bool,
    policy: Option<&str>,
) -> Result<Figures, CliError> {
    let name =
        format!("bench-{c}-{clients:?}-{}", if templates { "template" } else { "booted" }).to_lowercase();
    let Stack { dir, data, running, pool, client, key, tenant } = Stack::start(url, &name, c, |config| {
        config.worker.concurrency = c;
        config.jobs.tenant_max_concurrent = c;
        config.worker.templates = templates;
        if unjailed {
            config.worker.jailed = Some(false);
        }
    })
    .await?;
    if policy.is_some() {
        client.send(client.request(Method::POST, "/v1/packs?name=benchpack").body(BENCH_PACK)).await?;
    }
    let jobs_path = match policy {
        Some(policy) => format!("/v1/jobs?policy={policy}"),
        None => "/v1/jobs".to_owned(),
    };
    if clients == Clients::CliProcesses {
        let file = dir.join("sample.tar");
        std::fs::write(&file, artifact)
            .map_err(|e| CliError::File { path: file.display().to_string(), source: e })?;
        let ca_path = tls::local_ca_path(data.root());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..c {
            let n = jobs / c + u32::from(i < jobs % c);
            let (file, ca_path, url, key, dir) =
                (file.clone(), ca_path.clone(), running.url.clone(), key.clone(), dir.clone());
            let policy = policy.map(str::to_owned);
            tasks.push(tokio::spawn(async move {
                let exe = crate::binaries::sibling("cella")?;
                let mut latencies = Vec::new();
                for j in 0..n {
                    let t = Instant::now();
                    let out = tokio::process::Command::new(&exe)
                        .arg("scan")
                        .arg(&file)
                        .args(["--server", &url, "--ca"])
                        .arg(&ca_path)
                        .args(["--fail-on", "never", "--format", "json", "--sarif"])
                        .arg(dir.join(format!("{i}-{j}.sarif")))
                        .args(policy.iter().flat_map(|p| ["--policy", p.as_str()]))
                        .env("CELLA_API_KEY", &key)
                        .stdin(std::process::Stdio::null())
                        .output()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !out.status.success() {
                        return Err(format!("cella scan failed: {}", String::from_utf8_lossy(&out.stderr)));
                    }
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.map_err(|e| CliError::Usage(e.to_string()))?.map_err(CliError::Usage)?);
        }
        let wall = start.elapsed().as_secs_f64();
        running.stop().await;
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        let (p50, p99) = percentiles(&mut latencies);
        return Ok(Figures { jobs_per_sec: f64::from(jobs) / wall, p50_ms: p50, p99_ms: p99 });
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..c {
        let client = client.clone();
        let artifact = artifact.to_vec();
        let jobs_path = jobs_path.clone();
        let n = jobs / c + u32::from(i < jobs % c);
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                let job: serde_json::Value = client
                    .send(client.request(Method::POST, &jobs_path).body(artifact.clone()))
                    .await?
                    .json()
                    .await
                    .map_err(|e| cella_service::client::ClientError::Http("bench".into(), e))?;
                let id = job["id"].as_str().unwrap_or_default().to_owned();
                let j =
                    cella_service::client::scan::wait(&client, &id, Duration::from_secs(120), false).await?;
                if j["state"] != "succeeded" {
                    return Err(cella_service::client::ClientError::Other(format!(
                        "bench job {id} {}: {}",
                        j["state"], j["error"]
                    )));
                }
            }
            Ok::<(), cella_service::client::ClientError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| CliError::Usage(format!("bench client: {e}")))??;
    }
    let wall = start.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM jobs WHERE tenant_id = $1 AND state = 'succeeded'",
    )
    .bind(&tenant)
    .fetch_all(&pool)
    .await?;
    running.stop().await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Figures { jobs_per_sec: f64::from(jobs) / wall, p50_ms: p50, p99_ms: p99 })
}

/// The same scans with `cella-vmm scan` run directly, `c` at a time: what the service adds.
async fn direct_run(artifact: &[u8], c: u32, jobs: u32, unjailed: bool) -> Result<Figures, CliError> {
    let file: PathBuf = std::env::temp_dir().join(format!("cella-bench-{}.tar", std::process::id()));
    std::fs::write(&file, artifact)
        .map_err(|e| CliError::File { path: file.display().to_string(), source: e })?;
    let vmm = Arc::new(cella_service::worker::launch::default_vmm());
    let jailed = !unjailed && Config::default().worker.is_jailed();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..c {
        let n = jobs / c + u32::from(i < jobs % c);
        let (vmm, file) = (vmm.clone(), file.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for j in 0..n {
                let t = Instant::now();
                let mut cmd = tokio::process::Command::new(vmm.as_path());
                cmd.arg("scan").arg("--artifact").arg(&file).arg("--json");
                if jailed {
                    let uid = (64_200 + i).to_string();
                    cmd.args([
                        "--jailed",
                        "--jail-id",
                        &format!("bench-{i}-{j}"),
                        "--jail-uid",
                        &uid,
                        "--jail-gid",
                        &uid,
                    ]);
                }
                let out = cmd.output().await;
                if !out.as_ref().is_ok_and(|o| o.status.success()) {
                    return Err(format!("cella-vmm scan failed: {out:?}"));
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| CliError::Usage(e.to_string()))?.map_err(CliError::Usage)?);
    }
    let wall = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    let (p50, p99) = percentiles(&mut all);
    Ok(Figures { jobs_per_sec: f64::from(jobs) / wall, p50_ms: p50, p99_ms: p99 })
}

/// The queue alone: `n` queued no-op jobs over 10 tenants, drained by 8 concurrent "workers"
/// that lease and record a result (with the audit events) and run nothing.
async fn queue_only(url: &str, n: u32) -> Result<f64, CliError> {
    let pool = db::connect(url, 10).await?;
    sqlx::query("INSERT INTO tenants (id, name, max_concurrent) SELECT 'tenant_' || md5('q' || g), 'queue-' || g, 1000 FROM generate_series(1, 10) g")
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, policy, artifact_bytes, artifact_sha256, submitted_by)
         SELECT 'job_' || md5('j' || g), 'tenant_' || md5('q' || (g % 10 + 1)), 'secrets', 1, sha256('x'), 'bench'
         FROM generate_series(1, $1) g",
    )
    .bind(i32::try_from(n).unwrap_or(i32::MAX))
    .execute(&pool)
    .await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("bench-worker-{w}");
            while let Some(lease) = queue::lease(&pool, &id, Duration::from_secs(60)).await? {
                let done = Outcome::Succeeded {
                    summary: json!({"findings": 0}),
                    sarif: b"{}".to_vec(),
                    vm: json!({}),
                };
                queue::finish(&pool, &lease, &done)
                    .await
                    .map_err(|e| cella_service::error::ServiceError::Internal(e.to_string()))?;
            }
            Ok::<(), cella_service::error::ServiceError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| CliError::Usage(e.to_string()))??;
    }
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}
