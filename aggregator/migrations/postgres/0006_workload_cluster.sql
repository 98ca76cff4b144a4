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

ALTER TABLE gpu_usage_hourly ADD COLUMN cluster TEXT NOT NULL DEFAULT 'default';
ALTER TABLE gpu_usage_hourly ADD COLUMN workload TEXT NOT NULL DEFAULT '';
ALTER TABLE gpu_usage_hourly DROP CONSTRAINT gpu_usage_hourly_pkey;
ALTER TABLE gpu_usage_hourly
    ADD PRIMARY KEY (hour_ms, tenant, node, model, slice_fraction, cluster, workload);

ALTER TABLE io_usage_hourly ADD COLUMN cluster TEXT NOT NULL DEFAULT 'default';
ALTER TABLE io_usage_hourly DROP CONSTRAINT io_usage_hourly_pkey;
ALTER TABLE io_usage_hourly ADD PRIMARY KEY (hour_ms, tenant, node, cluster);
