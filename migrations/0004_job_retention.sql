-- Retention (service/src/janitor.rs): jobs that ended more than `jobs.retention_days` ago are
-- deleted with their SARIF logs and summaries, oldest first, and each purge is a `job.purged`
-- event on the tenant's audit chain (audit events are never deleted). This index finds them
-- without reading the live queue.
CREATE INDEX jobs_ended ON jobs (coalesce(finished_at, updated_at))
    WHERE state IN ('succeeded', 'failed', 'cancelled');
