-- Issue 13: the raw usage tables partitioned by UTC day of
-- interval_end_ms, so retention drops a day's partition at once (no dead
-- rows for VACUUM, the disk returned) instead of deleting row by row.
-- PostgreSQL only: SQLite keeps its batched deletes.
--
-- Each table is re-created as a partitioned table with the same columns
-- (LIKE copies whatever columns earlier migrations gave it) and:
--   <table>_legacy  the rows stored before this migration, attached as
--                   the range up to tomorrow (UTC); rows at or past that
--                   (an agent's clock far ahead) move to the default;
--   <table>_default whatever no day partition holds (clocks far off);
--   <table>_dYYYYMMDD one per day, created ahead by the aggregator
--                   (ledger/partitions.rs), never by ingest.
-- Attaching the legacy table scans it once to check its range.
DO $$
DECLARE
    t TEXT;
    bound BIGINT := (CAST(EXTRACT(EPOCH FROM now()) AS BIGINT) / 86400 + 1) * 86400000;
BEGIN
    FOREACH t IN ARRAY ARRAY['gpu_usage', 'io_usage'] LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t, t || '_legacy');
        EXECUTE format('ALTER INDEX %I RENAME TO %I', t || '_end', t || '_legacy_end');
        EXECUTE format(
            'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
            'PARTITION BY RANGE (interval_end_ms)', t, t || '_legacy');
        EXECUTE format('ALTER TABLE %I ADD FOREIGN KEY (report_id) REFERENCES reports (id)', t);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', t || '_default', t);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I WHERE interval_end_ms >= %s RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved', t || '_legacy', bound, t || '_default');
        -- The check lets ATTACH skip its own scan.
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (interval_end_ms < %s)',
            t || '_legacy', t || '_legacy_range', bound);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%s)',
            t, t || '_legacy', bound);
        -- Partitioned indexes: the legacy table's equal ones are attached,
        -- not rebuilt.
        EXECUTE format('CREATE INDEX %I ON %I (interval_end_ms, tenant)', t || '_end', t);
    END LOOP;
END $$;

-- gpu_usage's second index (0003), by node.
ALTER INDEX gpu_usage_node RENAME TO gpu_usage_legacy_node;
CREATE INDEX gpu_usage_node ON gpu_usage (node, interval_end_ms);
