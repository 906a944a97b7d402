//! What tenant rule packs cost a scan:
//! `cargo run --release -p cella-policies --example bench_packs -- [MiB] [runs]`.
//! Prints the engine's throughput with the built-in packs alone and with 1 and 10 tenant packs
//! of 50 rules each, on the same corpus, side by side (see `cella_policies::rules::bench_packs`).

fn main() {
    let mut args = std::env::args().skip(1);
    let mib = args.next().map_or(100, |a| a.parse().expect("corpus size in MiB"));
    let runs = args.next().map_or(3, |a| a.parse().expect("runs per configuration"));
    match cella_policies::rules::bench_packs::run(mib, runs) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("bench_packs: {e}");
            std::process::exit(1);
        }
    }
}
