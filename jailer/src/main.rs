//! `cella-jailer`: puts one Cella VMM in its own cell (namespaces, pivot_root, cgroups, rlimits,
//! Landlock, capability drop, uid/gid), then `exec`s it. The steps arrive with the jailer issue;
//! until then this binary only explains itself and refuses to run anything.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("cella-jailer: not built yet; run VMs with `cella-vmm run` for now");
    std::process::exit(2);
}
