//! `cella session …`: a tenant's sessions (a VM that keeps an artifact indexed in memory for up
//! to 8 hours): create, exec requests, pause, suspend, resume, connect, terminate, list, show.

use std::path::PathBuf;

use base64::Engine as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use super::{ClientError, Connection};
use crate::error::escape_controls;

/// Output and connection options shared by every session command.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Print the server's JSON answer instead of a summary
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Start a session on a folder (packed as tar) or file: its VM loads and indexes it once
    Create {
        artifact: PathBuf,
        /// Seconds it may live, running and suspended (at most 28800) [default: the server's]
        #[arg(long, value_name = "SECS")]
        max_duration: Option<u64>,
        /// Suspend it after this many seconds without exec or connect (0: never) [default: the server's]
        #[arg(long, value_name = "SECS")]
        idle_suspend: Option<u64>,
        /// What `read` returns: deny, redact (findings masked) or allow [default: redact]
        #[arg(long, value_name = "POLICY")]
        read_policy: Option<String>,
        /// Guest memory in MiB [default: the server's]
        #[arg(long, value_name = "MIB")]
        mem_mib: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Run a request in a running session (a paused or suspended one: `connect` first)
    Exec {
        id: String,
        #[command(subcommand)]
        op: ExecOp,
    },
    /// Pause a running session (vCPUs stop, memory stays)
    Pause {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Suspend a session to a snapshot on disk (its VMM stops and frees its memory)
    Suspend {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Resume a paused session, or restore a suspended one
    Resume {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Resume or restore a session if needed and mark it active; optionally extend its deadline
    Connect {
        id: String,
        /// Move the deadline to now + SECS if that is later (it never moves earlier)
        #[arg(long, value_name = "SECS")]
        extend: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Terminate a session: its VM stops (memory scrubbed), its files are deleted
    Rm {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Your sessions, newest first
    Ls {
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        common: Common,
    },
    /// One session
    Show {
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExecOp {
    /// Scan every indexed file; prints the findings
    Scan {
        /// Rule packs, comma-separated [default: the server's]
        #[arg(long)]
        policy: Option<String>,
        /// Also write the SARIF log here
        #[arg(long, value_name = "FILE")]
        sarif: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Search the indexed text files with a regular expression
    Grep {
        pattern: String,
        /// At most this many matching lines
        #[arg(long, default_value_t = 100)]
        max: u32,
        /// Only files whose path starts with this
        #[arg(long, value_name = "PREFIX")]
        path_prefix: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// The session's counters (the index id stays the same for its whole life)
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// Print a file's bytes (as the session's read policy allows)
    Read {
        path: String,
        /// At most this many bytes
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u64>,
        /// Write the bytes here instead of standard output
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Add a file or archive to the index, under NAME/ (default: the file's name)
    Add {
        file: PathBuf,
        /// The folder its files go under in the index (`NAME/…`) [default: the file's name]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

fn pretty(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A string field for the terminal (`-` when absent): control characters escaped, since most
/// of what a session shows (errors, paths, stats) came from its guest.
fn text<'a>(v: &'a Value, key: &str) -> std::borrow::Cow<'a, str> {
    escape_controls(v[key].as_str().unwrap_or("-"))
}

/// An RFC 3339 time to the second, for tables (`2026-11-28T18:27:24Z`).
fn to_second(time: &str) -> String {
    match time.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => time.to_owned(),
    }
}

/// A session as a few lines.
fn print_session(s: &Value) {
    println!("session   {}", text(s, "id"));
    println!("state     {}", text(s, "state"));
    println!(
        "artifact  {} ({} bytes, sha256 {})",
        text(&s["artifact"], "name"),
        s["artifact"]["bytes"],
        text(&s["artifact"], "sha256")
    );
    println!(
        "memory    {} MiB, read policy {}, idle suspend {} s",
        s["mem_mib"],
        text(s, "read_policy"),
        s["idle_suspend_secs"]
    );
    println!("deadline  {} (at most {})", text(s, "deadline"), text(s, "max_deadline"));
    println!("active    {}", text(s, "last_active_at"));
    println!("host      {}", text(s, "host"));
    if let Some(bytes) = s["snapshot_bytes"].as_i64() {
        println!("snapshot  {bytes} bytes");
    }
    if let Some(err) = s["error"].as_str() {
        println!("error     {}", escape_controls(err));
    }
}

fn show(s: &Value, common: &Common) {
    if common.json {
        pretty(s);
    } else {
        print_session(s);
    }
}

/// Runs a `cella session` command.
pub async fn run(cmd: SessionCommand) -> Result<(), ClientError> {
    match cmd {
        SessionCommand::Create { artifact, max_duration, idle_suspend, read_policy, mem_mib, common } => {
            let client = common.conn.tenant()?;
            let packed = super::scan::artifact(&artifact, false, &super::history::History::None)?;
            let (file, name) = (packed.file.clone(), packed.name.clone());
            let mut query = vec![("name", name)];
            let numbers = [
                ("max_duration", max_duration),
                ("idle_suspend", idle_suspend),
                ("mem_mib", mem_mib.map(u64::from)),
            ];
            for (key, value) in numbers {
                if let Some(v) = value {
                    query.push((key, v.to_string()));
                }
            }
            if let Some(p) = read_policy {
                query.push(("read_policy", p));
            }
            let s = super::scan::upload(&client, "/v1/sessions", &file, &query, &[]).await?;
            show(&s, &common);
            if s["state"] == "failed" {
                return Err(ClientError::Other(format!(
                    "session {} failed to start: {}",
                    text(&s, "id"),
                    text(&s, "error")
                )));
            }
        }
        SessionCommand::Exec { id, op } => exec(&id, op).await?,
        SessionCommand::Pause { id, common } => transition(&id, "pause", &common).await?,
        SessionCommand::Suspend { id, common } => transition(&id, "suspend", &common).await?,
        SessionCommand::Resume { id, common } => transition(&id, "resume", &common).await?,
        SessionCommand::Connect { id, extend, common } => {
            let path = match extend {
                Some(secs) => format!("/v1/sessions/{id}/connect?extend={secs}"),
                None => format!("/v1/sessions/{id}/connect"),
            };
            show(&common.conn.tenant()?.json(Method::POST, &path).await?, &common);
        }
        SessionCommand::Rm { id, common } => {
            let s = common.conn.tenant()?.json(Method::DELETE, &format!("/v1/sessions/{id}")).await?;
            if common.json {
                pretty(&s);
            } else {
                println!("session {id} {}", text(&s, "state"));
            }
        }
        SessionCommand::Ls { state, limit, common } => {
            let mut path = format!("/v1/sessions?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            let page = common.conn.tenant()?.json(Method::GET, &path).await?;
            if common.json {
                pretty(&page);
                return Ok(());
            }
            println!("{:<41} {:<11} {:<21} {:<21} ARTIFACT", "ID", "STATE", "CREATED", "DEADLINE");
            for s in page["sessions"].as_array().into_iter().flatten() {
                println!(
                    "{:<41} {:<11} {:<21} {:<21} {}",
                    text(s, "id"),
                    text(s, "state"),
                    to_second(&text(s, "created_at")),
                    to_second(&text(s, "deadline")),
                    text(&s["artifact"], "name")
                );
            }
        }
        SessionCommand::Show { id, common } => {
            show(&common.conn.tenant()?.json(Method::GET, &format!("/v1/sessions/{id}")).await?, &common);
        }
    }
    Ok(())
}

async fn transition(id: &str, action: &str, common: &Common) -> Result<(), ClientError> {
    let s = common.conn.tenant()?.json(Method::POST, &format!("/v1/sessions/{id}/{action}")).await?;
    if common.json {
        pretty(&s);
    } else {
        println!("session {id} {}", text(&s, "state"));
    }
    Ok(())
}

async fn exec(id: &str, op: ExecOp) -> Result<(), ClientError> {
    let path = format!("/v1/sessions/{id}/exec");
    match op {
        ExecOp::Scan { policy, sarif, common } => {
            let mut body = json!({ "op": "scan" });
            if let Some(p) = policy {
                body["policy_name"] = json!(p);
            }
            let reply = common.conn.tenant()?.post_json(&path, &body).await?;
            if let Some(out) = sarif {
                let bytes = serde_json::to_vec_pretty(&reply["sarif"]).unwrap_or_default();
                std::fs::write(&out, bytes).map_err(|e| ClientError::Write(out.clone(), e))?;
            }
            if common.json {
                pretty(&reply);
                return Ok(());
            }
            let results = reply["sarif"]["runs"][0]["results"].as_array().cloned().unwrap_or_default();
            super::scan::print_table(&results);
            println!(
                "{} finding(s) in {} file(s), policy {}",
                reply["result"]["findings"],
                reply["result"]["files_scanned"],
                text(&reply["result"], "policy_name")
            );
        }
        ExecOp::Grep { pattern, max, path_prefix, common } => {
            let body =
                json!({ "op": "grep", "pattern": pattern, "max_matches": max, "path_prefix": path_prefix });
            let reply = common.conn.tenant()?.post_json(&path, &body).await?;
            if common.json {
                pretty(&reply);
                return Ok(());
            }
            let result = &reply["result"];
            for m in result["matches"].as_array().into_iter().flatten() {
                println!(
                    "{}:{}:{}: {}",
                    text(m, "path"),
                    m["line"],
                    m["column"],
                    escape_controls(m["text"].as_str().unwrap_or_default())
                );
            }
            // A `deny` session answers with counts per file only.
            let mut lines = result["matches"].as_array().map_or(0, |m| m.len() as u64);
            for c in result["counts"].as_array().into_iter().flatten() {
                println!("{}: {} matching line(s)", text(c, "path"), c["lines"]);
                lines += c["lines"].as_u64().unwrap_or(0);
            }
            let more = if result["truncated"] == true { " (more lines match: raise --max)" } else { "" };
            let masked = if result["masked"] == true { ", findings masked by the read policy" } else { "" };
            println!("{lines} match(es) in {} file(s) searched{masked}{more}", result["files_searched"]);
        }
        ExecOp::Stats { common } => {
            let reply = common.conn.tenant()?.post_json(&path, &json!({ "op": "stats" })).await?;
            if common.json {
                pretty(&reply);
                return Ok(());
            }
            if let Some(fields) = reply["result"].as_object() {
                for (k, v) in fields.iter().filter(|(k, _)| *k != "op") {
                    let value = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    println!("{:<20} {}", escape_controls(k), escape_controls(&value));
                }
            }
        }
        ExecOp::Read { path: file, max_bytes, out, common } => {
            let body = json!({ "op": "read", "path": file, "max_bytes": max_bytes });
            let reply = common.conn.tenant()?.post_json(&path, &body).await?;
            if common.json {
                pretty(&reply);
                return Ok(());
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(reply["data_base64"].as_str().unwrap_or(""))
                .map_err(|e| ClientError::Other(format!("the server sent bad base64: {e}")))?;
            match out {
                Some(out) => std::fs::write(&out, &bytes).map_err(|e| ClientError::Write(out.clone(), e))?,
                None => {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&bytes);
                }
            }
            let r = &reply["result"];
            eprintln!(
                "{} of {} bytes ({}, {} redaction(s))",
                r["returned"],
                r["size"],
                text(r, "mode"),
                r["redactions"]
            );
        }
        ExecOp::Add { file, name, common } => {
            let client = common.conn.tenant()?;
            let packed = super::scan::artifact(&file, false, &super::history::History::None)?;
            let (upload, default_name) = (packed.file.clone(), packed.name.clone());
            let name = name.unwrap_or(default_name);
            let reply = super::scan::upload(
                &client,
                &format!("/v1/sessions/{id}/files"),
                &upload,
                &[("name", name)],
                &[],
            )
            .await?;
            if common.json {
                pretty(&reply);
                return Ok(());
            }
            let r = &reply["result"];
            println!(
                "added {} file(s), {} bytes under {}/; the index now holds {} file(s)",
                r["files_added"],
                r["bytes_added"],
                text(r, "name"),
                r["files"]
            );
        }
    }
    Ok(())
}
