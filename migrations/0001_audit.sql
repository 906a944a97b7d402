-- The audit log (cella-audit): one hash chain per tenant plus the operator chain, the signing
-- keys' public history and the signed checkpoints. See audit/src/lib.rs.

-- One row per chain: the last appended seq and hash. Appends lock this row, so appends to one
-- chain serialize until their transaction ends: no forks, no gaps.
CREATE TABLE audit_heads (
    chain      text        PRIMARY KEY,
    seq        bigint      NOT NULL CHECK (seq >= 0),
    hash       bytea       NOT NULL CHECK (octet_length(hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The events. `body` holds the exact canonical bytes that were hashed (`hash = SHA-256(body)`);
-- the other columns repeat a few of its fields for lookups only.
CREATE TABLE audit_events (
    chain      text        NOT NULL,
    seq        bigint      NOT NULL CHECK (seq >= 1),
    tenant     text,
    event_time timestamptz NOT NULL,
    action     text        NOT NULL,
    body       text        NOT NULL,
    hash       bytea       NOT NULL CHECK (octet_length(hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain, seq)
);
CREATE INDEX audit_events_tenant_time ON audit_events (tenant, event_time);

-- The log is append-only: refuse UPDATE and DELETE (tampering by someone who can disable this
-- trigger is still caught by `cella audit verify`).
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

-- Every checkpoint signing key ever used; the private halves live in key files, never here.
CREATE TABLE audit_keys (
    key_id       text        PRIMARY KEY,
    algorithm    text        NOT NULL DEFAULT 'ed25519',
    public_key   bytea       NOT NULL CHECK (octet_length(public_key) = 32),
    activated_at timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Signed tree heads. `peaks` (the Merkle compact range) and `last_hash` let the next checkpoint
-- extend this one without rereading the whole chain.
CREATE TABLE audit_checkpoints (
    chain      text        NOT NULL,
    idx        bigint      NOT NULL CHECK (idx >= 1),
    tree_size  bigint      NOT NULL CHECK (tree_size >= 1),
    root_hash  bytea       NOT NULL CHECK (octet_length(root_hash) = 32),
    last_hash  bytea       NOT NULL CHECK (octet_length(last_hash) = 32),
    peaks      bytea       NOT NULL,
    signed_at  text        NOT NULL,
    key_id     text        NOT NULL REFERENCES audit_keys (key_id),
    signature  bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain, idx),
    UNIQUE (chain, tree_size)
);
