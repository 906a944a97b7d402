//! `cella serve`: the data folder, PostgreSQL (private or `DATABASE_URL`), migrations, the admin
//! credential, the audit signing key and checkpointer, TLS, the session manager (re-adopting
//! this host's session VMs) and its reaper, the API and (by default) a worker; SIGTERM or Ctrl-C
//! shuts it all down in order (session VMs keep running for the next start).

use std::sync::Arc;

use cella_audit::{store, CheckpointPolicy, SigningKey};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::postgres::{PostgresError, PrivatePostgres};
use crate::sessions::SessionManager;
use crate::tenants;
use crate::tls::{self, TlsError};
use crate::worker::Worker;
use crate::{db, files, janitor};

/// Why `cella serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    File(#[from] files::FileError),
    #[error("the private PostgreSQL")]
    Postgres(#[from] PostgresError),
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply the migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("TLS")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {0}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    #[error("the audit signing key")]
    AuditKey(#[from] cella_audit::keys::KeyError),
    #[error("the audit log")]
    AuditStore(#[from] cella_audit::store::StoreError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the worker cannot launch VMs")]
    Launch(#[from] crate::worker::launch::LaunchError),
    #[error("[log] in the configuration")]
    Log(#[from] crate::logging::LogError),
}

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: DataDir,
    pub config_file: Option<std::path::PathBuf>,
    pub listen: Option<std::net::SocketAddr>,
    pub no_worker: bool,
    /// Overrides `[log] format`.
    pub log_format: Option<crate::logging::LogFormat>,
}

/// Connects to `DATABASE_URL` (or the configured URL), or starts the private PostgreSQL.
pub async fn database(
    config: &Config,
    data_dir: &DataDir,
) -> Result<(PgPool, Option<PrivatePostgres>), ServeError> {
    let (options, private): (PgConnectOptions, _) = match &config.database_url {
        Some(url) => (url.parse().map_err(ServeError::Connect)?, None),
        None => {
            tracing::info!(dir = %data_dir.root().join("postgres").display(), "starting the private PostgreSQL");
            let pg = PrivatePostgres::start(data_dir.root()).await?;
            (pg.connect_options(), Some(pg))
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(ServeError::Connect)?;
    db::MIGRATOR.run(&pool).await?;
    Ok((pool, private))
}

/// The admin credential in the data folder, created (and registered) on first start.
async fn ensure_admin_key(pool: &PgPool, data_dir: &DataDir) -> Result<(), ServeError> {
    let path = data_dir.admin_key_file();
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if tenants::authenticate_admin(pool, existing.trim()).await.is_ok() {
            return Ok(());
        }
        tracing::warn!(
            path = %path.display(),
            "the admin credential is not known to this database; creating a new one"
        );
    }
    let (id, secret) = tenants::create_admin_key(pool).await?;
    files::write_private(&path, format!("{secret}\n").as_bytes())?;
    tracing::info!(key = %id, path = %path.display(), "created the admin credential (mode 0600)");
    Ok(())
}

/// The checkpoint signing key: configured, or `<data dir>/audit-signing.key` made on first start.
fn ensure_signing_key(config: &Config, data_dir: &DataDir) -> Result<std::path::PathBuf, ServeError> {
    let path = config.audit.signing_key.clone().unwrap_or_else(|| data_dir.audit_key_file());
    if !path.exists() && config.audit.signing_key.is_none() {
        let id = format!("k-{}", &crate::ids::hex(&crate::ids::random_bytes::<4>()));
        let key = SigningKey::generate(&id)?;
        key.save(&path)?;
        tracing::info!(
            key = %id,
            path = %path.display(),
            public_key = %format!("{}.pub", path.display()),
            "created the audit signing key"
        );
    }
    SigningKey::load(&path)?;
    Ok(path)
}

/// Runs `cella serve` until SIGTERM/SIGINT.
pub async fn run(opts: ServeOptions) -> Result<(), ServeError> {
    let data_dir = opts.data_dir;
    data_dir.create()?;
    let mut config = Config::load(opts.config_file.as_deref(), &data_dir.config_file())?;
    if let Some(listen) = opts.listen {
        config.listen = listen;
    }
    if opts.no_worker {
        config.worker.enabled = false;
    }
    if let Some(format) = opts.log_format {
        config.log.format = format;
    }
    crate::logging::init(&config.log)?;
    if config.worker.enabled {
        crate::worker::launch::Launcher::new(&config.worker, config.quotas.vm_cpu_percent).check()?;
    }
    let tls_files = tls::ensure(&config.tls, data_dir.root())?;
    for line in tls_files.report() {
        tracing::info!("{line}");
    }
    let tls_config = tls::server_config(&tls_files)?;
    let (pool, private_pg) = database(&config, &data_dir).await?;
    let result = run_with(config, data_dir, pool.clone(), tls_config, tls_files).await;
    pool.close().await;
    if let Some(pg) = private_pg {
        if let Err(e) = pg.stop() {
            tracing::error!(error = %e, "cannot stop the private PostgreSQL");
        }
    }
    result
}

async fn run_with(
    config: Config,
    data_dir: DataDir,
    pool: PgPool,
    tls_config: Arc<rustls::ServerConfig>,
    tls_files: tls::TlsFiles,
) -> Result<(), ServeError> {
    // Listening for SIGTERM and SIGINT before anything starts: one that comes while `start`
    // runs is then answered by `stop` once it has, not by the default action, which would
    // leave what `start` began (a spare session VMM being made, say) behind.
    let signals = Signals::listen();
    let running = start(config.clone(), data_dir.clone(), pool, tls_config).await?;
    println!("cella serve: listening on {}", running.url);
    if let Some(ca) = &tls_files.ca {
        println!("cella serve: clients trust the CA in {}", ca.display());
    }
    println!("cella serve: admin credential in {}", data_dir.admin_key_file().display());
    if !config.worker.enabled {
        println!("cella serve: no worker in this process (run `cella worker` against the same database)");
    }
    signals.wait().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// A running API (and worker, and checkpointer).
#[derive(Debug)]
pub struct Running {
    /// `https://ADDR:PORT`.
    pub url: String,
    /// What the worker measured (VM launch, scrub, job run histograms).
    pub metrics: Arc<Metrics>,
    data_dir: DataDir,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    worker: Option<tokio::task::JoinHandle<Result<(), ServiceError>>>,
    checkpointer: tokio::task::JoinHandle<Result<(), cella_audit::store::StoreError>>,
    reaper: tokio::task::JoinHandle<()>,
    janitor: tokio::task::JoinHandle<()>,
    session_spares: Option<Arc<crate::spares::Spares>>,
    /// Its spare session VMM is ended when this stops (the sessions' own VMMs go on).
    sessions: Arc<SessionManager>,
}

/// Starts the API on `config.listen`, the checkpointer and (if enabled) a worker, on a migrated
/// database; makes the admin credential and signing key on first start.
pub async fn start(
    config: Config,
    data_dir: DataDir,
    pool: PgPool,
    tls_config: Arc<rustls::ServerConfig>,
) -> Result<Running, ServeError> {
    ensure_admin_key(&pool, &data_dir).await?;
    // What an earlier run that was killed left: half-written uploads, SARIF logs of jobs that
    // no longer run, artifacts of jobs that ended.
    let swept = janitor::sweep(&pool, &data_dir, janitor::Moment::ServeStart).await?;
    if swept != janitor::Swept::default() {
        tracing::info!(
            scratch_files = swept.work,
            artifacts = swept.artifacts,
            "removed uploads, artifacts and scratch files left by an earlier run"
        );
    }
    let signer_path = ensure_signing_key(&config, &data_dir)?;
    let signer = SigningKey::load(&signer_path)?;
    store::register_key(&mut *pool.acquire().await.map_err(ServeError::Connect)?, &signer.public()).await?;
    let policy = CheckpointPolicy {
        every_events: config
            .audit
            .checkpoint_every_events
            .unwrap_or(CheckpointPolicy::default().every_events)
            .max(1),
        every_secs: config.audit.checkpoint_every_secs.unwrap_or(CheckpointPolicy::default().every_secs),
    };
    let listener = crate::server::listen(config.listen, config.limits.listen_backlog)
        .map_err(|e| ServeError::Listen(config.listen, e))?;
    let addr = listener.local_addr().map_err(|e| ServeError::Listen(config.listen, e))?;
    let url = format!("https://{addr}");
    files::write_public(&data_dir.url_file(), format!("{url}\n").as_bytes())?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let vmm = config.worker.vmm.clone().unwrap_or_else(crate::worker::launch::default_vmm);
    let mut vmms = crate::sessions::vmm::Vmms::new(
        vmm.clone(),
        config.worker.scanner_image.clone(),
        config.worker.is_jailed(),
    );
    // Session VMMs take spare jails too (one kept ready); removed when serve stops.
    let session_spares = config.worker.is_jailed().then(|| crate::spares::Spares::new(&vmm, "session"));
    if let Some(spares) = &session_spares {
        spares.sweep_orphans().await;
        spares.refill(0);
        vmms = vmms.with_spares(spares.clone());
    }
    let sessions = Arc::new(
        SessionManager::new(
            pool.clone(),
            config.sessions.clone(),
            data_dir.clone(),
            crate::sessions::manager::host_name(),
            vmms,
        )
        .with_default_cpu_percent(config.quotas.vm_cpu_percent),
    );
    sessions.recover().await?;
    sessions.keep_spare();
    let spare_owner = sessions.clone();
    let reaper = tokio::spawn(crate::sessions::reaper::run(sessions.clone(), shutdown_rx.clone()));
    let state = AppState {
        pool: pool.clone(),
        config: Arc::new(config.clone()),
        data_dir: data_dir.clone(),
        metrics: metrics.clone(),
        signer: Some(Arc::new(signer)),
        jobs_done: api::wait::JobsDone::listen(pool.clone()),
        sessions,
        limits: Default::default(),
    };
    let checkpointer = {
        let mut rx = shutdown_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let key = SigningKey::load(&signer_path)?;
        tokio::spawn(store::run_checkpointer(
            pool.clone(),
            key,
            policy,
            std::time::Duration::from_secs(1),
            stop,
        ))
    };
    let janitor = tokio::spawn(janitor::run(
        pool.clone(),
        data_dir.clone(),
        config.jobs.retention_days,
        shutdown_rx.clone(),
    ));
    let worker = config.worker.enabled.then(|| {
        let worker = Worker::new(pool.clone(), &config, data_dir.clone(), metrics.clone());
        tokio::spawn(worker.run(shutdown_rx.clone()))
    });
    let open_files = crate::signal::raise_open_file_limit().unwrap_or(1024);
    let limits = crate::server::ConnectionLimits::for_open_files(open_files, &config.limits);
    tracing::info!(
        max = limits.max,
        answered_503 = limits.answer_reserve,
        closing = limits.lingering,
        open_file_limit = open_files,
        "connection limits"
    );
    let server =
        tokio::spawn(crate::server::serve(listener, tls_config, api::app(state), limits, shutdown_rx));
    Ok(Running {
        url,
        metrics,
        data_dir,
        shutdown,
        server,
        worker,
        checkpointer,
        reaper,
        janitor,
        session_spares,
        sessions: spare_owner,
    })
}

impl Running {
    /// Stops accepting, drains the worker, cuts a final checkpoint. Session VMMs keep running:
    /// the next start re-adopts them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        let _ = self.reaper.await;
        let _ = self.janitor.await;
        if let Some(spares) = &self.session_spares {
            spares.close().await;
        }
        let sessions = self.sessions.clone();
        let _ = tokio::task::spawn_blocking(move || sessions.close_spares()).await;
        if let Some(worker) = self.worker {
            match worker.await {
                Ok(Err(e)) => tracing::error!(error = %e, "the worker failed"),
                Err(e) => tracing::error!(error = %e, "the worker task failed"),
                Ok(Ok(())) => {}
            }
        }
        if let Ok(Err(e)) = self.checkpointer.await {
            tracing::error!(error = %e, "cannot cut the final checkpoint");
        }
        let _ = std::fs::remove_file(self.data_dir.url_file());
    }
}

/// SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    Signals::listen().wait().await
}

/// SIGTERM and SIGINT, listened for from [`Signals::listen`] on (one that comes before
/// [`Signals::wait`] is kept for it).
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            _ => Signals(None),
        }
    }

    async fn wait(self) {
        let Some((mut term, mut int)) = self.0 else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
