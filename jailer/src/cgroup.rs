//! cgroups for one jail: v2 and v1, chosen per controller from `/proc/mounts`.
//!
//! A controller mounted as its own v1 hierarchy is used there (this is what a v1 or hybrid host
//! has); otherwise the cgroup2 mount is used if its `cgroup.controllers` lists it (what a v2
//! host has). Each jail gets `<hierarchy>/<parent>/<id>`, where `<parent>` defaults to the
//! jailer's own cgroup in that hierarchy followed by `cella`. The limits are written before the
//! VMM joins; the supervisor removes the cgroups when the VMM is gone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long cleanup retries `rmdir` on a cgroup the kernel still calls busy.
const RMDIR_PATIENCE: Duration = Duration::from_secs(2);
/// The CFS period used for a CPU quota.
const CPU_PERIOD_US: u64 = 100_000;

/// Why a cgroup could not be planned, created or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("--cgroup `{0}` must be KEY=VALUE: memory=SIZE (e.g. 192M), cpu=CPUS (e.g. 0.5), pids=N, or CONTROLLER.FILE=VALUE")]
    BadSetting(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup hierarchy offers the `{0}` controller (looked for a v1 mount and the cgroup2 mount in /proc/mounts)")]
    NoController(String),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{value}` to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {0} exists already: another VM with this id runs, or a supervisor died before cleaning up"
    )]
    Exists(PathBuf),
    #[error(
        "--cgroup-parent `{0}` must be a path of plain names (letters, digits, `.`, `_`, `-`) without `..`"
    )]
    BadParent(String),
}

/// Checks a `--cgroup-parent`: plain names only, so it cannot leave the hierarchy.
fn check_parent(parent: Option<&str>) -> Result<(), CgroupError> {
    let Some(parent) = parent else { return Ok(()) };
    let ok = parent.trim_start_matches('/').split('/').all(|s| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    });
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadParent(parent.to_owned()))
    }
}

/// cgroup v1 or v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One limit the caller asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum CgroupSetting {
    /// `memory=SIZE`: the most memory the VMM process may use (guest memory plus overhead).
    Memory(u64),
    /// `cpu=CPUS`: a CFS quota, in CPUs.
    Cpu(f64),
    /// `pids=N`: the most tasks (threads) the VMM may have.
    Pids(u64),
    /// `CONTROLLER.FILE=VALUE`, written as given.
    Raw { controller: String, file: String, value: String },
}

fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl CgroupSetting {
    pub fn parse(spec: &str) -> Result<Self, CgroupError> {
        let bad = || CgroupError::BadSetting(spec.to_owned());
        let (key, value) = spec.split_once('=').ok_or_else(bad)?;
        let name_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        Ok(match key {
            "memory" => CgroupSetting::Memory(parse_size(value).filter(|v| *v > 0).ok_or_else(bad)?),
            "cpu" => CgroupSetting::Cpu(
                value.parse().ok().filter(|c: &f64| *c > 0.0 && c.is_finite()).ok_or_else(bad)?,
            ),
            "pids" => CgroupSetting::Pids(value.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?),
            _ => {
                let (controller, file) = key.split_once('.').ok_or_else(bad)?;
                if !name_ok(controller) || !file.split('.').all(name_ok) || value.contains('\n') {
                    return Err(bad());
                }
                CgroupSetting::Raw { controller: controller.into(), file: file.into(), value: value.into() }
            }
        })
    }

    fn controller(&self) -> &str {
        match self {
            CgroupSetting::Memory(_) => "memory",
            CgroupSetting::Cpu(_) => "cpu",
            CgroupSetting::Pids(_) => "pids",
            CgroupSetting::Raw { controller, .. } => controller,
        }
    }

    /// The files to write, in order, for this version.
    fn writes(&self, version: Version, dir: &Path) -> Vec<(String, String)> {
        match (self, version) {
            (CgroupSetting::Memory(bytes), Version::V1) => {
                let mut w = vec![("memory.limit_in_bytes".into(), bytes.to_string())];
                // With swap accounting, the same bound on memory + swap: no swapping past the limit.
                if dir.join("memory.memsw.limit_in_bytes").exists() {
                    w.push(("memory.memsw.limit_in_bytes".into(), bytes.to_string()));
                }
                w
            }
            (CgroupSetting::Memory(bytes), Version::V2) => {
                let mut w = vec![("memory.max".into(), bytes.to_string())];
                if dir.join("memory.swap.max").exists() {
                    w.push(("memory.swap.max".into(), "0".into()));
                }
                w
            }
            (CgroupSetting::Cpu(cpus), Version::V1) => vec![
                ("cpu.cfs_period_us".into(), CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us".into(), ((cpus * CPU_PERIOD_US as f64) as u64).max(1000).to_string()),
            ],
            (CgroupSetting::Cpu(cpus), Version::V2) => {
                let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
                vec![("cpu.max".into(), format!("{quota} {CPU_PERIOD_US}"))]
            }
            (CgroupSetting::Pids(n), _) => vec![("pids.max".into(), n.to_string())],
            (CgroupSetting::Raw { controller, file, value }, _) => {
                vec![(format!("{controller}.{file}"), value.clone())]
            }
        }
    }
}

/// One hierarchy the jail uses, and the controllers it uses there.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    pub version: Version,
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The jail's parent cgroup (created if missing, never removed).
    pub parent: PathBuf,
    /// The jail's own cgroup.
    pub dir: PathBuf,
    pub controllers: Vec<String>,
}

/// The cgroups one jail will have.
#[derive(Clone, Debug, Default)]
pub struct CgroupPlan {
    pub hierarchies: Vec<Hierarchy>,
    pub settings: Vec<CgroupSetting>,
}

/// A cgroup mount from `/proc/mounts`.
#[derive(Clone, Debug, PartialEq)]
struct Mount {
    version: Version,
    path: PathBuf,
    /// v1: the controllers in its options; v2: empty (read `cgroup.controllers`).
    controllers: Vec<String>,
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (path, fstype, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            let path = PathBuf::from(path.replace("\\040", " "));
            match *fstype {
                "cgroup" => Some(Mount {
                    version: Version::V1,
                    path,
                    controllers: options.split(',').map(str::to_owned).collect(),
                }),
                "cgroup2" => Some(Mount { version: Version::V2, path, controllers: Vec::new() }),
                _ => None,
            }
        })
        .collect()
}

/// This process's cgroup in a hierarchy, from `/proc/self/cgroup`.
fn own_cgroup(text: &str, mount: &Mount) -> PathBuf {
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, names, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let matches = match mount.version {
            Version::V2 => names.is_empty(),
            Version::V1 => names.split(',').any(|n| mount.controllers.iter().any(|c| c == n)),
        };
        if matches {
            return PathBuf::from(path.trim_start_matches('/'));
        }
    }
    PathBuf::new()
}

impl CgroupPlan {
    /// Decides where each controller the settings need lives. Reads `/proc/mounts`,
    /// `/proc/self/cgroup` and cgroup2's `cgroup.controllers`; creates nothing.
    pub fn resolve(
        id: &str,
        parent: Option<&str>,
        settings: Vec<CgroupSetting>,
    ) -> Result<Self, CgroupError> {
        check_parent(parent)?;
        if settings.is_empty() {
            return Ok(CgroupPlan::default());
        }
        let read = |path: &str| {
            fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })
        };
        let mounts = parse_mounts(&read("/proc/mounts")?);
        let own = read("/proc/self/cgroup")?;
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for setting in &settings {
            let controller = setting.controller();
            if hierarchies.iter().any(|h| h.controllers.iter().any(|c| c == controller)) {
                continue;
            }
            let v1 = mounts
                .iter()
                .find(|m| m.version == Version::V1 && m.controllers.iter().any(|c| c == controller));
            let mount = match v1 {
                Some(m) => m.clone(),
                None => mounts
                    .iter()
                    .find(|m| {
                        m.version == Version::V2
                            && fs::read_to_string(m.path.join("cgroup.controllers"))
                                .is_ok_and(|c| c.split_whitespace().any(|c| c == controller))
                    })
                    .cloned()
                    .ok_or_else(|| CgroupError::NoController(controller.to_owned()))?,
            };
            if let Some(h) = hierarchies.iter_mut().find(|h| h.mount == mount.path) {
                h.controllers.push(controller.to_owned());
                continue;
            }
            let parent = match parent {
                Some(p) => mount.path.join(p.trim_start_matches('/')),
                None => mount.path.join(own_cgroup(&own, &mount)).join("cella"),
            };
            hierarchies.push(Hierarchy {
                version: mount.version,
                dir: parent.join(id),
                parent,
                mount: mount.path.clone(),
                controllers: vec![controller.to_owned()],
            });
        }
        Ok(CgroupPlan { hierarchies, settings })
    }

    /// Every cgroup a jail with this id may have, in every mounted hierarchy: for removing the
    /// cgroups of a jail whose supervisor died (`cella-jailer cleanup`).
    pub fn everywhere(id: &str, parent: Option<&str>) -> Result<Self, CgroupError> {
        check_parent(parent)?;
        let read = |path: &str| {
            fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })
        };
        let own = read("/proc/self/cgroup")?;
        let hierarchies = parse_mounts(&read("/proc/mounts")?)
            .into_iter()
            .map(|mount| {
                let parent = match parent {
                    Some(p) => mount.path.join(p.trim_start_matches('/')),
                    None => mount.path.join(own_cgroup(&own, &mount)).join("cella"),
                };
                let dir = parent.join(id);
                // On cgroup2 the controllers are the jail's own (for `limits_hit`).
                let controllers = match mount.version {
                    Version::V1 => mount.controllers,
                    Version::V2 => fs::read_to_string(dir.join("cgroup.controllers"))
                        .map(|text| text.split_whitespace().map(str::to_owned).collect())
                        .unwrap_or_default(),
                };
                Hierarchy { version: mount.version, dir, parent, mount: mount.path, controllers }
            })
            .collect();
        Ok(CgroupPlan { hierarchies, settings: Vec::new() })
    }

    /// The files the (still single-threaded) VMM process writes `0` to, to join its cgroups.
    ///
    /// On v1 that is `tasks`: moving only the calling thread skips the kernel's global
    /// threadgroup lock, whose write side waits for an RCU grace period (~20 ms here) on every
    /// `cgroup.procs` write. The process has one thread at that point, so it moves entirely.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.dir.join(if h.version == Version::V1 { "tasks" } else { "cgroup.procs" }))
            .collect()
    }

    /// Creates the jail's cgroups and writes the limits. On failure removes what it created.
    pub fn create(&self) -> Result<(), CgroupError> {
        let mut created: Vec<&Hierarchy> = Vec::new();
        let result = (|| {
            for h in &self.hierarchies {
                ensure_parent(h)?;
                match fs::create_dir(&h.dir) {
                    Ok(()) => created.push(h),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(CgroupError::Exists(h.dir.clone()))
                    }
                    Err(source) => return Err(CgroupError::Create { path: h.dir.clone(), source }),
                }
                for setting in
                    self.settings.iter().filter(|s| h.controllers.iter().any(|c| c == s.controller()))
                {
                    for (file, value) in setting.writes(h.version, &h.dir) {
                        write(&h.dir.join(file), &value)?;
                    }
                }
            }
            Ok(())
        })();
        if result.is_err() {
            for h in created {
                let _ = remove_dir(&h.dir);
            }
        }
        result
    }

    /// Kills anything still in the jail's cgroups and removes them. Missing cgroups are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first_error = None;
        for h in &self.hierarchies {
            if !h.dir.exists() {
                continue;
            }
            kill_members(h);
            if let Err(e) = remove_dir(&h.dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What the limits did during the run: a line for each limit that was hit.
    pub fn limits_hit(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let read = |path: PathBuf| fs::read_to_string(path).unwrap_or_default();
        let counter = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok()))
                .unwrap_or(0)
        };
        for h in &self.hierarchies {
            for controller in &h.controllers {
                match (controller.as_str(), h.version) {
                    ("memory", Version::V1) => {
                        let limit = read(h.dir.join("memory.limit_in_bytes")).trim().to_owned();
                        let failcnt = read(h.dir.join("memory.failcnt")).trim().parse::<u64>().unwrap_or(0);
                        let oom = counter(&read(h.dir.join("memory.oom_control")), "oom_kill ");
                        if failcnt > 0 || oom > 0 {
                            notes.push(memory_note(&limit, oom));
                        }
                    }
                    ("memory", Version::V2) => {
                        let limit = read(h.dir.join("memory.max")).trim().to_owned();
                        let events = read(h.dir.join("memory.events"));
                        let (max, oom) = (counter(&events, "max "), counter(&events, "oom_kill "));
                        if max > 0 || oom > 0 {
                            notes.push(memory_note(&limit, oom));
                        }
                    }
                    ("pids", _) => {
                        let limit = read(h.dir.join("pids.max")).trim().to_owned();
                        let hits = counter(&read(h.dir.join("pids.events")), "max ");
                        if hits > 0 {
                            notes.push(format!(
                                "the pids limit of {limit} refused {hits} new task(s) (thread or process creation failed)"
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        notes
    }
}

fn memory_note(limit: &str, oom_kills: u64) -> String {
    let mib = limit.parse::<u64>().map(|b| format!(" ({} MiB)", b >> 20)).unwrap_or_default();
    if oom_kills > 0 {
        format!(
            "the memory limit of {limit} bytes{mib} was reached and the kernel's OOM killer killed the VMM"
        )
    } else {
        format!("the memory limit of {limit} bytes{mib} was reached")
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Creates the parent cgroup if needed; on v2 enables the jail's controllers for its children.
fn ensure_parent(h: &Hierarchy) -> Result<(), CgroupError> {
    if !h.parent.is_dir() {
        fs::create_dir_all(&h.parent)
            .map_err(|source| CgroupError::Create { path: h.parent.clone(), source })?;
    }
    if h.version == Version::V2 {
        // Every level from the mount down to the parent must pass the controllers on.
        let mut levels = vec![h.parent.clone()];
        let mut at = h.parent.as_path();
        while let Some(up) = at.parent().filter(|_| at != h.mount) {
            levels.push(up.to_owned());
            at = up;
        }
        for level in levels.iter().rev() {
            let file = level.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&file).unwrap_or_default();
            let missing: Vec<String> = h
                .controllers
                .iter()
                .filter(|c| !enabled.split_whitespace().any(|e| e == c.as_str()))
                .map(|c| format!("+{c}"))
                .collect();
            if !missing.is_empty() {
                write(&file, &missing.join(" "))?;
            }
        }
    }
    Ok(())
}

fn kill_members(h: &Hierarchy) {
    if h.version == Version::V2 && h.dir.join("cgroup.kill").exists() {
        let _ = fs::write(h.dir.join("cgroup.kill"), "1");
        return;
    }
    let pids = fs::read_to_string(h.dir.join("cgroup.procs")).unwrap_or_default();
    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) with a pid read from the jail's own cgroup; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `rmdir`, retrying while the kernel still counts an exiting task as a member.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    let started = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < RMDIR_PATIENCE => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(source) => return Err(CgroupError::Remove { path: dir.to_owned(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn reads_v1_and_v2_mounts() {
        let mounts = parse_mounts(HYBRID);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].version, Version::V1);
        assert!(mounts[1].controllers.contains(&"memory".to_owned()));
        assert_eq!(
            mounts[3],
            Mount { version: Version::V2, path: "/sys/fs/cgroup/unified".into(), controllers: vec![] }
        );
    }

    #[test]
    fn own_cgroup_per_hierarchy() {
        let mounts = parse_mounts(HYBRID);
        let own = "4:memory:/process_api/abc\n8:pids:/\n0::/user.slice\n";
        assert_eq!(own_cgroup(own, &mounts[1]), PathBuf::from("process_api/abc"));
        assert_eq!(own_cgroup(own, &mounts[2]), PathBuf::from(""));
        assert_eq!(own_cgroup(own, &mounts[3]), PathBuf::from("user.slice"));
    }

    #[test]
    fn parents_cannot_leave_the_hierarchy() {
        assert!(check_parent(Some("cella")).is_ok());
        assert!(check_parent(Some("/system.slice/cella-worker")).is_ok());
        for bad in ["../../etc", "a/../../b", "a//b", "", "a b"] {
            assert!(check_parent(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_parse_and_translate_per_version() {
        assert_eq!(CgroupSetting::parse("memory=192M").unwrap(), CgroupSetting::Memory(192 << 20));
        assert_eq!(CgroupSetting::parse("pids=8").unwrap(), CgroupSetting::Pids(8));
        assert!(CgroupSetting::parse("memory=lots").is_err());
        assert!(CgroupSetting::parse("memory").is_err());
        assert!(CgroupSetting::parse("../x.y=1").is_err());
        let cpu = CgroupSetting::parse("cpu=0.5").unwrap();
        let dir = Path::new("/nonexistent");
        assert_eq!(cpu.writes(Version::V2, dir), vec![("cpu.max".to_owned(), "50000 100000".to_owned())]);
        assert_eq!(cpu.writes(Version::V1, dir)[1], ("cpu.cfs_quota_us".to_owned(), "50000".to_owned()));
        assert_eq!(CgroupSetting::Memory(1 << 20).writes(Version::V2, dir)[0].0, "memory.max");
        assert_eq!(CgroupSetting::Memory(1 << 20).writes(Version::V1, dir)[0].0, "memory.limit_in_bytes");
    }
}
