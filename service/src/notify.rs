//! LISTEN with reconnection: one loop for every place that waits on PostgreSQL notifications
//! (the worker's lease wake-ups and cancels, the API's job-finished waits).

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;

use crate::error::QuietLog;

/// How long to wait before reconnecting after the connection is lost.
const RECONNECT: Duration = Duration::from_secs(1);

/// LISTENs on `channels` until the task is dropped or the pool is closed, calling `on_message` for each notification
/// and `on_gap` whenever notifications may have been missed (the connection dropped), so the
/// caller can catch up by polling. `who` names the caller in its (rate-limited) log lines.
pub async fn listen_forever(
    pool: PgPool,
    who: &'static str,
    channels: &[&str],
    mut on_message: impl FnMut(&PgNotification),
    mut on_gap: impl FnMut(),
) {
    let mut quiet = QuietLog::new(who);
    let mut log = |what: &str, e: &sqlx::Error| {
        // A closed pool is the process shutting down, not a problem to report.
        if !matches!(e, sqlx::Error::PoolClosed) {
            quiet.log(what, e)
        }
    };
    loop {
        if pool.is_closed() {
            return;
        }
        match PgListener::connect_with(&pool).await {
            Err(e) => log("LISTEN connection", &e),
            Ok(mut listener) => match listener.listen_all(channels.iter().copied()).await {
                Err(e) => log("LISTEN", &e),
                Ok(()) => loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => on_message(&n),
                        Ok(None) => break,
                        Err(e) => {
                            log("LISTEN", &e);
                            break;
                        }
                    }
                },
            },
        }
        on_gap();
        tokio::time::sleep(RECONNECT).await;
    }
}
