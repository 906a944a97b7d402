//! Prometheus metrics: in-process histograms and counters the worker updates, plus gauges read
//! from the database at scrape time (jobs and sessions by state, queue depth and age, worker
//! utilisation).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{PgPool, Row};

use crate::error::ServiceError;

/// A fixed-bucket histogram (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Ordering::Relaxed));
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

const LATENCY_BUCKETS: &[f64] = &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What this process measured.
#[derive(Debug)]
pub struct Metrics {
    /// From `cella-vmm` start to the guest's first exit.
    pub vm_launch: Histogram,
    /// Zeroing, verifying and releasing a VM's memory.
    pub scrub: Histogram,
    /// Whole job runs in a worker, lease to result.
    pub job_run: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            vm_launch: Histogram::new(LATENCY_BUCKETS),
            scrub: Histogram::new(LATENCY_BUCKETS),
            job_run: Histogram::new(&[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
        }
    }
}

impl Metrics {
    /// The exposition text (Prometheus 0.0.4).
    pub async fn render(&self, pool: &PgPool) -> Result<String, ServiceError> {
        let mut out = String::new();
        let rows =
            sqlx::query("SELECT state, count(*) AS n FROM jobs GROUP BY state").fetch_all(pool).await?;
        out.push_str("# HELP cella_jobs Jobs by state.\n# TYPE cella_jobs gauge\n");
        for state in crate::jobs::JobState::ALL {
            let n = rows
                .iter()
                .find(|r| r.try_get::<crate::jobs::JobState, _>("state").ok() == Some(state))
                .and_then(|r| r.try_get::<i64, _>("n").ok())
                .unwrap_or(0);
            let _ = writeln!(out, "cella_jobs{{state=\"{state}\"}} {n}");
        }
        let sessions = crate::sessions::store::count_by_state(pool).await?;
        out.push_str("# HELP cella_sessions Sessions by state.\n# TYPE cella_sessions gauge\n");
        for state in crate::sessions::State::ALL {
            let n = sessions.iter().find(|(s, _)| s == state.as_str()).map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "cella_sessions{{state=\"{state}\"}} {n}");
        }
        let (depth, age) = crate::queue::depth(pool).await?;
        let _ = writeln!(out, "# HELP cella_queue_depth Jobs waiting to be leased.\n# TYPE cella_queue_depth gauge\ncella_queue_depth {depth}");
        let _ = writeln!(
            out,
            "# HELP cella_queue_oldest_age_seconds Age of the oldest queued job.\n# TYPE cella_queue_oldest_age_seconds gauge\ncella_queue_oldest_age_seconds {age}"
        );
        let workers = crate::worker::registry::list(pool, false).await?;
        out.push_str("# HELP cella_worker_utilisation Running jobs over concurrency, per live worker.\n# TYPE cella_worker_utilisation gauge\n");
        for w in workers.iter().filter(|w| w.alive) {
            let u = f64::from(w.running) / f64::from(w.concurrency.max(1));
            let _ = writeln!(out, "cella_worker_utilisation{{worker=\"{}\"}} {u}", w.id);
        }
        self.vm_launch.render(
            &mut out,
            "cella_vm_launch_seconds",
            "From cella-vmm start to the guest's first VM exit.",
        );
        self.scrub.render(
            &mut out,
            "cella_vm_scrub_seconds",
            "Zeroing, verifying and releasing a VM's memory.",
        );
        self.job_run.render(
            &mut out,
            "cella_job_run_seconds",
            "A job's run in a worker, from lease to recorded result.",
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
