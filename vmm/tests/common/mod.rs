//! Shared helpers for the VMM's integration tests: the runner image, the CLI, JSON reports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

/// The guest image that `scripts/setup.sh` built; the tests cannot run without it.
pub fn runner_image() -> PathBuf {
    cella_vmm::default_runner_image().unwrap_or_else(|e| panic!("{e}; run scripts/setup.sh first"))
}

/// `cella-vmm` with the given arguments.
pub fn cella_vmm(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cella-vmm"));
    command.args(args).env(cella_vmm::vmm_config::RUNNER_IMAGE_ENV, runner_image());
    command
}

/// Runs `cella-vmm run --json [extra…] -- guest…` and returns its output and parsed report.
pub fn run_json(extra: &[&str], guest: &[&str]) -> (Output, Value) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(guest);
    let output = cella_vmm(&args).output().expect("cella-vmm starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no JSON on stdout; stderr: {}", String::from_utf8_lossy(&output.stderr)));
    let report = serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON {last:?}: {e}"));
    (output, report)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

/// Asserts that the report's scrub evidence is complete and clean.
pub fn assert_scrubbed(report: &Value) {
    let scrub = &report["scrub"];
    assert_eq!(scrub["verified_zero"], true, "{scrub}");
    assert_eq!(scrub["released"], true, "{scrub}");
    assert_eq!(scrub["blocks_after_release"], 0, "{scrub}");
    let bytes = scrub["bytes"].as_u64().unwrap();
    assert_eq!(scrub["pages_verified"].as_u64().unwrap(), bytes / 4096, "{scrub}");
}

/// Writes a minimal x86-64 ELF executable with one segment of `memsz` bytes at 2 MiB.
pub fn write_elf(path: &std::path::Path, memsz: u64) {
    let mut b = vec![0u8; 64 + 56 + 16];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    b[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// A fresh scratch folder under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A ustar archive of `(name, contents)` regular files (names verbatim, hostile ones too).
#[allow(unused_imports)] // not every test file builds archives
pub use cella_e2e::ustar as tar;

/// What a jailed VMM needs: `cella-jailer`, and a static `cella-vmm` (the jail has no shared
/// libraries).
pub struct JailBinaries {
    pub jailer: PathBuf,
    pub static_vmm: PathBuf,
}

/// `target/<profile>`, from this test executable's path (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned()
}

fn cargo(profile: &Path, args: &[&str], rustc_flags: &[&str]) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.args(args).arg("--quiet").arg("--manifest-path").arg(&manifest);
    command.arg("--target-dir").arg(profile.parent().expect("target dir"));
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(other) => {
            command.args(["--profile", other]);
        }
        None => panic!("no profile name in {}", profile.display()),
    }
    if !rustc_flags.is_empty() {
        command.arg("--").args(rustc_flags);
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "{command:?} failed");
}

/// Builds `cella-jailer` and a static `cella-vmm` once per test binary (as scripts/setup.sh
/// does, without debug info to keep the per-launch copy small, with the `test-hooks` feature) and copies the VMM into
/// `target/<profile>/<folder>/`. The static build replaces `target/<profile>/cella-vmm`, the
/// binary the tests also run as the outer process: every jailed test calls this first, so none
/// runs it while it is being relinked.
pub fn jail_binaries(folder: &str) -> &'static JailBinaries {
    static BINARIES: OnceLock<JailBinaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let profile = profile_dir();
        cargo(&profile, &["build", "-p", "cella-jailer", "--bin", "cella-jailer"], &[]);
        cargo(
            &profile,
            &["rustc", "-p", "cella-vmm", "--bin", "cella-vmm", "--features", "test-hooks"],
            &["-C", "target-feature=+crt-static", "-C", "strip=debuginfo"],
        );
        let out = profile.join(folder).join("cella-vmm");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let tmp = out.with_extension("new");
        std::fs::copy(profile.join("cella-vmm"), &tmp).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
        JailBinaries { jailer: profile.join("cella-jailer"), static_vmm: out }
    })
}

/// `Name:\tvalue` from a /proc status file.
pub fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

/// Every thread of `pid`: (name, status file).
pub fn threads(pid: u32) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let task = entry.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        found.push((status_field(&status, "Name"), status));
    }
    found
}

/// The pid of the jailed VMM: the jailer's one child.
pub fn jailed_vmm(jailer: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{jailer}/task/{jailer}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse().ok()) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "cella-vmm" {
                return pid;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no jailed VMM under cella-jailer {jailer}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A jailed spare's VMM, `pid`: the jailer handed it off and is gone, so it is this process's
/// own child, exec'd already.
pub fn handed_off_vmm(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Name"), "cella-vmm", "{status}");
    assert_eq!(status_field(&status, "PPid"), std::process::id().to_string(), "no process between");
    pid
}

/// Waits until the spare has both its threads (it confines itself before it starts the API
/// thread, and puts its own filter on right after).
pub fn wait_confined(pid: u32) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = threads(pid);
        if found.len() == 2 && found.iter().all(|(_, s)| status_field(s, "Seccomp") == "2") {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "spare not confined in time: {found:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A repository's history as a git bundle, in a tar with `filler` bytes of zeros beside it:
/// 120 files, each its own words, edited over 12 commits; a live-shaped Stripe key committed in
/// one file and deleted later. Made with the real `git`.
pub fn history_tar(dir: &Path, filler: usize) -> Vec<u8> {
    let repo = dir.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).unwrap();
    cella_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    for rev in 0..12u64 {
        for file in (0..120u64).filter(|f| rev == 0 || (f + rev) % 4 == 0) {
            let path = repo.join(format!("src/m{}/f{file}.txt", file % 10));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, cella_e2e::file_version(file, rev)).unwrap();
        }
        std::fs::create_dir_all(repo.join("config")).unwrap();
        let key = repo.join("config/payments.env");
        match rev {
            3 => std::fs::write(&key, "STRIPE_KEY=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n").unwrap(),
            8 => std::fs::remove_file(&key).unwrap(),
            _ => {}
        }
        cella_e2e::git(&repo, &["add", "-A"]);
        cella_e2e::git(&repo, &["commit", "-q", "-m", &format!("Revision {rev}")]);
    }
    cella_e2e::git(&repo, &["repack", "-adf", "-q"]);
    let bundle = dir.join("repo.bundle");
    cella_e2e::git(&repo, &["bundle", "create", "-q", bundle.to_str().unwrap(), "--all"]);
    let bundle = std::fs::read(&bundle).unwrap();
    let zeros = vec![0u8; filler];
    tar(&[("repo.bundle", &bundle), ("filler.bin", &zeros)])
}
