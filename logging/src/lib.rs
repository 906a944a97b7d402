//! Cella's log lines: `tracing` events written to stderr, one line each, as text or as JSON
//! lines, with the ids they concern as fields. Two shapes share the format and the filter:
//!
//! - the **service's** ([`subscriber`]): `2026-12-06T16:00:00.000000Z  INFO target: message
//!   job=…`, for `cella serve` and `cella worker`;
//! - a **tool's** ([`tool_subscriber`]), for `cella-jailer` and `cella-vmm`, whose stderr a
//!   person or a launcher reads: as text, exactly the line people read before (`cella-vmm
//!   spare: error: message key=value`: no time, no target, the level only when it is a warning
//!   or an error); as JSON, the same object as the service's, with the enclosing span's fields
//!   (e.g. the jail's id) under `span`, so a JSON server log can take the line as it is.
//!
//! Which events are written is a [`Targets`] filter ([`parse_filter`]).

use std::fmt;

use serde::Deserialize;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
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

/// The environment variable naming the format (`text` or `json`).
pub const FORMAT_ENV: &str = "CELLA_LOG_FORMAT";
/// The environment variable holding the filter.
pub const FILTER_ENV: &str = "CELLA_LOG";

/// Runs `command` (a Cella tool whose words its launcher quotes in messages for people)
/// without [`FORMAT_ENV`]: it writes text, whatever format its launcher logs in.
pub fn words_for_people(command: &mut std::process::Command) -> &mut std::process::Command {
    command.env_remove(FORMAT_ENV)
}

/// Why a logger could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "the log filter `{filter}` is not valid: `{part}` is not a level (error, warn, info, debug, trace, off) \
         or `module=level`; e.g. `info` or `info,sqlx=warn`"
    )]
    Filter { filter: String, part: String },
    #[error("{FORMAT_ENV}: {0}")]
    Format(String),
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

/// The JSON layer both shapes share.
fn json_layer<S, W>(writer: W, with_span: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer);
    Box::new(fmt.json().flatten_event(true).with_current_span(with_span).with_span_list(false))
}

/// The service's subscriber: `format` lines that pass `filter`, to `writer`.
pub fn subscriber<W>(format: LogFormat, filter: Targets, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = match format {
        LogFormat::Text => Box::new(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer)),
        LogFormat::Json => json_layer(writer, false),
    };
    tracing_subscriber::registry().with(layer.with_filter(filter))
}

/// A tool's text line: `program: [error: |warning: ]message key=value`.
struct ToolLine {
    program: String,
}

impl<S, N> FormatEvent<S, N> for ToolLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}: ", self.program)?;
        match *event.metadata().level() {
            Level::ERROR => writer.write_str("error: ")?,
            Level::WARN => writer.write_str("warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A tool's subscriber (`cella-jailer`, `cella-vmm`): lines named `program` when text.
pub fn tool_subscriber<W>(
    program: &str,
    format: LogFormat,
    filter: Targets,
    writer: W,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .event_format(ToolLine { program: program.to_owned() }),
        ),
        LogFormat::Json => json_layer(writer, true),
    };
    tracing_subscriber::registry().with(layer.with_filter(filter))
}

/// Installs `subscriber` as the process's logger. A second call, or one after another logger
/// was installed, changes nothing.
pub fn install(subscriber: impl Subscriber + Send + Sync + 'static) {
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// The filter a tool uses when none is given: its own events from `info`.
pub const TOOL_FILTER: &str = "info";

/// Installs a tool's logger on stderr: `format` and `filter` if given, else the environment's
/// ([`FORMAT_ENV`], [`FILTER_ENV`]), else text and [`TOOL_FILTER`].
pub fn init_tool(program: &str, format: Option<LogFormat>, filter: Option<&str>) -> Result<(), LogError> {
    let format = match format {
        Some(format) => format,
        None => match std::env::var(FORMAT_ENV) {
            Ok(word) => word.parse().map_err(LogError::Format)?,
            Err(_) => LogFormat::Text,
        },
    };
    let from_env = std::env::var(FILTER_ENV).ok();
    let filter = parse_filter(filter.or(from_env.as_deref()).unwrap_or(TOOL_FILTER))?;
    install(tool_subscriber(program, format, filter, std::io::stderr));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

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

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    fn lines(format: LogFormat, filter: &str, emit: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        tracing::subscriber::with_default(
            subscriber(format, parse_filter(filter).unwrap(), out.clone()),
            emit,
        );
        out.lines()
    }

    fn tool_lines(format: LogFormat, emit: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let sub = tool_subscriber("cella-vmm spare", format, parse_filter("info").unwrap(), out.clone());
        tracing::subscriber::with_default(sub, emit);
        out.lines()
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
        let got = lines(LogFormat::Text, "warn,cella_log=debug", || {
            tracing::debug!("kept: this crate is at debug");
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
    fn a_tools_text_lines_read_as_before_with_the_level_only_for_warnings_and_errors() {
        let got = tool_lines(LogFormat::Text, || {
            let span = tracing::info_span!("jail", jail = "job-1");
            let _in = span.enter();
            tracing::info!("guest exited with status 0");
            tracing::warn!(signal = 15, "cannot handle signal");
            tracing::error!("no such file");
        });
        assert_eq!(
            got,
            [
                "cella-vmm spare: guest exited with status 0",
                "cella-vmm spare: warning: cannot handle signal signal=15",
                "cella-vmm spare: error: no such file",
            ]
        );
    }

    #[test]
    fn a_tools_json_lines_carry_the_spans_fields() {
        let got = tool_lines(LogFormat::Json, || {
            let span = tracing::info_span!("jail", jail = "job-1");
            let _in = span.enter();
            tracing::error!(step = "mknod", "jail failed");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(
            (v["message"].as_str(), v["level"].as_str(), v["step"].as_str(), v["span"]["jail"].as_str()),
            (Some("jail failed"), Some("ERROR"), Some("mknod"), Some("job-1")),
            "{v}"
        );
    }
}
