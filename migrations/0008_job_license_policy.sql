-- A job's license policy (issue 16): the SPDX identifiers (or prefixes ending in `*`) whose
-- licenses its scan reports at `error` (denied) or at `warning` at least (flagged).
ALTER TABLE jobs
    ADD COLUMN license_deny text[] NOT NULL DEFAULT '{}',
    ADD COLUMN license_flag text[] NOT NULL DEFAULT '{}';

-- A tenant's license policy: what its jobs that give none run with (applied when a job is leased).
ALTER TABLE tenants
    ADD COLUMN license_deny text[] NOT NULL DEFAULT '{}',
    ADD COLUMN license_flag text[] NOT NULL DEFAULT '{}';
