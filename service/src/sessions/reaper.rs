//! The reaper: a task in `cella serve` that, every `sessions.reaper_interval_ms`, terminates
//! this host's sessions past their deadline (suspended ones too: their files are deleted),
//! suspends running or paused sessions idle longer than their `idle_suspend`, and fails
//! sessions whose VMM has disappeared, and finishes terminations that could not finish (a VMM
//! whose state could not be told). A session busy with a call is looked at next time. A VMM
//! whose process cannot be looked at (`/proc` unreadable: out of file descriptors) is never
//! taken for dead: the session is looked at again on the next pass.

use std::sync::Arc;

use tokio::sync::watch;

use super::driver::VmmDriver;
use super::store::{Due, SessionStore};
use super::SessionManager;
use crate::error::{QuietLog, ServiceError};

/// Runs until `shutdown` turns true.
pub async fn run<D: VmmDriver, S: SessionStore>(
    manager: Arc<SessionManager<D, S>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut quiet = QuietLog::new("cella serve: session reaper");
    let mut tick = tokio::time::interval(manager.config().reaper_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = once(&manager).await {
            quiet.log("pass", &e);
        }
    }
}

/// One pass over this host's sessions.
pub async fn once<D: VmmDriver, S: SessionStore>(manager: &SessionManager<D, S>) -> Result<(), ServiceError> {
    let due = manager.due().await?;
    for Due { id, expired, idle } in due {
        let Some(mut slot) = manager.try_lock(&id) else { continue };
        if let Err(e) = manager.reap_locked(&mut slot, &id, expired, idle).await {
            // Rate-limited: a host short of file descriptors must not also flood its log.
            static SESSION_ERRORS: std::sync::OnceLock<std::sync::Mutex<QuietLog>> =
                std::sync::OnceLock::new();
            let log = SESSION_ERRORS
                .get_or_init(|| std::sync::Mutex::new(QuietLog::new("cella serve: session reaper")));
            log.lock().unwrap_or_else(|p| p.into_inner()).log(&format!("session {id}"), &e);
        }
    }
    Ok(())
}
