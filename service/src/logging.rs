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

use serde::Deserialize;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-06T16:00:00.000000Z  INFO cella_service::worker: job running job=… tenant=…`
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the fields.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not a log format (text or json)")),
        }
    }
}

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

/// Why the logger could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "the log filter `{filter}` is not valid: `{part}` is not a level (error, warn, info, debug, trace, off) \
         or `module=level`; e.g. `info` or `info,sqlx=warn`"
    )]
    Filter { filter: String, part: String },
}

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// The filter `text` names. Each comma-separated part is a level or `module=level`: a bare word
/// that is not a level is refused (the filter syntax would take it for a module to log
/// everything of, and a typo like `infoo` would silence the rest).
pub fn parse_filter(text: &str) -> Result<Targets, LogError> {
    let bad = |part: &str| LogError::Filter { filter: text.to_owned(), part: part.to_owned() };
    for part in text.split(',').map(str::trim) {
        let level = part
            .rsplit_once('=')
            .map_or(part, |(module, level)| if module.trim().is_empty() { "" } else { level });
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(bad(part));
        }
    }
    text.trim().parse().map_err(|_| bad(text))
}

/// The formatting layer for `format`, writing to `writer`.
fn layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(fmt),
        LogFormat::Json => {
            Box::new(fmt.json().flatten_event(true).with_current_span(false).with_span_list(false))
        }
    }
}

/// A subscriber writing `format` lines that pass `filter` to `writer`.
pub fn subscriber<W>(format: LogFormat, filter: Targets, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(layer(format, writer).with_filter(filter))
}

/// Installs the process's logger (stderr). A second call, or one after another logger was
/// installed, changes nothing.
pub fn init(config: &LogConfig) -> Result<(), LogError> {
    let filter = parse_filter(&config.filter)?;
    let _ = tracing::subscriber::set_global_default(subscriber(config.format, filter, std::io::stderr));
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
    use std::io::Write;
    use std::sync::Arc;

    /// A writer into shared memory, for reading back what the logger wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines(format: LogFormat, filter: &str, emit: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let sub = subscriber(format, parse_filter(filter).unwrap(), out.clone());
        tracing::subscriber::with_default(sub, emit);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn json_lines_carry_the_ids_as_fields() {
        let got = lines(LogFormat::Json, "info", || {
            tracing::info!(job = "0123abcd", tenant = "acme", attempt = 1, "job running");
            tracing::debug!(job = "0123abcd", "not written at info");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(
            (v["message"].as_str(), v["job"].as_str(), v["tenant"].as_str(), v["attempt"].as_u64()),
            (Some("job running"), Some("0123abcd"), Some("acme"), Some(1)),
            "{v}"
        );
        assert_eq!((v["level"].as_str(), v["target"].as_str()), (Some("INFO"), Some(module_path!())));
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    }

    #[test]
    fn text_lines_name_the_level_the_message_and_the_fields() {
        let got = lines(LogFormat::Text, "warn", || {
            tracing::info!("left out");
            tracing::warn!(session = "s1", "session failed");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains(" WARN ") && got[0].ends_with("session failed session=\"s1\""), "{got:?}");
    }

    #[test]
    fn a_filter_can_name_modules() {
        let got = lines(LogFormat::Text, "warn,cella_service::logging=debug", || {
            tracing::debug!("kept: this module is at debug");
        });
        assert_eq!(got.len(), 1);
        for bad in ["loud", "infoo", "info,sqlx", "=warn", "", "info,,warn"] {
            let e = parse_filter(bad).expect_err(bad).to_string();
            assert!(e.contains("is not a level"), "{e}");
        }
        assert!(parse_filter("info,sqlx=warn").is_ok());
        assert!(parse_filter(" WARN ").is_ok());
    }

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
