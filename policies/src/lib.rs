//! Cella's policies as data: compliance rule packs (the VMM's seccomp filters are in
//! `cella-seccomp`, so the VMM's filters do not pull in the rule compiler); and baselines (`baseline.rs`: the known findings a scan suppresses,
//! read from a baseline file or an earlier SARIF log), the host side of which the service reuses.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod rules;
