-- What a job asks of its scan besides the rule packs (issue 15, findings management): files to
-- leave out, a baseline of known findings to suppress, and what its SARIF log says about where
-- the artifact came from.

-- A tenant's baselines: the `cellaLocation/v1` fingerprints of findings it already has (the
-- keyed fingerprints of its own scans), 32 bytes each, sorted. Content-addressed per tenant
-- (`sha256` of `fingerprints`); a name is optional. Deleting one keeps the row (jobs that name
-- it keep their baseline) but it can no longer be named by new jobs.
CREATE TABLE baselines (
    id           text        PRIMARY KEY,
    tenant_id    text        NOT NULL REFERENCES tenants (id),
    name         text,
    sha256       bytea       NOT NULL CHECK (octet_length(sha256) = 32),
    fingerprints bytea       NOT NULL CHECK (octet_length(fingerprints) % 32 = 0),
    count        integer     NOT NULL CHECK (count >= 0),
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE UNIQUE INDEX baselines_tenant_content ON baselines (tenant_id, sha256) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX baselines_tenant_name ON baselines (tenant_id, name) WHERE deleted_at IS NULL AND name IS NOT NULL;

ALTER TABLE jobs
    -- Gitignore-like globs of files not to scan.
    ADD COLUMN excludes      text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN baseline_id   text        REFERENCES baselines (id),
    -- `versionControlProvenance` of the SARIF run: {"repository_uri", "revision_id", "branch"}.
    ADD COLUMN vcs           jsonb;
