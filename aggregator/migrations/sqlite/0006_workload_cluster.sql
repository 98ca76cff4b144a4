-- Issue 14: usage per workload within a tenant, and several clusters in
-- one ledger. A report names its cluster (`[report] cluster`; reports
-- from older agents are 'default') and each GPU usage row its workload
-- ('' for usage outside any named workload). Both are stored on the raw
-- rows, as the node is, and key the hourly rollups, so chargeback can
-- group and filter by them from the rollups as from the raw rows.
ALTER TABLE reports ADD COLUMN cluster TEXT NOT NULL DEFAULT 'default';
ALTER TABLE gpu_usage ADD COLUMN cluster TEXT NOT NULL DEFAULT 'default';
ALTER TABLE gpu_usage ADD COLUMN workload TEXT NOT NULL DEFAULT '';
ALTER TABLE io_usage ADD COLUMN cluster TEXT NOT NULL DEFAULT 'default';

-- SQLite cannot change a primary key: the rollups are rebuilt with the
-- wider key, their rows kept.
CREATE TABLE gpu_usage_hourly_0006 (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    used_us BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    cluster TEXT NOT NULL DEFAULT 'default',
    workload TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (hour_ms, tenant, node, model, slice_fraction, cluster, workload)
);
INSERT INTO gpu_usage_hourly_0006 (hour_ms, tenant, node, model, slice_fraction, allocated_us,
    used_us, energy_mj, memory_byte_seconds)
SELECT hour_ms, tenant, node, model, slice_fraction, allocated_us, used_us, energy_mj,
    memory_byte_seconds FROM gpu_usage_hourly;
DROP TABLE gpu_usage_hourly;
ALTER TABLE gpu_usage_hourly_0006 RENAME TO gpu_usage_hourly;

CREATE TABLE io_usage_hourly_0006 (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    cluster TEXT NOT NULL DEFAULT 'default',
    PRIMARY KEY (hour_ms, tenant, node, cluster)
);
INSERT INTO io_usage_hourly_0006 (hour_ms, tenant, node, network_ingress_bytes,
    network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes)
SELECT hour_ms, tenant, node, network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes,
    pcie_d2h_bytes FROM io_usage_hourly;
DROP TABLE io_usage_hourly;
ALTER TABLE io_usage_hourly_0006 RENAME TO io_usage_hourly;
