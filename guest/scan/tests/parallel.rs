//! An artifact scanned by two workers (as a VM with a helper vCPU scans it) reports exactly
//! what one worker reports: for a history the same findings, commits and summary; for an
//! archive the same findings in the same order, counts and cap. Its own test binary, because
//! the workers are installed for the whole process (the tests take turns).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cella_scan::parallel::{set_workers, OneWorker, Workers};
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

/// The tests take turns: each installs the workers it wants.
static TURN: Mutex<()> = Mutex::new(());

/// Scans `data` with one worker, then with two; returns both reports and the stages the two
/// workers ran.
fn alone_and_together(data: &[u8], name: &str, limits: &Limits) -> (Report, Report, usize) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    set_workers(&OneWorker);
    let alone = scan_with(data, name, limits).unwrap();
    set_workers(&THREADS);
    let before = THREADS.stages.load(Ordering::Relaxed);
    let together = scan_with(data, name, limits).unwrap();
    let stages = THREADS.stages.load(Ordering::Relaxed) - before;
    set_workers(&OneWorker);
    (alone, together, stages)
}

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
    let (alone, together, stages) = alone_and_together(&bundle, "repo.bundle", &Limits::default());
    let history = alone.history.clone().unwrap();
    assert!(
        history.blobs_scanned > 300 && alone.findings.len() > 50,
        "{history:?}, {}",
        alone.findings.len()
    );
    // Resolving the deltas, reading the commit graph and scanning the versions each ran on
    // both workers.
    assert_eq!(stages, 3);
    assert_eq!(described(&together), described(&alone));
    assert_eq!(together.findings, alone.findings);
    assert_eq!(together.history, alone.history);
    assert_eq!(together.bytes_scanned, alone.bytes_scanned);

    // A limit one worker reaches stops both, and the scan is refused by name.
    let limits = Limits { max_history_inflated: 400_000, ..Limits::default() };
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    set_workers(&THREADS);
    let refused = scan_with(&bundle, "repo.bundle", &limits);
    set_workers(&OneWorker);
    drop(turn);
    match refused {
        Err(ArtifactError::History { problem: HistoryProblem::InflatedTotal { limit: 400_000 }, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A tar of 400 small files (secrets, cards, licences, a few marked as allowed), a file over
/// the batch's size limit in the middle, a nested zip and a binary file.
fn busy_archive() -> Vec<u8> {
    let texts: Vec<(String, String)> = (0..400)
        .map(|i| {
            let mut text = format!("file {i}\n");
            for line in 0..(i % 9) {
                text.push_str(&format!("key{line} = tok_{i:08}{line:08}\n"));
            }
            if i % 5 == 0 {
                text.push_str(&format!("allowed = tok_{i:08}aaaaaaaa # cella:allow\n"));
            }
            if i % 7 == 0 {
                text.push_str("card 4111 1111 1111 1111\nSPDX-License-Identifier: MIT\n");
            }
            (format!("src/{}/f{i}.txt", i % 13), text)
        })
        .collect();
    let large: String = (0..40_000).map(|i| format!("line {i} tok_{i:016}\n")).collect();
    // A zip whose entry inflates past the size it declares (read until the reader stops it).
    let lying_text: String = (0..60_000).map(|i| format!("lie {i} tok_{i:016}\n")).collect();
    let lying = ZipEntry { declared_size: Some(64), ..zfile("lies.txt", lying_text.as_bytes(), true) };
    let nested = zip(&[zfile("inner/a.txt", b"inner = tok_0000000000000001\n", true), lying]);
    let binary = [&b"\0\0\0ELF"[..], b" tok_00000000deadbeef ", &[0u8; 64]].concat();
    let mut entries: Vec<TarEntry<'_>> =
        texts.iter().map(|(name, text)| file(name, text.as_bytes())).collect();
    entries.insert(200, file("big/large.txt", large.as_bytes()));
    entries.insert(300, file("nested.zip", &nested));
    entries.insert(350, file("bin/tool", &binary));
    tar(&entries)
}

#[test]
fn two_workers_scan_an_archive_into_the_report_one_worker_makes_within_the_same_cap() {
    let archive = busy_archive();
    for limits in [Limits::default(), Limits { max_findings: 300, ..Limits::default() }] {
        let (alone, together, stages) = alone_and_together(&archive, "busy.tar", &limits);
        assert!(stages >= 2, "the small files before and after the large one were shared out");
        assert!(
            alone.findings.len() >= 300 && alone.files_scanned == 403,
            "{} {}",
            alone.findings.len(),
            alone.files_scanned
        );
        assert_eq!(together.findings, alone.findings);
        assert_eq!(
            (
                together.files_scanned,
                together.files_binary,
                together.bytes_scanned,
                together.findings_dropped
            ),
            (alone.files_scanned, alone.files_binary, alone.bytes_scanned, alone.findings_dropped)
        );
        assert_eq!(
            (together.suppressed_inline, &together.unsuppressed_by_rule, together.skipped.len()),
            (alone.suppressed_inline, &alone.unsuppressed_by_rule, alone.skipped.len())
        );
    }
}
