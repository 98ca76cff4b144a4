-- Issue 14: GPU time a tenant held while the device was idle (held, doing
-- nothing past the agent's `[states] idle_after`), a part of its
-- allocated time. Reports from older agents carry none: 0. Added last on
-- every table, so the fold's staging tables (`AS SELECT *`) keep the
-- tables' column order.
ALTER TABLE gpu_usage ADD COLUMN idle_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gpu_usage_hourly ADD COLUMN idle_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gpu_usage_hourly_tenant ADD COLUMN idle_us BIGINT NOT NULL DEFAULT 0;

-- The cluster view's reclaimable GPUs: since when an idle device is idle
-- (node clock, ms; NULL unless idle) and the named workloads holding it
-- (a JSON array of {tenant, workload}).
ALTER TABLE gpu_state ADD COLUMN idle_since_ms BIGINT;
ALTER TABLE gpu_state ADD COLUMN workloads TEXT;
