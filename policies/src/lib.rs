//! Cella's policies as data: compliance rule packs, per-thread seccomp filters, and jailer and
//! tenant resource defaults. The rule packs and seccomp filters arrive with their issues.
#![forbid(unsafe_code)]

pub mod rules;
pub mod seccomp;
