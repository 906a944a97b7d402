//! `cella-bench vm launch`: launch-to-exit latency of `hello` in a Cella microVM, side by side
//! in one run with a static native process doing the same work and with that process under
//! bubblewrap. Runs are interleaved (cella, native, bwrap, cella, …) so that noise on this
//! shared machine falls on all three alike.

mod firecracker;
mod packs;
mod pause;
mod scan;
mod session;
mod spare;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use cella_vmm::default_runner_image;
use clap::Subcommand;
use serde::Serialize;

use crate::exit_code;

/// Untimed launches of each kind before measuring.
const WARMUP: usize = 5;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Launch-to-exit latency of `hello`: Cella microVM vs native process vs bubblewrap
    Launch {
        /// Timed launches of each kind
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Print the figures as one JSON object instead of a table
        #[arg(long)]
        json: bool,
        /// Guest image [default: the cella-runner that scripts/setup.sh built]
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// Static native program for the comparison [default: native-hello beside the image]
        #[arg(long, value_name = "PATH")]
        native: Option<PathBuf>,
    },
    /// Scan throughput in a Cella VM vs the same engine natively vs ripgrep, and end-to-end
    /// `scan` latency for a 1 MiB and a 100 MiB tarball
    Scan(scan::ScanBenchArgs),
    /// What tenant rule packs cost a scan: built-in packs alone and with 1 and 10 tenant packs
    /// of 50 rules, natively and in a Cella VM, same corpus
    Packs(packs::PacksBenchArgs),
    /// Pause and resume latency of a guest spinning at 100% CPU, through the control contract
    /// and through the control socket
    Pause(pause::PauseBenchArgs),
    /// Session lifecycle: cold launch + load vs restore to first answer, pause, resume,
    /// snapshot time and size, for several guest memory sizes
    Session(session::SessionBenchArgs),
    /// Jailed launch from a spare VMM started ahead, and made at launch, vs bubblewrap
    Spare(spare::SpareBenchArgs),
    /// A job VM's launch vs a Firecracker boot to exit (whole process, and started ahead);
    /// Firecracker built from source in a scratch folder
    Firecracker(firecracker::FirecrackerBenchArgs),
}

/// Latency figures for one kind of launch, in milliseconds.
#[derive(Debug, Serialize)]
pub(crate) struct Figures {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_ms: f64,
    pub(crate) min_ms: f64,
}

#[derive(Debug, Serialize)]
struct LaunchBench {
    runs: usize,
    cella: Figures,
    native: Figures,
    bwrap: Option<Figures>,
    /// p50 ratios: below 1.0 means Cella is faster.
    cella_over_bwrap_p50: Option<f64>,
    cella_over_native_p50: f64,
}

pub fn main(cmd: BenchCommand) -> ExitCode {
    let (runs, json, image, native) = match cmd {
        BenchCommand::Launch { runs, json, image, native } => (runs, json, image, native),
        BenchCommand::Scan(args) => return scan::main(args),
        BenchCommand::Packs(args) => return packs::main(args),
        BenchCommand::Pause(args) => return pause::main(args),
        BenchCommand::Session(args) => return session::main(args),
        BenchCommand::Spare(args) => return spare::main(args),
        BenchCommand::Firecracker(args) => return firecracker::main(args),
    };
    match launch(runs.max(1), image, native) {
        Ok(bench) => {
            if json {
                println!("{}", serde_json::to_string(&bench).unwrap_or_default());
            } else {
                print_table(&bench);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cella-bench vm: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

fn launch(runs: usize, image: Option<PathBuf>, native: Option<PathBuf>) -> Result<LaunchBench, String> {
    let image = image.map(Ok).unwrap_or_else(default_runner_image).map_err(|e| e.to_string())?;
    let native = native.unwrap_or_else(|| image.with_file_name("native-hello"));
    if !native.is_file() {
        return Err(format!("no native comparison program at {}; run scripts/setup.sh", native.display()));
    }
    let exe = crate::binaries::sibling("cella-vmm")?;
    let mut cella = Command::new(&exe);
    cella.arg("run").arg("--image").arg(&image).args(["--", "hello"]);
    let mut plain = Command::new(&native);
    let mut bwrap = which("bwrap").map(|bwrap| {
        let mut c = Command::new(bwrap);
        c.args(["--unshare-all", "--die-with-parent", "--ro-bind"]).arg(&native).args(["/hello", "/hello"]);
        c
    });
    if bwrap.is_none() {
        eprintln!(
            "cella-bench vm: bwrap is not installed (scripts/setup.sh installs it); skipping that column"
        );
    }

    let mut samples = [Vec::with_capacity(runs), Vec::with_capacity(runs), Vec::with_capacity(runs)];
    for i in 0..WARMUP + runs {
        let kinds: [Option<&mut Command>; 3] = [Some(&mut cella), Some(&mut plain), bwrap.as_mut()];
        for (kind, command) in kinds.into_iter().enumerate() {
            let Some(command) = command else { continue };
            let ms = time_one(command)?;
            if i >= WARMUP {
                samples[kind].push(ms);
            }
        }
        let done = (i + 1).saturating_sub(WARMUP);
        if done > 0 && done.is_multiple_of(50) {
            eprintln!("cella-bench vm: {done} of {runs} rounds");
        }
    }
    let has_bwrap = bwrap.is_some();
    let [cella, native, bwrap] = samples.map(figures);
    let bwrap = has_bwrap.then_some(bwrap);
    Ok(LaunchBench {
        runs,
        cella_over_bwrap_p50: bwrap.as_ref().map(|b| cella.p50_ms / b.p50_ms),
        cella_over_native_p50: cella.p50_ms / native.p50_ms,
        cella,
        native,
        bwrap,
    })
}

/// Spawns `command`, waits for it, and returns the wall time in ms; a failed run is an error.
pub(crate) fn time_one(command: &mut Command) -> Result<f64, String> {
    let started = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if !status.success() {
        return Err(format!("{:?} failed ({status}); run it by hand to see why", command));
    }
    Ok(ms)
}

pub(crate) fn figures(mut ms: Vec<f64>) -> Figures {
    if ms.is_empty() {
        return Figures { p50_ms: f64::NAN, p99_ms: f64::NAN, mean_ms: f64::NAN, min_ms: f64::NAN };
    }
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Figures {
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        min_ms: ms[0],
    }
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn print_table(b: &LaunchBench) {
    println!("launch-to-exit of `hello`, {} interleaved runs of each (wall time, spawn to exit)", b.runs);
    println!("{:<32} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "mean ms", "min ms");
    let row = |name: &str, f: &Figures| {
        println!("{name:<32} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", f.p50_ms, f.p99_ms, f.mean_ms, f.min_ms)
    };
    row("Cella microVM (cella-vmm run)", &b.cella);
    row("native static process", &b.native);
    match &b.bwrap {
        Some(f) => row("bwrap --unshare-all, same process", f),
        None => println!("{:<32} {:>8}", "bwrap", "n/a"),
    }
    println!("ratio cella/native p50: {:.2}", b.cella_over_native_p50);
    if let Some(r) = b.cella_over_bwrap_p50 {
        let verdict = if r <= 1.0 { "met" } else { "NOT met" };
        println!("ratio cella/bwrap  p50: {r:.2}  (goal <= 1.00: {verdict})");
    }
}
