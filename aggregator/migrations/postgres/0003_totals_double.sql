-- Cluster-lifetime totals outgrow BIGINT (GPU memory byte-seconds of a
-- large tenant reach 2^63 within months): keep them as doubles, which
-- /metrics exports anyway. Per-report rows stay exact integers.
ALTER TABLE tenant_totals
    ALTER COLUMN allocated_us TYPE DOUBLE PRECISION,
    ALTER COLUMN sm_us TYPE DOUBLE PRECISION,
    ALTER COLUMN memory_byte_seconds TYPE DOUBLE PRECISION,
    ALTER COLUMN energy_mj TYPE DOUBLE PRECISION,
    ALTER COLUMN network_ingress_bytes TYPE DOUBLE PRECISION,
    ALTER COLUMN network_egress_bytes TYPE DOUBLE PRECISION,
    ALTER COLUMN pcie_h2d_bytes TYPE DOUBLE PRECISION,
    ALTER COLUMN pcie_d2h_bytes TYPE DOUBLE PRECISION;

CREATE INDEX gpu_usage_node ON gpu_usage (node, interval_end_ms);
