//! `cella-bench vm scan`: the scan engine's throughput inside a Cella VM, natively in this
//! process, and ripgrep with the same regex set — on the same generated corpus, in one run —
//! plus what a baseline and excludes cost natively, the corpus as a tar of small files in the
//! VM on two vCPUs and on one, and end-to-end `scan` latency (launch, scan, teardown) for a
//! 1 MiB and a 100 MiB tarball.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cella_policies::rules::bench::{self, BenchOptions};
use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_vmm::job::ScanOutcome;
use cella_vmm::scan::{self, ScanRequest};
use cella_vmm::{default_scanner_image, error_chain};
use clap::Args;

use crate::exit_code;

#[derive(Debug, Args)]
pub struct ScanBenchArgs {
    /// Corpus size in MiB
    #[arg(long, default_value_t = 200)]
    pub corpus_mib: usize,
    /// Runs of the in-VM and native file scans (interleaved) and end-to-end runs per tarball
    /// size; medians are reported
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Guest memory for the scans, in MiB
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
}

pub fn main(args: ScanBenchArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cella-bench vm scan: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

/// Scans `artifact` in a VM; returns (in-VM time, whole wall time, findings).
pub(crate) fn vm_scan(
    image: &Path,
    artifact: &Path,
    policy: &[u8],
    mem_mib: u64,
) -> Result<(Duration, Duration, u64), String> {
    let started = Instant::now();
    let request = ScanRequest {
        template: None,
        image: image.to_owned(),
        artifact: artifact.to_owned(),
        policy: policy.to_owned(),
        mem_mib,
        timeout: Duration::from_secs(600),
        launch_start: started,
        cancel: None,
        fingerprint_key: "00".repeat(32),
        options: Default::default(),
    };
    let run = scan::run(&request, Box::new(std::io::sink())).map_err(|e| error_chain(&e))?;
    let wall = started.elapsed();
    let job = run.job.map_err(|e| format!("{} (VM: {:?})", error_chain(&e), run.vm.exit))?;
    match job.outcome {
        ScanOutcome::Completed { summary, .. } => {
            let summary: serde_json::Value = serde_json::from_slice(&summary).map_err(|e| e.to_string())?;
            Ok((job.in_vm, wall, summary["findings"].as_u64().unwrap_or(0)))
        }
        ScanOutcome::Refused(e) => Err(format!("the runner refused the artifact: {}", e.message)),
    }
}

/// A tarball of the first `bytes` of `corpus`, cut into 256 KiB files.
pub(crate) fn tarball(corpus: &[u8], bytes: usize, dir: &Path) -> Result<PathBuf, String> {
    let tree = dir.join(format!("tree-{bytes}"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).map_err(|e| e.to_string())?;
    for (i, chunk) in corpus[..bytes.min(corpus.len())].chunks(256 << 10).enumerate() {
        std::fs::write(tree.join(format!("src-{i:04}.txt")), chunk).map_err(|e| e.to_string())?;
    }
    let out = dir.join(format!("corpus-{}mib.tar", bytes >> 20));
    let status = Command::new("tar").arg("-C").arg(&tree).arg("-cf").arg(&out).arg(".").status();
    let _ = std::fs::remove_dir_all(&tree);
    match status {
        Ok(s) if s.success() => Ok(out),
        _ => Err("tar failed to build the benchmark tarball".into()),
    }
}

/// `cella-vmm scan --json` of `artifact` (with `taskset -c 0` first when `one_cpu`: kept to one
/// CPU, the VMM gives the VM no helper vCPU); returns (in-VM time, vCPUs, findings).
fn vmm_scan(
    vmm: &Path,
    artifact: &Path,
    mem_mib: u64,
    one_cpu: bool,
) -> Result<(Duration, u64, u64), String> {
    let mut command = match one_cpu {
        true => {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(vmm);
            c
        }
        false => Command::new(vmm),
    };
    command.args(["scan", "--json", "--mem-mib", &mem_mib.to_string(), "--artifact"]).arg(artifact);
    let out = command.output().map_err(|e| format!("cannot run {}: {e}", vmm.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .map_err(|_| format!("cella-vmm scan printed no report: {}", String::from_utf8_lossy(&out.stderr)))?;
    let in_vm = report["in_vm_ms"].as_f64().ok_or("the report has no in_vm_ms")?;
    Ok((
        Duration::from_secs_f64(in_vm / 1e3),
        report["vcpus"].as_u64().unwrap_or(1),
        report["summary"]["findings"].as_u64().unwrap_or(0),
    ))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

fn run(args: &ScanBenchArgs) -> Result<(), String> {
    let image = default_scanner_image().map_err(|e| e.to_string())?;
    let policy = load_packs(DEFAULT_PACKS).map_err(|e| error_chain(&e))?.into_bytes();
    let dir = std::env::temp_dir().join(format!("cella-bench-scan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let opts = BenchOptions {
        corpus_mib: args.corpus_mib,
        corpus_path: dir.join("rg-corpus.txt"),
        ripgrep: true,
        suppression_runs: args.runs,
    };

    eprintln!("cella-bench vm scan: native engine and ripgrep on a {} MiB corpus...", args.corpus_mib);
    let native = bench::run(&opts).map_err(|e| error_chain(&e))?;
    eprintln!("cella-bench vm scan: the same corpus inside a Cella VM...");
    // The same generator and size give the same bytes the native run scanned.
    let (corpus, _) = bench::generate_corpus(args.corpus_mib << 20);
    let corpus_file = dir.join("corpus.txt");
    std::fs::write(&corpus_file, &corpus).map_err(|e| e.to_string())?;
    // The in-VM and the native file scans alternate, `runs` times each: medians of interleaved
    // runs stand up better to a shared machine's noise than one run each.
    let mut vm_runs = Vec::new();
    let mut file_runs = Vec::new();
    let mut vm_wall = Duration::ZERO;
    let mut vm_findings = 0;
    for _ in 0..args.runs.max(1) {
        let (in_vm, wall, findings) = vm_scan(&image, &corpus_file, &policy, args.mem_mib)?;
        vm_runs.push(in_vm);
        (vm_wall, vm_findings) = (wall, findings);
        file_runs.push(bench::scan_file(&corpus_file, &policy)?.0);
    }
    let (in_vm, file_time) = (median(vm_runs), median(file_runs));

    // The whole corpus as a tar of 256 KiB files: the VM gets a helper vCPU, and the scan
    // shares the files out; the same tar on one vCPU (the VMM kept to one CPU).
    let tar = tarball(&corpus, corpus.len(), &dir)?;
    let vmm = crate::binaries::sibling("cella-vmm")?;
    let (mut two_runs, mut one_runs) = (Vec::new(), Vec::new());
    let mut vcpu_findings = (0, 0);
    for _ in 0..args.runs.max(1) {
        let (two, two_vcpus, two_found) = vmm_scan(&vmm, &tar, args.mem_mib, false)?;
        let (one, one_vcpus, one_found) = vmm_scan(&vmm, &tar, args.mem_mib, true)?;
        if (two_vcpus, one_vcpus) != (2, 1) {
            eprintln!("cella-bench vm scan: expected 2 and 1 vCPUs, the VMs had {two_vcpus} and {one_vcpus}");
        }
        two_runs.push(two);
        one_runs.push(one);
        vcpu_findings = (two_found, one_found);
    }
    let (two_vcpus, one_vcpu) = (median(two_runs), median(one_runs));

    let mut e2e = Vec::new();
    for mib in [1usize, 100] {
        let tar = tarball(&corpus, mib << 20, &dir)?;
        let mut walls = Vec::new();
        for _ in 0..args.runs.max(1) {
            walls.push(vm_scan(&image, &tar, &policy, args.mem_mib)?.1);
        }
        e2e.push((mib, median(walls)));
    }
    let _ = std::fs::remove_dir_all(&dir);

    print!("{native}");
    let bytes = native.corpus_bytes;
    let vm_mbps = mbps(bytes, in_vm);
    let memory_mbps = mbps(bytes, native.engine_time);
    // The VM and ripgrep read the corpus file (from the page cache); so does this comparison.
    let file_mbps = mbps(bytes, file_time);
    println!();
    println!(
        "side by side, same corpus (the VM and native file scans: medians of {} interleaved runs)",
        args.runs.max(1)
    );
    println!("{:<52} {:>10} {:>10} {:>9}", "", "MB/s", "seconds", "findings");
    let row = |name: &str, mbps: f64, t: Duration, findings: String| {
        println!("{name:<52} {mbps:>10.1} {:>10.3} {findings:>9}", t.as_secs_f64());
    };
    row("cella-scan inside a Cella VM (reading its disk)", vm_mbps, in_vm, vm_findings.to_string());
    row("cella-scan natively, reading the file", file_mbps, file_time, native.engine_findings.to_string());
    row(
        "cella-scan natively, from memory",
        memory_mbps,
        native.engine_time,
        native.engine_findings.to_string(),
    );
    let mut rg_mbps = Vec::new();
    for r in &native.ripgrep {
        if let Ok(count) = r.outcome {
            let rg = mbps(bytes, r.time);
            rg_mbps.push((r.label, rg));
            row(&format!("ripgrep {}", r.label), rg, r.time, format!("{count} lines"));
        }
    }
    println!(
        "in-VM / native, both reading the corpus file: {:.2} (goal >= 0.90); against the engine scanning \
         an in-memory copy: {:.2}",
        vm_mbps / file_mbps,
        vm_mbps / memory_mbps
    );
    for (i, (label, rg)) in rg_mbps.iter().enumerate() {
        // The goal names `rg -c -e ... -e ...`: the first run, default flags.
        let goal = if i == 0 { " (goal >= 1.00)" } else { "" };
        println!("native (reading the file) / ripgrep {label}: {:.2}{goal}", file_mbps / rg);
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").unwrap_or_default();
    let mode = thp.split_once('[').and_then(|(_, r)| r.split_once(']')).map_or("unknown", |(m, _)| m);
    println!(
        "host huge pages for shared memory: {mode} (the VM's heap gets 2 MiB pages for a disk of {} MiB or \
         more only if this is advise, within_size or always; scripts/setup.sh sets advise)",
        cella_vmm::builder::HUGE_PAGES_MIN_DISK >> 20
    );
    println!(
        "the corpus as a tar of 256 KiB files, in the VM: 2 vCPUs {:.1} MB/s ({:.3} s, {} findings), \
         1 vCPU {:.1} MB/s ({:.3} s, {} findings): {:.2}x (medians of {} interleaved runs)",
        mbps(bytes, two_vcpus),
        two_vcpus.as_secs_f64(),
        vcpu_findings.0,
        mbps(bytes, one_vcpu),
        one_vcpu.as_secs_f64(),
        vcpu_findings.1,
        one_vcpu.as_secs_f64() / two_vcpus.as_secs_f64(),
        args.runs.max(1)
    );
    println!(
        "whole in-VM scan of the corpus (launch + scan + teardown): {:.0} ms",
        vm_wall.as_secs_f64() * 1e3
    );
    for (mib, wall) in e2e {
        println!(
            "end-to-end cella-vmm scan, {mib} MiB tarball: {:.0} ms (median of {})",
            wall.as_secs_f64() * 1e3,
            args.runs.max(1)
        );
    }
    Ok(())
}
