//! The jail request and its validation. Everything here runs before anything is created: a
//! request that fails these checks leaves no folder, mount or cgroup behind.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::cgroup::{CgroupError, CgroupPlan, CgroupSetting};

/// The longest jail ID.
pub const ID_MAX_LEN: usize = 64;
/// Where jails go unless `--chroot-base` says otherwise. A tmpfs: on a disk file system,
/// copying in and removing the VMM binary costs milliseconds per launch (measured here: ~7 ms on
/// ext4 under load, ~0.1 ms on tmpfs), and a jail holds nothing that must outlive its VMM.
pub const DEFAULT_CHROOT_BASE: &str = "/dev/shm/cella-jailer";
/// Jail paths the jailer keeps for itself; read-only files and `--bind-rw` folders may not be
/// placed there. `/run` holds nothing in a jail (a VMM gets its sockets as descriptors, or
/// makes them in its `--bind-rw` folder) but stays reserved, so that no caller comes to rely on
/// placing files there.
pub const RESERVED_JAIL_PATHS: &[&str] = &["/dev", "/run", "/proc"];
/// Where `--mount-proc` mounts the jail's own procfs.
pub const PROC_DIR: &str = "/proc";
/// The only device node a VMM gets.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("jail id `{0}` is empty; use letters, digits and hyphens, at most {ID_MAX_LEN}")]
    EmptyId(String),
    #[error("jail id `{id}` is {len} characters long; at most {ID_MAX_LEN} are allowed")]
    IdTooLong { id: String, len: usize },
    #[error("jail id `{0}` may only hold letters, digits and hyphens")]
    BadId(String),
    #[error("{what} `{path}` must be an absolute path without `.` or `..` components")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("exec-file `{0}` is a symbolic link; give the file itself")]
    ExecSymlink(PathBuf),
    #[error("{what} `{path}` is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} `{path}` cannot be read")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exec-file `{0}` is not executable")]
    NotExecutable(PathBuf),
    #[error("exec-file `{0}` is not a 64-bit ELF executable")]
    NotElf(PathBuf),
    #[error(
        "exec-file `{path}` is dynamically linked (it asks for `{interpreter}`), and a jail holds no \
         shared libraries; build it statically: `cargo rustc --release -p cella-vmm --bin cella-vmm -- \
         -C target-feature=+crt-static` (scripts/setup.sh does)"
    )]
    Dynamic { path: PathBuf, interpreter: String },
    #[error("exec-file name `{0}` may only hold letters, digits, `.`, `_` and `-`")]
    BadExecName(String),
    #[error("chroot base `{0}` exists and is not a folder")]
    BaseNotDir(PathBuf),
    #[error("--ro-file `{0}` must be HOST_PATH=JAIL_PATH")]
    BadRoFile(String),
    #[error("jail path `{0}` must be absolute, made of letters, digits, `.`, `_` and `-`, without `..`")]
    BadJailPath(String),
    #[error("jail path `{0}` is taken (by the jailer, the exec-file, another --ro-file or --bind-rw)")]
    JailPathTaken(String),
    #[error(
        "--bind-rw `{0}` is not a real folder at that path: give an existing folder by its path \
         without symbolic links (the jail sees it at the same path)"
    )]
    BindRwNotDir(PathBuf),
    #[error("--bind-rw `{0}` cannot be `/`: give the one folder this VMM may write")]
    BindRwRoot(PathBuf),
    #[error(
        "--bind-rw `{path}` must be closed to everyone but its owner (mode 0700); it has mode \
         {mode:04o}: the jail's uid gets this folder and all in it, so it must be a session's own \
         folder, not a shared one"
    )]
    BindRwOpen { path: PathBuf, mode: u32 },
    #[error(
        "--bind-rw `{path}` belongs to uid {uid}, not root or --uid {jail_uid}; if a jail whose \
         supervisor was killed left it to its uid, give it back first: `chown -R root:root {path}`"
    )]
    BindRwOwner { path: PathBuf, jail_uid: u32, uid: u32 },
    #[error(transparent)]
    Handover(#[from] crate::handover::HandoverError),
    #[error("--mount-proc needs --new-pid-ns: the jail's /proc must show the VMM's own PID namespace only")]
    ProcWithoutPidNs,
    #[error("--netns `{0}` does not exist")]
    NoNetns(PathBuf),
    #[error("descriptor {0} (--keep-fd or --hand-off) is not an open file descriptor above 2")]
    BadFd(i32),
    #[error("{what} {value} is not allowed: the VMM must not run as root (0)")]
    RootId { what: &'static str, value: u32 },
    #[error("the VMM arguments ask for `{0}`; a jailed VMM always runs with its seccomp filters enforced")]
    SeccompOff(String),
    #[error("--rlimit `{0}` must be NAME=VALUE with NAME one of: {names}", names = RLIMIT_NAMES.join(", "))]
    BadRlimit(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("--from-prepared `{0}` is the jail's own --id; a spare jail is prepared under an id of its own")]
    SpareIsId(String),
    #[error(
        "--hand-off {0} is also a --keep-fd: the VMM must not get the descriptor its pid is reported on"
    )]
    HandOffKept(i32),
}

/// The raw request, as the command line gives it.
#[derive(Clone, Debug, Default)]
pub struct JailRequest {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: Option<PathBuf>,
    pub cgroups: Vec<String>,
    pub cgroup_parent: Option<String>,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    pub ro_files: Vec<String>,
    pub bind_rw: Option<PathBuf>,
    pub mount_proc: bool,
    pub keep_fds: Vec<i32>,
    /// Hand the VMM off to the caller instead of staying behind: see [`JailConfig::hand_off`].
    pub hand_off: Option<i32>,
    pub rlimits: Vec<String>,
    /// A spare jail made ahead by `cella-jailer prepare` to take instead of making one.
    pub from_prepared: Option<String>,
    pub vmm_args: Vec<OsString>,
}

/// A file bound read-only into the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoFile {
    pub host: PathBuf,
    /// Absolute path inside the jail.
    pub jail: PathBuf,
}

/// A validated request.
#[derive(Clone, Debug)]
pub struct JailConfig {
    pub id: String,
    pub exec_file: PathBuf,
    /// The exec-file's name: the VMM's `argv[0]` and the folder of its jails.
    pub exec_name: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub cgroups: CgroupPlan,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    pub ro_files: Vec<RoFile>,
    /// A host folder bound read-write into the jail at the same path (`--bind-rw`): the one
    /// place the VMM may create, write and remove files (a session's folder). The supervisor
    /// gives it and everything in it to the VMM's uid/gid for the jail's life, and back to root
    /// when the jail ends.
    pub bind_rw: Option<PathBuf>,
    /// Mount a fresh procfs at [`PROC_DIR`] (`--mount-proc`; needs `new_pid_ns`), read-only and
    /// showing only the VMM's own PID namespace, for the VMM's reads of `/proc/self/pagemap`.
    pub mount_proc: bool,
    pub keep_fds: Vec<i32>,
    /// `--hand-off FD`: the VMM is started as a child of the jailer's caller (`CLONE_PARENT`),
    /// its pid written to this descriptor as soon as it exists, and the jailer exits once the VMM
    /// has exec'd, leaving nothing behind but the jail itself: the caller waits for the VMM and
    /// removes the jail ([`crate::supervisor::HandedOff`]). No per-VM process stays.
    pub hand_off: Option<i32>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// The id of a spare jail (made by `cella-jailer prepare`, with its network namespace) that becomes this
    /// jail's folder instead of a new one: see [`crate::prepared`].
    pub from_prepared: Option<String>,
    pub vmm_args: Vec<OsString>,
}

impl JailConfig {
    /// `<base>/<exec-name>/<id>`: everything this jail owns on disk.
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base.join(&self.exec_name).join(&self.id)
    }

    /// `<base>/<exec-name>/<id>/root`: the VMM's `/`.
    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// Where a jail path lives on the host.
    pub fn host_path(&self, jail_path: &Path) -> PathBuf {
        self.root().join(jail_path.strip_prefix("/").unwrap_or(jail_path))
    }
}

/// Rlimits a VMM gets unless `--rlimit` says otherwise: no core dumps (they would hold guest
/// memory), a bounded number of open files. Each is a ceiling: a limit the jailer itself runs
/// under that is lower is kept.
pub const DEFAULT_RLIMITS: &[(&str, u64)] = &[("core", 0), ("no-file", 1024)];

const RLIMIT_NAMES: &[&str] = &["core", "no-file", "fsize", "nproc", "memlock", "as"];

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "core" => libc::RLIMIT_CORE,
        "no-file" => libc::RLIMIT_NOFILE,
        "fsize" => libc::RLIMIT_FSIZE,
        "nproc" => libc::RLIMIT_NPROC,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "as" => libc::RLIMIT_AS,
        _ => return None,
    })
}

/// Checks an ID: letters, digits and hyphens, 1 to 64 of them.
pub fn validate_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty() {
        return Err(ConfigError::EmptyId(id.to_owned()));
    }
    if id.chars().count() > ID_MAX_LEN {
        return Err(ConfigError::IdTooLong { id: id.to_owned(), len: id.chars().count() });
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ConfigError::BadId(id.to_owned()));
    }
    Ok(())
}

/// Absolute, and only normal components after the root (no `.`, no `..`).
fn is_clean_absolute(path: &Path) -> bool {
    let mut components = path.components();
    components.next() == Some(Component::RootDir) && components.all(|c| matches!(c, Component::Normal(_)))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn check_jail_path(text: &str) -> Result<PathBuf, ConfigError> {
    // Checked as text: `Path` would quietly drop `.` components.
    let ok = text.strip_prefix('/').is_some_and(|rest| {
        rest.split('/').all(|s| !s.is_empty() && s != "." && s != ".." && s.chars().all(is_name_char))
    });
    if ok {
        Ok(PathBuf::from(text))
    } else {
        Err(ConfigError::BadJailPath(text.to_owned()))
    }
}

/// Reads the ELF header of `path` and returns the program interpreter, if it names one.
fn elf_interpreter(path: &Path) -> Result<Option<String>, ConfigError> {
    use std::io::Read;
    let unreadable = |source| ConfigError::Unreadable { what: "exec-file", path: path.to_owned(), source };
    let mut file = fs::File::open(path).map_err(unreadable)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).map_err(|_| ConfigError::NotElf(path.to_owned()))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(ConfigError::NotElf(path.to_owned()));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (u64_at(&header, 32), u16_at(&header, 54), u16_at(&header, 56));
    if phentsize < 56 || phnum > 256 {
        return Err(ConfigError::NotElf(path.to_owned()));
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut table, phoff)
        .map_err(|_| ConfigError::NotElf(path.to_owned()))?;
    for entry in table.chunks_exact(phentsize as usize) {
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) == PT_INTERP {
            let (offset, size) = (u64_at(entry, 8), u64_at(entry, 32).min(4096));
            let mut name = vec![0u8; size as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut name, offset)
                .map_err(|_| ConfigError::NotElf(path.to_owned()))?;
            let name = String::from_utf8_lossy(&name).trim_end_matches('\0').to_owned();
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// A `--bind-rw` folder: absolute, an existing real folder at exactly that path (no symbolic
/// link anywhere in it, since the jail sees it at the same path), not `/`, closed to others
/// (mode 0700: a system folder such as `/etc` or `/tmp` handed over by mistake fails here), and
/// root's or already the VMM's (`jail_uid`; `None`: any owner, for `cleanup`). Its contents are
/// checked as they are handed over ([`crate::handover`]).
pub fn check_bind_rw(path: &Path, jail_uid: Option<u32>) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    if !is_clean_absolute(path) {
        return Err(ConfigError::NotAbsolute { what: "--bind-rw folder", path: path.to_owned() });
    }
    if path == Path::new("/") {
        return Err(ConfigError::BindRwRoot(path.to_owned()));
    }
    let unreadable =
        |source| ConfigError::Unreadable { what: "--bind-rw folder", path: path.to_owned(), source };
    let meta = fs::symlink_metadata(path).map_err(unreadable)?;
    let real = fs::canonicalize(path).map_err(unreadable)?;
    if !meta.is_dir() || real != path {
        return Err(ConfigError::BindRwNotDir(path.to_owned()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(ConfigError::BindRwOpen { path: path.to_owned(), mode: meta.mode() & 0o7777 });
    }
    if let Some(jail_uid) = jail_uid.filter(|&u| meta.uid() != 0 && meta.uid() != u) {
        return Err(ConfigError::BindRwOwner { path: path.to_owned(), jail_uid, uid: meta.uid() });
    }
    Ok(())
}

fn check_exec_file(path: &Path) -> Result<String, ConfigError> {
    if !is_clean_absolute(path) {
        return Err(ConfigError::NotAbsolute { what: "exec-file", path: path.to_owned() });
    }
    let meta = fs::symlink_metadata(path).map_err(|source| ConfigError::Unreadable {
        what: "exec-file",
        path: path.to_owned(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(ConfigError::ExecSymlink(path.to_owned()));
    }
    if !meta.is_file() {
        return Err(ConfigError::NotAFile { what: "exec-file", path: path.to_owned() });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(ConfigError::NotExecutable(path.to_owned()));
    }
    if let Some(interpreter) = elf_interpreter(path)? {
        return Err(ConfigError::Dynamic { path: path.to_owned(), interpreter });
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
    if name.is_empty() || name.starts_with('.') || !name.chars().all(is_name_char) {
        return Err(ConfigError::BadExecName(name));
    }
    Ok(name)
}

/// Checks a `cella-jailer prepare` request: the spare's id, the exec-file (as for a launch) and
/// the base. Returns the exec-file's name and the base.
pub fn check_prepare(
    id: &str,
    exec_file: &Path,
    chroot_base: Option<PathBuf>,
) -> Result<(String, PathBuf), ConfigError> {
    validate_id(id)?;
    let exec_name = check_exec_file(exec_file)?;
    let chroot_base = chroot_base.unwrap_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE));
    if !is_clean_absolute(&chroot_base) {
        return Err(ConfigError::NotAbsolute { what: "chroot base", path: chroot_base });
    }
    Ok((exec_name, chroot_base))
}

/// Refuses VMM arguments that would turn seccomp off (only those before a `--`, which are the
/// VMM's own; the guest's come after it).
fn check_vmm_args(args: &[OsString]) -> Result<(), ConfigError> {
    let mut iter = args.iter().map(|a| a.to_string_lossy());
    while let Some(arg) = iter.next() {
        if arg == "--" {
            break;
        }
        if arg == "--no-seccomp" {
            return Err(ConfigError::SeccompOff(arg.into_owned()));
        }
        let value = if arg == "--seccomp" {
            iter.next().map(|v| v.into_owned()).unwrap_or_default()
        } else if let Some(v) = arg.strip_prefix("--seccomp=") {
            v.to_owned()
        } else {
            continue;
        };
        if value != "enforce" {
            return Err(ConfigError::SeccompOff(format!("--seccomp {value}")));
        }
    }
    Ok(())
}

impl JailRequest {
    /// Checks every part of the request and resolves the cgroup hierarchies, creating nothing.
    pub fn validate(self) -> Result<JailConfig, ConfigError> {
        validate_id(&self.id)?;
        if let Some(spare) = &self.from_prepared {
            validate_id(spare)?;
            if *spare == self.id {
                return Err(ConfigError::SpareIsId(spare.clone()));
            }
        }
        if self.uid == 0 {
            return Err(ConfigError::RootId { what: "--uid", value: 0 });
        }
        if self.gid == 0 {
            return Err(ConfigError::RootId { what: "--gid", value: 0 });
        }
        let exec_name = check_exec_file(&self.exec_file)?;

        let chroot_base = self.chroot_base.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE));
        if !is_clean_absolute(&chroot_base) {
            return Err(ConfigError::NotAbsolute { what: "chroot base", path: chroot_base });
        }
        if let Ok(meta) = fs::symlink_metadata(&chroot_base) {
            if !meta.is_dir() {
                return Err(ConfigError::BaseNotDir(chroot_base));
            }
        }

        let mut taken: Vec<PathBuf> = RESERVED_JAIL_PATHS.iter().map(PathBuf::from).collect();
        let mut ro_files = Vec::new();
        for spec in &self.ro_files {
            let (host, jail) = spec.rsplit_once('=').ok_or_else(|| ConfigError::BadRoFile(spec.clone()))?;
            let host = PathBuf::from(host);
            if !is_clean_absolute(&host) {
                return Err(ConfigError::NotAbsolute { what: "read-only file", path: host });
            }
            let meta = fs::metadata(&host).map_err(|source| ConfigError::Unreadable {
                what: "read-only file",
                path: host.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(ConfigError::NotAFile { what: "read-only file", path: host });
            }
            let jail = check_jail_path(jail)?;
            if taken.iter().any(|t| jail.starts_with(t) || t.starts_with(&jail)) {
                return Err(ConfigError::JailPathTaken(jail.display().to_string()));
            }
            taken.push(jail.clone());
            ro_files.push(RoFile { host, jail });
        }

        if let Some(dir) = &self.bind_rw {
            if taken.iter().any(|t| dir.starts_with(t) || t.starts_with(dir)) && dir != Path::new("/") {
                return Err(ConfigError::JailPathTaken(dir.display().to_string()));
            }
            check_bind_rw(dir, Some(self.uid))?;
            check_jail_path(&dir.to_string_lossy())?;
            crate::handover::check(dir)?;
        }
        if self.mount_proc && !self.new_pid_ns {
            return Err(ConfigError::ProcWithoutPidNs);
        }
        if let Some(netns) = &self.netns {
            if !netns.exists() {
                return Err(ConfigError::NoNetns(netns.clone()));
            }
        }
        for &fd in self.keep_fds.iter().chain(&self.hand_off) {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(ConfigError::BadFd(fd));
            }
        }
        if let Some(fd) = self.hand_off.filter(|fd| self.keep_fds.contains(fd)) {
            return Err(ConfigError::HandOffKept(fd));
        }

        let mut rlimits: Vec<(libc::__rlimit_resource_t, u64)> = DEFAULT_RLIMITS
            .iter()
            .map(|(name, value)| (rlimit_resource(name).expect("default rlimits are known"), *value))
            .collect();
        for spec in &self.rlimits {
            let bad = || ConfigError::BadRlimit(spec.clone());
            let (name, value) = spec.split_once('=').ok_or_else(bad)?;
            let resource = rlimit_resource(name).ok_or_else(bad)?;
            let value =
                if value == "unlimited" { libc::RLIM_INFINITY } else { value.parse().map_err(|_| bad())? };
            rlimits.retain(|(r, _)| *r != resource);
            rlimits.push((resource, value));
        }

        check_vmm_args(&self.vmm_args)?;

        let settings = self.cgroups.iter().map(|s| CgroupSetting::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let cgroups = CgroupPlan::resolve(&self.id, self.cgroup_parent.as_deref(), settings)?;

        Ok(JailConfig {
            id: self.id,
            exec_file: self.exec_file,
            exec_name,
            uid: self.uid,
            gid: self.gid,
            chroot_base,
            cgroups,
            netns: self.netns,
            new_pid_ns: self.new_pid_ns,
            ro_files,
            bind_rw: self.bind_rw,
            mount_proc: self.mount_proc,
            keep_fds: self.keep_fds,
            hand_off: self.hand_off,
            rlimits,
            from_prepared: self.from_prepared,
            vmm_args: self.vmm_args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_letters_digits_and_hyphens_up_to_64() {
        assert!(validate_id("vm-1").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        assert!(matches!(validate_id(&"a".repeat(65)), Err(ConfigError::IdTooLong { len: 65, .. })));
        assert!(matches!(validate_id("../x"), Err(ConfigError::BadId(_))));
        assert!(matches!(validate_id("a_b"), Err(ConfigError::BadId(_))));
        assert!(matches!(validate_id(""), Err(ConfigError::EmptyId(_))));
    }

    #[test]
    fn jail_paths_are_clean_and_absolute() {
        assert!(check_jail_path("/image").is_ok());
        assert!(check_jail_path("/guest/cella-runner").is_ok());
        for bad in ["image", "/", "/../etc/passwd", "/a/./b", "/a b", "//x/../y"] {
            assert!(check_jail_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seccomp_cannot_be_turned_off_but_guest_args_are_free() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(check_vmm_args(&args(&["run", "--seccomp", "enforce", "--", "hello"])).is_ok());
        assert!(check_vmm_args(&args(&["run", "--", "--seccomp", "off"])).is_ok());
        assert!(check_vmm_args(&args(&["run", "--seccomp", "off"])).is_err());
        assert!(check_vmm_args(&args(&["run", "--seccomp=log"])).is_err());
        assert!(check_vmm_args(&args(&["run", "--no-seccomp"])).is_err());
    }
}
