//! Shared helpers for the jailer's tests: the binaries, a static VMM, jail launches, residue.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The uid/gid jailed VMMs run as in these tests.
pub const UID: u32 = 64_001;
pub const GID: u32 = 64_002;

/// `target/<profile>`, from this test executable's path (`target/<profile>/deps/<test>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned()
}

pub fn jailer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cella-jailer"))
}

/// The guest image (`$CELLA_RUNNER_IMAGE` or the one scripts/setup.sh built).
pub fn runner_image() -> PathBuf {
    cella_vmm::default_runner_image().unwrap_or_else(|e| panic!("{e}; run scripts/setup.sh first"))
}

fn is_static(path: &Path) -> bool {
    // A dynamic executable names its loader in a PT_INTERP segment; look for the loader's name.
    std::fs::read(path).is_ok_and(|bytes| !bytes.windows(12).take(8192).any(|w| w == b"/lib64/ld-li"))
}

/// A statically linked `cella-vmm` (a jail has no shared libraries), built once per test run
/// the way scripts/setup.sh builds the release one, without debug info to keep the per-launch
/// copy small, and with the `test-hooks` feature (`--test-open`, `--test-forbidden-syscall`). Lives at `target/<profile>/jailer-tests/cella-vmm`.
pub fn static_vmm() -> PathBuf {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| {
        let profile = profile_dir();
        let out = profile.join("jailer-tests").join("cella-vmm");
        let built = profile.join("cella-vmm");
        // Always asked for: cargo relinks only when the sources or the flags changed, and a
        // static binary left by an older run must not be mistaken for a current one.
        {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let target_dir = profile.parent().expect("target dir");
            let mut command = Command::new(cargo);
            command.args([
                "rustc",
                "--quiet",
                "-p",
                "cella-vmm",
                "--bin",
                "cella-vmm",
                "--features",
                "test-hooks",
            ]);
            command.arg("--manifest-path");
            command.arg(&manifest).arg("--target-dir").arg(target_dir);
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
            command.args(["--", "-C", "target-feature=+crt-static", "-C", "strip=debuginfo"]);
            let status = command.status().expect("cargo runs");
            assert!(status.success(), "building a static cella-vmm failed: {command:?}");
            assert!(is_static(&built), "{} is still dynamically linked", built.display());
        }
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let tmp = out.with_extension("new");
        std::fs::copy(&built, &tmp).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

/// A fresh chroot base for one test (not created: the jailer creates it).
pub fn chroot_base(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jails").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A unique jail id for this test run.
pub fn jail_id(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// `cella-jailer` for one VMM: the static VMM, the runner image at `/image`, new PID namespace,
/// a memory and a pids limit. `vmm` are the arguments after `run --image /image`.
pub fn jailed(base: &Path, id: &str, extra: &[&str], vmm: &[&str]) -> Command {
    let mut command = Command::new(jailer());
    command.args(["--id", id, "--exec-file"]).arg(static_vmm());
    command.args(["--uid", &UID.to_string(), "--gid", &GID.to_string(), "--chroot-base"]).arg(base);
    command.args(["--new-pid-ns", "--cgroup", "memory=192M", "--cgroup", "pids=16", "--ro-file"]);
    command.arg(format!("{}=/image", runner_image().display()));
    command.args(extra).args(["--", "run", "--image", "/image"]).args(vmm);
    command
}

pub fn output(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().expect("cella-jailer starts")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Starts a jail whose VMM keeps running (`spin`) and waits until the VMM has exec'd and every
/// one of its threads has its seccomp filter. Returns the jailer and the VMM's pid.
pub fn start_spinning(base: &Path, id: &str) -> (Child, i32) {
    start_spinning_with(base, id, &[])
}

/// [`start_spinning`] with extra jailer arguments.
pub fn start_spinning_with(base: &Path, id: &str, extra: &[&str]) -> (Child, i32) {
    start_spinning_from(jailed(base, id, extra, &["--timeout-ms", "20000", "--", "spin"]))
}

/// [`start_spinning`] from a command made by [`jailed`] with a spinning VMM.
pub fn start_spinning_from(mut command: Command) -> (Child, i32) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cella-jailer starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = vmm_pid(child.id() as i32).filter(|&pid| guest_runs_confined(pid)) {
            return (child, pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
            panic!("the jail ended early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the jailed VMM never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the VMM `pid` has its vCPU thread and every one of its threads has installed its
/// seccomp filter: wait for this rather than for the thread count.
pub fn guest_runs_confined(pid: i32) -> bool {
    cella_e2e::threads_confined(pid as u32, 2)
}

/// The supervisor's child once it runs the VMM binary.
pub fn vmm_pid(jailer: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{jailer}/task/{jailer}/children")).ok()?;
    let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "cella-vmm").then_some(pid)
}

pub fn tasks(pid: i32) -> Vec<String> {
    cella_e2e::threads(pid as u32)
}

/// (device, inode) of a path.
pub fn inode(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.dev(), meta.ino())
}

/// Everything the jails under `base` might have left behind: entries in the jail folder,
/// mounts under `base`, and cgroups whose name starts with `prefix`.
pub fn residue(base: &Path, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let jails = base.join("cella-vmm");
    if let Ok(entries) = std::fs::read_dir(&jails) {
        found.extend(entries.filter_map(|e| e.ok()).map(|e| format!("jail folder {}", e.path().display())));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let base_text = base.display().to_string();
    found.extend(mountinfo.lines().filter(|l| l.contains(&base_text)).map(|l| format!("mount {l}")));
    for parent in cgroup_parents() {
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(format!("cgroup {}", entry.path().display()));
                }
            }
        }
    }
    found
}

pub use cella_e2e::{cgroup_parents, status_field};

/// Waits for `child` up to `limit`.
pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cella-jailer did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
