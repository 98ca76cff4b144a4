-- Issue 13: node-less hourly rollups for chargeback by tenant (and GPU
-- model). They are folded from the per-node hourly rollups by a
-- background tick (ledger/fold.rs), never by ingest: every report would
-- otherwise update rows that every node's reports share.

-- GPU usage per hour, tenant, model, slice, cluster and workload, summed
-- over nodes (the per-node rollup's key less the node).
-- over_rows counts the per-node rows folded in whose used_us exceeds
-- allocated_us: pricing `basis=used` clamps those per node, so chargeback
-- reads such keys per node instead.
CREATE TABLE gpu_usage_hourly_tenant (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    used_us BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    over_rows BIGINT NOT NULL,
    cluster TEXT NOT NULL,
    workload TEXT NOT NULL,
    PRIMARY KEY (hour_ms, tenant, model, slice_fraction, cluster, workload)
);

-- I/O per hour, tenant and cluster, summed over nodes.
CREATE TABLE io_usage_hourly_tenant (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    cluster TEXT NOT NULL,
    PRIMARY KEY (hour_ms, tenant, cluster)
);

-- How far the fold has come: every report received before received_ms
-- is in the node-less rollups. 0: nothing folded yet, every hour is read
-- per node.
CREATE TABLE rollup_watermark (
    name TEXT PRIMARY KEY,
    received_ms BIGINT NOT NULL
);
INSERT INTO rollup_watermark (name, received_ms) VALUES ('tenant_hourly', 0);

-- The fold and chargeback find the hours of recently received reports.
CREATE INDEX reports_received ON reports (received_ms);
