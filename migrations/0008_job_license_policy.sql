-- A job's license policy (issue 16): the SPDX identifiers (or prefixes ending in `*`) whose
-- licenses its scan reports at `error` (denied) or at `warning` at least (flagged).
ALTER TABLE jobs
    ADD COLUMN license_deny text[] NOT NULL DEFAULT '{}',
    ADD COLUMN license_flag text[] NOT NULL DEFAULT '{}';
