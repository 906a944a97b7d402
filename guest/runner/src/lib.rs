//! The host-testable half of `cella-runner`: the parts of the guest that need no hardware
//! (argument parsing into modes, for now), built `no_std` for the guest and tested on the host.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod mode;
