//! `cella-bench vm packs`: what tenant rule packs cost a scan, natively (the engine's
//! throughput, from `cella_policies::rules::bench_packs`) and inside a Cella VM: the built-in
//! packs alone and with 1 and 10 tenant packs of 50 rules each, on the same corpus, the VM
//! scans interleaved, side by side.

use std::process::ExitCode;
use std::time::Duration;

use cella_policies::rules::bench_packs::{self, tenant_pack, ORGS};
use cella_policies::rules::tenant::{self, PackFormat, PackLimits};
use cella_policies::rules::DEFAULT_PACKS;
use cella_vmm::{default_scanner_image, error_chain};
use clap::Args;

use super::scan::vm_scan;
use crate::exit_code;

#[derive(Debug, Args)]
pub struct PacksBenchArgs {
    /// Corpus size in MiB
    #[arg(long, default_value_t = 100)]
    pub corpus_mib: usize,
    /// Runs of each configuration (interleaved); medians are reported
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Guest memory for the scans, in MiB
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
}

pub fn main(args: PacksBenchArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cella-bench vm packs: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(args: &PacksBenchArgs) -> Result<(), String> {
    let runs = args.runs.max(1);
    eprintln!("cella-bench vm packs: natively, {} MiB, {runs} run(s) per configuration...", args.corpus_mib);
    let native = bench_packs::run(args.corpus_mib, runs).map_err(|e| error_chain(&e))?;
    eprintln!("cella-bench vm packs: the same corpus inside a Cella VM...");
    let image = default_scanner_image().map_err(|e| e.to_string())?;
    let mut packs = Vec::new();
    for org in ORGS {
        let v = tenant::validate(&tenant_pack(org), PackFormat::Cella, None, &PackLimits::default())
            .map_err(|e| e.to_string())?;
        packs.push(v.pack);
    }
    let policies = [0usize, 1, 10]
        .iter()
        .map(|&n| tenant::tenant_policy(DEFAULT_PACKS, packs[..n].to_vec()).map(|p| (n, p.into_bytes())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error_chain(&e))?;
    let dir = std::env::temp_dir().join(format!("cella-bench-packs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let corpus_file = dir.join("corpus.txt");
    let (corpus, _) = bench_packs::corpus(args.corpus_mib << 20);
    std::fs::write(&corpus_file, &corpus).map_err(|e| e.to_string())?;
    let mut in_vm = vec![Vec::new(); policies.len()];
    let mut findings = vec![0; policies.len()];
    for _ in 0..runs {
        for (i, (_, policy)) in policies.iter().enumerate() {
            let (t, _, f) = vm_scan(&image, &corpus_file, policy, args.mem_mib)?;
            in_vm[i].push(t);
            findings[i] = f;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print!("{native}");
    println!();
    println!("inside a Cella VM (reading its disk), same corpus, medians of {runs} interleaved runs");
    println!("{:<28} {:>10} {:>10} {:>8} {:>9}", "policy", "seconds", "MB/s", "cost", "findings");
    let base = median(in_vm[0].clone());
    for (i, (n, _)) in policies.iter().enumerate() {
        let t = median(std::mem::take(&mut in_vm[i]));
        let name = if *n == 0 {
            "built-in packs, no tenant's".to_owned()
        } else {
            format!("built-in + {n} tenant pack(s)")
        };
        let cost = (t.as_secs_f64() / base.as_secs_f64().max(1e-9) - 1.0) * 100.0;
        println!(
            "{name:<28} {:>10.3} {:>10.1} {:>7.1}% {:>9}",
            t.as_secs_f64(),
            corpus.len() as f64 / 1e6 / t.as_secs_f64().max(1e-9),
            cost,
            findings[i]
        );
    }
    Ok(())
}
