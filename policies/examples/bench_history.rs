//! History scan benchmark, native:
//! `cargo run --release -p cella-policies --example bench_history -- BUNDLE [REPO]`.
//!
//! Scans the git bundle BUNDLE with the default packs (as a job's VM does, on the host's
//! CPU) and prints objects per second, wall time, peak memory and the findings per rule; with
//! REPO (the same repository as a git directory), runs Kingfisher on it in the same run
//! (`kingfisher scan REPO --no-validate -j 2`, if installed) and prints its figures beside.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    kib / 1024
}

/// Workers on threads: the caller and `0 - 1` more, started for each stage.
struct Threads(usize);

impl cella_scan::parallel::Workers for Threads {
    fn count(&self) -> usize {
        self.0
    }

    fn run(&self, task: &(dyn Fn(usize) + Sync)) {
        std::thread::scope(|s| {
            for w in 1..self.0 {
                s.spawn(move || task(w));
            }
            task(0);
        });
    }
}

fn main() {
    // CELLA_BENCH_THREADS=2: scan on two threads, as a VM with a helper vCPU does.
    let threads: usize = std::env::var("CELLA_BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    if threads > 1 {
        cella_scan::parallel::set_workers(Box::leak(Box::new(Threads(threads))));
    }
    let mut args = std::env::args().skip(1);
    let Some(bundle) = args.next() else {
        eprintln!("usage: bench_history BUNDLE [REPO]");
        std::process::exit(2);
    };
    let repo = args.next();
    let data = std::fs::read(&bundle).unwrap_or_else(|e| {
        eprintln!("bench_history: reading {bundle}: {e}");
        std::process::exit(1);
    });
    let compiled = load_packs(DEFAULT_PACKS).expect("the built-in packs load");
    let mut engine = Engine::new(compiled.policy().clone()).expect("the built-in packs compile");
    let before = peak_rss_mib();
    let mut scan = |delta_scan: bool| {
        let started = Instant::now();
        let mut report = Report::default();
        let limits =
            Limits { max_git_objects: 2_000_000, history_delta_scan: delta_scan, ..Limits::default() };
        if let Err(e) =
            scan_artifact(&mut SliceSource(&data), "repo.bundle", &mut engine, &limits, &mut report)
        {
            eprintln!("bench_history: {e}");
            std::process::exit(1);
        }
        (started.elapsed(), report)
    };
    let (wall, report) = scan(true);
    if std::env::var_os("CELLA_BENCH_COMPARE").is_some() {
        // Every version scanned whole: slower, and it must find exactly the same.
        let (whole_wall, whole) = scan(false);
        let same = whole.findings == report.findings;
        println!(
            "every version scanned whole: {:.2} s, {} findings, {} bytes scanned; the same findings as the delta scan: {same}",
            whole_wall.as_secs_f64(),
            whole.findings.len(),
            whole.bytes_scanned
        );
        if !same {
            for (a, b) in whole.findings.iter().zip(&report.findings).filter(|(a, b)| a != b).take(5) {
                println!("  whole: {a:?}\n  delta: {b:?}");
            }
            std::process::exit(1);
        }
    }
    let history = report.history.clone().unwrap_or_default();
    let mut by_rule: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &report.findings {
        *by_rule.entry(&f.rule_id).or_default() += 1;
    }
    println!(
        "Cella history scan of {bundle} ({} MB), native, {threads} thread(s), default packs:",
        data.len() >> 20
    );
    println!(
        "  {} objects, {} commits, {} blobs scanned ({} of them only where they differ from their delta base; {} MB scanned), {} missing from the pack",
        history.objects,
        history.commits,
        history.blobs_scanned,
        history.blobs_scanned_in_part,
        report.bytes_scanned >> 20,
        history.objects_missing
    );
    println!(
        "  {:.2} s wall, {:.0} objects/s, peak memory {} MiB (bundle {} MiB in that, {} MiB before the scan)",
        wall.as_secs_f64(),
        history.objects as f64 / wall.as_secs_f64(),
        peak_rss_mib(),
        data.len() >> 20,
        before
    );
    let only =
        report.findings.iter().filter(|f| f.history.as_ref().is_some_and(|h| h.only_in_history)).count();
    println!("  {} findings ({only} only in history):", report.findings.len());
    for (rule, n) in &by_rule {
        println!("    {n:5}  {rule}");
    }
    let Some(repo) = repo else { return };
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "kingfisher", "scan", &repo, "--no-validate", "-j", "2", "--format", "json"])
        .output();
    let wall = started.elapsed();
    match out {
        Ok(out)
            if out.status.success() || out.status.code() == Some(200) || out.status.code() == Some(205) =>
        {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let max_kib: u64 = stderr.lines().rev().find_map(|l| l.trim().parse().ok()).unwrap_or(0);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let findings = stdout.lines().filter(|l| l.contains("\"rule\"")).count();
            println!("Kingfisher on {repo} (--no-validate -j 2):");
            println!(
                "  {:.2} s wall, peak memory {} MiB, {findings} finding lines",
                wall.as_secs_f64(),
                max_kib / 1024
            );
        }
        Ok(out) => {
            println!(
                "Kingfisher failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            )
        }
        Err(e) => println!("Kingfisher not run: {e}"),
    }
}
