use cella_policies::rules::*;
use cella_scan::*;
use std::time::Instant;
fn main() {
    let c = load_packs(DEFAULT_PACKS).unwrap();
    let (corpus, _) = bench::generate_corpus(4 << 20);
    for kib in [1usize, 4, 16, 64, 128, 256, 512, 1024, 4096] {
        let data = &corpus[..kib << 10];
        let mut res = vec![];
        for after in [0u64, u64::MAX] {
            let mut ts = vec![];
            let mut n = 0;
            for _ in 0..9 {
                let t = Instant::now();
                let mut e = Engine::from_policy_json(c.as_bytes()).unwrap();
                e.set_line_filter_after(after);
                let mut r = Report::default();
                scan_artifact(&mut SliceSource(data), "f.txt", &mut e, &Limits::default(), &mut r).unwrap();
                ts.push(t.elapsed());
                n = r.findings.len();
            }
            ts.sort();
            res.push((ts[4], n));
        }
        println!(
            "{kib:>5} KiB: filter {:?} ({}) | by line {:?} ({})",
            res[0].0, res[0].1, res[1].0, res[1].1
        );
    }
}
