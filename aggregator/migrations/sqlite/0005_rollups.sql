-- Issue 13: rollups written in the ingest transaction of every report, so
-- they can never disagree with the raw rows. Each is keyed by node: a
-- report only ever touches its own node's rollup rows, so concurrent
-- reports of different nodes never wait on each other's row locks.

-- GPU usage per hour (of interval_end_ms), in chargeback's grouping.
-- used_us is COALESCE(sm_us, allocated_us) summed, as chargeback prices it.
CREATE TABLE gpu_usage_hourly (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    used_us BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour_ms, tenant, node, model, slice_fraction)
);

-- I/O per hour (of interval_end_ms), in chargeback's grouping.
CREATE TABLE io_usage_hourly (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, tenant, node)
);

-- Running totals per tenant and node since the ledger began (/metrics sums
-- them by tenant). tenant_totals, which every report used to update, is
-- no longer written: it keeps what was counted before this migration.
CREATE TABLE tenant_node_totals (
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    allocated_us DOUBLE PRECISION NOT NULL,
    sm_us DOUBLE PRECISION NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    energy_mj DOUBLE PRECISION NOT NULL,
    network_ingress_bytes DOUBLE PRECISION NOT NULL,
    network_egress_bytes DOUBLE PRECISION NOT NULL,
    pcie_h2d_bytes DOUBLE PRECISION NOT NULL,
    pcie_d2h_bytes DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, node)
);

-- The rows stored before this migration, rolled up once.
INSERT INTO gpu_usage_hourly (hour_ms, tenant, node, model, slice_fraction, allocated_us,
    used_us, energy_mj, memory_byte_seconds)
SELECT (interval_end_ms / 3600000) * 3600000, tenant, node, model, slice_fraction,
    SUM(allocated_us), SUM(COALESCE(sm_us, allocated_us)), SUM(energy_mj),
    SUM(CAST(memory_byte_seconds AS DOUBLE PRECISION))
FROM gpu_usage GROUP BY (interval_end_ms / 3600000) * 3600000, tenant, node, model, slice_fraction;

INSERT INTO io_usage_hourly (hour_ms, tenant, node, network_ingress_bytes, network_egress_bytes,
    pcie_h2d_bytes, pcie_d2h_bytes)
SELECT (interval_end_ms / 3600000) * 3600000, tenant, node, SUM(network_ingress_bytes),
    SUM(network_egress_bytes), SUM(pcie_h2d_bytes), SUM(pcie_d2h_bytes)
FROM io_usage GROUP BY (interval_end_ms / 3600000) * 3600000, tenant, node;
