//! `cella-bench vm firecracker --firecracker PATH`: a Cella job VM's launch against a
//! Firecracker boot to exit, same machine, same run, interleaved. Firecracker is not part of
//! Cella: build it from source in a scratch folder (never in this repository) and pass its
//! binary.
//!
//! Firecracker's guest is the most trivial one it boots: an ELF "kernel" (written here) whose
//! entry, reached in long mode at CPL 0, writes 0xFE to the i8042 command port, a CPU reset,
//! which Firecracker takes as the guest's end. Cella's guest is `cella-runner exit 0`. Both
//! get the same memory. Two comparisons:
//! - **whole process**: exec to exit: `firecracker --no-api --config-file` against
//!   `cella-vmm run -- exit 0`;
//! - **started ahead**: the VMM process already running and configured (untimed), then the
//!   launch to its end: Firecracker's `PUT /actions InstanceStart` until its process exits,
//!   against a Cella spare's `PUT /vm` until `finish` answers (guest run, teardown and the
//!   verified scrub of its memory included), the way the service launches a job.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use cella_vmm::control::ControlClient;
use cella_vmm::default_runner_image;
use cella_vmm::spare::SpareOptions;
use clap::Args;
use serde_json::json;

use super::{figures, time_one, Figures};
use crate::exit_code;

/// Untimed launches of each kind before measuring.
const WARMUP: usize = 3;
/// Where the trivial guest is loaded and entered (Firecracker's kernel load address).
const GUEST_ADDR: u64 = 0x100_0000;
/// `mov $0xfe, %al; out %al, $0x64; 1: hlt; jmp 1b`.
const GUEST_CODE: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

#[derive(Debug, Args)]
pub struct FirecrackerBenchArgs {
    /// The Firecracker binary, built from source in a scratch folder
    #[arg(long, value_name = "PATH")]
    firecracker: PathBuf,
    /// Timed launches of each kind
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Guest memory of both, in MiB
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
}

pub fn main(args: FirecrackerBenchArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cella-bench vm firecracker: error: {e}");
            ExitCode::from(exit_code::BAD_INPUT)
        }
    }
}

/// A minimal x86-64 ELF executable: one segment, the headers and [`GUEST_CODE`], loaded at
/// [`GUEST_ADDR`] and entered at the code.
fn trivial_guest() -> Vec<u8> {
    let code_at = 64 + 56;
    let mut b = vec![0u8; code_at];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1; // ELF version
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&(GUEST_ADDR + code_at as u64).to_le_bytes()); // entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    let size = (code_at + GUEST_CODE.len()) as u64;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R + X
    b[ph + 16..ph + 24].copy_from_slice(&GUEST_ADDR.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&GUEST_ADDR.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&size.to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&size.to_le_bytes());
    b[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    b.extend_from_slice(&GUEST_CODE);
    b
}

/// Firecracker started and configured over its API (untimed); ms from `InstanceStart` to the
/// process's exit.
fn firecracker_ahead(firecracker: &Path, dir: &Path, kernel: &Path, mem_mib: u64) -> Result<f64, String> {
    let sock = dir.join("firecracker.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(firecracker)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--level", "Warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", firecracker.display()))?;
    let api = ControlClient::new(&sock).with_timeout(Duration::from_secs(5));
    // Its socket may exist a moment before it listens: ask until it answers.
    let waited = Instant::now();
    while api.request("GET", "/", None).is_err() {
        if waited.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("Firecracker's API did not answer within 5 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let configure = [
        ("/boot-source", json!({"kernel_image_path": kernel, "boot_args": "reboot=k"})),
        ("/machine-config", json!({"vcpu_count": 1, "mem_size_mib": mem_mib})),
    ];
    for (path, body) in configure {
        match api.request("PUT", path, Some(&body)) {
            Ok((status, _)) if status < 300 => {}
            answer => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("Firecracker's PUT {path}: {answer:?}"));
            }
        }
    }
    let started = Instant::now();
    // The guest may end before the answer is out: the exit is what counts.
    let _ = api.request("PUT", "/actions", Some(&json!({"action_type": "InstanceStart"})));
    let status = child.wait().map_err(|e| e.to_string())?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&sock);
    if !status.success() {
        return Err(format!("Firecracker ended with {status}"));
    }
    Ok(ms)
}

fn run(args: &FirecrackerBenchArgs) -> Result<(), String> {
    if !args.firecracker.is_file() {
        return Err(format!("no Firecracker binary at {}", args.firecracker.display()));
    }
    let vmm = crate::binaries::sibling("cella-vmm")?;
    let image = default_runner_image().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("cella-bench-firecracker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let kernel = dir.join("trivial-guest.elf");
    std::fs::write(&kernel, trivial_guest()).map_err(|e| e.to_string())?;
    let config = dir.join("config.json");
    let config_json = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "reboot=k"},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": args.mem_mib},
    });
    std::fs::write(&config, config_json.to_string()).map_err(|e| e.to_string())?;
    let mem = args.mem_mib.to_string();
    let firecracker_whole = || {
        let mut c = Command::new(&args.firecracker);
        c.arg("--no-api").arg("--config-file").arg(&config).args(["--level", "Warn"]);
        c
    };
    let cella_whole = || {
        let mut c = Command::new(&vmm);
        c.arg("run").arg("--image").arg(&image).args(["--mem-mib", &mem, "--", "exit", "0"]);
        c
    };
    let spare = SpareOptions {
        template: None,
        vmm: vmm.clone(),
        jail: None,
        image: Some(image.clone()),
        mem_mib: args.mem_mib,
        timeout: Duration::from_secs(10),
        seccomp: None,
        guest_args: vec!["exit".into(), "0".into()],
        run_dir: dir.clone(),
        capture_stderr: true,
    };

    let mut samples: [Vec<f64>; 4] = Default::default();
    for i in 0..WARMUP + args.runs.max(1) {
        let one = [
            time_one(&mut firecracker_whole())?,
            time_one(&mut cella_whole())?,
            firecracker_ahead(&args.firecracker, &dir, &kernel, args.mem_mib)?,
            super::spare::spare_launch(&spare)?,
        ];
        if i >= WARMUP {
            for (kind, ms) in one.into_iter().enumerate() {
                samples[kind].push(ms);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let [fc_whole, cella_whole, fc_ahead, cella_ahead] = samples.map(figures);
    println!(
        "a job VM's launch vs Firecracker boot to exit, {} MiB guests, {} interleaved runs of each",
        args.mem_mib,
        args.runs.max(1)
    );
    println!("{:<62} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "mean ms", "min ms");
    let row = |name: &str, f: &Figures| {
        println!("{name:<62} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", f.p50_ms, f.p99_ms, f.mean_ms, f.min_ms);
    };
    row("firecracker --no-api --config-file (trivial guest): exec->exit", &fc_whole);
    row("cella-vmm run -- exit 0: exec->exit", &cella_whole);
    row("firecracker started ahead: InstanceStart->exit", &fc_ahead);
    row("cella spare started ahead: PUT /vm->finish (scrub included)", &cella_ahead);
    let goal = |ratio: f64| if ratio <= 0.2 { "met" } else { "NOT met" };
    let whole_ratio = cella_whole.p50_ms / fc_whole.p50_ms;
    let ahead_ratio = cella_ahead.p50_ms / fc_ahead.p50_ms;
    println!(
        "ratio cella / firecracker p50, whole process: {whole_ratio:.2} (goal <= 0.2: {})",
        goal(whole_ratio)
    );
    println!(
        "ratio cella / firecracker p50, started ahead: {ahead_ratio:.2} (goal <= 0.2: {})",
        goal(ahead_ratio)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trivial guest is an ELF that Cella's own loader (linux-loader, as Firecracker's)
    /// accepts and enters at the code.
    #[test]
    fn the_trivial_guest_is_an_elf_with_its_code_at_the_entry() {
        let elf = trivial_guest();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        let offset = (entry - GUEST_ADDR) as usize;
        assert_eq!(&elf[offset..offset + GUEST_CODE.len()], &GUEST_CODE);
        let filesz = u64::from_le_bytes(elf[64 + 32..64 + 40].try_into().unwrap());
        assert_eq!(filesz as usize, elf.len());
    }
}
