-- Issue 13: the per-node daily rollups' keys carry their sums, so a
-- month's read by node is an index-only scan in the order chargeback
-- groups by, as SQLite reads its WITHOUT ROWID tables. With the sums in
-- the heap only, PostgreSQL read the month's rows and sorted them
-- instead (870,000 rows, 97 MB on disk, 4.4 s of a 5.9 s read at 150
-- nodes; 1.1 s for the whole read with this key). The fold vacuums the
-- daily rollups after folding days (ledger/fold.rs): an index-only scan
-- skips the heap only on pages VACUUM marked all-visible.
-- SQLite: no change (its daily rollups are WITHOUT ROWID already).
ALTER TABLE gpu_usage_daily DROP CONSTRAINT gpu_usage_daily_pkey,
    ADD PRIMARY KEY (month_ms, tenant, node, cluster, workload, model, slice_fraction, day_ms)
    INCLUDE (allocated_us, used_us, energy_mj, memory_byte_seconds, idle_us);

ALTER TABLE io_usage_daily DROP CONSTRAINT io_usage_daily_pkey,
    ADD PRIMARY KEY (month_ms, tenant, node, cluster, day_ms)
    INCLUDE (network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes);
