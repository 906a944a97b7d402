//! A history scanned by two workers (as a VM with a helper vCPU scans it) reports exactly
//! what one worker reports: the same findings, commits and summary. Its own test binary,
//! because the workers are installed for the whole process.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use cella_scan::parallel::{set_workers, Workers};
use cella_scan::{ArtifactError, HistoryProblem, Limits, Report};
use common::git::Repo;
use common::*;

/// Two threads; counts the stages run on them.
struct Threads {
    stages: AtomicUsize,
}

impl Workers for Threads {
    fn count(&self) -> usize {
        2
    }

    fn run(&self, task: &(dyn Fn(usize) + Sync)) {
        self.stages.fetch_add(1, Ordering::Relaxed);
        std::thread::scope(|s| {
            s.spawn(|| task(1));
            task(0);
        });
    }
}

static THREADS: Threads = Threads { stages: AtomicUsize::new(0) };

/// Every finding with where and when it came from.
fn described(r: &Report) -> Vec<String> {
    r.findings
        .iter()
        .map(|f| {
            let h = f.history.as_ref().expect("every finding comes from history");
            format!("{} {}:{} {} {} {}", f.rule_id, f.path, f.line, h.commit, h.subject, h.only_in_history)
        })
        .collect()
}

/// 100 files edited over 40 commits on two branches (enough delta trees and versions for
/// every stage to be spread), secrets added and removed along the way.
fn busy_repository() -> Vec<u8> {
    let mut repo = Repo::new("parallel");
    // Each file its own words (so its versions are deltas of each other, not of other files).
    let body = |file: usize, rev: usize| {
        let mut seed = (file as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut word = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            format!("{:x}", seed >> 40)
        };
        let mut text: String =
            (0..60).map(|line| format!("{line}: {} {} {} {}\n", word(), word(), word(), word())).collect();
        text.push_str(&format!("revision {rev}\n"));
        if (file + rev).is_multiple_of(7) {
            text.push_str(&format!("token = tok_{:04}{:04}abcdef{:02}\n", file, rev, file % 100));
        }
        text
    };
    for rev in 0..30 {
        for file in (0..100).filter(|f| (f + rev) % 3 == 0 || rev == 0) {
            repo.write(&format!("dir{}/file{file}.txt", file % 9), &body(file, rev));
        }
        // Files rewritten whole (no delta between the versions) that keep their secret: the
        // versions may be scanned by different workers, and the earlier commit must win.
        if rev == 3 || rev == 20 {
            for file in 0..20 {
                let text = body(1000 + file + rev, 0);
                repo.write(
                    &format!("rotated/{file}.txt"),
                    &format!("{text}key = tok_rotated{file:04}abcde\n"),
                );
            }
        }
        repo.commit(&format!("Revision {rev}"));
    }
    repo.git(&["checkout", "-q", "-b", "side", "HEAD~10"]);
    for rev in 100..110 {
        repo.write(&format!("side/only{rev}.txt"), &body(rev, rev));
        repo.commit(&format!("Side {rev}"));
    }
    repo.git(&["checkout", "-q", "main"]);
    repo.git(&["repack", "-adf", "-q"]);
    repo.bundle(&["--all"])
}

#[test]
fn two_workers_report_exactly_what_one_reports_and_stop_together_at_a_limit() {
    let bundle = busy_repository();
    let alone = scan(&bundle, "repo.bundle").unwrap();
    let history = alone.history.clone().unwrap();
    assert!(
        history.blobs_scanned > 300 && alone.findings.len() > 50,
        "{history:?}, {}",
        alone.findings.len()
    );

    set_workers(&THREADS);
    let together = scan(&bundle, "repo.bundle").unwrap();
    // Resolving the deltas, reading the commit graph and scanning the versions each ran on
    // both workers.
    assert_eq!(THREADS.stages.load(Ordering::Relaxed), 3);
    assert_eq!(described(&together), described(&alone));
    assert_eq!(together.findings, alone.findings);
    assert_eq!(together.history, alone.history);
    assert_eq!(together.bytes_scanned, alone.bytes_scanned);

    // A limit one worker reaches stops both, and the scan is refused by name.
    let limits = Limits { max_history_inflated: 400_000, ..Limits::default() };
    match scan_with(&bundle, "repo.bundle", &limits) {
        Err(ArtifactError::History { problem: HistoryProblem::InflatedTotal { limit: 400_000 }, .. }) => {}
        other => panic!("{other:?}"),
    }
}
