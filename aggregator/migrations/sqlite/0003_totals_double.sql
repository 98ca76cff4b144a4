-- Cluster-lifetime totals outgrow 64-bit integers; SQLite turns an
-- overflowing `+` into a REAL by itself and the totals are read back as
-- doubles, so only the PostgreSQL schema changes its column types.
CREATE INDEX gpu_usage_node ON gpu_usage (node, interval_end_ms);
