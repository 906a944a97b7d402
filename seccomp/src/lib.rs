//! The VMM's seccomp filters, one per thread kind, compiled at build time from
//! `seccomp/filters/<thread>.json` (see `build.rs`). Each allowed syscall in those files says
//! who needs it; `ioctl`, `tgkill`, `fcntl`, `fallocate`, `mmap` and `mprotect` are narrowed by
//! their arguments.
//!
//! The default action kills the whole process with `SIGSYS` (`SECCOMP_RET_KILL_PROCESS`): a
//! supervisor sees "killed by signal 31", and the kernel's audit log (`dmesg`, type 1326)
//! names the syscall. [`Action::Log`] swaps the kill for `SECCOMP_RET_LOG` for development: the
//! syscall is allowed and logged, so a missing entry can be found without killing the VMM.

#![forbid(unsafe_code)]

use seccompiler::{sock_filter, BpfProgram};

mod generated {
    /// One BPF instruction: `(code, jt, jf, k)`.
    pub(crate) type Insn = (u16, u8, u8, u32);
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// `BPF_RET | BPF_K`: return the constant `k`.
const BPF_RET_K: u16 = 0x06;
/// `SECCOMP_RET_KILL_PROCESS`.
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_LOG`.
const RET_LOG: u32 = 0x7ffc_0000;

/// The kinds of VMM thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits, kicks the vCPU, tears down, scrubs, reports.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the port I/O and MMIO the guest asks for.
    Vcpu,
    /// The device event loop (virtio back ends).
    Device,
    /// The control API thread: accepts connections on the control socket, parses HTTP, and
    /// passes actions to the VMM thread (`vmm/src/control/`).
    Api,
    /// The main thread of a spare VMM while it waits for its launch and starts its VM (also
    /// allows all that `Vmm` and `Vcpu` do: filters stack).
    Spare,
    /// The main thread of a spare session VMM while it waits for a snapshot's files and restores
    /// it (also allows all that `Vmm`, `Vcpu` and `Spare` do, but making a socket).
    Restore,
}

impl ThreadKind {
    /// Every thread kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Spare,
        ThreadKind::Restore,
    ];

    /// The name of the filter in `seccomp/filters/`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Spare => "spare",
            ThreadKind::Restore => "restore",
        }
    }

    fn instructions(self) -> &'static [generated::Insn] {
        match self {
            ThreadKind::Vmm => generated::VMM,
            ThreadKind::Vcpu => generated::VCPU,
            ThreadKind::Device => generated::DEVICE,
            ThreadKind::Api => generated::API,
            ThreadKind::Spare => generated::SPARE,
            ThreadKind::Restore => generated::RESTORE,
        }
    }
}

/// What a filter does with a syscall its policy does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    /// Kill the process with `SIGSYS`. What production and the jailer use.
    #[default]
    Kill,
    /// Allow it and write it to the kernel's audit log (development only).
    Log,
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp filters were built for this architecture (only x86_64 has them)")]
    Unsupported,
    #[error("cannot install the {thread} seccomp filter")]
    Install {
        thread: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// The BPF program for `kind`, with its default action set to `action`.
pub fn program(kind: ThreadKind, action: Action) -> Result<BpfProgram, SeccompError> {
    let insns = kind.instructions();
    if insns.is_empty() {
        return Err(SeccompError::Unsupported);
    }
    Ok(insns
        .iter()
        .map(|&(code, jt, jf, k)| {
            let k =
                if action == Action::Log && code == BPF_RET_K && k == RET_KILL_PROCESS { RET_LOG } else { k };
            sock_filter { code, jt, jf, k }
        })
        .collect())
}

/// Installs the filter for `kind` on the calling thread (and sets no-new-privs, which seccomp
/// needs without `CAP_SYS_ADMIN`). Threads this thread starts afterwards inherit it.
pub fn apply(kind: ThreadKind, action: Action) -> Result<(), SeccompError> {
    let program = program(kind, action)?;
    seccompiler::apply_filter(&program)
        .map_err(|source| SeccompError::Install { thread: kind.name(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_has_a_filter_that_kills_by_default() {
        for kind in ThreadKind::ALL {
            let program = program(kind, Action::Kill).unwrap();
            assert!(program.len() > 10, "{} filter is too short", kind.name());
            assert!(
                program.iter().any(|i| i.code == BPF_RET_K && i.k == RET_KILL_PROCESS),
                "{} filter never kills",
                kind.name()
            );
        }
    }

    #[test]
    fn log_action_replaces_every_kill() {
        for kind in ThreadKind::ALL {
            let program = program(kind, Action::Log).unwrap();
            assert!(!program.iter().any(|i| i.code == BPF_RET_K && i.k == RET_KILL_PROCESS));
            assert!(program.iter().any(|i| i.code == BPF_RET_K && i.k == RET_LOG));
        }
    }

    #[test]
    fn every_allowed_syscall_and_argument_says_who_needs_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("filters");
        let has_comment = |v: &serde_json::Value| v["comment"].as_str().is_some_and(|c| !c.trim().is_empty());
        for kind in ThreadKind::ALL {
            let text = std::fs::read_to_string(dir.join(format!("{}.json", kind.name()))).unwrap();
            let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
            let filter = &policy[kind.name()];
            assert!(has_comment(filter), "{}: the thread has no comment", kind.name());
            let rules = filter["filter"].as_array().unwrap();
            assert!(!rules.is_empty());
            for rule in rules {
                assert!(has_comment(rule), "{}: {} has no comment", kind.name(), rule["syscall"]);
                for arg in rule["args"].as_array().into_iter().flatten() {
                    assert!(
                        has_comment(arg),
                        "{}: an argument of {} has no comment",
                        kind.name(),
                        rule["syscall"]
                    );
                }
            }
        }
    }

    /// A child process (this test binary again, told by `CELLA_SECCOMP_PROBE`) puts `kind`'s
    /// filter on and connects a Unix socket: the vCPU filter lets it (the connect fails, nobody
    /// listens), a spare's main thread's filter, which its vCPU thread keeps, kills it.
    #[test]
    fn a_spares_threads_cannot_open_a_socket_where_a_vcpu_thread_may() {
        if let Ok(probe) = std::env::var("CELLA_SECCOMP_PROBE") {
            let kind = if probe == "spare" { ThreadKind::Spare } else { ThreadKind::Vcpu };
            apply(kind, Action::Kill).unwrap();
            let _ = std::os::unix::net::UnixStream::connect("/nonexistent/cella-probe.sock");
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let run = |probe: &str| {
            std::process::Command::new(&exe)
                .args(["--exact", "tests::a_spares_threads_cannot_open_a_socket_where_a_vcpu_thread_may"])
                .args(["--test-threads", "1"])
                .env("CELLA_SECCOMP_PROBE", probe)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
        };
        use std::os::unix::process::ExitStatusExt;
        assert!(run("vcpu").success(), "the vCPU filter allows a Unix socket");
        assert_eq!(run("spare").signal(), Some(31), "SIGSYS: the spare filter has no socket");
    }

    /// The filter really is in force: a child thread installs the vCPU filter in log mode
    /// (allowed, never killed), proving the program loads into this kernel.
    #[test]
    fn filters_load_into_the_kernel() {
        for kind in ThreadKind::ALL {
            std::thread::spawn(move || apply(kind, Action::Log).unwrap()).join().unwrap();
        }
    }
}
