//! `cella-bench vm spare`: what a jailed launch costs when its VMM was started ahead (a spare,
//! the service's way) and when it is made at launch (cold), side by side in one run with the
//! same `hello` as a static native process under bubblewrap. A spare launch is timed from
//! `PUT /vm` to `finish` answering (guest run, teardown and scrub included); the spare's start
//! (jail, VMM start, VM build, confinement) happens before, untimed, as it does in the service.
//! A cold launch is the whole `cella-vmm run --jailed -- hello` command. Runs are interleaved.
//!
//! Then a small scan job (the service's unit of work) in a jailed spare of the scanner image,
//! booted and restored from a template of the same policy (`cella-vmm template`), timed the
//! same way from `PUT /vm` to the report, with the VM's own launch time (`PUT /vm` to the
//! guest's first exit) and time in the guest.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_proto::{Job, SarifContext};
use cella_vmm::job::JobFrames;
use cella_vmm::spare::{Spare, SpareJail, SpareOptions};
use cella_vmm::GuestExit;
use cella_vmm::{default_runner_image, default_scanner_image, template};
use clap::Args;

use super::{figures, time_one, which, Figures};
use crate::exit_code;

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
            eprintln!("cella-bench vm spare: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

/// One launch from a spare made ahead: ms from `PUT /vm` to the report.
pub(super) fn spare_launch(options: &SpareOptions) -> Result<f64, String> {
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

/// One small scan job in a spare made ahead: (ms from `PUT /vm` to the report, the VM's
/// launch in ms, its run in ms).
fn spare_scan(
    options: &SpareOptions,
    artifact: &std::path::Path,
    frames: &JobFrames,
) -> Result<[f64; 3], String> {
    let spare = Spare::start(options).map_err(|e| cella_vmm::error_chain(&e))?;
    spare.api().state().map_err(|e| cella_vmm::error_chain(&e))?;
    let file = std::fs::File::open(artifact).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let run = spare.run_job(&file, frames).map_err(|e| cella_vmm::error_chain(&e))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let report = run.vm.map_err(|e| cella_vmm::error_chain(&e))?;
    let job = run.job.map_err(|e| cella_vmm::error_chain(&e))?;
    if report.exit != (GuestExit::Exited { code: 0 }) || !report.scrub.verified_zero {
        return Err(format!("the scan ended as {:?}", report.exit));
    }
    if job.policy_preloaded != options.template.is_some() {
        return Err(format!("policy preloaded: {}, template: {:?}", job.policy_preloaded, options.template));
    }
    spare.wait().map_err(|e| e.to_string())?;
    Ok([ms, report.launch_us as f64 / 1e3, report.run_us as f64 / 1e3])
}

fn run(args: &SpareBenchArgs) -> Result<(), String> {
    let image = default_runner_image().map_err(|e| e.to_string())?;
    let native = image.with_file_name("native-hello");
    let exe = crate::binaries::sibling("cella-vmm")?;
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

    // The scan job: a template of the built-in packs, and a small file with one secret.
    let scanner = default_scanner_image().map_err(|e| e.to_string())?;
    let scratch = std::env::temp_dir().join(format!("cella-bench-spare-{}", std::process::id()));
    let policy = load_packs(DEFAULT_PACKS).map_err(|e| cella_vmm::error_chain(&e))?.as_bytes().to_vec();
    template::build(&scanner, 128, &policy, &scratch.join("template"))
        .map_err(|e| cella_vmm::error_chain(&e))?;
    let artifact = scratch.join("settings.env");
    let text = b"# settings\nSTRIPE_KEY=sk_live_4eC39HqLyjWDarjtT1zdp7dc\nOWNER=ops@northwind-trading.com\n";
    std::fs::write(&artifact, text).map_err(|e| e.to_string())?;
    let frames = JobFrames {
        job: Job {
            artifact_name: "settings.env".into(),
            artifact_size: text.len() as u64,
            fingerprint_key: "00".repeat(32),
            excludes: Vec::new(),
            baseline: None,
            sarif: SarifContext::default(),
            policy_preloaded: false,
            license_policy: Default::default(),
        },
        policy: std::sync::Arc::new(cella_vmm::job::SerializedPolicy::new(policy)),
        baseline: None,
    };
    let scan_options = |from_template: bool, n: usize| {
        let mut o = options(true, n);
        if let Some(jail) = o.jail.as_mut() {
            jail.id = format!("bench-scan-{}-{n}-{from_template}", std::process::id());
            jail.memory_limit_mib = 128 + 32;
        }
        o.image = Some(scanner.clone());
        o.mem_mib = 128;
        o.template = from_template.then(|| scratch.join("template"));
        o.guest_args = Vec::new();
        o
    };

    let mut samples: [Vec<f64>; 4] = Default::default();
    let mut scans: [Vec<f64>; 6] = Default::default();
    let warmup = 3;
    for i in 0..warmup + args.runs {
        let round = [
            spare_launch(&options(true, i))?,
            spare_launch(&options(false, i))?,
            time_one(&mut cold(i))?,
            time_one(&mut boxed)?,
        ];
        let booted = spare_scan(&scan_options(false, i), &artifact, &frames)?;
        let restored = spare_scan(&scan_options(true, i), &artifact, &frames)?;
        if i >= warmup {
            for (kind, ms) in round.into_iter().enumerate() {
                samples[kind].push(ms);
            }
            for (kind, ms) in booted.into_iter().chain(restored).enumerate() {
                scans[kind].push(ms);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let [jailed, unjailed, cold, bwrap] = samples.map(figures);
    let [booted_job, booted_launch, booted_run, restored_job, restored_launch, restored_run] =
        scans.map(figures);
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
    println!();
    println!("a small scan job (built-in packs, one file with a secret) in a jailed spare, 128 MiB guest");
    println!("{:<52} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "mean ms", "min ms");
    row("booted spare: PUT /vm -> report", &booted_job);
    row("  its VM launch (PUT /vm -> first exit)", &booted_launch);
    row("  its guest run", &booted_run);
    row("template spare: PUT /vm -> report", &restored_job);
    row("  its VM launch (PUT /vm -> first exit)", &restored_launch);
    row("  its guest run", &restored_run);
    println!(
        "ratio template / booted p50: job {:.2}, launch {:.2}, guest run {:.2}",
        restored_job.p50_ms / booted_job.p50_ms,
        restored_launch.p50_ms / booted_launch.p50_ms,
        restored_run.p50_ms / booted_run.p50_ms
    );
    Ok(())
}
