//! Configuration: `<data dir>/cella.toml` (or `--config FILE`), then environment variables, then
//! built-in defaults that work on one host. Every key is documented in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("configuration file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("environment variable {name}={value:?} is not {what}")]
    Env { name: &'static str, value: String, what: &'static str },
    #[error("jail uids: {0}")]
    JailUids(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the API listens (`CELLA_LISTEN`).
    pub listen: SocketAddr,
    /// An external PostgreSQL (`DATABASE_URL`); without one, `cella serve` runs a private one in
    /// the data folder.
    pub database_url: Option<String>,
    /// The server certificate and key (PEM). Without them a CA and a certificate for
    /// `localhost`/`127.0.0.1` are generated in the data folder on first start.
    pub tls: TlsConfig,
    pub jobs: JobsConfig,
    pub worker: WorkerConfig,
    pub sessions: SessionsConfig,
    /// Server-wide limits on connections and uploads.
    pub limits: LimitsConfig,
    /// Per-tenant quotas: the defaults; `cella tenant quota` sets a tenant's own.
    pub quotas: QuotasConfig,
    /// The checkpoint signing key file and checkpoint policy.
    pub audit: AuditSection,
    /// The server log's format and filter.
    pub log: crate::logging::LogConfig,
}

/// Server-wide limits: how many connections are served, and how slow an upload may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections served at once (`CELLA_MAX_CONNECTIONS`); 0: 3/8 of the open-file
    /// limit (which `serve` raises to its hard limit at start), between 16 and 8192. A few more
    /// are accepted only to be answered 503; beyond those, new connections wait.
    pub max_connections: usize,
    /// Connections the kernel keeps waiting to be accepted (the `listen(2)` backlog) while every
    /// place is taken; 0: the kernel's maximum, `net.core.somaxconn`. A connection that finds
    /// the backlog full has its SYN dropped and retried on the client's schedule (1, 3, 7, 15,
    /// 31 s...), so this must exceed the connections a flood keeps opening, or a health check
    /// can go unanswered for minutes behind it.
    pub listen_backlog: u32,
    /// A request's headers must arrive within this.
    pub header_timeout_secs: u64,
    /// The longest one upload may take (408).
    pub upload_deadline_secs: u64,
    /// After `upload_grace_secs`, an upload that has averaged fewer bytes a second than this is
    /// dropped (408).
    pub upload_min_bytes_per_sec: u64,
    pub upload_grace_secs: u64,
    /// A request answered before its body was read (refused: too large, over a quota, the
    /// database away) has the rest of its body read and dropped as its connection closes, so
    /// that a client that sends the whole body before it reads gets the answer: while it keeps
    /// sending at `upload_min_bytes_per_sec` (after a second), for at most this long.
    pub linger_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            listen_backlog: 0,
            header_timeout_secs: 10,
            upload_deadline_secs: 3600,
            upload_min_bytes_per_sec: 16 << 10,
            upload_grace_secs: 10,
            linger_secs: 30,
        }
    }
}

impl LimitsConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }
}

/// The quotas of a tenant that has none of its own (the `quota_*` columns of `tenants` are
/// NULL). Live sessions default to `sessions.max_per_tenant`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Requests of one tenant in flight at once; more answer 429.
    pub requests: u32,
    /// Uploads (job and session artifacts, session file adds) of one tenant in flight; more
    /// answer 429.
    pub uploads: u32,
    /// Guest memory of one tenant's running and paused sessions together, in MiB.
    pub session_mem_mib: u32,
    /// Bytes one tenant keeps on the server's disk: artifacts of its queued and running jobs,
    /// its live sessions' artifacts and snapshots, and its uploads under way.
    pub disk_bytes: u64,
    /// CPU each of the tenant's VMs may use, in percent of one CPU (the VMM's cgroup: v2
    /// `cpu.max`, v1 `cpu.cfs_quota_us`).
    pub vm_cpu_percent: u32,
    /// Rule packs one tenant keeps (names with a live version); one more answers 409.
    pub packs: u32,
    /// What the regexes of one tenant's live pack versions take compiled, together, in bytes;
    /// an upload past it answers 409.
    pub pack_compiled_bytes: u64,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            requests: 64,
            uploads: 8,
            session_mem_mib: 16 << 10,
            disk_bytes: 20 << 30,
            vm_cpu_percent: 100,
            packs: 50,
            pack_compiled_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra host names (and IP addresses) for the generated certificate.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The largest artifact accepted (`CELLA_MAX_ARTIFACT_BYTES`); larger uploads answer 413.
    pub max_artifact_bytes: u64,
    /// How many times a job is leased before it fails for good.
    pub max_attempts: u32,
    /// How long a lease lasts without a heartbeat.
    pub lease_secs: u64,
    /// Rule packs when a request names none.
    pub default_policy: String,
    /// The most jobs of one tenant that run at once (new tenants; per tenant in the database).
    pub tenant_max_concurrent: u32,
    /// An upload that sends nothing for this long is dropped (408).
    pub upload_idle_secs: u64,
    /// Finished jobs (their rows, SARIF logs, summaries and files) and ended sessions' rows are
    /// deleted this many days after they ended (`CELLA_JOBS_RETENTION_DAYS`); 0 keeps them
    /// forever. Each purge is on the tenant's audit chain (`job.purged`, `session.purged`); the
    /// audit events themselves are never deleted.
    pub retention_days: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Whether `cella serve` also runs a worker (`CELLA_WORKER=0` turns it off).
    pub enabled: bool,
    /// Jobs one worker runs at once (`CELLA_WORKER_CONCURRENCY`).
    pub concurrency: u32,
    /// The `cella-vmm` binary (`CELLA_VMM`); default: next to `cella`.
    pub vmm: Option<PathBuf>,
    /// The scanner guest image (`CELLA_SCANNER_IMAGE`); default: cella-vmm's own default.
    pub scanner_image: Option<PathBuf>,
    /// Guest memory of each scan VM.
    pub mem_mib: u32,
    /// A scan is stopped after this long.
    pub timeout_secs: u64,
    /// Run each VMM through cella-jailer (`CELLA_JAILED=1|0`); needs root. Default: jailed
    /// when running as root.
    pub jailed: Option<bool>,
    /// After SIGTERM, how long running jobs may take to finish before their VMs are stopped
    /// and the jobs handed back (`CELLA_DRAIN_SECS`).
    pub drain_secs: u64,
    /// First uid/gid of the jailed VMMs: slot N of this worker runs as `jail_uid_base + N` (its
    /// running scan and the spare waiting for its next one; see `worker::spare_pool`).
    pub jail_uid_base: u32,
    /// Restore every scan's VM from a template whose engine of the default policy is built
    /// (`CELLA_TEMPLATES=1|0`; see `worker::template`). Off: each VM boots the scanner image.
    pub templates: bool,
    /// How many templates of policies other than the default the worker keeps, made the first
    /// time a job of that policy runs (`CELLA_POLICY_TEMPLATES`; 0: only the default's).
    pub policy_templates: u32,
}

/// The hard limit on a session's life, running and suspended: 8 hours.
pub const SESSION_MAX_DURATION_CAP_SECS: u64 = 8 * 3600;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// The longest a session may live, and the default `max_duration` of a new one
    /// (`CELLA_SESSIONS_MAX_DURATION_SECS`); at most 28800 (8 hours).
    pub max_duration_secs: u64,
    /// A running or paused session without exec or connect for this long is suspended
    /// (`CELLA_SESSIONS_IDLE_SUSPEND_SECS`); 0: never. A session may ask for its own.
    pub default_idle_suspend_secs: u64,
    /// Guest memory of a session VM when the request names none.
    pub mem_mib: u32,
    /// How often the reaper looks for idle and expired sessions (`CELLA_SESSIONS_REAPER_INTERVAL_MS`).
    pub reaper_interval_ms: u64,
    /// Jailed session VMMs (`worker.jailed`) run as uid/gid `jail_uid_base + n`, each live one
    /// with its own n below `jail_uids`; the range must not meet the workers'
    /// (`worker.jail_uid_base` .. + `worker.concurrency`).
    pub jail_uid_base: u32,
    /// The most jailed session VMMs one host runs at once (running or paused sessions).
    pub jail_uids: u32,
    /// The most live sessions (not terminated or failed; suspended ones count) one tenant may
    /// hold (`CELLA_SESSIONS_MAX_PER_TENANT`); a create beyond it answers 409. The default of
    /// the per-tenant quota `live_sessions` (see `cella tenant quota`).
    pub max_per_tenant: u32,
    /// The longest one exec (scan, grep, read, add) may wait for the guest's answer
    /// (`CELLA_SESSIONS_EXEC_TIMEOUT_SECS`); then it answers 504 and the session goes on.
    pub exec_timeout_secs: u64,
    /// How long a stop (terminate, suspend, a failed session) waits for the VMM's control API
    /// before it signals the VMM, and then kills it (SIGKILL) if it has not exited after 10 s.
    pub stop_timeout_secs: u64,
    /// Execs one session accepts per second on average (`CELLA_SESSIONS_EXEC_PER_SEC`), and
    /// in a burst; more answer 429 with `Retry-After`.
    pub exec_per_sec: u32,
    pub exec_burst: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_duration_secs: SESSION_MAX_DURATION_CAP_SECS,
            default_idle_suspend_secs: 900,
            mem_mib: 256,
            reaper_interval_ms: 1000,
            jail_uid_base: 65_000,
            jail_uids: 1000,
            max_per_tenant: 16,
            exec_timeout_secs: 120,
            stop_timeout_secs: 10,
            exec_per_sec: 10,
            exec_burst: 40,
        }
    }
}

impl Config {
    /// What SARIF logs name as the tool's `informationUri`: this service's API document, at the
    /// first configured certificate name (else the listen address).
    pub fn information_uri(&self) -> String {
        let host = match self.tls.names.first() {
            Some(name) => format!("{name}:{}", self.listen.port()),
            None => self.listen.to_string(),
        };
        format!("https://{host}/v1/openapi.json")
    }
}

impl SessionsConfig {
    pub fn exec_timeout(&self) -> Duration {
        Duration::from_secs(self.exec_timeout_secs.max(1))
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs.max(1))
    }

    /// The configured maximum, never above the 8-hour cap.
    pub fn max_duration(&self) -> u64 {
        self.max_duration_secs.clamp(1, SESSION_MAX_DURATION_CAP_SECS)
    }

    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms.max(10))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Default: `<data dir>/audit-signing.key` (generated on first start).
    pub signing_key: Option<PathBuf>,
    pub checkpoint_every_events: Option<u64>,
    pub checkpoint_every_secs: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            database_url: None,
            tls: TlsConfig::default(),
            jobs: JobsConfig::default(),
            worker: WorkerConfig::default(),
            sessions: SessionsConfig::default(),
            limits: LimitsConfig::default(),
            quotas: QuotasConfig::default(),
            audit: AuditSection::default(),
            log: crate::logging::LogConfig::default(),
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_artifact_bytes: 1 << 30,
            max_attempts: 3,
            lease_secs: 30,
            default_policy: "secrets,pii,licenses".to_owned(),
            tenant_max_concurrent: 4,
            upload_idle_secs: 30,
            retention_days: 90,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: 2,
            vmm: None,
            scanner_image: None,
            mem_mib: 256,
            timeout_secs: 600,
            jailed: None,
            drain_secs: 30,
            jail_uid_base: 64_100,
            templates: true,
            policy_templates: 4,
        }
    }
}

impl WorkerConfig {
    /// Whether VMMs run jailed: as configured, else when this process is root.
    pub fn is_jailed(&self) -> bool {
        self.jailed.unwrap_or_else(|| {
            std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
                .unwrap_or(false)
        })
    }
}

impl JobsConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }
}

impl Config {
    /// Reads `file` (if it exists; a missing default file is fine, a missing named file is
    /// not), then applies the environment.
    pub fn load(file: Option<&Path>, default_file: &Path) -> Result<Self, ConfigError> {
        let (path, required) = match file {
            Some(path) => (path, true),
            None => (default_file, false),
        };
        let mut config = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
            Err(e) => return Err(ConfigError::Read(path.to_owned(), e)),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.check()?;
        Ok(config)
    }

    /// Checks what no single value shows: the session VMMs' jail uids and the workers' never
    /// meet (a uid shared by two jails would let one VMM reach the other's files).
    pub fn check(&self) -> Result<(), ConfigError> {
        let workers = u64::from(self.worker.jail_uid_base)
            ..u64::from(self.worker.jail_uid_base) + u64::from(self.worker.concurrency);
        let sessions = u64::from(self.sessions.jail_uid_base)
            ..u64::from(self.sessions.jail_uid_base) + u64::from(self.sessions.jail_uids);
        if self.sessions.jail_uid_base == 0 || self.worker.jail_uid_base == 0 {
            return Err(ConfigError::JailUids("a jail uid of 0 would be root's".to_owned()));
        }
        if workers.start < sessions.end && sessions.start < workers.end {
            return Err(ConfigError::JailUids(format!(
                "the workers' uids {}-{} (worker.jail_uid_base, one per slot) meet the session VMMs' {}-{} \
                 (sessions.jail_uid_base, sessions.jail_uids); move one range",
                workers.start,
                workers.end - 1,
                sessions.start,
                sessions.end.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// Environment overrides (`get` is `std::env::var`, or a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(
            name: &'static str,
            value: String,
            what: &'static str,
        ) -> Result<T, ConfigError> {
            value.parse().map_err(|_| ConfigError::Env { name, value, what })
        }
        if let Some(v) = get("CELLA_LOG_FORMAT") {
            self.log.format = parse("CELLA_LOG_FORMAT", v, "a log format (text or json)")?;
        }
        if let Some(v) = get("CELLA_LOG").filter(|v| !v.trim().is_empty()) {
            crate::logging::parse_filter(&v).map_err(|_| ConfigError::Env {
                name: "CELLA_LOG",
                value: v.clone(),
                what: "a log filter like `info` or `info,sqlx=warn`",
            })?;
            self.log.filter = v;
        }
        if let Some(v) = get("CELLA_LISTEN") {
            self.listen = parse("CELLA_LISTEN", v, "an address like 127.0.0.1:8443")?;
        }
        if let Some(v) = get("DATABASE_URL").filter(|v| !v.is_empty()) {
            self.database_url = Some(v);
        }
        if let Some(v) = get("CELLA_MAX_ARTIFACT_BYTES") {
            self.jobs.max_artifact_bytes = parse("CELLA_MAX_ARTIFACT_BYTES", v, "a number of bytes")?;
        }
        if let Some(v) = get("CELLA_LEASE_SECS") {
            self.jobs.lease_secs = parse("CELLA_LEASE_SECS", v, "a number of seconds")?;
        }
        if let Some(v) = get("CELLA_JOBS_RETENTION_DAYS") {
            self.jobs.retention_days =
                parse("CELLA_JOBS_RETENTION_DAYS", v, "a number of days (0: keep forever)")?;
        }
        if let Some(v) = get("CELLA_WORKER") {
            self.worker.enabled = !matches!(v.as_str(), "0" | "false" | "no" | "off");
        }
        if let Some(v) = get("CELLA_WORKER_CONCURRENCY") {
            self.worker.concurrency = parse("CELLA_WORKER_CONCURRENCY", v, "a number")?;
        }
        if let Some(v) = get("CELLA_VMM") {
            self.worker.vmm = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CELLA_SCANNER_IMAGE") {
            self.worker.scanner_image = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CELLA_JAILED") {
            self.worker.jailed = Some(matches!(v.as_str(), "1" | "true" | "yes" | "on"));
        }
        if let Some(v) = get("CELLA_TEMPLATES") {
            self.worker.templates = !matches!(v.as_str(), "0" | "false" | "no" | "off");
        }
        if let Some(v) = get("CELLA_POLICY_TEMPLATES") {
            self.worker.policy_templates = parse("CELLA_POLICY_TEMPLATES", v, "a number")?;
        }
        if let Some(v) = get("CELLA_DRAIN_SECS") {
            self.worker.drain_secs = parse("CELLA_DRAIN_SECS", v, "a number of seconds")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_MAX_DURATION_SECS") {
            self.sessions.max_duration_secs =
                parse("CELLA_SESSIONS_MAX_DURATION_SECS", v, "a number of seconds")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_IDLE_SUSPEND_SECS") {
            self.sessions.default_idle_suspend_secs =
                parse("CELLA_SESSIONS_IDLE_SUSPEND_SECS", v, "a number of seconds")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_MAX_PER_TENANT") {
            self.sessions.max_per_tenant = parse("CELLA_SESSIONS_MAX_PER_TENANT", v, "a number of sessions")?;
        }
        if let Some(v) = get("CELLA_MAX_CONNECTIONS") {
            self.limits.max_connections = parse("CELLA_MAX_CONNECTIONS", v, "a number of connections")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_EXEC_TIMEOUT_SECS") {
            self.sessions.exec_timeout_secs =
                parse("CELLA_SESSIONS_EXEC_TIMEOUT_SECS", v, "a number of seconds")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_EXEC_PER_SEC") {
            self.sessions.exec_per_sec = parse("CELLA_SESSIONS_EXEC_PER_SEC", v, "a number of requests")?;
        }
        if let Some(v) = get("CELLA_SESSIONS_REAPER_INTERVAL_MS") {
            self.sessions.reaper_interval_ms =
                parse("CELLA_SESSIONS_REAPER_INTERVAL_MS", v, "a number of milliseconds")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_without_a_file() {
        let dir = std::env::temp_dir().join(format!("cella-config-{}", std::process::id()));
        let c = Config::load(None, &dir.join("cella.toml")).unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.jobs.max_attempts, 3);
        assert_eq!(c.sessions.max_duration(), 28_800);
    }

    #[test]
    fn finished_jobs_are_kept_90_days_unless_configured() {
        assert_eq!(Config::default().jobs.retention_days, 90);
        let mut c: Config = toml::from_str("[jobs]\nretention_days = 30\n").unwrap();
        assert_eq!(c.jobs.retention_days, 30);
        c.apply_env(|n| (n == "CELLA_JOBS_RETENTION_DAYS").then(|| "0".to_owned())).unwrap();
        assert_eq!(c.jobs.retention_days, 0);
        let err = c.apply_env(|n| (n == "CELLA_JOBS_RETENTION_DAYS").then(|| "-1".to_owned())).unwrap_err();
        assert!(err.to_string().contains("CELLA_JOBS_RETENTION_DAYS=\"-1\""), "{err}");
    }

    #[test]
    fn session_max_duration_never_exceeds_eight_hours() {
        let c: Config = toml::from_str("[sessions]\nmax_duration_secs = 100000\n").unwrap();
        assert_eq!(c.sessions.max_duration(), 28_800);
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c: Config =
            toml::from_str("listen = \"127.0.0.1:9000\"\n[worker]\nconcurrency = 3\n").unwrap();
        c.apply_env(|n| (n == "CELLA_WORKER_CONCURRENCY").then(|| "5".to_owned())).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.worker.concurrency, 5);
        // Templates are on unless turned off, in the file or the environment.
        assert!(c.worker.templates);
        c.apply_env(|n| (n == "CELLA_TEMPLATES").then(|| "0".to_owned())).unwrap();
        assert!(!c.worker.templates);
        let c: Config = toml::from_str("[worker]\ntemplates = false\n").unwrap();
        assert!(!c.worker.templates);
    }

    #[test]
    fn the_log_format_and_filter_come_from_the_file_or_the_environment() {
        use crate::logging::LogFormat;
        let mut c: Config = toml::from_str("[log]\nformat = \"json\"\nfilter = \"warn\"\n").unwrap();
        assert_eq!((c.log.format, c.log.filter.as_str()), (LogFormat::Json, "warn"));
        c.apply_env(|n| match n {
            "CELLA_LOG_FORMAT" => Some("text".to_owned()),
            "CELLA_LOG" => Some("info,sqlx=warn".to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!((c.log.format, c.log.filter.as_str()), (LogFormat::Text, "info,sqlx=warn"));
        assert_eq!(Config::default().log.format, LogFormat::Text);
        let err = c.apply_env(|n| (n == "CELLA_LOG_FORMAT").then(|| "xml".to_owned())).unwrap_err();
        assert!(err.to_string().contains("CELLA_LOG_FORMAT=\"xml\" is not a log format"), "{err}");
        let err = c.apply_env(|n| (n == "CELLA_LOG").then(|| "infoo".to_owned())).unwrap_err();
        assert!(err.to_string().contains("CELLA_LOG=\"infoo\""), "{err}");
        assert!(toml::from_str::<Config>("[log]\nformat = \"xml\"\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<Config>("[jobs]\nmax_artifact = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_artifact"), "{err}");
        let mut c = Config::default();
        let err = c.apply_env(|n| (n == "CELLA_LISTEN").then(|| "nowhere".to_owned())).unwrap_err();
        assert!(err.to_string().contains("CELLA_LISTEN=\"nowhere\""), "{err}");
    }

    #[test]
    fn session_jail_uids_may_not_meet_the_workers() {
        Config::default().check().unwrap();
        // One uid per slot: 10 slots from 64990 end just below the sessions' 65000.
        let c: Config = toml::from_str("[worker]\njail_uid_base = 64990\nconcurrency = 10\n").unwrap();
        c.check().unwrap();
        let c: Config = toml::from_str("[worker]\njail_uid_base = 64990\nconcurrency = 20\n").unwrap();
        let err = c.check().unwrap_err();
        assert!(
            err.to_string().contains("the workers' uids 64990-65009 (worker.jail_uid_base, one per slot)"),
            "{err}"
        );
        let c: Config = toml::from_str("[sessions]\njail_uid_base = 0\n").unwrap();
        assert!(c.check().is_err());
    }
}
