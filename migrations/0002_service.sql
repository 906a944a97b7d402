-- The service (cella-service): tenants and their API keys, operator credentials, the job queue
-- and the workers that lease from it. See service/src/lib.rs.

CREATE TABLE tenants (
    id               text        PRIMARY KEY,
    name             text        NOT NULL UNIQUE,
    -- A suspended tenant's keys answer 403 and its queued jobs are not leased.
    suspended        boolean     NOT NULL DEFAULT false,
    -- The most jobs of this tenant that run at once, over all workers.
    max_concurrent   integer     NOT NULL DEFAULT 4 CHECK (max_concurrent >= 1),
    -- When a worker last leased one of its jobs: dequeue serves the longest-waiting tenant
    -- first (round robin), so one tenant's backlog cannot starve the others.
    last_dequeued_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Tenants' API keys: only the SHA-256 of the key is kept; the key is shown once.
CREATE TABLE api_keys (
    id         text        PRIMARY KEY,
    tenant_id  text        NOT NULL REFERENCES tenants (id),
    key_hash   bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Operators' credentials for the admin API, kept the same way.
CREATE TABLE admin_keys (
    id         text        PRIMARY KEY,
    key_hash   bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per worker process; `heartbeat_at` says it is alive.
CREATE TABLE workers (
    id           text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    concurrency  integer     NOT NULL,
    draining     boolean     NOT NULL DEFAULT false,
    running      integer     NOT NULL DEFAULT 0,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id               text        PRIMARY KEY,
    tenant_id        text        NOT NULL REFERENCES tenants (id),
    state            text        NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Rule packs, comma-separated, as validated at submission.
    policy           text        NOT NULL,
    artifact_name    text,
    artifact_bytes   bigint      NOT NULL,
    artifact_sha256  bytea       NOT NULL CHECK (octet_length(artifact_sha256) = 32),
    submitted_by     text        NOT NULL,
    -- Idempotency-Key and the hash of what was submitted with it.
    idempotency_key  text,
    request_hash     bytea,
    -- Leasing: `attempt` counts leases; a result is only written by the worker holding the
    -- current (attempt, lease_owner) while the job is running (fencing).
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    lease_owner      text,
    lease_expires_at timestamptz,
    run_after        timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean     NOT NULL DEFAULT false,
    -- Outcome.
    error            text,
    findings         integer,
    summary          jsonb,
    sarif            bytea,
    vm               jsonb,
    vm_pid           integer,
    mem_mib          integer,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX jobs_tenant_created ON jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX jobs_tenant_state ON jobs (tenant_id, state);
CREATE INDEX jobs_queued ON jobs (run_after) WHERE state = 'queued';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE state = 'running';
