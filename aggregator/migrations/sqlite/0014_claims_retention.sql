-- Issue 13: report claims (`reports`) under retention, so the ledger's
-- size is bounded (ledger/retention.rs).
--
-- The raw tables' foreign keys to `reports` go: no index leads from
-- `report_id` to the raw rows, so removing a claim would look through
-- whole raw tables for rows still referring to it. Raw rows are removed
-- before (or with) their claim, by the same retention. SQLite cannot drop
-- a constraint: each table is rebuilt without it (the steps of SQLite's
-- "Making Other Kinds Of Table Schema Changes"), its rows and indexes as
-- they were. Audit records keep theirs: a claim an audit record refers
-- to is kept, and the index below finds them.
CREATE TABLE gpu_usage_rebuilt (
    report_id BIGINT NOT NULL,
    node TEXT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    gpu TEXT NOT NULL,
    uuid TEXT NOT NULL,
    model TEXT NOT NULL,
    mig_profile TEXT,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    sm_us BIGINT,
    memory_byte_seconds BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    cluster TEXT NOT NULL DEFAULT 'default',
    workload TEXT NOT NULL DEFAULT '',
    idle_us BIGINT NOT NULL DEFAULT 0
);
INSERT INTO gpu_usage_rebuilt (rowid, report_id, node, interval_end_ms, tenant, gpu, uuid, model,
    mig_profile, slice_fraction, allocated_us, sm_us, memory_byte_seconds, energy_mj, cluster,
    workload, idle_us)
SELECT rowid, report_id, node, interval_end_ms, tenant, gpu, uuid, model, mig_profile,
    slice_fraction, allocated_us, sm_us, memory_byte_seconds, energy_mj, cluster, workload, idle_us
FROM gpu_usage;
DROP TABLE gpu_usage;
ALTER TABLE gpu_usage_rebuilt RENAME TO gpu_usage;
CREATE INDEX gpu_usage_end ON gpu_usage (interval_end_ms, tenant);
CREATE INDEX gpu_usage_node ON gpu_usage (node, interval_end_ms);

CREATE TABLE io_usage_rebuilt (
    report_id BIGINT NOT NULL,
    node TEXT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    network_ingress_packets BIGINT NOT NULL,
    network_egress_packets BIGINT NOT NULL,
    network_dropped_packets BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    cluster TEXT NOT NULL DEFAULT 'default'
);
INSERT INTO io_usage_rebuilt (rowid, report_id, node, interval_end_ms, tenant,
    network_ingress_bytes, network_egress_bytes, network_ingress_packets, network_egress_packets,
    network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes, cluster)
SELECT rowid, report_id, node, interval_end_ms, tenant, network_ingress_bytes,
    network_egress_bytes, network_ingress_packets, network_egress_packets,
    network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes, cluster
FROM io_usage;
DROP TABLE io_usage;
ALTER TABLE io_usage_rebuilt RENAME TO io_usage;
CREATE INDEX io_usage_end ON io_usage (interval_end_ms, tenant);

CREATE INDEX audit_report ON audit (report_id);

-- What retention removed of each (node, boot)'s claims. Ingest refuses a
-- report whose seq is at or below `last_seq` and whose claim is gone: it
-- was stored once already, or comes too late to be told apart from one
-- that was. `GET /api/v1/reports` adds these to the claims still kept.
CREATE TABLE claims_removed (
    node TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    reports BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    last_interval_end_ms BIGINT NOT NULL,
    PRIMARY KEY (node, boot_id)
);
