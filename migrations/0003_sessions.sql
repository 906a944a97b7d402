-- Sessions (cella-service, service/src/sessions/): a tenant's microVM that stays alive with its
-- artifact indexed in memory, answers many calls, and is paused, suspended to a snapshot,
-- resumed and terminated, for at most 8 hours from creation (running or suspended).
--
-- States: pending → starting → running ⇄ paused; running|paused → suspending → suspended
-- → resuming → running; any live state → terminating → terminated; failed. Every change is a
-- conditional UPDATE on (state, generation) in the transaction that appends its audit event.

CREATE TABLE sessions (
    id                text        PRIMARY KEY,
    tenant_id         text        NOT NULL REFERENCES tenants (id),
    state             text        NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'starting', 'running', 'paused', 'suspending',
                                       'suspended', 'resuming', 'terminating', 'terminated', 'failed')),
    -- Bumped by every transition: a transition names the generation it started from, so two
    -- processes (or a reaper and a request) cannot both apply one.
    generation        bigint      NOT NULL DEFAULT 0,
    created_by        text        NOT NULL,
    artifact_name     text,
    artifact_bytes    bigint      NOT NULL,
    artifact_sha256   bytea       NOT NULL CHECK (octet_length(artifact_sha256) = 32),
    mem_mib           integer     NOT NULL CHECK (mem_mib BETWEEN 8 AND 65536),
    -- What `read` may return: deny, redact (findings masked) or allow.
    read_policy       text        NOT NULL CHECK (read_policy IN ('deny', 'redact', 'allow')),
    -- Suspended after this long without exec or connect; 0: never.
    idle_suspend_secs integer     NOT NULL CHECK (idle_suspend_secs >= 0),
    -- Terminated at `deadline`; `connect` may move it later, never earlier, and never past
    -- `max_deadline` (created_at + the configured maximum duration, at most 8 hours).
    deadline          timestamptz NOT NULL,
    max_deadline      timestamptz NOT NULL,
    last_active_at    timestamptz NOT NULL DEFAULT now(),
    -- Where its VM runs (sessions are pinned to a host) and how to reach it there.
    host              text        NOT NULL,
    vmm_pid           integer,
    api_sock          text,
    vsock_sock        text,
    -- The snapshot of a suspended session.
    snapshot_dir      text,
    snapshot_bytes    bigint,
    failure_reason    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    terminated_at     timestamptz,
    CHECK (deadline <= max_deadline),
    CHECK (max_deadline <= created_at + interval '8 hours')
);
CREATE INDEX sessions_tenant_created ON sessions (tenant_id, created_at DESC, id DESC);
CREATE INDEX sessions_live_by_host ON sessions (host, state) WHERE state NOT IN ('terminated', 'failed');
