//! Waiting for a job to end without polling: `GET /v1/jobs/{id}?wait=SECS`. One LISTEN
//! connection per API process fans `cella_job_done` notifications out to every waiting request.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::broadcast;

use crate::jobs::CHANNEL_DONE;

/// The longest a request may wait.
pub const MAX_WAIT_SECS: u64 = 60;
/// Waiters re-read the job at least this often (covers notifications lost while the LISTEN
/// connection was down).
const RECHECK: Duration = Duration::from_secs(1);

/// Job-finished notifications for this process's waiting requests.
#[derive(Debug, Clone)]
pub struct JobsDone {
    tx: broadcast::Sender<String>,
}

impl JobsDone {
    /// Starts the LISTEN task (it lives as long as the runtime).
    pub fn listen(pool: PgPool) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let sender = tx.clone();
        tokio::spawn(async move {
            crate::notify::listen_forever(
                pool,
                "cella serve",
                &[CHANNEL_DONE],
                |n| {
                    let _ = sender.send(n.payload().to_owned());
                },
                || {},
            )
            .await;
        });
        Self { tx }
    }

    /// Subscribes before the caller reads the job's state, so no notification falls between.
    pub fn subscribe(&self) -> Waiter {
        Waiter { rx: self.tx.subscribe() }
    }
}

/// One request's subscription.
#[derive(Debug)]
pub struct Waiter {
    rx: broadcast::Receiver<String>,
}

impl Waiter {
    /// Returns when `job_id` may have ended (its notification, a lost notification, or the
    /// recheck interval), or at `deadline`.
    pub async fn changed(&mut self, job_id: &str, deadline: tokio::time::Instant) {
        let wake = deadline.min(tokio::time::Instant::now() + RECHECK);
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Ok(id) if id == job_id => return,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep_until(wake).await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(wake) => return,
            }
        }
    }
}
