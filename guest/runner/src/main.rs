//! `cella-runner`: Cella's own guest. A freestanding program, no operating system, that the
//! VMM enters in 64-bit mode at CPL 3 with IOPL 3. It reads its boot-info block, sets up a
//! heap over the memory the VMM gave it, runs the mode its arguments name, and ends the VM by
//! writing its exit status to the exit port. It has no IDT: any fault is a triple fault, which
//! the VMM reports as "guest crashed".
//!
//! Built for `x86_64-unknown-none` (see `scripts/setup.sh`). Built for the host, it is only a
//! stub that says where it belongs, so the workspace still builds, lints and tests as one.
#![cfg_attr(target_os = "none", no_std, no_main)]

extern crate alloc;

#[cfg(target_os = "none")]
mod rt;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "cella-runner is a guest program: build it with `cargo build --release -p cella-runner \
         --target x86_64-unknown-none` and run it with `cella-vmm run`"
    );
    std::process::exit(2);
}
