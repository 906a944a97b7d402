//! The PostgreSQL connection and the migrations (`../migrations`, embedded at build time).

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Every migration in `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// `DATABASE_URL`, or a message saying how to set it.
pub fn database_url() -> Result<String, String> {
    std::env::var("DATABASE_URL").map_err(|_| {
        "DATABASE_URL is not set; point it at Cella's PostgreSQL, e.g. postgres://cella:cella@localhost:5432/cella"
            .to_owned()
    })
}

/// Connects a pool of up to `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new().max_connections(max).connect(url).await
}

/// A throw-away database next to `DATABASE_URL`'s, migrated (for benchmarks).
#[derive(Debug)]
pub struct ScratchDatabase {
    admin: PgPool,
    name: String,
    /// Its URL.
    pub url: String,
    /// The server part of `DATABASE_URL`, for messages.
    pub server: String,
}

impl ScratchDatabase {
    /// Creates `<prefix>_<pid>` and applies the migrations.
    pub async fn create(prefix: &str) -> Result<Self, String> {
        let url = database_url()?;
        let name = format!("{prefix}_{}", std::process::id());
        let (base, _) = url.split_once('?').unwrap_or((&url, ""));
        let (server, _) = base.rsplit_once('/').ok_or("DATABASE_URL has no database name")?;
        let admin = connect(&url, 1).await.map_err(|e| format!("cannot reach {server}: {e}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        let db = Self { admin, url: format!("{server}/{name}"), server: server.to_owned(), name };
        let pool = connect(&db.url, 1).await.map_err(|e| e.to_string())?;
        MIGRATOR.run(&pool).await.map_err(|e| format!("migrations: {e}"))?;
        pool.close().await;
        Ok(db)
    }

    /// Drops it (closing whatever is still connected).
    pub async fn drop_now(self) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&self.admin)
            .await;
    }
}
