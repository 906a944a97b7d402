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
