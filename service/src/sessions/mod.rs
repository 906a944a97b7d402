//! Sessions: a tenant's microVM that stays alive with its artifact indexed in memory and
//! answers many calls, for at most 8 hours from creation, running or suspended.
//!
//! ```text
//! pending → starting → running ⇄ paused
//!                      running|paused → suspending → suspended → resuming → running
//!            any live state → terminating → terminated          (and failed, from anywhere)
//! ```
//!
//! - [`store`]: the `sessions` table. Every transition is a conditional UPDATE on the state and
//!   generation it started from, in the transaction that appends its audit event.
//! - [`manager`]: the transitions themselves, one at a time per session (a lock per session id
//!   in this process, the generation fence across processes).
//! - [`vmm`]: runs `cella-vmm session` as a process of its own session (so a restarted `cella
//!   serve` re-adopts it), jailed like scan jobs when `worker.jailed` says so (each VMM with a
//!   uid of its own and the session's folder as the one place it may write), and talks to it
//!   through its control socket and the guest's vsock socket.
//! - [`driver`]: the one trait through which the manager drives a VMM ([`vmm::Vmms`] in `cella
//!   serve`, a fake in the manager's unit tests, which run without root, KVM or PostgreSQL).
//! - [`reaper`]: suspends idle sessions, terminates expired ones, notices VMMs that died.

pub mod driver;
#[cfg(test)]
mod fake;
pub mod manager;
#[cfg(test)]
mod manager_tests;
pub mod reaper;
pub mod spares;
pub mod store;
pub mod vmm;

use serde::Serialize;

use crate::error::ServiceError;
use crate::jobs::ArtifactView;

pub use manager::SessionManager;

/// A session's state (the `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Starting,
    Running,
    Paused,
    Suspending,
    Suspended,
    Resuming,
    Terminating,
    Terminated,
    Failed,
}

impl State {
    pub const ALL: [State; 10] = [
        State::Pending,
        State::Starting,
        State::Running,
        State::Paused,
        State::Suspending,
        State::Suspended,
        State::Resuming,
        State::Terminating,
        State::Terminated,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::Suspending => "suspending",
            State::Suspended => "suspended",
            State::Resuming => "resuming",
            State::Terminating => "terminating",
            State::Terminated => "terminated",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminated or failed: nothing runs and nothing is kept on disk.
    pub fn is_final(self) -> bool {
        matches!(self, State::Terminated | State::Failed)
    }

    /// A VMM process exists (or should).
    pub fn has_vmm(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Paused | State::Suspending | State::Resuming)
    }

    /// A step in progress: another call should wait and try again.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            State::Pending | State::Starting | State::Suspending | State::Resuming | State::Terminating
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `read` may return from the session's files.
pub const READ_POLICIES: &[&str] = &["deny", "redact", "allow"];

/// The least and most guest memory a session may ask for.
pub const MEM_MIB_RANGE: std::ops::RangeInclusive<u32> = 16..=8192;

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: String,
    /// pending, starting, running, paused, suspending, suspended, resuming, terminating,
    /// terminated or failed
    pub state: String,
    pub artifact: ArtifactView,
    pub mem_mib: i32,
    /// deny, redact or allow: what `read` returns.
    pub read_policy: String,
    /// Suspended after this many seconds without exec or connect (0: never).
    pub idle_suspend_secs: i32,
    /// Terminated at this time (running or suspended); `connect` with `extend` moves it later.
    #[schema(value_type = String, format = DateTime)]
    pub deadline: String,
    /// The latest `deadline` can be moved to (creation + the maximum duration).
    #[schema(value_type = String, format = DateTime)]
    pub max_deadline: String,
    #[schema(value_type = String, format = DateTime)]
    pub last_active_at: String,
    /// The host its VM runs on; calls that touch the VM go to the API on that host.
    pub host: String,
    /// The size of its snapshot on disk, while suspended.
    pub snapshot_bytes: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: String,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub terminated_at: Option<String>,
}

/// A page of sessions.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionPage {
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The parameters of a new session, validated.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub max_duration_secs: u64,
    pub idle_suspend_secs: u64,
    pub read_policy: String,
    pub mem_mib: u32,
}

impl SessionParams {
    /// Checks the request's values against the configuration; defaults fill what is absent.
    pub fn validate(
        config: &crate::config::SessionsConfig,
        max_duration: Option<u64>,
        idle_suspend: Option<u64>,
        read_policy: Option<&str>,
        mem_mib: Option<u32>,
    ) -> Result<Self, ServiceError> {
        let max = config.max_duration();
        let max_duration_secs = max_duration.unwrap_or(max);
        if max_duration_secs == 0 || max_duration_secs > max {
            return Err(ServiceError::Unprocessable(format!(
                "max_duration={max_duration_secs} is not allowed: a session lives 1 to {max} seconds ({} h)",
                max as f64 / 3600.0
            )));
        }
        if let Some(idle) = idle_suspend.filter(|i| *i > max) {
            return Err(ServiceError::Unprocessable(format!(
                "idle_suspend={idle} is longer than the maximum duration of {max} s; use 0 for never"
            )));
        }
        let idle_suspend_secs = idle_suspend.unwrap_or(config.default_idle_suspend_secs).min(max);
        let read_policy = read_policy.map(str::trim).filter(|p| !p.is_empty()).unwrap_or("redact");
        if !READ_POLICIES.contains(&read_policy) {
            return Err(ServiceError::Unprocessable(format!(
                "read_policy {read_policy:?} is unknown: use one of {}",
                READ_POLICIES.join(", ")
            )));
        }
        let mem_mib = mem_mib.unwrap_or(config.mem_mib);
        if !MEM_MIB_RANGE.contains(&mem_mib) {
            return Err(ServiceError::Unprocessable(format!(
                "mem_mib={mem_mib} is out of range: use {} to {} MiB",
                MEM_MIB_RANGE.start(),
                MEM_MIB_RANGE.end()
            )));
        }
        Ok(Self { max_duration_secs, idle_suspend_secs, read_policy: read_policy.to_owned(), mem_mib })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SessionsConfig;

    #[test]
    fn states_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("sleeping"), None);
    }

    #[test]
    fn params_default_from_the_configuration_and_refuse_out_of_range_values() {
        let c = SessionsConfig::default();
        let p = SessionParams::validate(&c, None, None, None, None).unwrap();
        assert_eq!((p.max_duration_secs, p.idle_suspend_secs, p.mem_mib), (28_800, 900, 256));
        assert_eq!(p.read_policy, "redact");
        let err = SessionParams::validate(&c, Some(28_801), None, None, None).unwrap_err();
        assert!(err.to_string().contains("1 to 28800 seconds"), "{err}");
        let err = SessionParams::validate(&c, None, None, Some("everything"), None).unwrap_err();
        assert!(err.to_string().contains("deny, redact, allow"), "{err}");
        assert!(SessionParams::validate(&c, None, None, None, Some(4)).is_err());
        assert!(SessionParams::validate(&c, Some(0), None, None, None).is_err());
    }
}
