//! `cella scan PATH`: pack a folder (or take a file), upload it with progress, wait for the job,
//! print a findings table, write the SARIF log, and exit by the worst unsuppressed finding's
//! severity (a result the scan suppressed, inline or by baseline, never fails the gate).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cella_scan::Confidence;
use clap::{Args, ValueEnum};
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::history::History;

/// Excludes a job takes (the service's limit).
const MAX_EXCLUDES: usize = 256;
use super::{ignore, report, ApiClient, ClientError, Connection};

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// A folder (packed as tar) or a file (tar, tar.gz, zip or any single file)
    pub path: PathBuf,
    /// Rule packs, comma-separated: built-in (secrets, pii, licenses) and yours (NAME: its latest
    /// version; NAME@VERSION) [default: your default policy, else the server's]
    #[arg(long)]
    pub policy: Option<String>,
    /// One of your packs to add to the policy: NAME (its latest version) or NAME@VERSION
    /// (repeatable)
    #[arg(long = "pack", value_name = "NAME[@VERSION]")]
    pub packs: Vec<String>,
    /// What to print on stdout: a table, JSON, the SARIF log, CSV or JUnit XML
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Where to write the SARIF log [default: cella-<job id>.sarif]
    #[arg(long, value_name = "FILE")]
    pub sarif: Option<PathBuf>,
    /// Also write the findings as JSON here
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the findings as CSV here
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Also write the findings as JUnit XML here (a test case per finding; those at or above
    /// --fail-on fail)
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Exit 1 if an unsuppressed finding at or above this level exists
    #[arg(long, value_enum, default_value_t = Level::Error)]
    pub fail_on: Level,
    /// The least confidence a finding needs to count for --fail-on: a provider's own token
    /// format is high, a generic rule's finding or a validated card number medium, an e-mail
    /// address low, and a finding in a test or example folder one step lower
    #[arg(long, default_value = "medium", value_parser = confidence_parser())]
    pub min_confidence: Confidence,
    /// Reuse a job if this key was sent before with the same artifact (safe retries)
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Give up waiting after this many seconds (the job keeps running)
    #[arg(long, default_value_t = 900)]
    pub wait_secs: u64,
    /// Suppress the findings of this baseline: a baseline file or SARIF log (stored in the
    /// service first, once), or the name or id of one stored before (`cella baseline push`)
    #[arg(long, value_name = "FILE|NAME")]
    pub baseline: Option<String>,
    /// Do not scan files matching this gitignore-like glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Report licenses of these SPDX identifiers at `error` (so `--fail-on error` fails on
    /// them): `AGPL-3.0` (also its `-only`, `-or-later` and `+` forms) or a prefix ending in `*`;
    /// comma-separated or repeated. An expression is judged as a whole: `MIT OR AGPL-3.0-only`
    /// is allowed
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub license_deny: Vec<String>,
    /// Report licenses of these SPDX identifiers at `warning` at least (as --license-deny)
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub license_flag: Vec<String>,
    /// Send every file of a folder (but .git/), ignoring .gitignore, .git/info/exclude and
    /// .cellaignore
    #[arg(long)]
    pub no_ignore: bool,
    /// The git history to scan with a repository's work tree (PATH its root): `all` (every
    /// branch and tag), `since=REV` (only commits REV does not hold: for CI), `branch=NAME`, or
    /// `none`. Each finding in history names the commit that introduced it
    #[arg(long, value_name = "WHICH", default_value = "all", value_parser = clap::value_parser!(History))]
    pub history: History,
    /// PATH is a container image: a `docker save` archive, or an OCI image layout (a tar, or
    /// its folder). Every layer is scanned, each finding named with its layer and the build
    /// step that added it; an archive that holds no image is an error. (An image archive is
    /// recognised without it too.)
    #[arg(long)]
    pub image: bool,
    /// The repository URI for the SARIF log [default: the folder's git `origin`, if any]
    #[arg(long, value_name = "URI")]
    pub vcs_repo: Option<String>,
    /// The revision [default: the folder's git HEAD]
    #[arg(long, value_name = "REV")]
    pub vcs_revision: Option<String>,
    /// The branch [default: the folder's git branch]
    #[arg(long, value_name = "BRANCH")]
    pub vcs_branch: Option<String>,
    #[command(flatten)]
    pub conn: Connection,
}

/// A git remote as a repository URI for a SARIF log: `scheme://host/path` without user or
/// password, `user@host:path` (scp form) as `https://host/path`, no `.git` suffix; `None` for
/// anything else (a local path).
fn repository_uri(remote: &str) -> Option<String> {
    let remote = remote.trim().trim_end_matches('/').trim_end_matches(".git");
    if let Some((scheme, rest)) = remote.split_once("://") {
        if !matches!(scheme, "https" | "http" | "ssh") {
            return None;
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit('@').next().unwrap_or(authority);
        return Some(format!("{scheme}://{host}/{path}"));
    }
    let (user_host, path) = remote.split_once(':')?;
    if user_host.contains('/') || path.is_empty() {
        return None;
    }
    let host = user_host.rsplit('@').next().unwrap_or(user_host);
    Some(format!("https://{host}/{}", path.trim_start_matches('/')))
}

/// Where a folder came from, if it is a git work tree: its `origin` (made an `https://` URI
/// where git's `user@host:path` form allows), HEAD and branch.
fn git_provenance(dir: &Path) -> (Option<String>, Option<String>, Option<String>) {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    if git(&["rev-parse", "--is-inside-work-tree"]).as_deref() != Some("true") {
        return (None, None, None);
    }
    let repo = git(&["remote", "get-url", "origin"]).and_then(|url| repository_uri(&url));
    let branch = git(&["rev-parse", "--abbrev-ref", "HEAD"]).filter(|b| b != "HEAD");
    (repo, git(&["rev-parse", "HEAD"]), branch)
}

/// What `cella scan` prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Sarif,
    Csv,
    Junit,
}

/// SARIF result levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Level {
    Note,
    Warning,
    Error,
    /// Never fail on findings
    Never,
}

impl Level {
    fn of(sarif_level: &str) -> Level {
        match sarif_level {
            "error" => Level::Error,
            "warning" => Level::Warning,
            _ => Level::Note,
        }
    }
}

/// `--min-confidence`: one of [`Confidence::NAMES`].
fn confidence_parser() -> impl clap::builder::TypedValueParser<Value = Confidence> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Confidence::NAMES)
        .map(|name| Confidence::parse(&name).unwrap_or(Confidence::Medium))
}

/// A SARIF result's confidence (`properties.confidence`); a result without one (a log from
/// before confidences) counts as high.
fn confidence_of(row: &report::Row) -> Confidence {
    Confidence::parse(&row.confidence).unwrap_or(Confidence::High)
}

/// What a scan found, for the exit status.
#[derive(Debug)]
pub struct ScanReport {
    pub job_id: String,
    pub findings: usize,
    /// Findings the scan suppressed (inline marker, baseline).
    pub suppressed: usize,
    /// Unsuppressed findings at or above `--fail-on`.
    pub at_threshold: usize,
}

/// Packs `dir` into a tar file in the system's temporary folder, its paths relative to `dir`
/// (so SARIF paths are the repository's own), leaving out `.git/` and what the ignore files
/// name unless `no_ignore` (see [`ignore`]); symbolic links kept as links (the scanner refuses
/// links that leave the archive); sparse files written whole. Says on stderr what it left out.
fn pack(
    dir: &Path,
    no_ignore: bool,
    history: &History,
) -> Result<(tempfile_path::TempPath, String, Vec<String>), ClientError> {
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "artifact".to_owned());
    let walked = ignore::walk(dir, no_ignore).map_err(|e| ClientError::Read(dir.to_owned(), e))?;
    for (file, line, why) in &walked.bad_patterns {
        eprintln!("cella scan: {file}:{line}: not a pattern, ignored: {why}");
    }
    let path = tempfile_path::TempPath::new(&format!("cella-scan-{}-{}.tar", std::process::id(), name));
    let file =
        std::fs::File::create(path.path()).map_err(|e| ClientError::Write(path.path().to_owned(), e))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    // A sparse file goes whole: the scanner reads plain entries.
    tar.sparse(false);
    // The history first: the scanner joins it to the tree's findings once it has both.
    let mut history_excludes = Vec::new();
    if let Some(bundle) = super::history::bundle(dir, history, &name)? {
        // What the ignore files leave out of the tree is left out of its history too.
        history_excludes = walked
            .skipped
            .iter()
            .filter(|(_, why)| *why == ignore::IGNORED)
            .filter_map(|(path, _)| super::history::anchored_glob(path))
            .collect();
        let size = std::fs::metadata(bundle.file.path()).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "cella scan: sending the git history too: {} commit(s), {:.1} MB (--history none leaves it out)",
            bundle.commits,
            size as f64 / 1e6
        );
        tar.append_path_with_name(bundle.file.path(), cella_scan::HISTORY_ENTRY)
            .map_err(|e| ClientError::Read(bundle.file.path().to_owned(), e))?;
    }
    for (disk, rel) in walked.dirs.iter().chain(&walked.files) {
        tar.append_path_with_name(disk, rel).map_err(|e| ClientError::Read(disk.clone(), e))?;
    }
    let inner = tar.into_inner().map_err(|e| ClientError::Write(path.path().to_owned(), e))?;
    inner
        .into_inner()
        .map_err(|e| ClientError::Write(path.path().to_owned(), e.into_error()))?
        .sync_all()
        .ok();
    if !walked.skipped.is_empty() {
        let shown: Vec<&str> = walked.skipped.iter().take(8).map(|(p, _)| p.as_str()).collect();
        let more = walked.skipped.len().saturating_sub(shown.len());
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        eprintln!(
            "cella scan: left out {} path(s) (.git/, .gitignore, .git/info/exclude, .cellaignore; --no-ignore sends all but .git/): {}{more}",
            walked.skipped.len(),
            shown.join(", ")
        );
    }
    Ok((path, format!("{name}.tar"), history_excludes))
}

pub(crate) mod tempfile_path {
    use std::path::{Path, PathBuf};

    /// A file in the temporary folder, removed when dropped.
    #[derive(Debug)]
    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn new(name: &str) -> Self {
            Self(std::env::temp_dir().join(name))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Uploads `file` as the body of `POST path?query`, with a progress line on a terminal (jobs,
/// sessions and files added to a session).
pub(crate) async fn upload(
    client: &ApiClient,
    path: &str,
    file: &Path,
    query: &[(&str, String)],
    headers: &[(&str, String)],
) -> Result<Value, ClientError> {
    let size = std::fs::metadata(file).map_err(|e| ClientError::Read(file.to_owned(), e))?.len();
    let reader = tokio::fs::File::open(file).await.map_err(|e| ClientError::Read(file.to_owned(), e))?;
    let sent = Arc::new(AtomicU64::new(0));
    let progress = Progress::new(size, sent.clone());
    let stream = futures_util::stream::unfold((reader, sent), |(mut reader, sent)| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                sent.fetch_add(n as u64, Ordering::Relaxed);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), (reader, sent)))
            }
            Err(e) => Some((Err(e), (reader, sent))),
        }
    });
    let mut request = client
        .request(Method::POST, path)
        .query(query)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let ticker = progress.spawn();
    let result = client.send(request).await;
    ticker.abort();
    progress.finish();
    result?.json().await.map_err(|e| ClientError::Http(client.base().to_owned(), e))
}

/// What `cella scan` uploads.
#[derive(Debug)]
pub(crate) struct Artifact {
    /// The packed tar of a folder, removed when dropped.
    pub _packed: Option<tempfile_path::TempPath>,
    /// The file to upload.
    pub file: PathBuf,
    /// Its name in the job.
    pub name: String,
    /// Excludes that keep what the ignore files left out of the tree out of its history
    /// (anchored paths), when the history goes with it.
    pub history_excludes: Vec<String>,
}

/// A folder packed as tar (removed when dropped), or the file itself; and its name.
pub(crate) fn artifact(path: &Path, no_ignore: bool, history: &History) -> Result<Artifact, ClientError> {
    let meta = std::fs::metadata(path).map_err(|e| ClientError::Read(path.to_owned(), e))?;
    if meta.is_dir() && *history != History::None {
        // A bare repository is its history: sent as a bundle.
        if let Some(bundle) = super::history::bare_bundle(path, history)? {
            let name = std::fs::canonicalize(path)
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().trim_end_matches(".git").to_owned()))
                .unwrap_or_else(|| "repository".to_owned());
            eprintln!(
                "cella scan: {} is a bare git repository: sending its history ({} commit(s))",
                path.display(),
                bundle.commits
            );
            let file = bundle.file.path().to_owned();
            return Ok(Artifact {
                _packed: Some(bundle.file),
                file,
                name: format!("{name}.bundle"),
                history_excludes: Vec::new(),
            });
        }
    }
    if meta.is_dir() {
        let (tmp, name, history_excludes) = pack(path, no_ignore, history)?;
        let file = tmp.path().to_owned();
        Ok(Artifact { _packed: Some(tmp), file, name, history_excludes })
    } else {
        let name = path.file_name().map_or_else(|| "artifact".into(), |n| n.to_string_lossy().into_owned());
        Ok(Artifact { _packed: None, file: path.to_owned(), name, history_excludes: Vec::new() })
    }
}

/// An upload progress line on stderr (only on a terminal).
#[derive(Debug, Clone)]
struct Progress {
    total: u64,
    sent: Arc<AtomicU64>,
    tty: bool,
}

impl Progress {
    fn new(total: u64, sent: Arc<AtomicU64>) -> Self {
        Self { total, sent, tty: std::io::stderr().is_terminal() }
    }

    fn draw(&self) {
        let sent = self.sent.load(Ordering::Relaxed).min(self.total);
        let pct = (sent * 100).checked_div(self.total).unwrap_or(100);
        let bar = "#".repeat((pct / 5) as usize);
        eprint!("\ruploading [{bar:<20}] {pct:>3}% {}/{} KiB", sent / 1024, self.total / 1024);
        let _ = std::io::stderr().flush();
    }

    fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            if !me.tty {
                return;
            }
            loop {
                me.draw();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn finish(&self) {
        if self.tty {
            self.draw();
            eprintln!();
        }
    }
}

/// The policy the job will run, checked with the server before anything is packed or
/// uploaded: `--policy` (else the tenant's default) with the `--pack`s added, resolved to
/// built-in packs and exact versions of the tenant's (sent as such, so the job runs what was
/// checked).
async fn checked_policy(
    client: &ApiClient,
    policy: Option<&str>,
    packs: &[String],
) -> Result<String, ClientError> {
    let resolve = |policy: Option<String>| async move {
        let mut request = client.request(Method::GET, "/v1/tenant/policy");
        if let Some(p) = &policy {
            request = request.query(&[("policy", p)]);
        }
        let resolved: Value = client
            .send(request)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Http(client.base().to_owned(), e))?;
        let names: Vec<String> = resolved["policy"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        Ok::<_, ClientError>(names)
    };
    let mut names = match policy {
        Some(p) => vec![p.to_owned()],
        None if packs.is_empty() => return Ok(resolve(None).await?.join(",")),
        None => resolve(None).await?,
    };
    names.extend(packs.iter().cloned());
    Ok(resolve(Some(names.join(","))).await?.join(","))
}

/// Runs `cella scan`.
pub async fn run(args: &ScanArgs) -> Result<ScanReport, ClientError> {
    let client = args.conn.tenant()?;
    let policy = checked_policy(&client, args.policy.as_deref(), &args.packs).await?;
    if let Some(bad) = args.exclude.iter().find(|g| g.contains(',')) {
        return Err(ClientError::Usage(format!("--exclude {bad:?}: a glob cannot hold a comma")));
    }
    // An image folder (an OCI layout) is sent whole: no ignore files, no history.
    let (no_ignore, history) = match args.image {
        true => (true, History::None),
        false => (args.no_ignore, args.history.clone()),
    };
    let packed = artifact(&args.path, no_ignore, &history)?;
    let file = packed.file.clone();
    let mut query = vec![("name", packed.name.clone()), ("policy", policy)];
    let mut excludes = args.exclude.clone();
    let room = MAX_EXCLUDES.saturating_sub(excludes.len());
    if packed.history_excludes.len() > room {
        eprintln!(
            "cella scan: the ignore files leave out {} paths, more than the {room} excludes left for a job: the history of the rest is scanned",
            packed.history_excludes.len()
        );
    }
    excludes.extend(packed.history_excludes.iter().take(room).cloned());
    if !excludes.is_empty() {
        query.push(("exclude", excludes.join(",")));
    }
    // Checked before the upload: a mistake is told at once.
    cella_scan::spdx::LicensePolicy::new(&args.license_deny, &args.license_flag)
        .map_err(|e| ClientError::Usage(format!("--license-deny/--license-flag: {e}")))?;
    for (key, ids) in [("license_deny", &args.license_deny), ("license_flag", &args.license_flag)] {
        if !ids.is_empty() {
            query.push((key, ids.join(",")));
        }
    }
    if let Some(baseline) = &args.baseline {
        // A file is stored first (content-addressed: the same file stores once); anything else
        // names a baseline the service keeps.
        let id = if Path::new(baseline).is_file() {
            let stored = super::baseline::push(&args.conn, Path::new(baseline), None).await?;
            stored["id"].as_str().unwrap_or_default().to_owned()
        } else {
            baseline.clone()
        };
        query.push(("baseline", id));
    }
    let (repo, revision, branch) =
        if args.path.is_dir() { git_provenance(&args.path) } else { (None, None, None) };
    let repo = args.vcs_repo.clone().or(repo);
    if let Some(repo) = repo {
        query.push(("vcs_repo", repo));
        if let Some(revision) = args.vcs_revision.clone().or(revision) {
            query.push(("vcs_revision", revision));
        }
        if let Some(branch) = args.vcs_branch.clone().or(branch) {
            query.push(("vcs_branch", branch));
        }
    }
    let headers: Vec<(&str, String)> =
        args.idempotency_key.iter().map(|k| ("Idempotency-Key", k.clone())).collect();
    let job = upload(&client, "/v1/jobs", &file, &query, &headers).await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    eprintln!("job {id} submitted ({} bytes, policy {})", job["artifact"]["bytes"], job["policy"]);
    let job = wait(&client, &id, Duration::from_secs(args.wait_secs), true).await?;
    let state = job["state"].as_str().unwrap_or("?");
    if state != "succeeded" {
        let reason = job["error"].as_str().unwrap_or("no reason given");
        return Err(ClientError::Other(format!("job {id} {state}: {reason}")));
    }
    let sarif = client.bytes(&format!("/v1/jobs/{id}/sarif")).await?;
    let out = args.sarif.clone().unwrap_or_else(|| PathBuf::from(format!("cella-{id}.sarif")));
    write_file(&out, &sarif)?;
    let log: Value = serde_json::from_slice(&sarif)
        .map_err(|e| ClientError::Other(format!("the SARIF log is not JSON: {e}")))?;
    let results = log["runs"][0]["results"].as_array().cloned().unwrap_or_default();
    let rows = report::rows(&results);
    let gate =
        |r: &report::Row| Level::of(&r.level) >= args.fail_on && confidence_of(r) >= args.min_confidence;
    let at_threshold = rows.iter().filter(|r| r.suppressed.is_none() && gate(r)).count();
    let below_confidence = rows
        .iter()
        .filter(|r| {
            r.suppressed.is_none()
                && Level::of(&r.level) >= args.fail_on
                && confidence_of(r) < args.min_confidence
        })
        .count();
    let suppressed = rows.iter().filter(|r| r.suppressed.is_some()).count();
    let summary = client.json(Method::GET, &format!("/v1/jobs/{id}/summary")).await.unwrap_or(Value::Null);
    if let Ok(history) = serde_json::from_value::<cella_scan::HistorySummary>(summary["history"].clone()) {
        eprintln!("{history}");
    }
    match serde_json::from_value::<cella_scan::ImageSummary>(summary["image"].clone()) {
        Ok(image) => eprintln!("{image}"),
        Err(_) if args.image => {
            return Err(ClientError::Usage(format!(
                "--image: {} holds no container image (a `docker save` archive or an OCI image layout: manifest.json or index.json and the layer blobs they name); its files were scanned as a plain archive in job {id}",
                args.path.display()
            )))
        }
        Err(_) => {}
    }
    if let Some(path) = &args.json {
        write_file(path, report::json(&id, &summary, &rows).as_bytes())?;
    }
    if let Some(path) = &args.csv {
        write_file(path, report::csv(&rows).as_bytes())?;
    }
    if let Some(path) = &args.junit {
        write_file(path, report::junit(&id, &rows, gate).as_bytes())?;
    }
    match args.format {
        Format::Table => print!("{}", report::table(&rows)),
        Format::Json => print!("{}", report::json(&id, &summary, &rows)),
        Format::Sarif => {
            std::io::stdout().write_all(&sarif).map_err(|e| ClientError::Write("stdout".into(), e))?
        }
        Format::Csv => print!("{}", report::csv(&rows)),
        Format::Junit => print!("{}", report::junit(&id, &rows, gate)),
    }
    // Entries the guest could not read (a damaged nested archive, an encrypted zip entry) were
    // not scanned: said on stderr, so every format's stdout stays what it is.
    let skipped = report::skipped_lines(&log);
    if !skipped.is_empty() {
        eprintln!("{} entries could not be read and were skipped (the rest was scanned):", skipped.len());
        for line in &skipped {
            eprintln!("  {line}");
        }
    }
    // Findings the confidence floor leaves out of the gate are said, so nobody wonders why a
    // finding in the table did not fail the build.
    let below = match below_confidence {
        0 => String::new(),
        n => format!(" ({n} more below --min-confidence {})", args.min_confidence.as_str()),
    };
    let line = format!(
        "{} finding(s) ({suppressed} suppressed); {at_threshold} at or above --fail-on {}{below}; SARIF written to {}; job {id}",
        rows.len(),
        format!("{:?}", args.fail_on).to_lowercase(),
        out.display()
    );
    // With a machine-readable stdout, the human line goes to stderr.
    if args.format == Format::Table {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
    Ok(ScanReport { job_id: id, findings: rows.len(), suppressed, at_threshold })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    std::fs::write(path, bytes).map_err(|e| ClientError::Write(path.to_owned(), e))
}

/// Waits for the job to end (or `limit` to pass), with long polls (`?wait=`).
pub async fn wait(
    client: &ApiClient,
    id: &str,
    limit: Duration,
    progress: bool,
) -> Result<Value, ClientError> {
    let start = Instant::now();
    let tty = progress && std::io::stderr().is_terminal();
    let mut last_state = String::new();
    loop {
        // On a terminal the status line is redrawn every second; elsewhere each state once.
        let slice = if tty { 1 } else { 30 };
        let left = limit.saturating_sub(start.elapsed()).as_secs().min(slice);
        let job = client.json(Method::GET, &format!("/v1/jobs/{id}?wait={left}")).await?;
        let state = job["state"].as_str().unwrap_or("?").to_owned();
        let done = state.parse::<crate::jobs::JobState>().is_ok_and(crate::jobs::JobState::is_final);
        if tty {
            eprint!("\rjob {id}: {state:<10} {:>5} s", start.elapsed().as_secs());
            if done {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else if progress && state != last_state {
            eprintln!("job {id}: {state}");
        }
        last_state = state.clone();
        if done {
            return Ok(job);
        }
        if start.elapsed() >= limit {
            if tty {
                eprintln!();
            }
            return Err(ClientError::StillRunning(format!(
                "job {id} is still {state} after {} s (--wait-secs); it goes on: see `cella job show {id}`, \
                 or wait again with `cella job show {id}` later",
                limit.as_secs()
            )));
        }
    }
}

/// The findings table of a SARIF log's results (see [`report::table`]).
pub(crate) fn print_table(results: &[Value]) {
    print!("{}", report::table(&report::rows(results)));
}

#[cfg(test)]
mod tests {
    use super::repository_uri;

    #[test]
    fn remotes_become_uris_without_credentials() {
        assert_eq!(
            repository_uri("https://user:token@github.com/acme/app.git").as_deref(),
            Some("https://github.com/acme/app")
        );
        assert_eq!(
            repository_uri("git@github.com:acme/app.git").as_deref(),
            Some("https://github.com/acme/app")
        );
        assert_eq!(repository_uri("ssh://git@host:22/x/y").as_deref(), Some("ssh://host:22/x/y"));
        assert_eq!(repository_uri("/srv/repos/app.git"), None);
        assert_eq!(repository_uri("file:///srv/app"), None);
    }
}
