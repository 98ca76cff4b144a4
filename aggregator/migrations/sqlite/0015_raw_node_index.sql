-- Issue 13: one index fewer to write per GPU-usage row at ingest.
--
-- `gpu_usage_node` (node, interval_end_ms) came with migration 0003, for
-- reads of raw rows by node. Those reads now come from the per-node
-- rollups (hourly, daily, monthly); what still reads raw rows (a period's
-- partial hours, retention) finds them by time, through `gpu_usage_end`.
-- Nothing chose this index any more, and every GPU-usage row paid an
-- insert into it.
DROP INDEX IF EXISTS gpu_usage_node;
