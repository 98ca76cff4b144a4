-- Issue 13: report claims (`reports`) under retention, so the ledger's
-- size is bounded (ledger/retention.rs).
--
-- The raw tables' foreign keys to `reports` go: no index leads from
-- `report_id` to the raw rows, so removing a claim would look through
-- whole raw tables for rows still referring to it, and checking the key
-- cost ~7 µs per raw row at ingest. Raw rows are removed before (or with)
-- their claim, by the same retention. Audit records keep theirs: a claim
-- an audit record refers to is kept, and the index below finds them.
DO $$
DECLARE
    c RECORD;
BEGIN
    -- Inherited keys (on partitions) go with their parent's.
    FOR c IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
        WHERE contype = 'f' AND confrelid = 'reports'::regclass AND conparentid = 0
        AND conrelid <> 'audit'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END $$;

CREATE INDEX audit_report ON audit (report_id);

-- What retention removed of each (node, boot)'s claims. Ingest refuses a
-- report whose seq is at or below `last_seq` and whose claim is gone: it
-- was stored once already, or comes too late to be told apart from one
-- that was. `GET /api/v1/reports` adds these to the claims still kept.
CREATE TABLE claims_removed (
    node TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    reports BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    last_interval_end_ms BIGINT NOT NULL,
    PRIMARY KEY (node, boot_id)
);
