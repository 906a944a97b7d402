//! `cella-bench sessions`: what a tenant waits for to get back to a session, through the real
//! service (HTTPS, PostgreSQL, jailed session VMMs) in this process: resumed from pause (the
//! VM is still in memory) against restored from disk (`suspend` wrote its snapshot and ended
//! its VMM; `connect` starts a VMM that loads it), each timed from the call that brings it back
//! to the first answer of an `exec` (`stats`), interleaved round by round. The difference is
//! what a suspended session costs its tenant over a paused one. Needs DATABASE_URL (it works in
//! a scratch database).

use std::time::Instant;

use cella_service::cli::CliError;
use cella_service::client::{ApiClient, ClientError};
use cella_service::db::ScratchDatabase;
use clap::Args;
use reqwest::Method;
use serde_json::json;

use crate::audit::load_average;
use crate::service::Stack;
use crate::vm::figures;

#[derive(Debug, Args)]
pub struct SessionsBenchArgs {
    /// Rounds of each kind (interleaved)
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Run the VMMs without the jailer (default: jailed when root, as `cella serve` does)
    #[arg(long)]
    unjailed: bool,
}

pub fn run(args: SessionsBenchArgs) -> Result<(), CliError> {
    cella_service::cli::runtime()?.block_on(bench(args))
}

/// ms from `POST {path}` (the call that brings the session back) to its first `exec` answer.
async fn back_to_first_answer(client: &ApiClient, id: &str, call: &str) -> Result<f64, ClientError> {
    let started = Instant::now();
    let view = client.json(Method::POST, &format!("/v1/sessions/{id}/{call}")).await?;
    if view["state"] != "running" {
        return Err(ClientError::Other(format!("{call}: the session is {}", view["state"])));
    }
    let answer = client.post_json(&format!("/v1/sessions/{id}/exec"), &json!({"op": "stats"})).await?;
    if answer["result"]["index_id"].is_null() {
        return Err(ClientError::Other(format!("{call}: exec answered {answer}")));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

async fn bench(args: SessionsBenchArgs) -> Result<(), CliError> {
    let artifact = crate::service::small_artifact()?;
    let db = ScratchDatabase::create("cella_sessions_bench").await.map_err(CliError::Usage)?;
    let result = async {
        let unjailed = args.unjailed;
        let stack = Stack::start(&db.url, "bench-sessions", 1, |config| {
            // The benchmark calls one session back to back: its per-session call limit (10 a
            // second by default) would answer 429 past 40 calls.
            config.sessions.exec_per_sec = 10_000;
            if unjailed {
                config.worker.jailed = Some(false);
            }
        })
        .await?;
        let client = &stack.client;
        let created = client
            .send(client.request(Method::POST, "/v1/sessions?idle_suspend=0").body(artifact))
            .await?
            .json::<serde_json::Value>()
            .await
            .map_err(|e| ClientError::Http("bench".into(), e))?;
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        let (mut resumed, mut restored) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) + 1 {
            client.json(Method::POST, &format!("/v1/sessions/{id}/pause")).await?;
            let resume = back_to_first_answer(client, &id, "resume").await?;
            client.json(Method::POST, &format!("/v1/sessions/{id}/suspend")).await?;
            let restore = back_to_first_answer(client, &id, "connect").await?;
            // The first round warms the snapshot's files and the VMM's binary: not counted.
            if round > 0 {
                resumed.push(resume);
                restored.push(restore);
            }
        }
        client.send(client.request(Method::DELETE, &format!("/v1/sessions/{id}"))).await?;
        let jailed = !unjailed && cella_service::config::Config::default().worker.is_jailed();
        stack.running.stop().await;
        stack.pool.close().await;
        let _ = std::fs::remove_dir_all(&stack.dir);
        let (resume, restore) = (figures(resumed), figures(restored));
        println!(
            "cella-bench sessions: {} rounds, session of examples/sample-app, VMMs {}, load avg {}",
            args.rounds.max(1),
            if jailed { "jailed" } else { "unjailed" },
            load_average()
        );
        println!(
            "  {:<58} {:>8} {:>8} {:>8}",
            "call -> first exec answer, through the API", "p50 ms", "p99 ms", "min ms"
        );
        println!(
            "  {:<58} {:>8.1} {:>8.1} {:>8.1}",
            "resume from pause (VM in memory)", resume.p50_ms, resume.p99_ms, resume.min_ms
        );
        println!(
            "  {:<58} {:>8.1} {:>8.1} {:>8.1}",
            "connect after suspend (new VMM, snapshot from disk)",
            restore.p50_ms,
            restore.p99_ms,
            restore.min_ms
        );
        let gap = restore.p50_ms - resume.p50_ms;
        println!(
            "  restore - resume, p50: {gap:.1} ms (goal <= 10 ms: {})",
            if gap <= 10.0 { "met" } else { "NOT met" }
        );
        Ok::<(), CliError>(())
    }
    .await;
    db.drop_now().await;
    result
}
