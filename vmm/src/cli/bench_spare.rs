//! `cella-vmm bench spare`: what a jailed launch costs when its VMM was started ahead (a spare,
//! the service's way) and when it is made at launch (cold), side by side in one run with the
//! same `hello` as a static native process under bubblewrap. A spare launch is timed from
//! `PUT /vm` to `finish` answering (guest run, teardown and scrub included); the spare's start
//! (jail, VMM start, VM build, confinement) happens before, untimed, as it does in the service.
//! A cold launch is the whole `cella-vmm run --jailed -- hello` command. Runs are interleaved.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cella_vmm::default_runner_image;
use cella_vmm::spare::{Spare, SpareJail, SpareOptions};
use cella_vmm::GuestExit;
use clap::Args;

use super::bench::{figures, time_one, which, Figures};
use super::exit_code;

#[derive(Debug, Args)]
pub struct SpareBenchArgs {
    /// Timed launches of each kind
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// The uid/gid the jailed VMMs run as
    #[arg(long, default_value_t = 64_090)]
    uid: u32,
}

pub fn main(args: SpareBenchArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cella-vmm bench spare: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

/// One launch from a spare made ahead: ms from `PUT /vm` to the report.
fn spare_launch(options: &SpareOptions) -> Result<f64, String> {
    let spare = Spare::start(options).map_err(|e| cella_vmm::error_chain(&e))?;
    // Untimed: the spare gets ready (its first answer comes once it is confined and serving).
    spare.api().state().map_err(|e| cella_vmm::error_chain(&e))?;
    let started = Instant::now();
    spare.api().start_vm(None, &[]).map_err(|e| cella_vmm::error_chain(&e))?;
    let report = spare.api().finish(Duration::from_secs(5)).map_err(|e| cella_vmm::error_chain(&e))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if report.exit != (GuestExit::Exited { code: 0 }) || !report.scrub.verified_zero {
        return Err(format!("the spare's hello ended as {:?}", report.exit));
    }
    spare.wait().map_err(|e| e.to_string())?;
    Ok(ms)
}

fn run(args: &SpareBenchArgs) -> Result<(), String> {
    let image = default_runner_image().map_err(|e| e.to_string())?;
    let native = image.with_file_name("native-hello");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let jailer = exe.with_file_name("cella-jailer");
    if !jailer.is_file() {
        return Err(format!("no cella-jailer beside {}; run scripts/setup.sh", exe.display()));
    }
    let bwrap = which("bwrap").ok_or("bwrap is not installed (scripts/setup.sh installs it)")?;
    let options = |jailed: bool, n: usize| SpareOptions {
        template: None,
        vmm: exe.clone(),
        jail: jailed.then(|| SpareJail {
            jailer: jailer.clone(),
            id: format!("bench-spare-{}-{n}", std::process::id()),
            uid: args.uid,
            gid: args.uid,
            chroot_base: None,
            memory_limit_mib: 64 + 32,
            cpus: None,
            pids_max: 16,
            from_prepared: None,
        }),
        image: Some(image.clone()),
        mem_mib: 64,
        timeout: Duration::from_secs(10),
        seccomp: None,
        guest_args: vec!["hello".into()],
        run_dir: std::env::temp_dir(),
        capture_stderr: true,
    };
    let cold = |n: usize| {
        let mut command = Command::new(&exe);
        command.args(["run", "--jailed", "--mem-mib", "64", "--jail-uid", &args.uid.to_string()]);
        command.args(["--jail-gid", &args.uid.to_string(), "--jail-id"]);
        command.arg(format!("bench-cold-{}-{n}", std::process::id()));
        command.arg("--image").arg(&image).args(["--", "hello"]);
        command
    };
    let mut boxed = Command::new(&bwrap);
    boxed.args(["--unshare-all", "--die-with-parent", "--ro-bind"]).arg(&native).args(["/hello", "/hello"]);

    let mut samples: [Vec<f64>; 4] = Default::default();
    let warmup = 3;
    for i in 0..warmup + args.runs {
        let round = [
            spare_launch(&options(true, i))?,
            spare_launch(&options(false, i))?,
            time_one(&mut cold(i))?,
            time_one(&mut boxed)?,
        ];
        if i >= warmup {
            for (kind, ms) in round.into_iter().enumerate() {
                samples[kind].push(ms);
            }
        }
    }
    let [jailed, unjailed, cold, bwrap] = samples.map(figures);
    println!("launch of `hello` (64 MiB guest), {} interleaved runs of each", args.runs);
    println!("{:<52} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "mean ms", "min ms");
    let row = |name: &str, f: &Figures| {
        println!("{name:<52} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", f.p50_ms, f.p99_ms, f.mean_ms, f.min_ms)
    };
    row("jailed spare: PUT /vm -> finish (VMM started ahead)", &jailed);
    row("unjailed spare: PUT /vm -> finish", &unjailed);
    row("jailed, made at launch: cella-vmm run --jailed", &cold);
    row("bwrap --unshare-all, static native hello", &bwrap);
    let ratio = |f: &Figures| f.p50_ms / bwrap.p50_ms;
    let verdict = |r: f64, goal: f64| if r <= goal { "met" } else { "NOT met" };
    let (r_spare, r_cold) = (ratio(&jailed), ratio(&cold));
    println!("ratio jailed spare / bwrap p50: {r_spare:.2} (goal <= 1.1: {})", verdict(r_spare, 1.1));
    println!("ratio jailed cold  / bwrap p50: {r_cold:.2} (goal <= 1.5: {})", verdict(r_cold, 1.5));
    Ok(())
}
