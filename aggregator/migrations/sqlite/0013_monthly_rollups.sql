-- Issue 13: per-node monthly rollups for chargeback by node. A month of
-- the per-node daily rollups is 30 rows per tenant and node (5.8 M rows
-- at 1,000 nodes and 200 tenants); a whole month is one row each here.
-- They are folded from the daily rollups by the background tick
-- (ledger/fold.rs), one UTC calendar month once it is over, and again
-- whenever one of its days is re-folded; never by ingest.
--
-- Keyed as the daily rollups less the day: a month's rows come out in
-- the order chargeback groups them by. WITHOUT ROWID: the sums sit in
-- the key's B-tree, read in one pass.
CREATE TABLE gpu_usage_monthly (
    month_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    cluster TEXT NOT NULL,
    workload TEXT NOT NULL,
    model TEXT NOT NULL,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    used_us BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    memory_byte_seconds DOUBLE PRECISION NOT NULL,
    idle_us BIGINT NOT NULL,
    PRIMARY KEY (month_ms, tenant, node, cluster, workload, model, slice_fraction)
) WITHOUT ROWID;

CREATE TABLE io_usage_monthly (
    month_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    cluster TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL,
    PRIMARY KEY (month_ms, tenant, node, cluster)
) WITHOUT ROWID;

-- Not a time of receipt: every UTC month before this one (ms, a
-- month's first instant) is in the monthly rollups, except months with
-- a day that has reports received since the 'tenant_hourly' watermark.
-- Its own row, not derived from 'node_daily': on a ledger that already
-- has daily rollups, no month is folded yet.
-- 0: no month folded yet.
INSERT INTO rollup_watermark (name, received_ms) VALUES ('node_monthly', 0);
