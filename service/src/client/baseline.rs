//! `cella baseline …`: make a baseline of the findings a code base already has, keep it in the
//! service, and list or remove the ones kept. `cella scan --baseline FILE|NAME` then reports
//! only new findings.

use std::path::{Path, PathBuf};

use cella_policies::baseline::Baseline;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use super::{ClientError, Connection};

#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Make a baseline file from a SARIF log (a file, or a finished job's)
    Create {
        /// The SARIF log of an earlier Cella scan
        #[arg(required_unless_present = "job", conflicts_with = "job")]
        sarif: Option<PathBuf>,
        /// Take the SARIF log of this finished job from the server instead
        #[arg(long, value_name = "JOB_ID")]
        job: Option<String>,
        /// Where to write it
        #[arg(long, value_name = "FILE", default_value = "cella-baseline.json")]
        out: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
    /// Keep a baseline file (or SARIF log) in the service, so jobs can name it
    Push {
        file: PathBuf,
        /// A name for it (1-64 letters, digits, `.`, `_`, `-`)
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// The baselines kept in the service
    Ls {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove a baseline kept in the service (by id or name)
    Rm {
        baseline: String,
        #[command(flatten)]
        conn: Connection,
    },
}

fn baseline_error(e: cella_policies::baseline::BaselineError) -> ClientError {
    ClientError::Usage(crate::error::error_chain(&e))
}

pub async fn run(cmd: BaselineCommand) -> Result<(), ClientError> {
    match cmd {
        BaselineCommand::Create { sarif, job, out, conn } => {
            let baseline = match (sarif, job) {
                (Some(path), _) => Baseline::read(&path).map_err(baseline_error)?,
                (None, Some(job)) => {
                    let bytes = conn.tenant()?.bytes(&format!("/v1/jobs/{job}/sarif")).await?;
                    Baseline::from_sarif(&bytes).map_err(baseline_error)?
                }
                (None, None) => unreachable!("clap requires one"),
            };
            baseline.write(&out).map_err(baseline_error)?;
            eprintln!("wrote a baseline of {} finding(s) to {}", baseline.len(), out.display());
        }
        BaselineCommand::Push { file, name, conn } => {
            let stored = push(&conn, &file, name.as_deref()).await?;
            println!(
                "baseline {} ({} finding(s)){}",
                stored["id"].as_str().unwrap_or("?"),
                stored["fingerprints"],
                stored["name"].as_str().map(|n| format!(", name {n}")).unwrap_or_default()
            );
        }
        BaselineCommand::Ls { json, conn } => {
            let list = conn.tenant()?.json(Method::GET, "/v1/baselines").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
                return Ok(());
            }
            println!("{:<36} {:<24} {:>9} CREATED", "ID", "NAME", "FINDINGS");
            for b in list.as_array().into_iter().flatten() {
                println!(
                    "{:<36} {:<24} {:>9} {}",
                    b["id"].as_str().unwrap_or(""),
                    b["name"].as_str().unwrap_or("-"),
                    b["fingerprints"],
                    b["created_at"].as_str().unwrap_or("")
                );
            }
        }
        BaselineCommand::Rm { baseline, conn } => {
            let client = conn.tenant()?;
            client.send(client.request(Method::DELETE, &format!("/v1/baselines/{baseline}"))).await?;
            eprintln!("removed baseline {baseline}");
        }
    }
    Ok(())
}

/// Stores the baseline file (or SARIF log) at `path` in the service; returns what it kept. The
/// file is checked here first, so a mistake is reported without a round trip.
pub async fn push(conn: &Connection, path: &Path, name: Option<&str>) -> Result<Value, ClientError> {
    let baseline = Baseline::read(path).map_err(baseline_error)?;
    let client = conn.tenant()?;
    let mut request = client
        .request(Method::POST, "/v1/baselines")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(baseline.to_json());
    if let Some(name) = name {
        request = request.query(&[("name", name)]);
    }
    client.send(request).await?.json().await.map_err(|e| ClientError::Http(client.base().to_owned(), e))
}
