//! `cella-jailer`: puts one Cella VMM in its own cell, then `exec`s it, and either stays behind
//! as its supervisor to remove the cell when the VMM ends, or (`--hand-off`) hands the VMM to its
//! caller as the caller's own child and exits: the caller then removes the cell
//! ([`supervisor::HandedOff`]), and [`owner`] lets the next caller sweep the cells of one that
//! was killed.
//!
//! The steps, in order (Firecracker's jailer is the model; Cella adds Landlock and explicit
//! capability dropping): validate the ID and every path ([`config`]); close inherited file
//! descriptors; clear the environment; create `<base>/<exec-name>/<id>/root`; create `/dev`
//! and the mount points for the read-only files; open the VMM binary (`O_PATH`, checked: a
//! regular executable file neither its group nor others can write); create the cgroups and
//! write their limits ([`cgroup`], v1 and v2 per controller); clone into new mount, IPC, UTS,
//! network and (with `--new-pid-ns`) PID namespaces; in the child ([`child`]): join the
//! cgroups, set rlimits, bind the read-only files, `pivot_root`, unmount the old root, `mknod
//! /dev/kvm`, chown it, make the root read-only, join a netns if asked, apply Landlock, drop
//! every capability, set no-new-privs, switch uid/gid ([`confine`]), and `execveat` the VMM
//! from the descriptor with an empty environment. The binary is never copied into the jail
//! (Landlock allows executing that one file, through the descriptor): a launch costs no copy
//! and every VMM shares the host's page cache of one read-only binary. The VMM installs its own
//! per-thread seccomp filters.
//!
//! The [`supervisor`] blocks the signals it forwards before it creates anything, waits for the
//! VMM and removes the jail folder and cgroups however it ends; mounts live only in the VMM's
//! mount namespace and vanish with it.
//!
//! Ahead of a launch, [`prepared`] makes a spare jail folder (with a network namespace) that a
//! launch with `--from-prepared` takes instead of making its own.
//!
//! For a session (`cella-vmm session --jailed`): `--bind-rw DIR` binds one host folder
//! read-write into the jail at the same path (no path translation: the host and the VMM name
//! the same files the same way); the supervisor hands the folder and its contents to the
//! VMM's uid/gid before the clone and back to root when the jail ends ([`handover`]), and
//! Landlock lets the VMM read, write, create and remove files, folders and sockets in it and
//! nowhere else. `--mount-proc` (with `--new-pid-ns`) mounts the jail's own procfs at `/proc`,
//! read-only, `subset=pid,hidepid=invisible`, where the VMM is the only process; Landlock lets
//! it read files there (a restored VM's scrub reads `/proc/self/pagemap`).
//!
//! A VMM that talks to its caller without a shared folder (a spare, `cella-vmm spare`) gets
//! its descriptors passed on with `--keep-fd`. A caller that must not be outlived sets SIGTERM
//! as the jailer's parent-death signal before exec: it is forwarded like any other SIGTERM, so
//! the VM still stops, is scrubbed, and the jail is removed.

pub mod cgroup;
pub mod child;
pub mod config;
pub mod confine;
pub mod handover;
pub mod owner;
pub mod prepared;
pub mod supervisor;
pub mod timing;
pub mod wait;

pub use config::{ConfigError, JailConfig, JailRequest};
pub use supervisor::{JailError, Outcome, VmmStatus};

/// An error and its sources on one line: `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
