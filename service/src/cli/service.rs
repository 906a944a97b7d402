//! `cella serve` and `cella worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use sqlx::postgres::PgPoolOptions;

use super::{runtime, CliError};
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::metrics::Metrics;
use crate::postgres::PrivatePostgres;
use crate::serve::{self, ServeOptions};
use crate::worker::Worker;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data folder: configuration, TLS, credentials, private PostgreSQL, artifacts
    /// [env: CELLA_DATA_DIR] [default: /var/lib/cella as root, else ~/.local/share/cella]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Where the HTTPS API listens [env: CELLA_LISTEN] [default: 127.0.0.1:8443]
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// The configuration file [default: <data dir>/cella.toml, if it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Do not run a worker in this process
    #[arg(long)]
    no_worker: bool,
    /// The server log's format on stderr [env: CELLA_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<crate::logging::LogFormat>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The data folder shared with `cella serve` (artifacts, and its private PostgreSQL)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The configuration file [default: <data dir>/cella.toml, if it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Jobs run at once [env: CELLA_WORKER_CONCURRENCY] [default: 2]
    #[arg(long)]
    concurrency: Option<u32>,
    /// The log's format on stderr [env: CELLA_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<crate::logging::LogFormat>,
}

pub fn serve(args: ServeArgs) -> Result<(), CliError> {
    let opts = ServeOptions {
        data_dir: DataDir::resolve(args.data_dir),
        config_file: args.config,
        listen: args.listen,
        no_worker: args.no_worker,
        log_format: args.log_format,
    };
    runtime()?.block_on(serve::run(opts))?;
    Ok(())
}

pub fn worker(args: WorkerArgs) -> Result<(), CliError> {
    let data_dir = DataDir::resolve(args.data_dir);
    let mut config = Config::load(args.config.as_deref(), &data_dir.config_file())
        .map_err(crate::serve::ServeError::from)?;
    if let Some(n) = args.concurrency {
        config.worker.concurrency = n;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    crate::logging::init(&config.log).map_err(|e| CliError::Usage(crate::error::error_chain(&e)))?;
    crate::worker::launch::Launcher::new(&config.worker, config.quotas.vm_cpu_percent)
        .check()
        .map_err(crate::serve::ServeError::from)?;
    runtime()?.block_on(async move {
        let options = match &config.database_url {
            Some(url) => url.parse()?,
            None => PrivatePostgres::attach(data_dir.root()).ok_or_else(|| {
                CliError::Usage(format!(
                    "no database: set DATABASE_URL, or start `cella serve --data-dir {}` first",
                    data_dir.root().display()
                ))
            })?,
        };
        let pool = PgPoolOptions::new().max_connections(8).connect_with(options).await?;
        crate::db::MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| CliError::Usage(format!("the database's migrations: {e}")))?;
        let worker = Worker::new(pool.clone(), &config, data_dir, Arc::new(Metrics::default()));
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            serve::wait_for_signal().await;
            let _ = tx.send(true);
        });
        worker.run(rx).await?;
        pool.close().await;
        Ok(())
    })
}
