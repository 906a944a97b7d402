//! The server log: `tracing` events on stderr, one line each, as text or as JSON lines
//! (`[log] format`, `CELLA_LOG_FORMAT`, `--log-format`), with the ids they concern (`job`,
//! `tenant`, `session`, `slot`, `worker`) as fields. Which events are written is a
//! [`Targets`] filter (`[log] filter`, `CELLA_LOG`): Cella's own events from `info` and its
//! libraries' from `warn` by default ([`DEFAULT_FILTER`]), or a level and per-module levels like
//! `info,cella_service::worker=debug,sqlx=warn`.
//!
//! The command-line client does not log: what it prints is its output. Only `cella serve` and
//! `cella worker` install the logger ([`init`]); without it (in-process tests) events go
//! nowhere.
//!
//! Lines whose words a guest or an artifact can choose (what a failed job's VMM said) go
//! through [`GuestWords`], a token bucket shared by the process: a guest failing on purpose,
//! job after job, cannot flood the log or the disk under it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use cella_log::{parse_filter, subscriber, LogError, LogFormat};
use serde::Deserialize;

/// The filter when none is configured: this service's events from `info`, its libraries' (sqlx's
/// notices, for one) from `warn`.
pub const DEFAULT_FILTER: &str = "warn,cella_service=info,cella_host=info";

/// `[log]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json` (`CELLA_LOG_FORMAT`).
    pub format: LogFormat,
    /// Which events are written (`CELLA_LOG`): a level (`error`, `warn`, `info`, `debug`,
    /// `trace`, `off`), or a default level and `target=level` pairs separated by commas.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, filter: DEFAULT_FILTER.to_owned() }
    }
}

/// Installs the process's logger (stderr). A second call, or one after another logger was
/// installed, changes nothing.
pub fn init(config: &LogConfig) -> Result<(), LogError> {
    let filter = parse_filter(&config.filter)?;
    cella_log::install(subscriber(config.format, filter, std::io::stderr));
    Ok(())
}

/// A token bucket for log lines a guest can cause: `burst` lines at once, refilled at one
/// line per `every`. Lines beyond it are counted, and the next line let through says how
/// many were left out.
#[derive(Debug)]
pub struct GuestWords {
    burst: u32,
    every: Duration,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When tokens were last added; `None` until the first line (the bucket starts full).
    refilled: Option<Instant>,
    dropped: u64,
}

impl GuestWords {
    pub const fn new(burst: u32, every: Duration) -> Self {
        GuestWords { burst, every, state: Mutex::new(Bucket { tokens: burst, refilled: None, dropped: 0 }) }
    }

    /// `Some(lines left out before this one)` if a line may be written now; `None` if not.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let since = b.refilled.get_or_insert(now);
        let every = self.every.max(Duration::from_nanos(1));
        let earned = now.saturating_duration_since(*since).as_nanos() / every.as_nanos();
        if earned > 0 {
            *since = now;
            b.tokens = (u128::from(b.tokens) + earned).min(u128::from(self.burst)) as u32;
        }
        if b.tokens == 0 {
            b.dropped += 1;
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_words_are_held_to_the_burst_then_the_rate() {
        let words = GuestWords::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..10).map(|_| words.admit(t0)).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // A second later one line is let through, and it says seven were left out.
        assert_eq!(words.admit(t0 + Duration::from_millis(1000)), Some(7));
        assert_eq!(words.admit(t0 + Duration::from_millis(1500)), None);
        // A long quiet refills the bucket to its burst, no more.
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..5).filter(|_| words.admit(later).is_some()).count();
        assert_eq!(admitted, 3);
    }
}
