-- Issue 6: what the cluster view and the scheduler extender read.
-- The agent's GPU state, the tenants holding the device and whether a
-- physical GPU is in MIG mode, on the latest gauges of every device.
ALTER TABLE gpu_state ADD COLUMN state TEXT;
ALTER TABLE gpu_state ADD COLUMN tenants TEXT;
ALTER TABLE gpu_state ADD COLUMN mig_mode BIGINT;

-- Each node's report interval: stale after three intervals without one.
ALTER TABLE nodes ADD COLUMN report_interval_ms BIGINT;

-- Each tenant's local quotas on each node, as of the node's latest report.
CREATE TABLE tenant_quota_state (
    node TEXT NOT NULL,
    tenant TEXT NOT NULL,
    resource TEXT NOT NULL,
    limit_value DOUBLE PRECISION NOT NULL,
    usage_value DOUBLE PRECISION,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (node, tenant, resource)
);
