-- Issue 13: the cluster-lifetime totals of /metrics are no longer kept by
-- ingest. tenant_node_totals took an upsert per tenant of every report
-- (a fifth of the SQLite writer's work at 50 tenants a report).
--
-- The fold keeps them instead (ledger/fold.rs): each time it re-folds an
-- hour, it adds what that changed in the hour's node-less rows to
-- tenant_folded_totals, in the same transaction. /metrics reads those
-- totals plus, for the hours with reports received since the fold's
-- watermark, their per-node rows less their node-less rows
-- (ledger/totals.rs): exact at every moment, without waiting for a fold.

-- SM time as the totals count it (a row without sm_us counts 0), which
-- used_us does not (it counts the allocated time). Rows from before this
-- migration have 0 here: their SM time is in the totals below. Added
-- last, as 0008 explains.
ALTER TABLE gpu_usage_hourly ADD COLUMN sm_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gpu_usage_hourly_tenant ADD COLUMN sm_us BIGINT NOT NULL DEFAULT 0;

-- Totals per tenant of every hour folded so far (doubles: over a
-- cluster's lifetime they outgrow 64-bit integers, see 0003).
CREATE TABLE tenant_folded_totals (
    tenant TEXT PRIMARY KEY,
    allocated_us DOUBLE PRECISION NOT NULL,
    sm_us DOUBLE PRECISION NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    energy_mj DOUBLE PRECISION NOT NULL,
    network_ingress_bytes DOUBLE PRECISION NOT NULL,
    network_egress_bytes DOUBLE PRECISION NOT NULL,
    pcie_h2d_bytes DOUBLE PRECISION NOT NULL,
    pcie_d2h_bytes DOUBLE PRECISION NOT NULL
);

-- Everything counted so far, less what /metrics will add for the hours
-- not yet folded (their per-node rows less their node-less ones), so
-- that the totals read the same before and after this migration.
WITH unfolded_hours AS (
    SELECT DISTINCT (interval_end_ms / 3600000) * 3600000 AS hour_ms FROM reports
    WHERE received_ms >= (SELECT received_ms FROM rollup_watermark WHERE name = 'tenant_hourly')
)
INSERT INTO tenant_folded_totals (tenant, allocated_us, sm_us, memory_byte_seconds, energy_mj,
    network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes)
SELECT tenant, SUM(allocated_us), SUM(sm_us), SUM(memory_byte_seconds), SUM(energy_mj),
    SUM(network_ingress_bytes), SUM(network_egress_bytes), SUM(pcie_h2d_bytes),
    SUM(pcie_d2h_bytes)
FROM (
    SELECT tenant, CAST(allocated_us AS DOUBLE PRECISION) AS allocated_us,
        CAST(sm_us AS DOUBLE PRECISION) AS sm_us,
        CAST(memory_byte_seconds AS DOUBLE PRECISION) AS memory_byte_seconds,
        CAST(energy_mj AS DOUBLE PRECISION) AS energy_mj,
        CAST(network_ingress_bytes AS DOUBLE PRECISION) AS network_ingress_bytes,
        CAST(network_egress_bytes AS DOUBLE PRECISION) AS network_egress_bytes,
        CAST(pcie_h2d_bytes AS DOUBLE PRECISION) AS pcie_h2d_bytes,
        CAST(pcie_d2h_bytes AS DOUBLE PRECISION) AS pcie_d2h_bytes
    FROM tenant_totals
    UNION ALL
    SELECT tenant, allocated_us, sm_us, memory_byte_seconds, energy_mj, network_ingress_bytes,
        network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes
    FROM tenant_node_totals
    UNION ALL
    SELECT tenant, CAST(-SUM(allocated_us) AS DOUBLE PRECISION), 0,
        -SUM(memory_byte_seconds), CAST(-SUM(energy_mj) AS DOUBLE PRECISION), 0, 0, 0, 0
    FROM gpu_usage_hourly WHERE hour_ms IN (SELECT hour_ms FROM unfolded_hours) GROUP BY tenant
    UNION ALL
    SELECT tenant, CAST(SUM(allocated_us) AS DOUBLE PRECISION), 0,
        SUM(memory_byte_seconds), CAST(SUM(energy_mj) AS DOUBLE PRECISION), 0, 0, 0, 0
    FROM gpu_usage_hourly_tenant WHERE hour_ms IN (SELECT hour_ms FROM unfolded_hours)
    GROUP BY tenant
    UNION ALL
    SELECT tenant, 0, 0, 0, 0, CAST(-SUM(network_ingress_bytes) AS DOUBLE PRECISION),
        CAST(-SUM(network_egress_bytes) AS DOUBLE PRECISION),
        CAST(-SUM(pcie_h2d_bytes) AS DOUBLE PRECISION),
        CAST(-SUM(pcie_d2h_bytes) AS DOUBLE PRECISION)
    FROM io_usage_hourly WHERE hour_ms IN (SELECT hour_ms FROM unfolded_hours) GROUP BY tenant
    UNION ALL
    SELECT tenant, 0, 0, 0, 0, CAST(SUM(network_ingress_bytes) AS DOUBLE PRECISION),
        CAST(SUM(network_egress_bytes) AS DOUBLE PRECISION),
        CAST(SUM(pcie_h2d_bytes) AS DOUBLE PRECISION),
        CAST(SUM(pcie_d2h_bytes) AS DOUBLE PRECISION)
    FROM io_usage_hourly_tenant WHERE hour_ms IN (SELECT hour_ms FROM unfolded_hours)
    GROUP BY tenant
) t
GROUP BY tenant;

-- What they held is in tenant_folded_totals now.
DROP TABLE tenant_node_totals;
DROP TABLE tenant_totals;
