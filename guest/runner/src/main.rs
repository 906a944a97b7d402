//! `cella-runner`: Cella's own guest. A freestanding program, no operating system, that the
//! VMM enters in 64-bit mode at CPL 3 with IOPL 3. It reads its boot-info block, sets up a
//! heap over the memory the VMM gave it, runs the mode its arguments name, and ends the VM by
//! writing its exit status to the exit port. It has no IDT: any fault is a triple fault, which
//! the VMM reports as "guest crashed".
//!
//! Built with `--cfg cella_guest` as a freestanding static executable (see `scripts/build-guest.sh`):
//! the `x86_64-unknown-linux-gnu` code generator with no libc, no start files and no OS, so
//! the guest gets SSE/SSSE3/SSE4.2 (which `x86_64-unknown-none`, a soft-float target, cannot
//! have) for the scan engine. Built without that cfg, it is only a stub that says where it
//! belongs, so the workspace still builds, lints and tests as one.
#![cfg_attr(cella_guest, no_std, no_main)]

extern crate alloc;

#[cfg(cella_guest)]
mod rt;

#[cfg(not(cella_guest))]
fn main() {
    eprintln!(
        "cella-runner is a guest program: build it with scripts/build-guest.sh and run it with \
         `cella-vmm run`"
    );
    std::process::exit(2);
}
