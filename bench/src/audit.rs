//! `cella-bench audit`: append throughput against the real PostgreSQL and offline verification
//! speed on a generated bundle, printed side by side. Not part of the test suite.

use std::time::Instant;

use cella_audit::bundle::{self, Bundle};
use cella_audit::event::truncate_to_micros;
use cella_audit::store::append;
use cella_audit::verify::{verify_bundle, verify_tar, Options, Report};
use cella_audit::{Actor, NewEvent, Resource, SigningKey, TenantId};
use clap::Args;
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

use cella_service::cli::CliError;
use cella_service::db;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events in the generated bundle for the verification benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Appends per append scenario (each in its own transaction).
    #[arg(long, default_value_t = 4000)]
    appends: u64,
    /// Tenants in the many-tenant scenarios.
    #[arg(long, default_value_t = 100)]
    tenants: u64,
    /// Only the offline verification part (no database needed).
    #[arg(long)]
    skip_db: bool,
    /// Keep the generated bundle at this path (to time `cella audit verify` on it, say), and its
    /// public key at FILE.pub.
    #[arg(long, value_name = "FILE")]
    keep_bundle: Option<std::path::PathBuf>,
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> Result<(), CliError> {
    if !args.skip_db {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))?;
        rt.block_on(append_bench(&args))?;
    }
    verify_bench(args.events, args.keep_bundle.as_deref())
}

fn event(tenant: &TenantId, n: u64) -> NewEvent {
    const ACTIONS: [&str; 5] = ["job.created", "job.started", "vm.launched", "vm.scrubbed", "job.finished"];
    NewEvent::tenant(
        tenant.clone(),
        Actor::ApiKey(format!("key_{}", n % 7)),
        ACTIONS[(n % 5) as usize],
        Resource::new("job", format!("job-{:08}", n / 5)),
        json!({
            "image": "sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b",
            "policy": "secrets-v3",
            "bytes": n * 4096,
            "findings": n % 13,
            "host": "worker-2",
        }),
    )
}

fn tenants(prefix: &str, n: u64) -> Result<Vec<TenantId>, CliError> {
    (0..n)
        .map(|i| TenantId::new(format!("{prefix}{i}")).map_err(|e| CliError::Usage(e.to_string())))
        .collect()
}

async fn appends(pool: &PgPool, writers: u64, total: u64, tenants: &[TenantId]) -> Result<f64, CliError> {
    let per = total / writers;
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        let tenants = tenants.to_vec();
        handles.push(tokio::spawn(async move {
            for i in 0..per {
                let t = &tenants[((w + i * writers) % tenants.len() as u64) as usize];
                let mut tx = pool.begin().await?;
                append(&mut tx, &event(t, i)).await.map_err(|e| match e {
                    cella_audit::store::StoreError::Db(e) => e,
                    other => sqlx::Error::Protocol(other.to_string()),
                })?;
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for h in handles {
        h.await.map_err(|e| CliError::Usage(format!("writer task failed: {e}")))??;
    }
    Ok((per * writers) as f64 / start.elapsed().as_secs_f64())
}

async fn append_bench(args: &BenchArgs) -> Result<(), CliError> {
    let db = db::ScratchDatabase::create("cella_audit_bench").await.map_err(CliError::Usage)?;
    let result = async {
        let pool = db::connect(&db.url, 9).await?;
        let r11 = appends(&pool, 1, args.appends, &tenants("one", 1)?).await?;
        let r18 = appends(&pool, 8, args.appends, &tenants("eight", 1)?).await?;
        let rm1 = appends(&pool, 1, args.appends, &tenants("a", args.tenants)?).await?;
        let rm8 = appends(&pool, 8, args.appends, &tenants("b", args.tenants)?).await?;
        pool.close().await;
        println!(
            "appends/s, each append in its own transaction, {} appends per cell (PostgreSQL at {}):",
            args.appends, db.server
        );
        println!("  {:<22} {:>12} {:>12}", "", "1 writer", "8 writers");
        println!("  {:<22} {:>12.0} {:>12.0}", "one tenant", r11, r18);
        println!("  {:<22} {:>12.0} {:>12.0}", format!("{} tenants", args.tenants), rm1, rm8);
        Ok::<(), CliError>(())
    }
    .await;
    db.drop_now().await;
    result
}

/// Builds a valid bundle of `n` events with a checkpoint every 10,000.
fn generate_bundle(n: u64) -> Result<(Vec<u8>, cella_audit::PublicKey), CliError> {
    let key = SigningKey::generate("bench")?;
    let tenant = tenants("bench", 1)?.remove(0);
    let t0 = truncate_to_micros(OffsetDateTime::now_utc());
    let events = (1..=n).map(|seq| (event(&tenant, seq), t0 + time::Duration::microseconds(seq as i64)));
    let contents =
        bundle::offline_chain(&tenant, &key, events, |seq| seq % 10_000 == 0 || seq == n, false, t0);
    let mut out = Vec::new();
    bundle::write_bundle(&contents, &mut out)
        .map_err(|e| CliError::Usage(format!("cannot write the bundle: {e}")))?;
    Ok((out, key.public()))
}

fn verify_bench(n: u64, keep: Option<&std::path::Path>) -> Result<(), CliError> {
    let t = Instant::now();
    let (tar, public) = generate_bundle(n)?;
    let path = keep.map_or_else(
        || std::env::temp_dir().join(format!("cella-audit-bench-{}.tar", std::process::id())),
        std::path::Path::to_path_buf,
    );
    std::fs::write(&path, &tar)
        .map_err(|source| CliError::File { path: path.display().to_string(), source })?;
    if keep.is_some() {
        let mut pub_path = path.clone().into_os_string();
        pub_path.push(".pub");
        std::fs::write(&pub_path, public.to_file_text())
            .map_err(|source| CliError::File { path: pub_path.to_string_lossy().into_owned(), source })?;
        println!(
            "kept the bundle: cella audit verify {} --trusted-key {}",
            path.display(),
            std::path::Path::new(&pub_path).display()
        );
    }
    println!(
        "generated a {n}-event bundle ({:.0} MiB, {} checkpoints) in {:.1} s",
        tar.len() as f64 / (1 << 20) as f64,
        n.div_ceil(10_000),
        t.elapsed().as_secs_f64()
    );
    drop(tar);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let options = |threads| Options::pinned(vec![public.clone()]).with_threads(threads);
    let file_err = |source| CliError::File { path: path.display().to_string(), source };
    let bundle = Bundle::read(&std::fs::read(&path).map_err(file_err)?[..])?;
    let mut rows = Vec::new();
    for threads in [cores, 1] {
        // The bundle already read and untarred: the checks alone.
        let in_memory = timed(n, || Ok(verify_bundle(&bundle, &options(threads))?))?;
        // What `cella audit verify` does: stream the tar file (from the page cache here).
        let from_file = timed(n, || {
            let file = std::fs::File::open(&path).map_err(file_err)?;
            Ok(verify_tar(file, &options(threads))?)
        })?;
        rows.push((threads, in_memory, from_file));
    }
    drop(bundle);
    if keep.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    println!("offline verification of {n} events (goal: >= 1,000,000 events/s); CPU-s = user+system time of this process;");
    println!("in memory: the bundle already read and untarred; from file: `cella audit verify`, streaming the tar file:");
    println!(
        "  {:<8} {:>16} {:>18} {:>16} {:>18}",
        "threads", "in memory ev/s", "in memory ev/CPU-s", "from file ev/s", "from file ev/CPU-s"
    );
    for (threads, in_memory, from_file) in rows {
        println!(
            "  {threads:<8} {:>16.0} {:>18.0} {:>16.0} {:>18.0}",
            in_memory.per_second, in_memory.per_cpu_second, from_file.per_second, from_file.per_cpu_second
        );
    }
    println!("  (the machine's load average while measuring: {})", load_average());
    Ok(())
}

/// Events verified per second of wall time and per CPU-second.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    per_cpu_second: f64,
}

/// Times one verification of `n` events, checking that it verified all of them.
fn timed(n: u64, verify: impl FnOnce() -> Result<Report, CliError>) -> Result<Rate, CliError> {
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let report = verify()?;
    let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    if report.events != n {
        return Err(CliError::VerificationFailed(format!("verified {} events, expected {n}", report.events)));
    }
    Ok(Rate { per_second: n as f64 / wall, per_cpu_second: n as f64 / cpu })
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (0 if unavailable).
pub(super) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`; utime and stime are the 14th and 15th fields overall.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "unknown".to_owned(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}
