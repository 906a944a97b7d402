//! Confinement options shared by `run` and `scan`: `--seccomp`, and `--jailed`, which runs the
//! VMM through `cella-jailer` with the guest image and other input files bound read-only into
//! the jail and the arguments rewritten to their jail paths.
//!
//! `run --jailed` replaces this process with the jailer ([`JailArgs::exec`]). `scan --jailed`
//! runs its VMM as a jailed spare ([`JailArgs::spare_jail`], `cella_vmm::spare`) and stays as
//! the job's host side. `session --jailed` replaces this process with the jailer too
//! ([`JailArgs::exec_in`]), with the session's folder bound read-write at its own path
//! ([`JailedCell`]): a session must outlive whoever launched it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use cella_vmm::seccomp::{self, Mode};
use cella_vmm::spare::SpareJail;
use clap::{Args, ValueEnum};

use super::exit_code;

/// What the VMM's own process needs beyond guest memory (binary, page tables, KVM's per-VM
/// kernel memory, buffers); the memory limit is guest memory plus this. Measured: a 128 MiB
/// guest that touches all of its memory (`fill-canary`) runs under a 136 MiB limit.
pub const VMM_OVERHEAD_MIB: u64 = 32;
/// The jailed VMM's uid and gid unless `--jail-uid`/`--jail-gid` say otherwise.
pub const DEFAULT_JAIL_ID: u32 = 64_000;
/// The most tasks a jailed VMM may have (main, vCPU, device and API threads, with room).
pub const DEFAULT_PIDS_MAX: u32 = 16;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SeccompArg {
    /// Kill the VMM on any syscall its thread's filter does not allow
    #[default]
    Enforce,
    /// Allow such syscalls but log them to the kernel audit log (development)
    Log,
    /// No filters (development only; refused with --jailed)
    Off,
}

impl SeccompArg {
    /// The library's mode for this argument.
    pub fn mode(self) -> Mode {
        match self {
            SeccompArg::Enforce => Mode::Enforce,
            SeccompArg::Log => Mode::Log,
            SeccompArg::Off => Mode::Off,
        }
    }
}

#[derive(Debug, Args, Clone, Default)]
pub struct JailArgs {
    /// Per-thread seccomp filters (seccomp/filters/)
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
    /// Run the VMM in a cell made by cella-jailer: namespaces, pivot_root, cgroups, Landlock,
    /// seccomp, no capabilities, its own uid/gid
    #[arg(long)]
    pub jailed: bool,
    /// The cella-jailer binary [default: next to this executable]
    #[arg(long, value_name = "PATH", requires = "jailed")]
    pub jailer: Option<PathBuf>,
    /// The VMM binary to jail, statically linked [default: this executable]
    #[arg(long, value_name = "PATH", requires = "jailed")]
    pub vmm_binary: Option<PathBuf>,
    /// The jail's ID [default: vm-<pid>]
    #[arg(long, value_name = "ID", requires = "jailed")]
    pub jail_id: Option<String>,
    /// A spare jail made ahead by `cella-jailer prepare` (with the same VMM binary and base) to
    /// take instead of making the jail at launch; if it is missing or unusable the jailer says
    /// why and makes the jail as usual
    #[arg(long, value_name = "ID", requires = "jailed")]
    pub jail_prepared: Option<String>,
    /// The uid the jailed VMM runs as
    #[arg(long, value_name = "UID", default_value_t = DEFAULT_JAIL_ID)]
    pub jail_uid: u32,
    /// The gid the jailed VMM runs as
    #[arg(long, value_name = "GID", default_value_t = DEFAULT_JAIL_ID)]
    pub jail_gid: u32,
    /// Where jails are made [default: cella-jailer's, /dev/shm/cella-jailer]
    #[arg(long, value_name = "DIR", requires = "jailed")]
    pub chroot_base: Option<PathBuf>,
    /// Memory limit of the jailed VMM in MiB [default: guest memory + 32 MiB VMM overhead]
    #[arg(long, value_name = "MIB", requires = "jailed")]
    pub memory_limit_mib: Option<u64>,
    /// CPU quota of the jailed VMM, in CPUs (e.g. 0.5)
    #[arg(long, value_name = "CPUS", requires = "jailed")]
    pub cpus: Option<f64>,
    /// The most tasks (threads) the jailed VMM may have
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PIDS_MAX)]
    pub pids_max: u32,
}

/// Why a jailed launch could not be started.
#[derive(Debug, thiserror::Error)]
pub enum JailedError {
    #[error(
        "guest memory of {mem_mib} MiB plus the VMM's overhead of {VMM_OVERHEAD_MIB} MiB needs {need} MiB, \
         more than the memory limit of {limit} MiB: raise --memory-limit-mib or lower --mem-mib"
    )]
    OverMemoryLimit { mem_mib: u64, need: u64, limit: u64 },
    #[error("--seccomp {0} cannot be combined with --jailed: a jailed VMM always enforces its filters")]
    SeccompOff(&'static str),
    #[error("{0} is not supported with --jailed yet")]
    Unsupported(&'static str),
    #[error("cannot find this executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot find cella-jailer at {0}: build it (cargo build -p cella-jailer) or pass --jailer PATH")]
    NoJailer(PathBuf),
    #[error("cannot run {0}")]
    Exec(PathBuf, #[source] std::io::Error),
}

impl JailedError {
    fn exit_code(&self) -> ExitCode {
        match self {
            JailedError::CurrentExe(_) | JailedError::Exec(..) => ExitCode::from(exit_code::VMM_FAILED),
            _ => ExitCode::from(exit_code::BAD_INPUT),
        }
    }
}

/// What a jailed launch needs, checked.
struct Resolved {
    limit: u64,
    jailer: PathBuf,
    vmm: PathBuf,
    id: String,
}

/// One VMM launch to put in a jail.
#[derive(Debug)]
pub struct JailedLaunch {
    /// The VMM's subcommand (`run`).
    pub subcommand: &'static str,
    pub mem_mib: u64,
    /// Host files the VMM reads, with the option that names each (`--image`, `--disk`, ...);
    /// each is bound read-only at `/<option name>` in the jail.
    pub files: Vec<(&'static str, PathBuf)>,
    /// Other VMM options, passed as given.
    pub options: Vec<OsString>,
    /// The guest's arguments (after `--`).
    pub guest_args: Vec<String>,
}

/// What a jail holds beyond a [`JailedLaunch`]'s read-only files (`session --jailed`).
#[derive(Debug, Default)]
pub struct JailedCell {
    /// A host folder bound read-write into the jail at the same path (`cella-jailer --bind-rw`).
    pub bind_rw: Option<PathBuf>,
    /// A procfs of the jail's own PID namespace at `/proc` (`cella-jailer --mount-proc`).
    pub mount_proc: bool,
}

impl JailArgs {
    /// Sets this process's seccomp mode (for an unjailed run).
    pub fn apply_seccomp_mode(&self) {
        seccomp::set_mode(self.seccomp.mode());
    }

    /// The jailer, the VMM binary, the jail's id and its memory limit for a VM of `mem_mib`,
    /// checked: filters enforced, the limit room enough, the jailer there.
    fn resolve(&self, mem_mib: u64) -> Result<Resolved, JailedError> {
        match self.seccomp {
            SeccompArg::Enforce => {}
            SeccompArg::Log => return Err(JailedError::SeccompOff("log")),
            SeccompArg::Off => return Err(JailedError::SeccompOff("off")),
        }
        let limit = self.memory_limit_mib.unwrap_or(mem_mib + VMM_OVERHEAD_MIB);
        let need = mem_mib + VMM_OVERHEAD_MIB;
        if need > limit {
            return Err(JailedError::OverMemoryLimit { mem_mib, need, limit });
        }
        let exe = std::env::current_exe().map_err(JailedError::CurrentExe)?;
        let jailer = match &self.jailer {
            Some(path) => path.clone(),
            None => exe.with_file_name("cella-jailer"),
        };
        if !jailer.is_file() {
            return Err(JailedError::NoJailer(jailer));
        }
        let vmm = self.vmm_binary.clone().unwrap_or(exe);
        let id = self.jail_id.clone().unwrap_or_else(|| format!("vm-{}", std::process::id()));
        Ok(Resolved { limit, jailer, vmm, id })
    }

    /// The cell of a jailed spare (`cella-vmm spare` in a jail) for a VM of `mem_mib`, and the
    /// VMM binary to jail.
    pub fn spare_jail(&self, mem_mib: u64) -> Result<(SpareJail, PathBuf), JailedError> {
        let Resolved { limit, jailer, vmm, id } = self.resolve(mem_mib)?;
        let jail = SpareJail {
            jailer,
            id,
            uid: self.jail_uid,
            gid: self.jail_gid,
            chroot_base: self.chroot_base.clone(),
            memory_limit_mib: limit,
            cpus: self.cpus,
            pids_max: self.pids_max,
            from_prepared: self.jail_prepared.clone(),
        };
        Ok((jail, absolute(&vmm)))
    }

    /// The `cella-jailer` command for `launch` in a jail that also holds `cell`.
    pub fn command_in(&self, launch: &JailedLaunch, cell: &JailedCell) -> Result<Command, JailedError> {
        let Resolved { limit, jailer, vmm, id } = self.resolve(launch.mem_mib)?;
        let mut command = Command::new(&jailer);
        command.arg("--id").arg(&id).arg("--exec-file").arg(&vmm);
        if let Some(spare) = &self.jail_prepared {
            command.arg("--from-prepared").arg(spare);
        }
        command.arg("--uid").arg(self.jail_uid.to_string()).arg("--gid").arg(self.jail_gid.to_string());
        if let Some(base) = &self.chroot_base {
            command.arg("--chroot-base").arg(base);
        }
        command.arg("--new-pid-ns");
        command.arg("--cgroup").arg(format!("memory={limit}M"));
        command.arg("--cgroup").arg(format!("pids={}", self.pids_max));
        if let Some(cpus) = self.cpus {
            command.arg("--cgroup").arg(format!("cpu={cpus}"));
        }
        if let Some(dir) = &cell.bind_rw {
            command.arg("--bind-rw").arg(dir);
        }
        if cell.mount_proc {
            command.arg("--mount-proc");
        }
        let mut vmm_args: Vec<OsString> = vec![launch.subcommand.into()];
        for (option, host) in &launch.files {
            let jail_path = format!("/{}", option.trim_start_matches('-'));
            let mut spec = OsString::from(absolute(host));
            spec.push(format!("={jail_path}"));
            command.arg("--ro-file").arg(spec);
            vmm_args.push(option.into());
            vmm_args.push(jail_path.into());
        }
        vmm_args.extend([
            "--mem-mib".into(),
            launch.mem_mib.to_string().into(),
            "--seccomp".into(),
            "enforce".into(),
        ]);
        vmm_args.extend(launch.options.iter().cloned());
        vmm_args.push("--".into());
        vmm_args.extend(launch.guest_args.iter().map(OsString::from));
        command.arg("--").args(vmm_args);
        Ok(command)
    }

    /// Replaces this process with the jailer running `launch`; returns only on failure.
    pub fn exec(&self, launch: &JailedLaunch) -> ExitCode {
        self.exec_in(launch, &JailedCell::default())
    }

    /// [`JailArgs::exec`] in a jail that also holds `cell`.
    pub fn exec_in(&self, launch: &JailedLaunch, cell: &JailedCell) -> ExitCode {
        let e = match self.command_in(launch, cell) {
            Ok(mut command) => JailedError::Exec(PathBuf::from(command.get_program()), command.exec()),
            Err(e) => e,
        };
        refuse(&e)
    }
}

/// Reports why a jailed launch did not start; returns the exit code for it.
pub fn refuse(e: &JailedError) -> ExitCode {
    tracing::error!("{}", cella_vmm::error_chain(e));
    e.exit_code()
}

/// `path` made absolute (symlinks resolved where it exists), as the jailer requires.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> JailedLaunch {
        JailedLaunch {
            subcommand: "run",
            mem_mib: 128,
            files: vec![("--image", PathBuf::from("/nonexistent/cella-runner"))],
            options: vec!["--json".into()],
            guest_args: vec!["hello".into()],
        }
    }

    #[test]
    fn refuses_guest_memory_above_the_memory_limit_before_launching() {
        let args = JailArgs { jailed: true, memory_limit_mib: Some(100), ..JailArgs::default() };
        let e = args.command_in(&launch(), &JailedCell::default()).unwrap_err();
        assert!(matches!(e, JailedError::OverMemoryLimit { mem_mib: 128, need: 160, limit: 100 }), "{e}");
        assert!(e.to_string().contains("more than the memory limit of 100 MiB"));
        // A jailed spare (scan --jailed) is held to the same.
        assert!(matches!(args.spare_jail(128), Err(JailedError::OverMemoryLimit { .. })));
    }

    #[test]
    fn refuses_seccomp_off_when_jailed() {
        let args = JailArgs { jailed: true, seccomp: SeccompArg::Off, ..JailArgs::default() };
        assert!(matches!(
            args.command_in(&launch(), &JailedCell::default()),
            Err(JailedError::SeccompOff("off"))
        ));
        assert!(matches!(args.spare_jail(128), Err(JailedError::SeccompOff("off"))));
    }
}
