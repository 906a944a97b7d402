-- Per-tenant secrets and limits (issue 14, hardening the service edge).
--
-- `fingerprint_key`: the key of the HMAC-SHA256 fingerprints in this tenant's SARIF logs and
-- events. Findings of equal secrets still share a fingerprint across the tenant's jobs, but a
-- fingerprint cannot be brute-forced offline without the key, which never leaves the service
-- (it is handed to each of the tenant's scan VMs, inside the VM's job message).
ALTER TABLE tenants
    ADD COLUMN fingerprint_key bytea NOT NULL
        DEFAULT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
        CHECK (octet_length(fingerprint_key) = 32);

-- Quotas. NULL: the service's configured default (docs/configuration.md, [quotas]).
ALTER TABLE tenants
    -- Guest memory of all the tenant's live sessions together.
    ADD COLUMN quota_session_mem_mib integer CHECK (quota_session_mem_mib >= 0),
    -- Sessions not yet terminated or failed.
    ADD COLUMN quota_live_sessions   integer CHECK (quota_live_sessions >= 0),
    -- Bytes on disk: stored artifacts of jobs not yet purged, and live sessions' artifacts and
    -- snapshots.
    ADD COLUMN quota_disk_bytes      bigint  CHECK (quota_disk_bytes >= 0),
    -- Uploads (job artifacts, session artifacts, session file adds) in flight at once.
    ADD COLUMN quota_uploads         integer CHECK (quota_uploads >= 0),
    -- Requests in flight at once (each connection carries one at a time).
    ADD COLUMN quota_requests        integer CHECK (quota_requests >= 0),
    -- CPU each of the tenant's VMs may use, in percent of one CPU (cgroup cpu.max / cfs quota).
    ADD COLUMN quota_vm_cpu_percent  integer CHECK (quota_vm_cpu_percent BETWEEN 1 AND 10000);
