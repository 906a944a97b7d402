//! `cella-bench jailer`: launch-to-exit latency of `hello` in a jailed Cella VM, side by side in
//! one run with the same VM unjailed and with a static native process under `bwrap
//! --unshare-all`, interleaved so machine noise falls on all alike; then the jailer's own cost
//! broken down by step (from `--timings`), so it is clear what dominates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;

use cella_jailer::timing::Timings;

use crate::vm::{figures, which, Figures};

/// Untimed launches of each kind before measuring.
const WARMUP: usize = 5;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Timed launches of each kind
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// The VMM binary, statically linked [default: cella-vmm next to this executable]
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<PathBuf>,
    /// Guest image [default: $CELLA_RUNNER_IMAGE, else target/cella/cella-runner]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Static native program for the bwrap comparison [default: native-hello beside the image]
    #[arg(long, value_name = "PATH")]
    pub native: Option<PathBuf>,
    /// Where the benchmark's jails are made
    #[arg(long, value_name = "DIR", default_value = "/dev/shm/cella-jailer-bench")]
    pub chroot_base: PathBuf,
    /// The jailed VMM's uid and gid
    #[arg(long, default_value_t = 64_000)]
    pub uid: u32,
    /// Guest memory in MiB (the memory limit adds 32 MiB of VMM overhead, as `cella-vmm run --jailed` does)
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u64,
}

fn default_image() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CELLA_RUNNER_IMAGE") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .skip(2)
        .take(2)
        .map(|up| up.join("cella").join("cella-runner"))
        .find(|c| c.is_file())
        .ok_or_else(|| {
            "no guest image: pass --image or set CELLA_RUNNER_IMAGE (scripts/setup.sh builds it)".into()
        })
}

/// Runs `command` to its end; returns wall ms and stderr.
fn time_one(command: &mut Command) -> Result<(f64, String), String> {
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!("{command:?} failed ({}): {stderr}", output.status));
    }
    Ok((ms, stderr))
}

pub fn main(args: BenchArgs) -> Result<(), String> {
    let vmm = match args.vmm {
        Some(vmm) => vmm,
        None => crate::binaries::sibling("cella-vmm")?,
    };
    let jailer = crate::binaries::sibling("cella-jailer")?;
    let image = args.image.map(Ok).unwrap_or_else(default_image)?;
    let native = args.native.unwrap_or_else(|| image.with_file_name("native-hello"));
    let bwrap = which("bwrap");
    if bwrap.is_none() || !native.is_file() {
        eprintln!("cella-bench jailer: bwrap or {} missing; skipping the bwrap column", native.display());
    }
    let memory = format!("memory={}M", args.mem_mib + 32);
    let mem = args.mem_mib.to_string();
    let ro = format!("{}=/image", image.display());

    let mut samples: [Vec<f64>; 4] = Default::default();
    // Step timings of the cold and the prepared jailed launches.
    let mut steps: [BTreeMap<String, Vec<f64>>; 2] = Default::default();
    let mut order: Vec<String> = Vec::new();
    for i in 0..WARMUP + args.runs {
        let mut unjailed = Command::new(&vmm);
        unjailed.arg("run").arg("--image").arg(&image).args(["--mem-mib", &mem, "--", "hello"]);
        let id = format!("bench-{}-{i}", std::process::id());
        let spare = format!("spare-{}-{i}", std::process::id());
        let jailed = |id: &str, extra: &[&str]| {
            let mut c = Command::new(&jailer);
            c.args(["--id", id])
                .args(extra)
                .arg("--exec-file")
                .arg(&vmm)
                .args(["--uid", &args.uid.to_string(), "--gid", &args.uid.to_string(), "--chroot-base"])
                .arg(&args.chroot_base)
                .args(["--new-pid-ns", "--cgroup", &memory, "--cgroup", "pids=16", "--cgroup", "cpu=1"])
                .args(["--ro-file", &ro, "--timings", "--", "run", "--image", "/image", "--mem-mib", &mem])
                .args(["--", "hello"]);
            c
        };
        // The spare is made outside the timed launch, as a worker makes it between jobs.
        let mut prepare = Command::new(&jailer);
        prepare
            .args(["prepare", "--id", &spare, "--exec-file"])
            .arg(&vmm)
            .arg("--chroot-base")
            .arg(&args.chroot_base);
        time_one(&mut prepare)?;

        let (ms, _) = time_one(&mut unjailed)?;
        let (cold_ms, cold_stderr) = time_one(&mut jailed(&format!("{id}-cold"), &[]))?;
        let (warm_ms, warm_stderr) = time_one(&mut jailed(&id, &["--from-prepared", &spare]))?;
        let b = match (&bwrap, native.is_file()) {
            (Some(bwrap), true) => {
                let mut c = Command::new(bwrap);
                c.args(["--unshare-all", "--die-with-parent", "--ro-bind"])
                    .arg(&native)
                    .args(["/hello", "/hello"]);
                Some(time_one(&mut c)?.0)
            }
            _ => None,
        };
        if i < WARMUP {
            continue;
        }
        samples[0].push(warm_ms);
        samples[1].push(cold_ms);
        samples[2].push(ms);
        if let Some(b) = b {
            samples[3].push(b);
        }
        for (kind, stderr) in [cold_stderr, warm_stderr].iter().enumerate() {
            if let Some(line) = stderr.lines().find_map(|l| l.strip_prefix("cella-jailer: timings: ")) {
                for (step, ms) in Timings::parse_line(line).steps {
                    if !order.contains(&step) {
                        order.push(step.clone());
                    }
                    steps[kind].entry(step).or_default().push(ms);
                }
            }
        }
    }

    let [prepared, cold, unjailed, bwrap_ms] = samples.map(figures);
    println!(
        "launch-to-exit of `hello`, {} interleaved runs of each (wall time, spawn to exit, ms)",
        args.runs
    );
    println!("{:<44} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p99", "mean", "min");
    let row = |name: &str, f: &Figures| {
        println!("{name:<44} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", f.p50_ms, f.p99_ms, f.mean_ms, f.min_ms)
    };
    row("Cella VM, jailed, jail prepared ahead", &prepared);
    row("Cella VM, jailed, jail made at launch", &cold);
    row("Cella VM, unjailed (cella-vmm run)", &unjailed);
    row("bwrap --unshare-all, static native process", &bwrap_ms);
    println!(
        "jailer overhead p50: {:.3} ms prepared ahead, {:.3} ms made at launch (jailed - unjailed)",
        prepared.p50_ms - unjailed.p50_ms,
        cold.p50_ms - unjailed.p50_ms
    );
    if !bwrap_ms.p50_ms.is_nan() {
        for (name, f) in [("prepared ahead", &prepared), ("made at launch", &cold)] {
            let ratio = f.p50_ms / bwrap_ms.p50_ms;
            let verdict = if ratio <= 1.5 { "met" } else { "NOT met" };
            println!("ratio jailed ({name})/bwrap p50: {ratio:.2} (goal <= 1.50: {verdict})");
        }
    }
    println!(
        "\njailer steps (ms; `vmm-run` is the VMM itself, from exec to exit; `exec` is the time \
         from the child's last step to the VMM's start, execveat of the host's binary included):"
    );
    println!("{:<28} {:>17} {:>17}", "", "made at launch", "prepared ahead");
    println!("{:<28} {:>8} {:>8} {:>8} {:>8}", "step", "p50", "p99", "p50", "p99");
    let cell = |f: Option<Figures>| match f {
        Some(f) => format!("{:>8.3} {:>8.3}", f.p50_ms, f.p99_ms),
        None => format!("{:>8} {:>8}", "-", "-"),
    };
    for step in &order {
        let [c, w] = [0, 1].map(|k| steps[k].remove(step).map(figures));
        println!("{step:<28} {} {}", cell(c), cell(w));
    }
    let _ = std::fs::remove_dir(args.chroot_base.join(vmm.file_name().unwrap_or_default()));
    let _ = std::fs::remove_dir(&args.chroot_base);
    Ok(())
}
