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
