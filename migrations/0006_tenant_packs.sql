-- Tenant rule packs (issue 15, findings management): a tenant's own rules, uploaded as Cella's
-- pack TOML or as a gitleaks configuration (converted on upload), validated, versioned and
-- content-hashed (service/src/packs.rs). Jobs and sessions select them by `name` (the latest
-- live version when submitted) or `name@version`; a job records the exact versions it resolved
-- to (`jobs.policy`), so a retry runs the same rules.

CREATE TABLE tenant_packs (
    tenant_id      text        NOT NULL REFERENCES tenants (id),
    name           text        NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    -- 1, 2, 3, … per tenant and name, assigned by the server; never reused (a deleted version
    -- keeps its row).
    version        integer     NOT NULL CHECK (version >= 1),
    format         text        NOT NULL CHECK (format IN ('cella', 'gitleaks')),
    -- The file as uploaded, and its SHA-256 (what a job's `job.succeeded` evidence names).
    source         text        NOT NULL,
    source_sha256  bytea       NOT NULL CHECK (octet_length(source_sha256) = 32),
    -- The pack as Cella's TOML: the source itself, or what a gitleaks configuration became.
    cella_toml     text        NOT NULL,
    rules          integer     NOT NULL CHECK (rules >= 1),
    rule_ids       text[]      NOT NULL,
    -- What its regexes take compiled, in bytes: live versions count against the tenant's
    -- `pack_compiled_bytes` quota.
    compiled_bytes bigint      NOT NULL CHECK (compiled_bytes >= 0),
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- Deleted versions keep their rows (the audit trail and the jobs that ran them name them)
    -- but can no longer be selected, and a queued job that names one fails.
    deleted_at     timestamptz,
    deleted_by     text,
    PRIMARY KEY (tenant_id, name, version)
);
CREATE INDEX tenant_packs_live ON tenant_packs (tenant_id, name, version DESC) WHERE deleted_at IS NULL;

ALTER TABLE tenants
    -- The policy of the tenant's jobs and session scans that name none: built-in pack names and
    -- its own packs (`name`: the latest live version when a job is submitted; `name@version`),
    -- comma-separated. NULL: the server's `jobs.default_policy`.
    ADD COLUMN default_policy            text,
    -- Quotas (NULL: the configured default, docs/configuration.md [quotas]): packs with a live
    -- version, and the compiled size of all live versions together.
    ADD COLUMN quota_packs               integer CHECK (quota_packs >= 0),
    ADD COLUMN quota_pack_compiled_bytes bigint  CHECK (quota_pack_compiled_bytes >= 0);
