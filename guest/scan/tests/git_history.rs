//! Git history from bundles made by the real `git`: each finding is attributed to the commit
//! that introduced its secret at its path; a secret deleted from the tree is still found and
//! marked as only in history. Hostile packs are refused by name, within limits.

mod common;
mod pack_writer;
mod sarif_checks;

use cella_scan::{scan_artifact, ArtifactError, HistoryProblem, Limits, Report, SliceSource, HISTORY_ENTRY};
use common::git::{git_in, Repo};
use common::*;

fn scan_bytes(data: &[u8], name: &str, limits: &Limits) -> Result<Report, ArtifactError> {
    let mut engine = engine();
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(data), name, &mut engine, limits, &mut report)?;
    Ok(report)
}

/// Each finding as `path:line:commit:only-in-history`.
fn attributed(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = r
        .findings
        .iter()
        .map(|f| match &f.history {
            Some(h) => format!("{}:{}:{}:{}", f.path, f.line, h.commit, h.only_in_history),
            None => format!("{}:{}:-", f.path, f.line),
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_secret_added_then_removed_is_found_with_the_commit_that_added_it() {
    let mut repo = Repo::new("removed");
    repo.write("README", "hello\n");
    repo.commit("Start");
    repo.write("config/app.env", &format!("NAME=x\nTOKEN={SECRET}\n"));
    let added = repo.commit("Add the app config");
    std::fs::remove_file(repo.dir.join("config/app.env")).unwrap();
    repo.commit("Remove the config");
    let report = scan_bytes(&repo.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    assert_eq!(attributed(&report), [format!("config/app.env:2:{added}:true")]);
    let origin = report.findings[0].history.as_ref().unwrap();
    assert_eq!(origin.author, "Ada Example <ada@example.org>");
    assert_eq!(origin.subject, "Add the app config");
    assert_eq!(origin.date, "2023-11-14T23:15:20+01:00");
    assert_eq!(
        (origin.committer.as_str(), origin.committed.as_str()),
        ("Ada Example <ada@example.org>", "2023-11-14T23:15:20+01:00")
    );
    let summary = report.history.as_ref().unwrap();
    assert_eq!(
        (summary.bundles, summary.commits, summary.partial, summary.objects_missing),
        (1, 3, false, 0)
    );
    assert!(summary.blobs_scanned >= 2, "{summary:?}");
}

#[test]
fn a_secret_kept_through_edits_is_reported_once_with_its_first_commit() {
    let mut repo = Repo::new("edits");
    repo.write("settings.ini", &format!("[a]\ntoken = {SECRET}\n"));
    let first = repo.commit("Add settings");
    for i in 0..5 {
        repo.write("settings.ini", &format!("[a]\ntoken = {SECRET}\nrev = {i}\n"));
        repo.commit(&format!("Edit {i}"));
    }
    let report = scan_bytes(&repo.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    // At HEAD still: not only in history.
    assert_eq!(attributed(&report), [format!("settings.ini:2:{first}:false")]);
}

#[test]
fn a_secret_on_a_side_branch_and_one_behind_a_tag_are_found() {
    let mut repo = Repo::new("branches");
    repo.write("a.txt", "base\n");
    repo.commit("Base");
    repo.git(&["checkout", "-q", "-b", "side"]);
    repo.write("side.txt", &format!("{SECRET}\n"));
    let side = repo.commit("Side work");
    repo.git(&["checkout", "-q", "main"]);
    // A commit reachable only from an annotated tag.
    repo.git(&["checkout", "-q", "-b", "release"]);
    repo.write("deploy/key.txt", "x\ntok_fedcba9876543210\n");
    let tagged = repo.commit("Release key");
    repo.clock += 60;
    repo.git(&["tag", "-a", "v1", "-m", "v1"]);
    repo.git(&["checkout", "-q", "main"]);
    repo.git(&["branch", "-q", "-D", "release"]);
    let report = scan_bytes(&repo.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    assert_eq!(
        attributed(&report),
        [format!("deploy/key.txt:2:{tagged}:true"), format!("side.txt:1:{side}:true")]
    );
}

#[test]
fn a_renamed_file_keeps_the_commit_that_added_its_secret() {
    let mut repo = Repo::new("renamed");
    repo.write("old/name.txt", &format!("k={SECRET}\n"));
    let added = repo.commit("Add");
    repo.git(&["mv", "old/name.txt", "new.txt"]);
    repo.commit("Rename");
    // The same content again elsewhere: one blob, one finding.
    repo.write("copy.txt", &format!("k={SECRET}\n"));
    repo.commit("Copy");
    let report = scan_bytes(&repo.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    // Still in the tree (renamed): not only in history.
    assert_eq!(attributed(&report), [format!("old/name.txt:1:{added}:false")]);
}

#[test]
fn deep_delta_chains_resolve_and_attribute_exactly() {
    let mut repo = Repo::new("deep");
    // Each commit changes one line: a version's best delta base is its neighbour, so the
    // chains are as deep as git allows (50 when it writes the bundle).
    let mut lines: Vec<String> =
        (0..150).map(|j| format!("line {j} of the original text, long enough to be worth a delta")).collect();
    let mut introduced = String::new();
    for i in 0..120 {
        lines[i] = format!("line {i} changed in commit {i}");
        if i == 77 {
            lines.push(format!("secret = {SECRET}"));
        }
        repo.write("grow.txt", &(lines.join("\n") + "\n"));
        let id = repo.commit(&format!("Change {i}"));
        if i == 77 {
            introduced = id;
        }
    }
    repo.git(&["repack", "-adf", "-q", "--depth=200", "--window=250"]);
    let bundle = repo.bundle(&["--all"]);
    let report = scan_bytes(&bundle, "repo.bundle", &Limits::default()).unwrap();
    assert_eq!(attributed(&report), [format!("grow.txt:151:{introduced}:false")]);
    // The same chains under a depth limit: refused by name.
    let limits = Limits { max_delta_depth: 5, ..Limits::default() };
    match scan_bytes(&bundle, "repo.bundle", &limits) {
        Err(ArtifactError::History { entry, problem: HistoryProblem::DeltaTooDeep { limit: 5, .. } }) => {
            assert_eq!(entry, "repo.bundle")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_since_bundle_scans_only_new_commits_and_says_it_is_partial() {
    let mut repo = Repo::new("since");
    repo.write("old.txt", &format!("{SECRET}\n"));
    let old = repo.commit("Old secret");
    repo.write("new.txt", "tok_aaaaaaaaaaaaaaaa\n");
    let new = repo.commit("New secret");
    let caret = format!("^{old}");
    let report = scan_bytes(&repo.bundle(&["--all", &caret]), "repo.bundle", &Limits::default()).unwrap();
    assert_eq!(attributed(&report), [format!("new.txt:1:{new}:false")]);
    let summary = report.history.as_ref().unwrap();
    assert!(summary.partial && summary.commits == 1, "{summary:?}");
}

#[test]
fn history_in_a_scanned_tree_joins_the_tree_findings() {
    let mut repo = Repo::new("tree");
    repo.write("app.env", &format!("T={SECRET}\n"));
    let added = repo.commit("Add app env");
    repo.write("gone.env", "T=tok_bbbbbbbbbbbbbbbb\n");
    let gone = repo.commit("Add another");
    std::fs::remove_file(repo.dir.join("gone.env")).unwrap();
    repo.commit("Remove it");
    let bundle = repo.bundle(&["--all"]);
    let tree_file = format!("T={SECRET}\n");
    // The bundle first, as `cella scan` sends it, then the working tree.
    let artifact = tar(&[file(HISTORY_ENTRY, &bundle), file("app.env", tree_file.as_bytes())]);
    let report = scan_bytes(&artifact, "repo.tar", &Limits::default()).unwrap();
    assert_eq!(attributed(&report), [format!("app.env:1:{added}:false"), format!("gone.env:1:{gone}:true")]);
    // A tree finding keeps its place; the bundle itself is not scanned as a file.
    assert_eq!(report.findings[0].path, "app.env");
    let summary = report.summary(&policy(), 0);
    assert_eq!(summary.findings, 2);
    // SARIF: the commit in each result's properties and message, both writers alike, valid.
    let details = cella_scan::sarif::RunDetails::default();
    let value = cella_scan::sarif::to_value(&policy(), &report, &details);
    let text = cella_scan::sarif::to_json(&policy(), &report, &details);
    assert_eq!(text, serde_json::to_string_pretty(&value).unwrap());
    assert_eq!(sarif_checks::schema_errors(&value), Vec::<String>::new());
    assert_eq!(sarif_checks::github_problems(&value), Vec::<String>::new());
    let results = value["runs"][0]["results"].as_array().unwrap();
    let gone_result = results.iter().find(|r| r["properties"]["history"]["commit"] == gone.as_str()).unwrap();
    assert_eq!(gone_result["properties"]["history"]["onlyInHistory"], true);
    assert_eq!(gone_result["properties"]["history"]["subject"], "Add another");
    let message = gone_result["message"]["text"].as_str().unwrap();
    assert!(message.contains(&format!("introduced in commit {}", &gone[..12])), "{message}");
    assert!(message.contains("still in the repository's history"), "{message}");
    // Any other bundle in an archive is reported under its own path.
    let artifact = tar(&[file("backup/repo.bundle", &bundle)]);
    let report = scan_bytes(&artifact, "x.tar", &Limits::default()).unwrap();
    assert_eq!(
        attributed(&report),
        [
            format!("backup/repo.bundle!/app.env:1:{added}:false"),
            format!("backup/repo.bundle!/gone.env:1:{gone}:true")
        ]
    );
}

#[test]
fn a_shallow_clone_scans_what_it_has() {
    let mut repo = Repo::new("shallow-src");
    repo.write("a.txt", &format!("{SECRET}\n"));
    repo.commit("One");
    repo.write("b.txt", "tok_cccccccccccccccc\n");
    let two = repo.commit("Two");
    let clone = repo.dir.with_file_name(format!("cella-git-{}-shallow", std::process::id()));
    let _ = std::fs::remove_dir_all(&clone);
    let url = format!("file://{}", repo.dir.display());
    git_in(&std::env::temp_dir(), &["clone", "-q", "--depth", "1", &url, clone.to_str().unwrap()], 0);
    let shallow = Repo { dir: clone, clock: 0 };
    let report = scan_bytes(&shallow.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    // The one commit it holds has both files: both attributed to it.
    assert_eq!(attributed(&report), [format!("a.txt:1:{two}:false"), format!("b.txt:1:{two}:false")]);
    let summary = report.history.as_ref().expect("a history summary");
    assert!(summary.partial, "a shallow clone's history is partial: {summary:?}");
    // A whole history is not.
    let whole = scan_bytes(&repo.bundle(&["--all"]), "repo.bundle", &Limits::default()).unwrap();
    assert!(!whole.history.as_ref().expect("a history summary").partial);
}

/// Hostile packs, written byte by byte.
mod hostile {
    use super::pack_writer::*;
    use super::*;

    fn refused(data: &[u8], limits: &Limits) -> HistoryProblem {
        match scan_bytes(data, "h.bundle", limits) {
            Err(ArtifactError::History { entry, problem }) => {
                assert_eq!(entry, "h.bundle");
                problem
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_cut_or_altered_pack_is_refused_by_its_checksum() {
        let good = bundle(&[object(BLOB, b"hello\n")], 1);
        assert!(scan_bytes(&good, "h.bundle", &Limits::default()).is_ok());
        assert_eq!(refused(&good[..good.len() - 7], &Limits::default()), HistoryProblem::PackChecksum);
        let mut flipped = good.clone();
        let at = flipped.len() - 25;
        flipped[at] ^= 1;
        assert_eq!(refused(&flipped, &Limits::default()), HistoryProblem::PackChecksum);
        // Announcing more objects than it holds.
        assert!(matches!(
            refused(&bundle(&[object(BLOB, b"hello\n")], 2), &Limits::default()),
            HistoryProblem::Truncated { .. }
        ));
    }

    #[test]
    fn extracting_a_bundle_checks_it_as_a_scan_does_and_yields_no_files() {
        let good = bundle(&[object(BLOB, b"hello\n")], 1);
        let mut files = Vec::new();
        let extract = |data: &[u8], files: &mut Vec<String>| {
            cella_scan::extract_artifact(
                &mut SliceSource(data),
                "h.bundle",
                "",
                &Limits::default(),
                1 << 20,
                |p, _| {
                    files.push(p.to_owned());
                    Ok(())
                },
            )
        };
        extract(&good, &mut files).unwrap();
        assert!(files.is_empty(), "{files:?}");
        let cut = &good[..good.len() - 5];
        match extract(cut, &mut files) {
            Err(ArtifactError::History { problem: HistoryProblem::PackChecksum, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_delta_base_out_of_range_is_refused() {
        let problem = refused(&base_out_of_range(), &Limits::default());
        assert!(matches!(problem, HistoryProblem::BaseOutOfRange { .. }), "{problem:?}");
    }

    #[test]
    fn a_delta_cycle_is_refused() {
        assert_eq!(
            refused(&delta_cycle(), &Limits::default()),
            HistoryProblem::UnresolvedDeltas { count: 2 }
        );
    }

    #[test]
    fn a_delta_copying_past_its_base_is_refused() {
        let base = object(BLOB, b"abc");
        let mut delta = header(OFS_DELTA, 5);
        delta.push(base.len() as u8);
        delta.extend(zlib(&[3, 4, 0x91, 2, 4]));
        let problem = refused(&bundle(&[base, delta], 2), &Limits::default());
        assert!(matches!(problem, HistoryProblem::BadDelta { .. }), "{problem:?}");
    }

    #[test]
    fn inflate_bombs_are_refused_within_limits() {
        // 100 MiB of zeros in one object: over the object limit, refused from its header.
        let zeros = vec![0u8; 100 << 20];
        let bomb = object(BLOB, &zeros);
        assert!(bomb.len() < 200 << 10);
        let problem = refused(&bundle(&[bomb], 1), &Limits::default());
        assert!(
            matches!(problem, HistoryProblem::ObjectTooLarge { size, .. } if size == 100 << 20),
            "{problem:?}"
        );
        // Many objects of 4 MiB each: the total inflated is capped.
        let four = object(BLOB, &zeros[..4 << 20]);
        let objects = vec![four; 8];
        let limits = Limits { max_history_inflated: 16 << 20, ..Limits::default() };
        assert_eq!(refused(&bundle(&objects, 8), &limits), HistoryProblem::InflatedTotal { limit: 16 << 20 });
        // A delta that rebuilds a huge object from a tiny one.
        let problem = refused(&delta_bomb(), &Limits::default());
        assert!(matches!(problem, HistoryProblem::ObjectTooLarge { .. }), "{problem:?}");
    }

    #[test]
    fn a_million_tiny_objects_are_refused_by_the_object_limit() {
        let tiny = object(BLOB, b"");
        let objects = vec![tiny; 1_000_000];
        let data = bundle(&objects, 1_000_000);
        assert_eq!(
            refused(&data, &Limits::default()),
            HistoryProblem::TooManyObjects { count: 1_000_000, limit: Limits::default().max_git_objects }
        );
        // Within the limit, such a pack is read (a debug build does ~40k objects a second).
        let data = bundle(&objects[..50_000], 50_000);
        let report = scan_bytes(&data, "h.bundle", &Limits::default()).unwrap();
        assert_eq!(report.history.unwrap().objects, 50_000);
    }

    #[test]
    fn a_damaged_bundle_in_an_archive_is_skipped_and_the_rest_scanned() {
        let good = bundle(&[object(BLOB, b"hello\n")], 1);
        let damaged = &good[..good.len() - 3];
        let secret = format!("{SECRET}\n");
        let artifact = tar(&[file("old.bundle", damaged), file("a.txt", secret.as_bytes())]);
        let report = scan_bytes(&artifact, "x.tar", &Limits::default()).unwrap();
        assert_eq!(triples(&report), ["a.txt:1:test-token"]);
        assert_eq!(report.skipped.len(), 1);
        assert!(report.skipped[0].reason.contains("checksum"), "{:?}", report.skipped);
    }
}

#[test]
fn versions_scanned_in_part_carry_their_bases_findings() {
    let mut repo = Repo::new("carry");
    let mut lines: Vec<String> =
        (0..600).map(|i| format!("filler line {i} with nothing in it at all")).collect();
    lines[300] = format!("token = {SECRET}");
    repo.write("big.txt", &(lines.join("\n") + "\n"));
    let first = repo.commit("First");
    for i in 0..6 {
        lines[10 + i * 50] = format!("changed line {i}");
        repo.write("big.txt", &(lines.join("\n") + "\n"));
        repo.commit(&format!("Change {i}"));
    }
    repo.git(&["repack", "-adf", "-q", "--depth=50", "--window=50"]);
    let bundle = repo.bundle(&["--all"]);
    let delta = scan_bytes(&bundle, "repo.bundle", &Limits::default()).unwrap();
    let whole =
        scan_bytes(&bundle, "repo.bundle", &Limits { history_delta_scan: false, ..Limits::default() })
            .unwrap();
    let summary = delta.history.as_ref().unwrap();
    assert!(summary.blobs_scanned_in_part >= 5, "{summary:?}");
    assert_eq!(attributed(&whole), [format!("big.txt:301:{first}:false")]);
    assert_eq!(attributed(&delta), attributed(&whole));
    assert_eq!(delta.findings, whole.findings);
}
