//! Native scan benchmark: `cargo run --release -p cella-policies --example bench_scan -- [MiB] [RUNS]`.
//! Prints the engine's throughput next to ripgrep's on the same corpus and regex set, then what
//! a baseline and excludes cost (RUNS interleaved runs of each, default 3).

fn main() {
    let mut opts = cella_policies::rules::bench::BenchOptions::default();
    if let Some(mib) = std::env::args().nth(1) {
        opts.corpus_mib = mib.parse().expect("corpus size in MiB");
    }
    if let Some(runs) = std::env::args().nth(2) {
        opts.suppression_runs = runs.parse().expect("runs of each suppression variant");
    }
    match cella_policies::rules::bench::run(&opts) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("bench_scan: {e}");
            std::process::exit(1);
        }
    }
}
