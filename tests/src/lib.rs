//! End-to-end tests for Cella: they start the real binaries against the real `/dev/kvm`.
//! Also the helpers that several crates' tests share (a dev-dependency of `vmm`, `jailer`,
//! `policies` and `service`).

use std::path::{Path, PathBuf};

/// A ustar archive of `(name, contents)` regular files, built by hand: names go in verbatim
/// (tar writers refuse `..`), so tests can make hostile archives.
pub fn ustar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// The `cella` parent cgroup in every hierarchy the jailer may use (this process's own cgroup
/// + `/cella`), from /proc/mounts and /proc/self/cgroup.
pub fn cgroup_parents() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut parents = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || !(f[2] == "cgroup" || f[2] == "cgroup2") {
            continue;
        }
        let options: Vec<&str> = f[3].split(',').collect();
        let path = own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, names, path) = (p.next()?, p.next()?, p.next()?);
            let hit = if f[2] == "cgroup2" {
                names.is_empty()
            } else {
                names.split(',').any(|n| options.contains(&n))
            };
            hit.then(|| path.trim_start_matches('/').to_owned())
        });
        parents.push(Path::new(f[1]).join(path.unwrap_or_default()).join("cella"));
    }
    parents
}

/// A field of a `/proc/.../status` file, e.g. `Seccomp` → `2`; empty if the file or the field
/// is missing.
pub fn status_field(path: &str, field: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The thread ids of process `pid` (empty once it is gone).
pub fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Whether process `pid` has at least `at_least` threads and every one of them has installed
/// its seccomp filter (`Seccomp: 2`). A VMM thread installs its own filter when it starts (the
/// vCPU thread before the guest's first instruction, the main thread right after it started the
/// vCPU thread), so a thread seen a moment after it was created may not have it yet.
pub fn threads_confined(pid: u32, at_least: usize) -> bool {
    let threads = threads(pid);
    threads.len() >= at_least
        && threads.iter().all(|t| status_field(&format!("/proc/{pid}/task/{t}/status"), "Seccomp") == "2")
}

/// Waits (up to 20 s) until [`threads_confined`]; panics naming every thread's seccomp mode if
/// that never happens.
pub fn wait_until_threads_confined(pid: u32, at_least: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !threads_confined(pid, at_least) {
        if std::time::Instant::now() > deadline {
            let modes: Vec<String> = threads(pid)
                .iter()
                .map(|t| format!("{t}: {}", status_field(&format!("/proc/{pid}/task/{t}/status"), "Seccomp")))
                .collect();
            panic!("process {pid} never had {at_least} threads, all with a seccomp filter: {modes:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs the real `git` with `args` in `repo` as a fixed test user (no system config, no
/// signing); panics with its output if it fails. Returns its stdout, trimmed.
pub fn git(repo: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Cella Test",
            "-c",
            "user.email=test@cella.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git runs");
    let out = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(o.status.success(), "git {args:?}: {}{}", out(&o.stdout), out(&o.stderr));
    out(&o.stdout).trim().to_owned()
}

/// A text file's version `rev`: 40 lines of words of its own (seeded by `file`, so git deltas
/// a file's versions against each other, not against other files) and its revision.
pub fn file_version(file: u64, rev: u64) -> String {
    let mut seed = file.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text: String = (0..40)
        .map(|line| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            format!("{line}: {:x} {:x}\n", seed >> 20, seed >> 40)
        })
        .collect();
    text.push_str(&format!("revision {rev}\n"));
    text
}
