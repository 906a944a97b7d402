//! `cella-vmm template`: builds a template — a scanner VM with its devices set up and its scan
//! engine built from a policy, parked and snapshotted — that `scan --template` and
//! `spare --template` restore each job's VM from (see [`cella_vmm::template`]).

use std::path::PathBuf;
use std::process::ExitCode;

use cella_vmm::{default_scanner_image, error_chain, template};
use clap::Args;

use super::exit_code;

#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// The folder to write the template into (created if needed; a template already there is
    /// replaced)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Built-in rule packs whose engine the template holds, comma-separated (secrets, pii,
    /// licenses)
    #[arg(long, value_name = "PACKS", default_value = "secrets,pii,licenses", value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Also this rule pack file (TOML, same format as policies/rules/*.toml)
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// This compiled policy instead (JSON, as cella-policies serializes it)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["policy", "policy_file"])]
    pub compiled_policy: Option<PathBuf>,
    /// Guest image [default: the cella-scanner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest memory in MiB (every VM restored from the template has this much)
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub mem_mib: u64,
    /// Print the template's identity and timings as one JSON line instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: TemplateArgs) -> ExitCode {
    let fail = |code: u8, message: String| {
        tracing::error!("{message}");
        ExitCode::from(code)
    };
    let image = match args.image.clone().map(Ok).unwrap_or_else(default_scanner_image) {
        Ok(image) => image,
        Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
    };
    let policy = match super::policy::compile(
        &args.policy,
        args.policy_file.as_deref(),
        args.compiled_policy.as_deref(),
    ) {
        Ok(policy) => policy,
        Err(message) => return fail(exit_code::BAD_INPUT, message),
    };
    match template::build(&image, args.mem_mib, &policy, &args.out) {
        Ok(built) => {
            if args.json {
                println!("{}", serde_json::to_string(&built).unwrap_or_default());
            } else {
                println!(
                    "template {} in {}: engine of policy {} ready after {:.1} ms, {} KiB of memory kept, {:.1} ms in all",
                    built.identity.id,
                    built.dir.display(),
                    &built.identity.policy_sha256[..16],
                    built.prepare_ms,
                    built.memory_bytes >> 10,
                    built.total_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(e @ template::TemplateError::Build(_)) if e.is_bad_input() => {
            fail(exit_code::BAD_INPUT, error_chain(&e))
        }
        Err(e) => fail(exit_code::VMM_FAILED, error_chain(&e)),
    }
}
