//! The CI recipes in `examples/ci/` run as written against a real `cella serve` (real jailed
//! microVMs as root): the GitHub Actions workflow's steps and the GitLab job's script are read
//! from their YAML (by a real YAML parser) and run by the shell, with the settings a team
//! would make (server URL, API key, CA, baseline) as the CI system would pass them and nothing
//! of the server's data folder; the pre-commit hook is installed in a repository and refuses a
//! commit that adds a live key. Each gate fails on a new finding and passes once it is
//! silenced (a stored baseline, an inline marker); the SARIF log each leaves is what GitHub
//! code scanning accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use cella_e2e::git;
use common::{cella, serve_jailed, tenant_key, test_db_url, Scratch};
use sarif_checks::checked_sarif;

/// A made-up Stripe-shaped live key (not a real one).
const LIVE_KEY: &str = "sk_live_9Tq2Wv7Lm4Rx8Kc1Zp6Hn3Yd";

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A recipe's YAML as JSON, read by PyYAML.
fn yaml(path: &Path) -> Value {
    let o = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(path)
        .output()
        .expect("python3 with PyYAML (scripts/setup.sh installs python3-yaml)");
    assert!(o.status.success(), "{}: {}", path.display(), err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The environment a CI runner gives a step: PATH with the `cella` under test (so a recipe's
/// install step finds it), an empty HOME, TMPDIR and data folder (nothing of the server's),
/// and `vars` as the recipe's settings.
fn runner(shell: &[&str], script: &str, cwd: &Path, home: &Path, vars: &BTreeMap<String, String>) -> Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_cella")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(shell[0]);
    cmd.args(&shell[1..]).arg(script).current_dir(cwd).env_clear();
    let tmp = home.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    cmd.env("PATH", path)
        .env("HOME", home)
        .env("TMPDIR", tmp)
        .env("CELLA_DATA_DIR", home.join("no-data-dir"));
    cmd.envs(vars);
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Replaces GitHub's `${{ secrets.NAME }}` and `${{ vars.NAME }}` with the settings (unset:
/// empty, as GitHub does).
fn github_expand(text: &str, secrets: &BTreeMap<&str, String>, vars: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed ${{") + start;
        let expr = rest[start + 3..end].trim();
        let value = match expr.split_once('.') {
            Some(("secrets", name)) => secrets.get(name).cloned().unwrap_or_default(),
            Some(("vars", name)) => vars.get(name).cloned().unwrap_or_default(),
            _ => panic!("the test knows no expression `{expr}`"),
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out + rest
}

/// What running a workflow job gave: each `run` step's output, and the SARIF file the upload
/// step would send.
struct JobRun {
    steps: Vec<(String, Output)>,
    uploaded: Option<PathBuf>,
}

impl JobRun {
    fn failed(&self) -> Option<&(String, Output)> {
        self.steps.iter().find(|(_, o)| !o.status.success())
    }
}

/// Runs the GitHub Actions job `job` of `workflow` in `checkout` as the runner would: the
/// job's env (expressions expanded), each `run` step by `bash -e`, steps after a failure only
/// if their `if:` says `always()`; `actions/checkout` is the folder given; the upload step's
/// `sarif_file` is recorded.
fn run_github_job(
    workflow: &Value,
    job: &str,
    checkout: &Path,
    home: &Path,
    secrets: &BTreeMap<&str, String>,
    vars: &BTreeMap<&str, String>,
) -> JobRun {
    let job = &workflow["jobs"][job];
    let mut env: BTreeMap<String, String> = job["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), github_expand(v.as_str().unwrap(), secrets, vars)))
        .collect();
    let temp = home.join("runner-temp");
    std::fs::create_dir_all(&temp).unwrap();
    env.insert("RUNNER_TEMP".into(), temp.to_str().unwrap().into());
    env.insert("GITHUB_WORKSPACE".into(), checkout.to_str().unwrap().into());
    let mut result = JobRun { steps: Vec::new(), uploaded: None };
    for step in job["steps"].as_array().unwrap() {
        let condition = step["if"].as_str().unwrap_or("success()");
        if result.failed().is_some() && !condition.contains("always()") {
            continue;
        }
        let uses = step["uses"].as_str().unwrap_or("");
        if let Some(script) = step["run"].as_str() {
            let name = step["name"].as_str().unwrap_or("run").to_owned();
            let o = runner(
                &["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"],
                script,
                checkout,
                home,
                &env,
            );
            result.steps.push((name, o));
        } else if uses.starts_with("actions/checkout@") {
            assert!(checkout.join(".git").is_dir());
        } else if uses.starts_with("github/codeql-action/upload-sarif@") {
            let file = checkout.join(step["with"]["sarif_file"].as_str().unwrap());
            // `hashFiles('cella.sarif') != ''`: uploaded only if the scan wrote it.
            result.uploaded = file.is_file().then_some(file);
        } else {
            panic!("the test knows no step {step}");
        }
    }
    result
}

/// A repository as the CI system checks it out: a live key in its config.
fn checkout(dir: &Path) -> PathBuf {
    let repo = dir.join("checkout");
    write(&repo, "config/prod.env", &format!("STRIPE_KEY={LIVE_KEY}\n"));
    write(&repo, "src/app.py", "print('hello')\n");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "app"]);
    repo
}

#[sqlx::test(migrations = "../migrations")]
async fn the_github_actions_workflow_gates_on_a_live_key_uploads_sarif_and_passes_with_a_baseline(
    pool: PgPool,
) {
    let dir = Scratch::new("ci-github");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let key = tenant_key(&server.data, "ci");
    let repo = checkout(&dir);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let workflow = yaml(&common::repo().join("examples/ci/github/cella.yml"));
    assert_eq!(workflow["permissions"]["security-events"], "write", "upload-sarif needs it");
    let secrets = BTreeMap::from([
        ("CELLA_API_KEY", key.clone()),
        ("CELLA_CA_PEM", String::from_utf8(server.ca.clone()).unwrap()),
    ]);
    let mut vars = BTreeMap::from([("CELLA_URL", server.url.clone())]);

    // The live key fails the check; the SARIF log is uploaded anyway.
    let run = run_github_job(&workflow, "scan", &repo, &home, &secrets, &vars);
    let (step, o) = run.failed().expect("the live key fails the check");
    assert_eq!((step.as_str(), o.status.code()), ("Scan with Cella", Some(1)), "{}", err(o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("config/prod.env:1"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let sarif = run.uploaded.expect("upload-sarif runs after a failed scan");
    let log = checked_sarif(&sarif);
    let results = log["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{log}");
    assert_eq!(results[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"], "config/prod.env");
    assert!(repo.join("cella-junit.xml").is_file());

    // The team accepts the finding (say, a key of a test account) with a stored baseline
    // named in the repository's variables: the check passes, the finding stays in the SARIF
    // log as suppressed.
    let baseline = dir.join("baseline.json");
    let o = cella(
        &server.data,
        Some(&key),
        &["baseline", "create", sarif.to_str().unwrap(), "--out", baseline.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", err(&o));
    let o =
        cella(&server.data, Some(&key), &["baseline", "push", baseline.to_str().unwrap(), "--name", "main"]);
    assert!(o.status.success(), "{}", err(&o));
    vars.insert("CELLA_BASELINE", "main".into());
    std::fs::remove_file(&sarif).unwrap();
    let run = run_github_job(&workflow, "scan", &repo, &home, &secrets, &vars);
    if let Some((step, o)) = run.failed() {
        panic!("{step}: {}\n{}", String::from_utf8_lossy(&o.stdout), err(o));
    }
    let log = checked_sarif(&run.uploaded.expect("uploaded"));
    assert_eq!(log["runs"][0]["results"][0]["suppressions"][0]["kind"], "external", "{log}");

    // Without the API key the step fails with the reason, not a finding.
    let run = run_github_job(&workflow, "scan", &repo, &home, &BTreeMap::new(), &vars);
    let (_, o) = run.failed().expect("no key, no scan");
    assert_ne!(o.status.code(), Some(1));
    assert!(err(o).contains("CELLA_API_KEY"), "{}", err(o));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_gitlab_job_gates_on_a_live_key_and_leaves_its_reports(pool: PgPool) {
    let dir = Scratch::new("ci-gitlab");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let key = tenant_key(&server.data, "ci");
    let repo = checkout(&dir);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let config = yaml(&common::repo().join("examples/ci/gitlab/.gitlab-ci.yml"));
    let job = &config["cella-scan"];
    // GitLab runs the script's lines in one shell and stops at the first that fails.
    let script: Vec<&str> = job["script"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let script = script.join("\n");
    // CELLA_CA as a variable of type File: the variable holds the path of a file.
    let ca = home.join("CELLA_CA");
    std::fs::write(&ca, &server.ca).unwrap();
    let vars = BTreeMap::from([
        ("CELLA_URL".to_owned(), server.url.clone()),
        ("CELLA_API_KEY".to_owned(), key.clone()),
        ("CELLA_CA".to_owned(), ca.to_str().unwrap().to_owned()),
    ]);
    let o = runner(&["sh", "-e", "-c"], &script, &repo, &home, &vars);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", String::from_utf8_lossy(&o.stdout), err(&o));
    // The reports it names are there (`when: always`), and read back.
    assert_eq!(job["artifacts"]["when"], "always");
    let junit = repo.join(job["artifacts"]["reports"]["junit"].as_str().unwrap());
    let text = std::fs::read_to_string(&junit).unwrap();
    let o = Command::new("python3")
        .args(["-c", "import sys, xml.etree.ElementTree as ET; r = ET.parse(sys.argv[1]).getroot(); print(sum(1 for c in r.iter('testcase') if c.find('failure') is not None))"])
        .arg(&junit)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1", "{text}");
    for path in job["artifacts"]["paths"].as_array().unwrap() {
        checked_sarif(&repo.join(path.as_str().unwrap()));
    }

    // A false positive marked on its line: the job passes.
    write(&repo, "config/prod.env", &format!("STRIPE_KEY={LIVE_KEY}  # cella:allow a test account's key\n"));
    let o = runner(&["sh", "-e", "-c"], &script, &repo, &home, &vars);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", String::from_utf8_lossy(&o.stdout), err(&o));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_pre_commit_hook_refuses_a_staged_live_key_and_lets_a_marked_one_through(pool: PgPool) {
    let dir = Scratch::new("ci-pre-commit");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let key = tenant_key(&server.data, "ci");
    let repo = dir.join("work");
    write(&repo, "README.md", "work\n");
    git(&repo, &["init", "-q", "-b", "main"]);
    let hook = repo.join(".git/hooks/pre-commit");
    std::fs::copy(common::repo().join("examples/ci/pre-commit/cella-pre-commit"), &hook).unwrap();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let ca = home.join("ca.pem");
    std::fs::write(&ca, &server.ca).unwrap();
    let vars = BTreeMap::from([
        ("CELLA_URL".to_owned(), server.url.clone()),
        ("CELLA_API_KEY".to_owned(), key.clone()),
        ("CELLA_CA".to_owned(), ca.to_str().unwrap().to_owned()),
    ]);
    let commit = |message: &str| {
        let script = format!("git -c user.name=T -c user.email=t@cella.invalid commit -qm '{message}'");
        runner(&["sh", "-c"], &script, &repo, &home, &vars)
    };
    let stage = |path: &str, text: &str| {
        write(&repo, path, text);
        git(&repo, &["add", path]);
    };

    stage("README.md", "clean\n");
    let o = commit("clean");
    assert!(o.status.success(), "a clean commit passes: {}", err(&o));

    // The staged version is what counts: the live key is staged, then removed from the work
    // tree only.
    stage("deploy.env", &format!("STRIPE_KEY={LIVE_KEY}\n"));
    std::fs::write(repo.join("deploy.env"), "STRIPE_KEY=\n").unwrap();
    let o = commit("key");
    assert!(!o.status.success(), "the staged key is refused");
    assert!(err(&o).contains("the commit was refused"), "{}", err(&o));
    // (git shows a hook's output on stderr.)
    assert!(err(&o).contains("deploy.env:1"), "{}", err(&o));
    assert_eq!(git(&repo, &["log", "--oneline"]).lines().count(), 1, "nothing committed");
    let temp: Vec<_> = std::fs::read_dir(home.join("tmp")).unwrap().collect();
    assert!(temp.is_empty(), "the hook leaves nothing in TMPDIR: {temp:?}");

    stage("deploy.env", &format!("STRIPE_KEY={LIVE_KEY}  # cella:allow sandbox account\n"));
    let o = commit("marked");
    assert!(o.status.success(), "a marked key passes: {}", err(&o));
    let left: Vec<_> = std::fs::read_dir(&repo).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().ends_with(".sarif")),
        "no SARIF log left in the work tree: {left:?}"
    );
}
