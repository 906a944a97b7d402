//! `cella pack …`: a tenant's own rule packs. `push`, `ls`, `show`, `rm` and `default` are one
//! API call each (`/v1/packs`, `/v1/tenant/default-policy`); `test FILE DIR` needs no server: it
//! validates the pack as the server would (`cella-policies`) and runs it alone in a local VM
//! (`cella-vmm scan --policy-file`, the `cella-vmm` next to `cella`) on the sample files.

use std::path::{Path, PathBuf};
use std::process::Command;

use cella_policies::rules::tenant::{self, PackFormat, PackLimits};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use super::{report, ClientError, Connection};
use crate::error::escape_controls;

#[derive(Debug, Subcommand)]
pub enum PackCommand {
    /// Upload a pack file as a new version of a pack (Cella's pack TOML, or a gitleaks
    /// configuration, converted by the server)
    Push {
        file: PathBuf,
        /// The pack's name [default: a Cella pack's `[pack] name`; a gitleaks configuration's file
        /// name]
        #[arg(long)]
        name: Option<String>,
        /// The file's format [default: guessed: a `[pack]` table means cella]
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Your packs: the latest version of each (what `NAME` alone selects) and all live ones
    Ls {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// A pack's versions (NAME), or one version's Cella TOML (NAME@VERSION)
    Show {
        /// NAME or NAME@VERSION
        pack: String,
        /// With NAME@VERSION: print the file as uploaded instead of its Cella TOML
        #[arg(long)]
        source: bool,
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Delete a pack's live versions (NAME), or one (NAME@VERSION): they can no longer be
    /// selected, and queued jobs that name them fail
    Rm {
        /// NAME or NAME@VERSION
        pack: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Your default policy: what jobs and session scans that name no policy run
    #[command(subcommand)]
    Default(DefaultCommand),
    /// Your license policy: the licenses your jobs that give none (--license-deny,
    /// --license-flag on `cella scan`) report at `error` (denied) and `warning` (flagged)
    #[command(subcommand)]
    LicensePolicy(LicensePolicyCommand),
    /// Validate FILE as the server would and run it alone on the sample files in DIR in a local
    /// VM: prints the findings and how many each rule found; exit 1 if a rule found nothing
    /// (the samples should exercise every rule), 2 if the pack is refused (the line says where)
    Test {
        file: PathBuf,
        /// A folder (or a file, tar, tar.gz or zip) of samples
        dir: PathBuf,
        /// The file's format [default: guessed]
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// The cella-vmm to run [env: CELLA_VMM] [default: next to cella]
        #[arg(long, value_name = "PATH")]
        vmm: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DefaultCommand {
    /// Show it, and what it resolves to now
    Show {
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Set it: built-in packs and yours (NAME: the latest version at each submission;
    /// NAME@VERSION), comma-separated
    Set {
        policy: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Go back to the server's default
    Clear {
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum LicensePolicyCommand {
    /// Show it
    Show {
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Set it: SPDX identifiers (`AGPL-3.0` also covers its `-only`, `-or-later` and `+` forms)
    /// or prefixes ending in `*`, comma-separated or repeated; what is not given is emptied
    Set {
        /// Licenses reported at `error`
        #[arg(long, value_name = "IDS", value_delimiter = ',')]
        deny: Vec<String>,
        /// Licenses reported at `warning` at least
        #[arg(long, value_name = "IDS", value_delimiter = ',')]
        flag: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove it: license findings keep their rules' levels
    Clear {
        #[command(flatten)]
        conn: Connection,
    },
}

/// A pack file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Cella,
    Gitleaks,
}

impl Format {
    fn pack_format(self) -> PackFormat {
        match self {
            Format::Cella => PackFormat::Cella,
            Format::Gitleaks => PackFormat::Gitleaks,
        }
    }
}

/// What `cella pack test` found: rules of the pack that found nothing in the samples.
#[derive(Debug, Default)]
pub struct TestReport {
    pub silent_rules: Vec<String>,
}

/// `NAME` or `NAME@VERSION`.
fn split_pack(pack: &str) -> Result<(&str, Option<u32>), ClientError> {
    match pack.split_once('@') {
        None => Ok((pack, None)),
        Some((name, v)) => match v.parse::<u32>() {
            Ok(v) if v >= 1 => Ok((name, Some(v))),
            _ => Err(ClientError::Usage(format!("{pack:?}: give NAME or NAME@VERSION (a number from 1)"))),
        },
    }
}

/// A pack name from a file name: `.gitleaks.toml` → `gitleaks`, `Team Rules.toml` → `team-rules`.
fn name_from_file(file: &Path) -> String {
    let stem = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = stem.trim_start_matches('.');
    let stem = stem.split('.').next().unwrap_or("");
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '_');
    if name.is_empty() {
        "gitleaks".to_owned()
    } else {
        name.chars().take(64).collect()
    }
}

fn read(file: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(file).map_err(|e| ClientError::Read(file.to_owned(), e))
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn text(v: &Value) -> String {
    escape_controls(&match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    })
    .into_owned()
}

/// Runs a `cella pack` command; `test` reports the rules that found nothing.
pub async fn run(cmd: PackCommand) -> Result<TestReport, ClientError> {
    match cmd {
        PackCommand::Push { file, name, format, json, conn } => {
            let body = read(&file)?;
            let format = format.map_or_else(|| PackFormat::guess(&body), Format::pack_format);
            let name = name.or_else(|| (format == PackFormat::Gitleaks).then(|| name_from_file(&file)));
            let client = conn.tenant()?;
            let mut request = client.request(Method::POST, "/v1/packs").query(&[("format", format.as_str())]);
            if let Some(name) = &name {
                request = request.query(&[("name", name)]);
            }
            let request =
                request.header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8").body(body);
            let response = client.send(request).await?;
            let v: Value =
                response.json().await.map_err(|e| ClientError::Http(client.base().to_owned(), e))?;
            if json {
                print(&v);
            } else {
                println!(
                    "pushed {}@{}: {} rule(s), {}{}, sha256 {}",
                    text(&v["name"]),
                    v["version"],
                    v["rules"],
                    text(&v["format"]),
                    if format == PackFormat::Gitleaks { " (converted)" } else { "" },
                    text(&v["sha256"])
                );
            }
        }
        PackCommand::Ls { json, conn } => {
            let v = conn.tenant()?.json(Method::GET, "/v1/packs").await?;
            if json {
                print(&v);
                return Ok(TestReport::default());
            }
            let packs = v["packs"].as_array().cloned().unwrap_or_default();
            if packs.is_empty() {
                println!("no packs yet: upload one with `cella pack push FILE`");
            } else {
                println!("{:<24} {:>7} {:>6}  {:<16} SHA256", "NAME", "LATEST", "RULES", "VERSIONS");
                for p in packs {
                    let versions: Vec<String> =
                        p["versions"].as_array().into_iter().flatten().map(|v| v.to_string()).collect();
                    println!(
                        "{:<24} {:>7} {:>6}  {:<16} {}",
                        text(&p["name"]),
                        p["latest_version"],
                        p["rules"],
                        versions.join(","),
                        text(&p["sha256"])
                    );
                }
            }
        }
        PackCommand::Show { pack, source, json, conn } => {
            let (name, version) = split_pack(&pack)?;
            let client = conn.tenant()?;
            match version {
                Some(v) => {
                    let detail = client.json(Method::GET, &format!("/v1/packs/{name}/versions/{v}")).await?;
                    if json {
                        print(&detail);
                    } else {
                        let deleted = detail["deleted_at"]
                            .as_str()
                            .map(|d| format!(", deleted {d}"))
                            .unwrap_or_default();
                        eprintln!(
                            "{name}@{v}: {} rule(s), {}, sha256 {}, created {}{deleted}",
                            detail["rules"],
                            text(&detail["format"]),
                            text(&detail["sha256"]),
                            text(&detail["created_at"])
                        );
                        let body = if source { &detail["source"] } else { &detail["cella_toml"] };
                        for line in body.as_str().unwrap_or_default().lines() {
                            println!("{}", escape_controls(line));
                        }
                    }
                }
                None => {
                    let history = client.json(Method::GET, &format!("/v1/packs/{name}")).await?;
                    if json {
                        print(&history);
                        return Ok(TestReport::default());
                    }
                    println!(
                        "{:>7}  {:<9} {:>6}  {:<26} {:<26} SHA256",
                        "VERSION", "FORMAT", "RULES", "CREATED", "DELETED"
                    );
                    for v in history["versions"].as_array().into_iter().flatten() {
                        println!(
                            "{:>7}  {:<9} {:>6}  {:<26} {:<26} {}",
                            v["version"],
                            text(&v["format"]),
                            v["rules"],
                            text(&v["created_at"]),
                            text(&v["deleted_at"]),
                            text(&v["sha256"])
                        );
                    }
                }
            }
        }
        PackCommand::Rm { pack, conn } => {
            let (name, version) = split_pack(&pack)?;
            let path = match version {
                Some(v) => format!("/v1/packs/{name}/versions/{v}"),
                None => format!("/v1/packs/{name}"),
            };
            let deleted = conn.tenant()?.json(Method::DELETE, &path).await?;
            let versions: Vec<String> = deleted["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{}@{v}", text(&deleted["name"])))
                .collect();
            println!("deleted {}", versions.join(", "));
        }
        PackCommand::Default(cmd) => default(cmd).await?,
        PackCommand::LicensePolicy(cmd) => license_policy(cmd).await?,
        PackCommand::Test { file, dir, format, vmm } => return test(&file, &dir, format, vmm).await,
    }
    Ok(TestReport::default())
}

async fn default(cmd: DefaultCommand) -> Result<(), ClientError> {
    let (view, json) = match cmd {
        DefaultCommand::Show { json, conn } => {
            (conn.tenant()?.json(Method::GET, "/v1/tenant/default-policy").await?, json)
        }
        DefaultCommand::Set { policy, conn } => {
            let body = json!({ "policy": policy });
            (conn.tenant()?.send_json(Method::PUT, "/v1/tenant/default-policy", &body).await?, false)
        }
        DefaultCommand::Clear { conn } => {
            let body = json!({ "policy": null });
            (conn.tenant()?.send_json(Method::PUT, "/v1/tenant/default-policy", &body).await?, false)
        }
    };
    if json {
        print(&view);
    } else {
        let own = view["policy"].as_str().map_or_else(
            || format!("none (the server's: {})", text(&view["server_default"])),
            |p| escape_controls(p).into_owned(),
        );
        let resolved: Vec<String> =
            view["resolved"]["policy"].as_array().into_iter().flatten().map(text).collect();
        println!("default policy: {own}\nruns now:       {}", resolved.join(","));
    }
    Ok(())
}

async fn license_policy(cmd: LicensePolicyCommand) -> Result<(), ClientError> {
    const PATH: &str = "/v1/tenant/license-policy";
    let (view, json) = match cmd {
        LicensePolicyCommand::Show { json, conn } => (conn.tenant()?.json(Method::GET, PATH).await?, json),
        LicensePolicyCommand::Set { deny, flag, conn } => {
            cella_scan::spdx::LicensePolicy::new(&deny, &flag)
                .map_err(|e| ClientError::Usage(format!("--deny/--flag: {e}")))?;
            let body = json!({ "deny": deny, "flag": flag });
            (conn.tenant()?.send_json(Method::PUT, PATH, &body).await?, false)
        }
        LicensePolicyCommand::Clear { conn } => {
            (conn.tenant()?.send_json(Method::PUT, PATH, &json!({})).await?, false)
        }
    };
    if json {
        print(&view);
    } else {
        let list = |v: &serde_json::Value| {
            let ids: Vec<String> = v.as_array().into_iter().flatten().map(text).collect();
            if ids.is_empty() {
                "none".to_owned()
            } else {
                ids.join(",")
            }
        };
        println!("denied (error):    {}\nflagged (warning): {}", list(&view["deny"]), list(&view["flag"]));
    }
    Ok(())
}

/// `cella pack test FILE DIR`.
async fn test(
    file: &Path,
    dir: &Path,
    format: Option<Format>,
    vmm: Option<PathBuf>,
) -> Result<TestReport, ClientError> {
    let source = read(file)?;
    let format = format.map_or_else(|| PackFormat::guess(&source), Format::pack_format);
    let name = (format == PackFormat::Gitleaks).then(|| name_from_file(file));
    let validated = tenant::validate(&source, format, name.as_deref(), &PackLimits::default())
        .map_err(|problem| ClientError::Pack { path: file.to_owned(), problem })?;
    let packed = super::scan::artifact(dir, true, &super::history::History::None)?;
    let artifact = packed.file.clone();
    let work =
        super::scan::tempfile_path::TempPath::new(&format!("cella-pack-test-{}.toml", std::process::id()));
    std::fs::write(work.path(), &validated.cella_toml)
        .map_err(|e| ClientError::Write(work.path().to_owned(), e))?;
    let sarif =
        super::scan::tempfile_path::TempPath::new(&format!("cella-pack-test-{}.sarif", std::process::id()));
    let vmm = vmm
        .or_else(|| std::env::var_os("CELLA_VMM").map(PathBuf::from))
        .unwrap_or_else(crate::worker::launch::default_vmm);
    let mut cmd = Command::new(&vmm);
    cmd.arg("scan")
        .arg("--json")
        .arg("--artifact")
        .arg(&artifact)
        .arg("--policy")
        .arg("")
        .arg("--policy-file")
        .arg(work.path())
        .arg("--sarif")
        .arg(sarif.path());
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| ClientError::ScanFailed(format!("running {}: {e}", vmm.display())))?
        .map_err(|e| {
            ClientError::Usage(format!(
                "cannot run {} ({e}): build it (scripts/setup.sh) or pass --vmm PATH",
                vmm.display()
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_owned();
        return Err(ClientError::ScanFailed(format!(
            "the test scan failed ({}): {}",
            output.status,
            escape_controls(&last)
        )));
    }
    let log: Value = std::fs::read(sarif.path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ClientError::ScanFailed("the test scan wrote no SARIF log".into()))?;
    let results = log["runs"][0]["results"].as_array().cloned().unwrap_or_default();
    let rows = report::rows(&results);
    print!("{}", report::table(&rows));
    println!();
    let ids = validated.rule_ids();
    let width = ids.iter().map(String::len).max().unwrap_or(4).max(4);
    println!("{:<width$}  FINDINGS", "RULE");
    let mut silent = Vec::new();
    for id in &ids {
        let n = rows.iter().filter(|r| &r.rule == id).count();
        println!("{id:<width$}  {n}{}", if n == 0 { "  (found nothing)" } else { "" });
        if n == 0 {
            silent.push(id.clone());
        }
    }
    println!(
        "pack {} ({}, {} rule(s)) on {}: {} finding(s); {} of {} rule(s) found nothing",
        validated.pack.name,
        validated.format,
        ids.len(),
        dir.display(),
        rows.len(),
        silent.len(),
        ids.len()
    );
    Ok(TestReport { silent_rules: silent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_files_and_packs_split_at_the_version() {
        assert_eq!(name_from_file(Path::new("/x/.gitleaks.toml")), "gitleaks");
        assert_eq!(name_from_file(Path::new("Team Rules.v2.toml")), "team-rules");
        assert_eq!(name_from_file(Path::new("...")), "gitleaks");
        assert_eq!(split_pack("acme@3").unwrap(), ("acme", Some(3)));
        assert_eq!(split_pack("acme").unwrap(), ("acme", None));
        assert!(split_pack("acme@x").is_err() && split_pack("acme@0").is_err());
    }
}
