//! Git history end to end: `cella serve` and the `cella` command line as real processes, real
//! (jailed, as root) microVMs, a repository made by the test with the real `git`. `cella scan
//! REPO` sends the history with the work tree: a key that was committed and then deleted is
//! found and named with the commit that added it; a key still in the tree carries its commit;
//! what `.cellaignore` leaves out of the tree stays out of its history; `--history none`,
//! `--history since=REV` and a `.bundle` file given directly each scan what they say; deep delta
//! chains and a shallow clone are attributed exactly; hostile packs are refused by name.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/pack_writer/mod.rs"]
mod pack_writer;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use cella_e2e::git;
use common::{cella, serve_jailed, tenant_key, test_db_url, Scratch};
use sarif_checks::checked_sarif;

/// A Stripe-shaped live key for `n` (made up).
fn stripe_key(n: u32) -> String {
    const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut state = 0x85eb_ca6b_u32.wrapping_mul(n + 7);
    let tail: String = (0..24)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ALNUM[(state >> 24) as usize % ALNUM.len()] as char
        })
        .collect();
    format!("sk_live_{tail}")
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write(root: &Path, path: &str, body: &str) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

/// Each SARIF result as `path:line:commit:onlyInHistory` (`-` without history), sorted.
fn attributed(log: &Value) -> Vec<String> {
    let mut out: Vec<String> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ruleId"] == "stripe-secret-key")
        .map(|r| {
            let loc = &r["locations"][0]["physicalLocation"];
            let at = format!(
                "{}:{}",
                loc["artifactLocation"]["uri"].as_str().unwrap(),
                loc["region"]["startLine"]
            );
            match r["properties"].get("history") {
                Some(h) => format!("{at}:{}:{}", h["commit"].as_str().unwrap(), h["onlyInHistory"]),
                None => format!("{at}:-"),
            }
        })
        .collect();
    out.sort();
    out
}

#[sqlx::test(migrations = "../migrations")]
async fn a_deleted_key_is_found_in_history_with_the_commit_that_added_it(pool: PgPool) {
    let dir = Scratch::new("history-e2e");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "hist");

    let repo = dir.join("shop");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    write(&repo, "README.md", "# shop\n");
    write(&repo, ".cellaignore", "fixtures/\n");
    write(&repo, "fixtures/fake.env", &format!("KEY={}\n", stripe_key(1)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Start"]);
    write(&repo, "config/payments.env", &format!("# payments\nSTRIPE_KEY={}\n", stripe_key(2)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Add payments config"]);
    let added = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::remove_file(repo.join("config/payments.env")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Remove the payments config"]);
    let removed = git(&repo, &["rev-parse", "HEAD"]);
    write(&repo, "app/keep.env", &format!("STRIPE_KEY={}\n", stripe_key(3)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Add the app key"]);
    let kept = git(&repo, &["rev-parse", "HEAD"]);

    // The default: the work tree and all of its history.
    let sarif = dir.join("all.sarif");
    let json = dir.join("all.json");
    let o = cella(
        &data,
        Some(&key),
        &[
            "scan",
            repo.to_str().unwrap(),
            "--sarif",
            sarif.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("sending the git history too: 4 commit(s)"), "{}", text(&o));
    assert!(text(&o).contains("history: 4 commits, "), "{}", text(&o));
    let log = checked_sarif(&sarif);
    assert_eq!(
        attributed(&log),
        [format!("app/keep.env:1:{kept}:false"), format!("config/payments.env:2:{added}:true")],
        "fixtures/ (.cellaignore) stays out of the history too"
    );
    let gone = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["properties"]["history"]["commit"] == added.as_str())
        .unwrap();
    assert_eq!(gone["properties"]["history"]["subject"], "Add payments config");
    assert_eq!(gone["properties"]["history"]["author"], "Cella Test <test@cella.invalid>");
    assert!(gone["message"]["text"].as_str().unwrap().contains("still in the repository's history"));
    // The table names the short commit; the JSON carries it whole; the summary the history.
    assert!(text(&o).contains(&format!("config/payments.env:2 @{} (history)", &added[..7])), "{}", text(&o));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let history = &report["summary"]["history"];
    assert_eq!(
        (history["commits"].as_u64(), history["partial"].as_bool()),
        (Some(4), Some(false)),
        "{history}"
    );
    assert!(report["findings"].as_array().unwrap().iter().any(|f| f["history"]["commit"] == kept.as_str()));

    // --history none: the work tree only.
    let none = dir.join("none.sarif");
    let o = cella(
        &data,
        Some(&key),
        &["scan", repo.to_str().unwrap(), "--history", "none", "--sarif", none.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(attributed(&checked_sarif(&none)), ["app/keep.env:1:-"]);

    // --history since=REV: only what is new since the removal.
    let since = dir.join("since.sarif");
    let rev = format!("since={removed}");
    let o = cella(
        &data,
        Some(&key),
        &["scan", repo.to_str().unwrap(), "--history", &rev, "--sarif", since.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("1 commit(s)"), "{}", text(&o));
    assert_eq!(attributed(&checked_sarif(&since)), [format!("app/keep.env:1:{kept}:false")]);

    // A bad revision is told before anything is sent.
    let o = cella(&data, Some(&key), &["scan", repo.to_str().unwrap(), "--history", "since=no-such-rev"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--history"), "{}", text(&o));

    // A bundle given directly: its history, at the repository's own paths.
    let bundle = dir.join("shop.bundle");
    git(&repo, &["bundle", "create", "-q", bundle.to_str().unwrap(), "--all"]);
    let direct = dir.join("bundle.sarif");
    let o =
        cella(&data, Some(&key), &["scan", bundle.to_str().unwrap(), "--sarif", direct.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        attributed(&checked_sarif(&direct)),
        [
            format!("app/keep.env:1:{kept}:false"),
            format!("config/payments.env:2:{added}:true"),
            format!("fixtures/fake.env:1:{}:false", git(&repo, &["rev-list", "--max-parents=0", "HEAD"])),
        ]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_large_repository_is_scanned_on_a_helper_vcpu_restored_from_the_template(pool: PgPool) {
    let dir = Scratch::new("history-e2e-helper");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "hist-helper");

    // 120 files edited over 10 commits, a key added and removed on the way, and 9 MiB of
    // assets beside them: the artifact is large enough for a helper vCPU, and the history has
    // enough versions for the scan to share them out.
    let repo = dir.join("big");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut added = String::new();
    for rev in 0..10u64 {
        for file in (0..120u64).filter(|f| rev == 0 || (f + rev) % 4 == 0) {
            write(&repo, &format!("src/m{}/f{file}.txt", file % 10), &cella_e2e::file_version(file, rev));
        }
        match rev {
            3 => write(&repo, "config/payments.env", &format!("STRIPE_KEY={}\n", stripe_key(40))),
            7 => std::fs::remove_file(repo.join("config/payments.env")).unwrap(),
            _ => {}
        }
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", &format!("Revision {rev}")]);
        if rev == 3 {
            added = git(&repo, &["rev-parse", "HEAD"]);
        }
    }
    std::fs::create_dir_all(repo.join("assets")).unwrap();
    std::fs::write(repo.join("assets/blob.bin"), vec![0u8; 9 << 20]).unwrap();

    let sarif = dir.join("big.sarif");
    let o = cella(&data, Some(&key), &["scan", repo.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(attributed(&checked_sarif(&sarif)), [format!("config/payments.env:1:{added}:true")]);
    let vm: Value =
        sqlx::query_scalar("SELECT vm FROM jobs WHERE state = 'succeeded'").fetch_one(&pool).await.unwrap();
    assert_eq!(vm["vcpus"], 2, "{vm}");
    assert_eq!(vm["built_ahead"], true, "{vm}");
    assert_eq!(vm["template"].as_str().map(str::len), Some(64), "{vm}");
}

#[sqlx::test(migrations = "../migrations")]
async fn branches_tags_renames_a_bare_clone_and_a_baseline_through_the_service(pool: PgPool) {
    let dir = Scratch::new("history-e2e-2");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "hist2");

    let repo = dir.join("svc");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    write(&repo, "README.md", "# svc\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Start"]);
    // Only on a side branch.
    git(&repo, &["checkout", "-q", "-b", "experiment"]);
    write(&repo, "exp/try.env", &format!("STRIPE_KEY={}\n", stripe_key(10)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Try the new key"]);
    let side = git(&repo, &["rev-parse", "HEAD"]);
    // Only behind an annotated tag (its branch deleted).
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["checkout", "-q", "-b", "release"]);
    write(&repo, "deploy/prod.env", &format!("STRIPE_KEY={}\n", stripe_key(11)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Release config"]);
    let tagged = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["tag", "-a", "v1.0", "-m", "v1.0"]);
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["branch", "-q", "-D", "release"]);
    // Added, then renamed: the commit that added it.
    write(&repo, "old/name.env", &format!("STRIPE_KEY={}\n", stripe_key(12)));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "Add the key"]);
    let added = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["mv", "old/name.env", "new.env"]);
    git(&repo, &["commit", "-qm", "Rename"]);

    let sarif = dir.join("svc.sarif");
    let o = cella(&data, Some(&key), &["scan", repo.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let found = attributed(&checked_sarif(&sarif));
    assert_eq!(
        found,
        [
            format!("deploy/prod.env:1:{tagged}:true"),
            format!("exp/try.env:1:{side}:true"),
            "new.env:1:-".to_owned(),
            format!("old/name.env:1:{added}:false"),
        ]
    );

    // A bare clone is sent as its history.
    let bare = dir.join("svc.git");
    git(&dir, &["clone", "-q", "--bare", repo.to_str().unwrap(), bare.to_str().unwrap()]);
    git(&bare, &["fetch", "-q", "origin", "refs/heads/*:refs/heads/*", "refs/tags/*:refs/tags/*"]);
    let bare_sarif = dir.join("bare.sarif");
    let o =
        cella(&data, Some(&key), &["scan", bare.to_str().unwrap(), "--sarif", bare_sarif.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is a bare git repository"), "{}", text(&o));
    assert_eq!(
        attributed(&checked_sarif(&bare_sarif)),
        [
            format!("deploy/prod.env:1:{tagged}:true"),
            format!("exp/try.env:1:{side}:true"),
            format!("old/name.env:1:{added}:false"),
        ]
    );

    // A baseline made from the scan silences history findings too: the gate passes.
    let baseline = dir.join("baseline.json");
    let o = cella(
        &data,
        Some(&key),
        &["baseline", "create", sarif.to_str().unwrap(), "--out", baseline.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o =
        cella(&data, Some(&key), &["scan", repo.to_str().unwrap(), "--baseline", baseline.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("4 finding(s) (4 suppressed)"), "{}", text(&o));
}

#[sqlx::test(migrations = "../migrations")]
async fn deep_delta_chains_a_shallow_clone_and_a_damaged_bundle_through_the_service(pool: PgPool) {
    let dir = Scratch::new("history-e2e-3");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "hist3");

    // One file edited in 60 commits: a key added in the 10th stays; one added in the 30th is
    // removed in the 40th. Repacked so that the versions are delta chains up to 50 deep.
    let repo = dir.join("conf");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let (kept, gone) = (format!("STRIPE_KEY={}\n", stripe_key(20)), format!("OLD_KEY={}\n", stripe_key(21)));
    let mut body = String::from("# settings\n");
    let mut commits = Vec::new();
    for i in 1..=60 {
        body.push_str(&format!("setting_{i} = {}\n", i * 7));
        match i {
            10 => body.push_str(&kept),
            30 => body.push_str(&gone),
            40 => body = body.replace(&gone, ""),
            _ => {}
        }
        write(&repo, "conf/app.conf", &body);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", &format!("Edit {i}")]);
        commits.push(git(&repo, &["rev-parse", "HEAD"]));
    }
    git(&repo, &["repack", "-q", "-a", "-d", "-f", "--depth=50", "--window=250"]);
    let sarif = dir.join("deep.sarif");
    let o = cella(&data, Some(&key), &["scan", repo.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("history: 60 commits"), "{}", text(&o));
    assert_eq!(
        attributed(&checked_sarif(&sarif)),
        [format!("conf/app.conf:12:{}:false", commits[9]), format!("conf/app.conf:33:{}:true", commits[29])]
    );

    // A shallow clone of the last 5 commits: what it holds is scanned, and it says so. The kept
    // key is named with the oldest commit the clone has.
    let shallow = dir.join("shallow");
    let url = format!("file://{}", repo.display());
    git(&dir, &["clone", "-q", "--depth", "5", &url, shallow.to_str().unwrap()]);
    let sarif = dir.join("shallow.sarif");
    let o =
        cella(&data, Some(&key), &["scan", shallow.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("partial: history before the bundle's first commits was not scanned"),
        "{}",
        text(&o)
    );
    assert_eq!(attributed(&checked_sarif(&sarif)), [format!("conf/app.conf:12:{}:false", commits[55])]);

    // A bundle whose pack was altered is refused, and says why.
    let bundle = dir.join("conf.bundle");
    git(&repo, &["bundle", "create", bundle.to_str().unwrap(), "--all"]);
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&bundle, &bytes).unwrap();
    let o = cella(&data, Some(&key), &["scan", bundle.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("checksum"), "{}", text(&o));
}

#[sqlx::test(migrations = "../migrations")]
async fn hostile_packs_are_refused_by_name_through_the_service(pool: PgPool) {
    use pack_writer::{base_out_of_range, bundle, delta_bomb, delta_cycle, object, BLOB};

    let dir = Scratch::new("history-e2e-4");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "hist4");

    // 100 MiB of zeros in one object (a few KiB packed).
    let bomb = object(BLOB, &vec![0u8; 100 << 20]);
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("range", base_out_of_range(), "names a base that is not an earlier object"),
        ("cycle", delta_cycle(), "a delta cycle"),
        ("bomb", bundle(&[bomb], 1), "over the 67108864-byte object limit"),
        ("delta-bomb", delta_bomb(), "over the 67108864-byte object limit"),
        ("million", bundle(&[], 1_000_000), "holds 1000000 objects, over the limit of 500000"),
        ("short", bundle(&[object(BLOB, b"hello\n")], 2), "its pack is truncated"),
    ];
    for (name, bytes, says) in cases {
        let path = dir.join(&format!("{name}.bundle"));
        std::fs::write(&path, bytes).unwrap();
        let o = cella(&data, Some(&key), &["scan", path.to_str().unwrap()]);
        assert!(!o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains(says), "{name}: {}", text(&o));
    }
}
