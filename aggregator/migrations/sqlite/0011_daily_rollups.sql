-- Issue 13: per-node daily rollups for chargeback by node. A month of
-- the per-node hourly rollup is 720 rows per tenant and node; summing
-- them (and sorting them into groups) was most of a month's chargeback
-- by tenant and node. They are folded from the per-node hourly rollups
-- by the background tick (ledger/fold.rs), one UTC day once it is over,
-- never by ingest.
--
-- The key starts with the UTC month (its first day, in ms), then the
-- group and the day last: a month's rows come out already in the order
-- chargeback groups them by, so the database sums them without sorting.
-- WITHOUT ROWID: the sums sit in the key's B-tree, read in one pass.
CREATE TABLE gpu_usage_daily (
    month_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    cluster TEXT NOT NULL,
    workload TEXT NOT NULL,
    model TEXT NOT NULL,
    slice_fraction DOUBLE PRECISION NOT NULL,
    day_ms BIGINT NOT NULL,
    allocated_us BIGINT NOT NULL,
    used_us BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    idle_us BIGINT NOT NULL,
    PRIMARY KEY (month_ms, tenant, node, cluster, workload, model, slice_fraction, day_ms)
) WITHOUT ROWID;
-- A day's rows, for its re-fold and retention.
CREATE INDEX gpu_usage_daily_day ON gpu_usage_daily (day_ms);

CREATE TABLE io_usage_daily (
    month_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    cluster TEXT NOT NULL,
    day_ms BIGINT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    PRIMARY KEY (month_ms, tenant, node, cluster, day_ms)
) WITHOUT ROWID;
CREATE INDEX io_usage_daily_day ON io_usage_daily (day_ms);

-- Not a time of receipt: every UTC day before this one (ms) is in the
-- daily rollups, except days with reports received since the
-- 'tenant_hourly' watermark. 0: no day folded yet.
INSERT INTO rollup_watermark (name, received_ms) VALUES ('node_daily', 0);
