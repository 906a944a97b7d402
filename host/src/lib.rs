//! `cella-host`: everything the host needs to drive a Cella VMM, and nothing of KVM. The VMM's
//! control API seen from outside ([`client::ControlClient`], its HTTP framing [`http`] and
//! descriptor passing [`fds`]), the host ends of the guest channels (a scan job, [`job`]; a
//! session, [`session`]), spare VMMs started ahead and given their jobs ([`spare`]), and the
//! typed results both sides share ([`report`], [`scan_report`]). `cella-vmm` uses the same
//! types and framing for its side; the service depends on this crate only.

pub mod client;
pub mod fds;
pub mod http;
pub mod images;
pub mod job;
pub mod report;
pub mod scan_report;
pub mod session;
pub mod spare;
pub mod spawn;
pub mod template;

pub use report::{ConsoleStats, GuestExit, PauseStats, RunReport, ScrubReport, VmInfo, VmMetrics, VmState};
