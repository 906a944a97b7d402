//! `cella audit …`: export, verify, prove, keygen, checkpoint (its benchmark: `cella-bench audit`).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cella_audit::bundle::Bundle;
use cella_audit::checkpoint::CheckpointPolicy;
use cella_audit::export::{Export, ExportError, ExportRequest};
use cella_audit::proof::{self, InclusionProof};
use cella_audit::store;
use cella_audit::verify::{self, Failure, Options, Trust, VerifyError};
use cella_audit::{Chain, PublicKey, SigningKey, TenantId};
use clap::{Args, Subcommand};
use tokio::io::AsyncWriteExt;

use super::{runtime, CliError};
use crate::db;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an export bundle (or an inclusion proof) offline against the server's public key.
    /// Prints `OK: …` and exits 0, or prints `FAILED: <first failure>` and exits 1.
    Verify {
        /// The bundle (tar) or proof (JSON) file.
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Hashing threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Also check that this SARIF log is the one job --job produced: its SHA-256 against the
        /// one the job's `job.succeeded` event in the (verified) bundle records.
        #[arg(long, value_name = "FILE", requires = "job")]
        sarif: Option<PathBuf>,
        /// The job whose SARIF log --sarif is.
        #[arg(long, value_name = "JOB_ID", requires = "sarif")]
        job: Option<String>,
    },
    /// Write an inclusion proof for one event of a bundle; `cella audit verify` checks it alone.
    Prove {
        /// The bundle (exported from seq 1).
        bundle: PathBuf,
        /// The event's sequence number.
        #[arg(long)]
        seq: u64,
        /// Prove against this checkpoint index (default: the newest that covers the event).
        #[arg(long)]
        checkpoint: Option<u64>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Where to write the proof (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Export a chain from the database (DATABASE_URL) as a bundle.
    Export(ExportArgs),
    /// Download your own audit log from the server (CELLA_API_KEY) as a bundle, with the server's
    /// public key saved next to it; prints its fingerprint and the verify command.
    Download {
        /// First event: a sequence number or an RFC 3339 time
        #[arg(long)]
        from: Option<String>,
        /// Last event: a sequence number or an RFC 3339 time
        #[arg(long)]
        to: Option<String>,
        /// The bundle file to write
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: crate::client::Connection,
    },
    /// Print a public key's fingerprint (SHA256:…), to compare with the one your operator reads
    /// you over another channel.
    Fingerprint {
        /// A public key file (`.pub`).
        file: PathBuf,
    },
    /// Generate a checkpoint signing key: FILE (mode 0600) and FILE.pub.
    Keygen {
        /// The key id checkpoints will name (`k1`, `2026-11`).
        #[arg(long)]
        id: String,
        /// Where to write the private key; the public key goes to FILE.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// Cut the checkpoints that are due, for every chain (DATABASE_URL).
    Checkpoint {
        /// The signing key file (default: $CELLA_AUDIT_KEY). Using a new key id is a rotation.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Cut once this many events are uncovered.
        #[arg(long, default_value_t = CheckpointPolicy::default().every_events)]
        every_events: u64,
        /// Cut once the oldest uncovered event is this many seconds old.
        #[arg(long, default_value_t = CheckpointPolicy::default().every_secs)]
        every_secs: u64,
        /// Cut for every chain with uncovered events, due or not.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The tenant whose chain to export.
    #[arg(long, conflicts_with = "operator", required_unless_present = "operator")]
    tenant: Option<String>,
    /// Export the operator chain instead.
    #[arg(long)]
    operator: bool,
    /// First seq (default 1).
    #[arg(long)]
    from: Option<u64>,
    /// Last seq (default: the newest a signed checkpoint covers; see --sign-with).
    #[arg(long)]
    to: Option<u64>,
    /// Also write ocsf.jsonl (OCSF API Activity records for SIEMs).
    #[arg(long)]
    ocsf: bool,
    /// Cut a checkpoint with this key first, so the export reaches the newest event (a bundle
    /// holds only events a signed checkpoint covers).
    #[arg(long, value_name = "KEY_FILE")]
    sign_with: Option<PathBuf>,
    /// The bundle file to write.
    #[arg(long)]
    out: PathBuf,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::File { path: path.display().to_string(), source }
}

/// The environment variable naming the operator's pinned key file(s), separated by `:`.
pub const TRUSTED_KEY_ENV: &str = "CELLA_AUDIT_TRUSTED_KEY";

/// Whose keys `verify` and `prove` check signatures against.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The server's audit public key (a `.pub` file; `cella audit download` saves it next to the
    /// bundle, operators find it at <data dir>/audit-signing.key.pub); repeat for keys from before
    /// a rotation [default: the files in $CELLA_AUDIT_TRUSTED_KEY, separated by `:`]
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
    /// Check against the keys inside the file instead. Whoever made it could have made those
    /// keys too, so this proves nothing about who made it: it never says OK, and exits 1
    #[arg(long, conflicts_with = "trusted_keys")]
    insecure_trust_bundle_keys: bool,
}

const NO_TRUSTED_KEY: &str = "no trusted key: pass --trusted-key FILE with the server's audit public key \
(`cella audit download` saves it next to the bundle as cella-audit-<key id>.pub; operators have it at \
<data dir>/audit-signing.key.pub), or set CELLA_AUDIT_TRUSTED_KEY to it, and compare its fingerprint \
(`cella audit fingerprint FILE`) with the one your operator gives you. The keys inside a bundle prove \
nothing about who made it (--insecure-trust-bundle-keys checks against them anyway, and never says OK)";

impl TrustArgs {
    /// The pinned keys (`--trusted-key`, else `$CELLA_AUDIT_TRUSTED_KEY`), or the bundle's own
    /// with `--insecure-trust-bundle-keys`; a usage error without any.
    fn trust(&self) -> Result<Trust, CliError> {
        if self.insecure_trust_bundle_keys {
            return Ok(Trust::BundleKeys);
        }
        let paths: Vec<PathBuf> = if self.trusted_keys.is_empty() {
            std::env::var_os(TRUSTED_KEY_ENV)
                .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
                .unwrap_or_default()
        } else {
            self.trusted_keys.clone()
        };
        if paths.is_empty() {
            return Err(CliError::Usage(NO_TRUSTED_KEY.to_owned()));
        }
        Ok(Trust::Pinned(paths.iter().map(|p| PublicKey::read(p)).collect::<Result<_, _>>()?))
    }
}

/// What `--insecure-trust-bundle-keys` prints after a pass, on stderr.
const UNTRUSTED_WARNING: &str = "warning: --insecure-trust-bundle-keys: every check passed, but against \
keys that came inside the file; whoever made it could have made them too, so this proves nothing about \
who made it. Verify with --trusted-key FILE (the server's audit public key) to rely on it";

/// Runs one `cella audit` command.
pub fn run(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify { file, trust, threads, sarif, job } => {
            verify_file(&file, &trust.trust()?, threads)?;
            match (sarif, job) {
                (Some(sarif), Some(job)) => verify_sarif(&file, &sarif, &job),
                _ => Ok(()),
            }
        }
        AuditCommand::Prove { bundle, seq, checkpoint, trust, out } => {
            let trust = trust.trust()?;
            let data = fs::read(&bundle).map_err(file_err(&bundle))?;
            let b = Bundle::read(&data[..])?;
            let options = Options { trust: trust.clone(), threads: 0 };
            let proof = proof::prove(&b, seq, checkpoint, &options).map_err(|e| match e {
                proof::ProveError::Invalid(f) => CliError::VerificationFailed(f.to_string()),
                other => CliError::Usage(other.to_string()),
            })?;
            let mut text = serde_json::to_string_pretty(&proof).unwrap_or_default();
            text.push('\n');
            match &out {
                Some(path) => fs::write(path, text).map_err(file_err(path))?,
                None => print!("{text}"),
            }
            if trust == Trust::BundleKeys {
                // stdout may be the proof itself: the verdict goes to stderr.
                eprintln!(
                    "UNTRUSTED: the proof of event {seq} was made from a bundle checked only against its own keys"
                );
                eprintln!("{UNTRUSTED_WARNING}");
                return Err(CliError::Untrusted);
            }
            Ok(())
        }
        AuditCommand::Fingerprint { file } => {
            let key = PublicKey::read(&file)?;
            println!("{} (key {})", key.fingerprint(), key.id);
            Ok(())
        }
        AuditCommand::Export(args) => runtime()?.block_on(export_cmd(args)),
        AuditCommand::Download { from, to, out, conn } => {
            Ok(runtime()?.block_on(crate::client::admin::audit_download(&conn, from, to, &out))?)
        }
        AuditCommand::Keygen { id, out } => {
            let key = SigningKey::generate(&id)?;
            let pub_path = key.save(&out)?;
            eprintln!(
                "wrote signing key {id} to {} (mode 0600) and its public key to {} (fingerprint {})",
                out.display(),
                pub_path.display(),
                key.public().fingerprint()
            );
            Ok(())
        }
        AuditCommand::Checkpoint { key, every_events, every_secs, force } => {
            let key = load_key(key)?;
            let policy = CheckpointPolicy { every_events, every_secs };
            runtime()?.block_on(async {
                let pool = db::connect(&db::database_url().map_err(CliError::Usage)?, 2).await?;
                let cut = store::cut_due_checkpoints(&pool, &key, policy, force).await?;
                for cp in &cut {
                    println!(
                        "{}: checkpoint {} at tree size {}, key {}",
                        cp.chain, cp.index, cp.tree_size, cp.key_id
                    );
                }
                if cut.is_empty() {
                    println!("no checkpoint due");
                }
                Ok(())
            })
        }
    }
}

fn load_key(path: Option<PathBuf>) -> Result<SigningKey, CliError> {
    let path = path.or_else(|| std::env::var_os("CELLA_AUDIT_KEY").map(PathBuf::from)).ok_or_else(|| {
        CliError::Usage(
            "no signing key: pass --key FILE or set CELLA_AUDIT_KEY (create one with `cella audit keygen`)"
                .into(),
        )
    })?;
    Ok(SigningKey::load(&path)?)
}

impl From<Failure> for CliError {
    fn from(failure: Failure) -> Self {
        CliError::VerificationFailed(failure.to_string())
    }
}

impl From<VerifyError> for CliError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Read(e) => CliError::Bundle(e),
            VerifyError::Failed(failure) => failure.into(),
        }
    }
}

fn verify_file(path: &Path, trust: &Trust, threads: usize) -> Result<(), CliError> {
    let mut file = fs::File::open(path).map_err(file_err(path))?;
    let mut first = [0u8; 1];
    let n = file.read(&mut first).map_err(file_err(path))?;
    file.seek(SeekFrom::Start(0)).map_err(file_err(path))?;
    if n == 1 && first[0] == b'{' {
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(file_err(path))?;
        let proof: InclusionProof = serde_json::from_slice(&data)
            .map_err(|e| CliError::VerificationFailed(format!("proof: not a Cella inclusion proof ({e})")))?;
        let report =
            proof::verify_proof(&proof, trust).map_err(|f| CliError::VerificationFailed(f.to_string()))?;
        // `OK: …`, or `UNTRUSTED: …` against the proof's own key.
        println!("{report}");
        return untrusted_unless(report.pinned);
    }
    // Streamed from the file: memory stays bounded however large events.jsonl is.
    let report = verify::verify_tar(file, &Options { trust: trust.clone(), threads })?;
    println!("{report}");
    untrusted_unless(report.pinned)
}

/// Checks that `sarif` is the SARIF log job `job` produced, by the SHA-256 its `job.succeeded`
/// event records in the bundle (which the caller verified).
fn verify_sarif(bundle: &Path, sarif: &Path, job: &str) -> Result<(), CliError> {
    let data = fs::read(sarif).map_err(file_err(sarif))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &data);
    let actual: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut file = fs::File::open(bundle).map_err(file_err(bundle))?;
    let event = cella_audit::bundle::find_event(&mut file, |e| {
        e.action == "job.succeeded" && e.resource.kind == "job" && e.resource.id == job
    })?
    .ok_or_else(|| {
        CliError::VerificationFailed(format!(
            "the bundle holds no job.succeeded event of job {job} (export a range that includes it)"
        ))
    })?;
    let recorded = event.details["sarif_sha256"].as_str().unwrap_or_default();
    if recorded != actual {
        return Err(CliError::VerificationFailed(format!(
            "{} is not job {job}'s SARIF log: its SHA-256 is {actual}, event {} records {}",
            sarif.display(),
            event.seq,
            if recorded.is_empty() { "none" } else { recorded }
        )));
    }
    println!(
        "OK: {} is job {job}'s SARIF log (SHA-256 {actual}, recorded by event {} at {}; artifact {} {} bytes, SHA-256 {})",
        sarif.display(),
        event.seq,
        event.time,
        event.details["artifact"]["name"].as_str().unwrap_or("(unnamed)"),
        event.details["artifact"]["bytes"],
        event.details["artifact"]["sha256"].as_str().unwrap_or("?"),
    );
    Ok(())
}

/// A pass against pinned keys is success; against the file's own keys, a warning and exit 1.
fn untrusted_unless(pinned: bool) -> Result<(), CliError> {
    if pinned {
        return Ok(());
    }
    eprintln!("{UNTRUSTED_WARNING}");
    Err(CliError::Untrusted)
}

async fn export_cmd(args: ExportArgs) -> Result<(), CliError> {
    let chain = match (&args.tenant, args.operator) {
        (Some(t), false) => {
            Chain::Tenant(TenantId::new(t.clone()).map_err(|e| CliError::Usage(e.to_string()))?)
        }
        _ => Chain::Operator,
    };
    let key = args.sign_with.as_deref().map(SigningKey::load).transpose()?;
    let pool = db::connect(&db::database_url().map_err(CliError::Usage)?, 2).await?;
    if let Some(key) = &key {
        store::cut_checkpoint(&pool, &chain, key, CheckpointPolicy::default(), true).await?;
    }
    let request = ExportRequest { chain, from: args.from, to: args.to, ocsf: args.ocsf };
    let export = Export::begin(&pool, &request).await.map_err(|e| match e {
        e @ (ExportError::NotCovered { .. } | ExportError::NoCheckpoint { .. }) => CliError::Usage(format!(
            "{e} (`cella audit export --sign-with KEY_FILE` cuts one as part of the export)"
        )),
        other => other.into(),
    })?;
    if let Some(clamped) = export.clamped() {
        eprintln!(
            "note: events {}..{} are not yet covered by a signed checkpoint, so the bundle stops at {}; \
             --sign-with KEY_FILE cuts a checkpoint first and exports them too",
            clamped.covered + 1,
            clamped.head,
            clamped.covered
        );
    }
    // Write next to the target and rename, so a failed export never leaves half a bundle.
    let tmp = args.out.with_extension("partial");
    let file = tokio::fs::File::create(&tmp).await.map_err(file_err(&tmp))?;
    let mut writer = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let exported = match export.write_to(&mut writer).await {
        Ok(e) => e,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    writer.flush().await.map_err(file_err(&tmp))?;
    writer.into_inner().sync_all().await.map_err(file_err(&tmp))?;
    fs::rename(&tmp, &args.out).map_err(file_err(&args.out))?;
    let manifest = exported.manifest;
    eprintln!(
        "exported {} events of {} (seq {}..{}), {} checkpoints, {} keys to {}",
        manifest.counts.events,
        manifest.chain,
        manifest.range.from,
        manifest.range.to,
        manifest.counts.checkpoints,
        manifest.counts.keys,
        args.out.display()
    );
    Ok(())
}
