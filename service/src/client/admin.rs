//! Operator commands (`cella tenant …`, `cella key …`, `cella admin …`) and a tenant's job and
//! audit commands (`cella job …`, `cella audit download`), each one API call (`download` makes a
//! second one, for the public keys that verify the bundle).

use std::path::{Path, PathBuf};

use cella_audit::PublicKey;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use super::{ClientError, Connection};
use crate::api::audit::AuditKeys;

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id and its first API key (shown only once)
    Create {
        name: String,
        /// The most of its jobs that run at once
        #[arg(long)]
        max_concurrent: Option<u32>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List tenants
    Ls {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Suspend a tenant: its keys answer 403 and its queued jobs wait
    Suspend {
        tenant: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Reinstate a suspended tenant
    Reinstate {
        tenant: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a tenant's quotas (its own, those in force, what it holds now), or set them: each
    /// option takes a number, or `default` for the server's default (audited)
    Quota {
        tenant: String,
        #[command(flatten)]
        set: QuotaArgs,
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
}

/// New values for `cella tenant quota`: a number, or `default`.
#[derive(Debug, clap::Args)]
pub struct QuotaArgs {
    /// Guest memory of its running and paused sessions together, MiB
    #[arg(long, value_name = "MIB|default")]
    session_mem_mib: Option<String>,
    /// Sessions not terminated or failed
    #[arg(long, value_name = "N|default")]
    live_sessions: Option<String>,
    /// Bytes of artifacts (queued and running jobs, live sessions), snapshots and uploads
    #[arg(long, value_name = "BYTES|default")]
    disk_bytes: Option<String>,
    /// Uploads in flight at once
    #[arg(long, value_name = "N|default")]
    uploads: Option<String>,
    /// Requests in flight at once
    #[arg(long, value_name = "N|default")]
    requests: Option<String>,
    /// CPU of each of its VMs, percent of one CPU (1-10000)
    #[arg(long, value_name = "PERCENT|default")]
    vm_cpu_percent: Option<String>,
    /// Rule packs it keeps (names with a live version)
    #[arg(long, value_name = "N|default")]
    packs: Option<String>,
    /// What its live pack versions take compiled, together, in bytes
    #[arg(long, value_name = "BYTES|default")]
    pack_compiled_bytes: Option<String>,
}

impl QuotaArgs {
    /// The fields given, as JSON values (`default` is null), by their API names.
    fn changes(&self) -> Result<Vec<(&'static str, Value)>, ClientError> {
        let fields = [
            ("session_mem_mib", &self.session_mem_mib),
            ("live_sessions", &self.live_sessions),
            ("disk_bytes", &self.disk_bytes),
            ("uploads", &self.uploads),
            ("requests", &self.requests),
            ("vm_cpu_percent", &self.vm_cpu_percent),
            ("packs", &self.packs),
            ("pack_compiled_bytes", &self.pack_compiled_bytes),
        ];
        let mut out = Vec::new();
        for (name, value) in fields {
            let Some(value) = value else { continue };
            let v = if value == "default" {
                Value::Null
            } else {
                let n: u64 = value.parse().map_err(|_| {
                    ClientError::Usage(format!(
                        "--{} takes a number or `default`, not {value:?}",
                        name.replace('_', "-")
                    ))
                })?;
                json!(n)
            };
            out.push((name, v));
        }
        Ok(out)
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List a tenant's keys (ids, created, revoked): the KEY_ID `revoke` takes
    Ls {
        tenant: String,
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Issue another API key for a tenant (prints it once)
    Create {
        tenant: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Revoke one key, or all of a tenant's keys with --all
    Revoke {
        tenant: String,
        #[arg(required_unless_present = "all")]
        key_id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Revoke all of a tenant's keys and issue one new key
    Rotate {
        tenant: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Workers, with their load and whether they drain
    Workers {
        /// Also stopped workers
        #[arg(long)]
        all: bool,
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Stop a worker from leasing jobs (running jobs finish)
    Drain {
        worker: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Let a drained worker lease jobs again
    Undrain {
        worker: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Running VMs: tenant, job, worker, age, memory
    Vms {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel any tenant's job
    Cancel {
        job: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Export a tenant's audit log (or `operator`) as a bundle
    AuditExport {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// One job, as JSON
    Show {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Your jobs, newest first
    Ls {
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the page as JSON (with `next_cursor`)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Cancel a queued or running job
    Cancel {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn tenant(cmd: TenantCommand) -> Result<(), ClientError> {
    match cmd {
        TenantCommand::Create { name, max_concurrent, conn } => {
            let mut body = json!({ "name": name });
            if let Some(m) = max_concurrent {
                body["max_concurrent"] = json!(m);
            }
            let created = conn.admin()?.post_json("/v1/admin/tenants", &body).await?;
            println!("tenant  {}", created["tenant"]["id"].as_str().unwrap_or("?"));
            println!("key id  {}", created["key"]["key_id"].as_str().unwrap_or("?"));
            println!("API key {}", created["key"]["api_key"].as_str().unwrap_or("?"));
            eprintln!(
                "keep the API key now: it is not stored and cannot be shown again (export CELLA_API_KEY=...)"
            );
        }
        TenantCommand::Ls { json, conn } => {
            let tenants = conn.admin()?.json(Method::GET, "/v1/admin/tenants").await?;
            if json {
                print(&tenants);
                return Ok(());
            }
            println!("{:<40} {:<24} {:<10} MAX", "ID", "NAME", "SUSPENDED");
            for t in tenants.as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<24} {:<10} {}",
                    t["id"].as_str().unwrap_or(""),
                    t["name"].as_str().unwrap_or(""),
                    t["suspended"],
                    t["max_concurrent"]
                );
            }
        }
        TenantCommand::Suspend { tenant, conn } => {
            print(&conn.admin()?.json(Method::POST, &format!("/v1/admin/tenants/{tenant}/suspend")).await?)
        }
        TenantCommand::Reinstate { tenant, conn } => {
            print(&conn.admin()?.json(Method::POST, &format!("/v1/admin/tenants/{tenant}/reinstate")).await?)
        }
        TenantCommand::Quota { tenant, set, json, conn } => {
            let changes = set.changes()?;
            let client = conn.admin()?;
            let path = format!("/v1/admin/tenants/{tenant}/quotas");
            let mut view = client.json(Method::GET, &path).await?;
            if !changes.is_empty() {
                let mut overrides = view["overrides"].clone();
                for (name, value) in changes {
                    overrides[name] = value;
                }
                view = client.send_json(Method::PUT, &path, &overrides).await?;
            }
            if json {
                print(&view);
            } else {
                print_quotas(&view);
            }
        }
    }
    Ok(())
}

/// A tenant's quotas as a table: each quota, the tenant's own value, the value in force, and
/// what it holds now.
fn print_quotas(view: &Value) {
    println!("{:<19} {:>14} {:>14} {:>14}", "QUOTA", "OWN", "IN FORCE", "IN USE");
    for name in [
        "session_mem_mib",
        "live_sessions",
        "disk_bytes",
        "uploads",
        "requests",
        "vm_cpu_percent",
        "packs",
        "pack_compiled_bytes",
    ] {
        let own = match &view["overrides"][name] {
            Value::Null => "default".to_owned(),
            v => v.to_string(),
        };
        let used = match &view["usage"][name] {
            Value::Null => "-".to_owned(),
            v => v.to_string(),
        };
        println!("{name:<19} {own:>14} {:>14} {used:>14}", view["effective"][name]);
    }
}

pub async fn key(cmd: KeyCommand) -> Result<(), ClientError> {
    let (key, conn_used) = match cmd {
        KeyCommand::Ls { tenant, json, conn } => {
            let keys = conn.admin()?.json(Method::GET, &format!("/v1/admin/tenants/{tenant}/keys")).await?;
            if json {
                print(&keys);
                return Ok(());
            }
            println!("{:<40} {:<26} REVOKED", "KEY ID", "CREATED");
            for k in keys.as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<26} {}",
                    k["key_id"].as_str().unwrap_or(""),
                    k["created_at"].as_str().unwrap_or(""),
                    k["revoked_at"].as_str().unwrap_or("-")
                );
            }
            return Ok(());
        }
        KeyCommand::Create { tenant, conn } => {
            (conn.admin()?.json(Method::POST, &format!("/v1/admin/tenants/{tenant}/keys")).await?, true)
        }
        KeyCommand::Rotate { tenant, conn } => (
            conn.admin()?.json(Method::POST, &format!("/v1/admin/tenants/{tenant}/keys/rotate")).await?,
            true,
        ),
        KeyCommand::Revoke { tenant, key_id, all: _, conn } => {
            let path = match key_id {
                Some(k) => format!("/v1/admin/tenants/{tenant}/keys/{k}/revoke"),
                None => format!("/v1/admin/tenants/{tenant}/keys/revoke"),
            };
            let revoked = conn.admin()?.json(Method::POST, &path).await?;
            println!("revoked {} key(s)", revoked["revoked"]);
            (Value::Null, false)
        }
    };
    if conn_used {
        println!("key id  {}", key["key_id"].as_str().unwrap_or("?"));
        println!("API key {}", key["api_key"].as_str().unwrap_or("?"));
        eprintln!("keep the API key now: it is not stored and cannot be shown again");
    }
    Ok(())
}

pub async fn admin(cmd: AdminCommand) -> Result<(), ClientError> {
    match cmd {
        AdminCommand::Workers { all, json, conn } => {
            let path = if all { "/v1/admin/workers?all=true" } else { "/v1/admin/workers" };
            let workers = conn.admin()?.json(Method::GET, path).await?;
            if json {
                print(&workers);
                return Ok(());
            }
            println!("{:<40} {:<16} {:>7} {:>9} {:<8} ALIVE", "ID", "HOST", "RUNNING", "SLOTS", "DRAINING");
            for w in workers.as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:<16} {:>7} {:>9} {:<8} {}",
                    w["id"].as_str().unwrap_or(""),
                    w["hostname"].as_str().unwrap_or(""),
                    w["running"],
                    w["concurrency"],
                    w["draining"],
                    w["alive"]
                );
            }
        }
        AdminCommand::Drain { worker, conn } => {
            print(&conn.admin()?.json(Method::POST, &format!("/v1/admin/workers/{worker}/drain")).await?)
        }
        AdminCommand::Undrain { worker, conn } => {
            print(&conn.admin()?.json(Method::POST, &format!("/v1/admin/workers/{worker}/undrain")).await?)
        }
        AdminCommand::Vms { json, conn } => {
            let vms = conn.admin()?.json(Method::GET, "/v1/admin/vms").await?;
            if json {
                print(&vms);
                return Ok(());
            }
            println!("{:<38} {:<40} {:>8} {:>8} {:>8} WORKER", "JOB", "TENANT", "PID", "MEM_MIB", "AGE_S");
            for v in vms.as_array().into_iter().flatten() {
                println!(
                    "{:<38} {:<40} {:>8} {:>8} {:>8.1} {}",
                    v["job_id"].as_str().unwrap_or(""),
                    v["tenant_id"].as_str().unwrap_or(""),
                    v["pid"],
                    v["mem_mib"],
                    v["age_secs"].as_f64().unwrap_or(0.0),
                    v["worker_id"].as_str().unwrap_or("")
                );
            }
        }
        AdminCommand::Cancel { job, conn } => {
            print(&conn.admin()?.json(Method::POST, &format!("/v1/admin/jobs/{job}/cancel")).await?)
        }
        AdminCommand::AuditExport { tenant, from, to, out, conn } => {
            let client = conn.admin()?;
            let mut request =
                client.request(Method::GET, "/v1/admin/audit/export").query(&[("tenant", tenant)]);
            if let Some(f) = from {
                request = request.query(&[("from", f)]);
            }
            if let Some(t) = to {
                request = request.query(&[("to", t)]);
            }
            save(client.send(request).await?, &out).await?;
            print_operator_verify_hint(&conn, &out);
        }
    }
    Ok(())
}

/// After an operator's export on the server host: the verify command with the data folder's
/// public key (or the configured signing key's), and its fingerprint to read to a reviewer.
fn print_operator_verify_hint(conn: &Connection, out: &Path) {
    let data_dir = conn.data_dir();
    let key_file = crate::config::Config::load(None, &data_dir.config_file())
        .ok()
        .and_then(|c| c.audit.signing_key)
        .unwrap_or_else(|| data_dir.audit_key_file());
    let mut pub_file = key_file.into_os_string();
    pub_file.push(".pub");
    let pub_file = PathBuf::from(pub_file);
    match PublicKey::read(&pub_file) {
        Ok(key) => {
            eprintln!("audit key {}: {} ({})", key.id, key.fingerprint(), pub_file.display());
            let other = bundle_key_ids(out).into_iter().filter(|id| *id != key.id).collect::<Vec<_>>();
            if !other.is_empty() {
                eprintln!(
                    "the bundle also has checkpoints signed by {} (before a key rotation): add their .pub \
                     files with more --trusted-key",
                    other.join(", ")
                );
            }
        }
        Err(_) => eprintln!(
            "no audit public key at {} (run this on the server host, with --data-dir of the server); \
             give the reviewer the .pub file of the server's audit signing key",
            pub_file.display()
        ),
    }
    eprintln!("verify with (give the reviewer the .pub file through another channel than the bundle):");
    eprintln!("  cella audit verify {} --trusted-key {}", shell_word(out), shell_word(&pub_file));
}

/// The ids of the keys that signed the checkpoints of the bundle at `path` (none if unreadable).
fn bundle_key_ids(path: &Path) -> Vec<String> {
    std::fs::File::open(path)
        .ok()
        .and_then(|mut f| cella_audit::bundle::signing_key_ids(&mut f).ok())
        .unwrap_or_default()
}

/// `path` as one word of a shell command line.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./:=@%+,".contains(&b));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

pub async fn job(cmd: JobCommand) -> Result<(), ClientError> {
    match cmd {
        JobCommand::Show { id, conn } => {
            print(&conn.tenant()?.json(Method::GET, &format!("/v1/jobs/{id}")).await?)
        }
        JobCommand::Cancel { id, conn } => {
            print(&conn.tenant()?.json(Method::POST, &format!("/v1/jobs/{id}/cancel")).await?)
        }
        JobCommand::Ls { state, limit, json, conn } => {
            let client = conn.tenant()?;
            let mut request = client.request(Method::GET, "/v1/jobs").query(&[("limit", limit)]);
            if let Some(s) = state {
                request = request.query(&[("state", s)]);
            }
            let page: Value = client
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| ClientError::Http(client.base().into(), e))?;
            if json {
                print(&page);
                return Ok(());
            }
            println!("{:<38} {:<10} {:>8} {:<25} ERROR", "ID", "STATE", "FINDINGS", "CREATED");
            for j in page["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{:<38} {:<10} {:>8} {:<25} {}",
                    j["id"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["findings"].as_i64().map_or("-".into(), |n| n.to_string()),
                    j["created_at"].as_str().unwrap_or(""),
                    crate::error::escape_controls(j["error"].as_str().unwrap_or(""))
                );
            }
        }
    }
    Ok(())
}

/// `cella audit download`: the caller's own audit bundle, and next to it the server's public
/// key(s) that verify it, with their fingerprints and the verify command.
pub async fn audit_download(
    conn: &Connection,
    from: Option<String>,
    to: Option<String>,
    out: &PathBuf,
) -> Result<(), ClientError> {
    let client = conn.tenant()?;
    let mut request = client.request(Method::GET, "/v1/audit/export");
    if let Some(f) = from {
        request = request.query(&[("from", f)]);
    }
    if let Some(t) = to {
        request = request.query(&[("to", t)]);
    }
    save(client.send(request).await?, out).await?;
    let keys = match client.send(client.request(Method::GET, "/v1/audit/keys")).await {
        Ok(response) => {
            response.json::<AuditKeys>().await.map_err(|e| ClientError::Http(client.base().into(), e))
        }
        Err(e) => Err(e),
    };
    match keys {
        Ok(keys) => save_audit_keys(&keys, out),
        Err(e) => {
            eprintln!(
                "WARNING: the server did not give its audit public key ({}); ask your operator for it, then \
                 verify with: cella audit verify {} --trusted-key FILE",
                crate::error::error_chain(&e),
                shell_word(out)
            );
            Ok(())
        }
    }
}

/// Where `download` saves key `id`: next to the bundle.
fn key_path(bundle: &Path, id: &str) -> PathBuf {
    let dir = bundle.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    dir.join(format!("cella-audit-{id}.pub"))
}

/// Saves the server's current key, and any other key the bundle's checkpoints name, next to the
/// bundle, never replacing a different key saved there before (a key id whose key changed is what
/// a forgery looks like: that is said loudly, and the saved key stays the one to verify with).
/// Prints each key's fingerprint and the verify command.
fn save_audit_keys(keys: &AuditKeys, bundle: &Path) -> Result<(), ClientError> {
    let needed = bundle_key_ids(bundle);
    let mut trusted = Vec::new();
    for view in keys.keys.iter().filter(|k| k.current || needed.contains(&k.id)) {
        let key = match PublicKey::from_file_text(Path::new("the server's answer"), &view.public_key_file) {
            Ok(key) if key.id == view.id => key,
            _ => {
                eprintln!(
                    "WARNING: the server's audit key {} is not a valid public key file; skipped",
                    view.id
                );
                continue;
            }
        };
        let path = key_path(bundle, &key.id);
        match std::fs::read_to_string(&path) {
            Ok(text) => match PublicKey::from_file_text(&path, &text) {
                Ok(saved) if saved == key => {
                    eprintln!(
                        "audit key {}: {} (already saved as {})",
                        key.id,
                        key.fingerprint(),
                        path.display()
                    )
                }
                saved => {
                    let saved = saved.map_or_else(|e| format!("not a public key ({e})"), |k| k.fingerprint());
                    eprintln!(
                        "WARNING: {} already holds a different key under the id {}:\n  \
                         saved:  {saved}\n  server: {}\n\
                         WARNING: a key id whose key changed is what a forged bundle or an impostor server \
                         looks like. The saved file was kept and the bundle will be checked against it; ask \
                         your operator which fingerprint is right (to take the server's, delete {} and \
                         download again).",
                        path.display(),
                        key.id,
                        key.fingerprint(),
                        path.display()
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&path, key.to_file_text()).map_err(|e| ClientError::Write(path.clone(), e))?;
                eprintln!("audit key {}: {} (saved as {})", key.id, key.fingerprint(), path.display());
            }
            Err(e) => return Err(ClientError::Read(path, e)),
        }
        if needed.is_empty() || needed.contains(&key.id) {
            trusted.push(path);
        }
    }
    if let Some(missing) = needed.iter().find(|id| !keys.keys.iter().any(|k| &k.id == *id)) {
        eprintln!("WARNING: the bundle names key {missing}, which the server does not list; ask your operator for it");
    }
    let mut command = format!("cella audit verify {}", shell_word(bundle));
    for path in &trusted {
        command.push_str(&format!(" --trusted-key {}", shell_word(path)));
    }
    eprintln!("compare the fingerprint with the one your operator gives you, then verify with:");
    eprintln!("  {command}");
    Ok(())
}

/// Streams a bundle to `<out>.partial` (progress on a terminal), then renames it to `out`. A
/// transfer that breaks off (the server aborts a failed export mid-stream) leaves nothing.
async fn save(response: reqwest::Response, out: &PathBuf) -> Result<(), ClientError> {
    let tmp = out.with_extension("partial");
    let file = tokio::fs::File::create(&tmp).await.map_err(|e| ClientError::Write(tmp.to_owned(), e))?;
    let result = stream_to(response, file, &tmp).await;
    let bytes = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| ClientError::Write(out.clone(), e))?;
    eprintln!("wrote {} bytes to {}", bytes, out.display());
    Ok(())
}

async fn stream_to(
    response: reqwest::Response,
    file: tokio::fs::File,
    tmp: &std::path::Path,
) -> Result<u64, ClientError> {
    use futures_util::StreamExt;
    use std::io::{IsTerminal, Write};
    use tokio::io::AsyncWriteExt;

    let tty = std::io::stderr().is_terminal();
    let mut writer = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut body = response.bytes_stream();
    let (mut bytes, mut shown) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ClientError::Interrupted(bytes, e))?;
        writer.write_all(&chunk).await.map_err(|e| ClientError::Write(tmp.to_owned(), e))?;
        bytes += chunk.len() as u64;
        if tty && bytes - shown >= 1 << 20 {
            shown = bytes;
            eprint!("\rdownloading {} MiB", bytes >> 20);
            let _ = std::io::stderr().flush();
        }
    }
    if tty && shown > 0 {
        eprintln!("\rdownloading {} MiB", bytes >> 20);
    }
    writer.flush().await.map_err(|e| ClientError::Write(tmp.to_owned(), e))?;
    writer.into_inner().sync_all().await.map_err(|e| ClientError::Write(tmp.to_owned(), e))?;
    Ok(bytes)
}
