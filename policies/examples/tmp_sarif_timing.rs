use cella_policies::rules::*;
use cella_scan::*;
use std::time::Instant;
fn main() {
    let c = load_packs(DEFAULT_PACKS).unwrap();
    let data = std::fs::read("/tmp/sample.tar").unwrap();
    let mut e = Engine::from_policy_json(c.as_bytes()).unwrap();
    let mut r = Report::default();
    scan_artifact(&mut SliceSource(&data), "sample.tar", &mut e, &Limits::default(), &mut r).unwrap();
    for _ in 0..5 {
        let t = Instant::now();
        let v = sarif::to_value(e.policy(), &r);
        let t1 = t.elapsed();
        let s = serde_json::to_string_pretty(&v).unwrap();
        let t2 = t.elapsed();
        let sum = r.summary_json(e.policy(), 0);
        let t3 = t.elapsed();
        let t = Instant::now();
        let _e2 = Engine::from_policy_json(c.as_bytes()).unwrap();
        let t4 = t.elapsed();
        println!(
            "value {t1:?} pretty {:?} summary {:?} ({} B sarif, {} B summary) from_json {t4:?}",
            t2 - t1,
            t3 - t2,
            s.len(),
            sum.len()
        );
    }
}
