-- The usage ledger. Every report is stored once per (node, boot_id, seq);
-- its usage rows are written in the same transaction.
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    interval_start_ms BIGINT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    digest TEXT NOT NULL,
    UNIQUE (node, boot_id, seq)
);
CREATE INDEX reports_end ON reports (interval_end_ms);

CREATE TABLE gpu_usage (
    report_id BIGINT NOT NULL REFERENCES reports (id),
    node TEXT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    gpu TEXT NOT NULL,
    uuid TEXT NOT NULL,
    model TEXT NOT NULL,
    mig_profile TEXT,
    slice_fraction DOUBLE PRECISION NOT NULL,
    allocated_us BIGINT NOT NULL,
    sm_us BIGINT,
    memory_byte_seconds BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL
);
CREATE INDEX gpu_usage_end ON gpu_usage (interval_end_ms, tenant);

CREATE TABLE io_usage (
    report_id BIGINT NOT NULL REFERENCES reports (id),
    node TEXT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    network_ingress_packets BIGINT NOT NULL,
    network_egress_packets BIGINT NOT NULL,
    network_dropped_packets BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL
);
CREATE INDEX io_usage_end ON io_usage (interval_end_ms, tenant);

-- The latest gauges of every GPU and MIG instance, per node.
CREATE TABLE gpu_state (
    node TEXT NOT NULL,
    uuid TEXT NOT NULL,
    gpu TEXT NOT NULL,
    model TEXT NOT NULL,
    mig_profile TEXT,
    parent_uuid TEXT,
    slice_fraction DOUBLE PRECISION,
    health TEXT NOT NULL,
    utilization_ratio DOUBLE PRECISION,
    memory_used_bytes BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    processes BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (node, uuid)
);

-- Audit records of every node; `problem` is NULL when the record follows
-- the node's chain, else why it does not.
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    report_id BIGINT NOT NULL REFERENCES reports (id),
    node TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    tenant TEXT,
    action TEXT,
    prev_sha256 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    problem TEXT,
    record TEXT NOT NULL
);
CREATE INDEX audit_time ON audit (time_ms);
CREATE INDEX audit_tenant ON audit (tenant, time_ms);

-- The last audit hash seen per node: where its chain continues.
CREATE TABLE audit_heads (
    node TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL
);

-- Running totals per tenant since the ledger began (for /metrics), kept in
-- the ingest transaction.
CREATE TABLE tenant_totals (
    tenant TEXT PRIMARY KEY,
    allocated_us BIGINT NOT NULL,
    sm_us BIGINT NOT NULL,
    memory_byte_seconds BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    network_ingress_bytes BIGINT NOT NULL,
    network_egress_bytes BIGINT NOT NULL,
    pcie_h2d_bytes BIGINT NOT NULL,
    pcie_d2h_bytes BIGINT NOT NULL
);

-- The last report of every node.
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    reports BIGINT NOT NULL,
    last_received_ms BIGINT NOT NULL,
    last_interval_end_ms BIGINT NOT NULL
);
