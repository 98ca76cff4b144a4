//! Folding the per-node hourly rollups into the node-less ones that
//! chargeback by tenant reads, off the ingest path.
//!
//! Ingest never touches the node-less rows (every node's reports would
//! update them). A background tick re-folds each hour in which a report
//! arrived since the watermark: the hour's node-less rows are deleted
//! and summed again from the per-node rows, in one transaction, so a
//! re-fold is idempotent and a late report is counted by the next tick.
//! Replicas on PostgreSQL take turns per hour (an advisory lock), so the
//! last fold of an hour always saw the newest rows.
//!
//! The watermark promises: every report received before it is folded.
//! Chargeback reads the hours of reports received since, per node
//! ([`super::chargeback`]), so its answer never waits for a tick.
//!
//! Each re-fold of an hour also adds what it changed in the hour's
//! node-less rows to the cluster-lifetime totals of `/metrics`, in its
//! transaction ([`super::totals`]); their readers, too, read the hours
//! received since the watermark per node.
//!
//! The same tick folds the per-node hourly rollups into per-node daily
//! ones, which chargeback by node reads: a UTC day once it is over (by
//! the commit lag), and again whenever one of its hours is re-folded.
//! `node_daily` in `rollup_watermark` is the day below which every day
//! is folded; days with reports received since the watermark are read
//! from the hourly rollup instead, as hours are.
//!
//! Then it folds the per-node daily rollups into per-node monthly ones
//! the same way: a UTC calendar month once all its days are folded, and
//! again whenever one of its days is re-folded. `node_monthly` is the
//! month below which every month is folded; months with a day that has
//! reports received since the watermark are read by day instead.

use std::collections::BTreeSet;

use sqlx::{Acquire, AnyConnection, Executor};

use super::{Backend, Ledger, LedgerError, totals};
use crate::time::{DAY_MS, day_of, month_of};

/// A report is taken to be committed this long after it was received
/// (ingest gives up far sooner: `POSTGRES_ACQUIRE_TIMEOUT`, the agents'
/// timeout); the slack also covers clock skew between replicas.
const COMMIT_LAG_MS: i64 = 10 * 60_000;

/// The node-less GPU rollup's key besides the hour: the per-node
/// rollup's less the node. A new dimension is one more name here, with
/// its column in a migration.
const GPU_KEY: &str = "tenant, model, slice_fraction, cluster, workload";
/// The node-less I/O rollup's key besides the hour.
const IO_KEY: &str = "tenant, cluster";

/// The per-node rollups' keys besides the hour or day (the daily and
/// monthly ones also lead with the month).
pub(super) const GPU_NODE_KEY: &str = "tenant, node, cluster, workload, model, slice_fraction";
pub(super) const IO_NODE_KEY: &str = "tenant, node, cluster";

/// The per-node rollups' sums.
pub(super) const GPU_NODE_SUMS: &str =
    "allocated_us, used_us, energy_mj, memory_byte_seconds, idle_us";
pub(super) const IO_NODE_SUMS: &str =
    "network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes";

/// The watermark's row in `rollup_watermark`.
pub(super) const WATERMARK: &str = "tenant_hourly";

/// The daily rollups' row in `rollup_watermark`: not a time of receipt
/// but the day below which every day is folded.
pub(super) const DAILY: &str = "node_daily";

/// The monthly rollups' row in `rollup_watermark`: the month (its first
/// instant) below which every month is folded.
pub(super) const MONTHLY: &str = "node_monthly";

/// PostgreSQL advisory lock key of the fold (any constant unique to it).
const FOLD_LOCK: i64 = 0x7a11_f01d;

impl Ledger {
    /// Re-folds every hour in which a report arrived since the watermark
    /// and moves the watermark up to `now_ms` less the commit lag.
    /// Returns how many hours were folded.
    pub(crate) async fn fold(&self, now_ms: i64) -> Result<usize, LedgerError> {
        let hours: Vec<i64> = sqlx::query_scalar(concat!(unfolded_hours!(), " ORDER BY hour_ms"))
            .fetch_all(&self.pool)
            .await?;
        let mut conn = self.pool.acquire().await?;
        stage_tables(&mut conn).await?;
        for &hour in &hours {
            self.replace(&mut conn, Grain::Hour, hour).await?;
        }
        // Days: those of the hours above, and those over since the last
        // tick (all of them on the first), once the commit lag is past.
        let (through, months_through): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT received_ms FROM rollup_watermark WHERE name = $1), \
             (SELECT received_ms FROM rollup_watermark WHERE name = $2)",
        )
        .bind(DAILY)
        .bind(MONTHLY)
        .fetch_one(&mut *conn)
        .await?;
        let new_through = day_of(now_ms - COMMIT_LAG_MS);
        // Also below the watermark when this replica's clock is behind
        // it: readers trust those days.
        let mut days: BTreeSet<i64> = hours
            .iter()
            .map(|&h| day_of(h))
            .filter(|&d| d < new_through.max(through))
            .collect();
        if new_through > through {
            let over: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT DISTINCT (hour_ms / {DAY_MS}) * {DAY_MS} AS day_ms \
                     FROM gpu_usage_hourly WHERE hour_ms >= $1 AND hour_ms < $2 \
                     UNION SELECT DISTINCT (hour_ms / {DAY_MS}) * {DAY_MS} AS day_ms \
                     FROM io_usage_hourly WHERE hour_ms >= $1 AND hour_ms < $2"
            ))
            .bind(through)
            .bind(new_through)
            .fetch_all(&mut *conn)
            .await?;
            days.extend(over);
        }
        for &day in &days {
            self.replace(&mut conn, Grain::Day, day).await?;
        }
        // Months, from the days just folded: those of the days above
        // once all their days are folded, and those over since the last
        // tick (all of them on the first, also on a ledger that had daily
        // rollups before the monthly ones).
        let new_months_through = month_of(new_through);
        let mut months: BTreeSet<i64> = days
            .iter()
            .map(|&d| month_of(d))
            .filter(|&m| m < new_months_through.max(months_through))
            .collect();
        if new_months_through > months_through {
            let over: Vec<i64> = sqlx::query_scalar(
                "SELECT DISTINCT month_ms FROM gpu_usage_daily \
                 WHERE month_ms >= $1 AND month_ms < $2 \
                 UNION SELECT DISTINCT month_ms FROM io_usage_daily \
                 WHERE month_ms >= $1 AND month_ms < $2",
            )
            .bind(months_through)
            .bind(new_months_through)
            .fetch_all(&mut *conn)
            .await?;
            months.extend(over);
        }
        for &month in &months {
            self.replace(&mut conn, Grain::Month, month).await?;
        }
        if self.backend() == Backend::Postgres {
            // The reads by node scan the rollups' keys alone (migrations
            // 0012, 0013) only on pages VACUUM marked all-visible;
            // autovacuum would come after days of inserts. ANALYZE: the
            // planner weighs that scan by the tables' new sizes.
            for (folded, tables) in [
                (!days.is_empty(), "gpu_usage_daily, io_usage_daily"),
                (!months.is_empty(), "gpu_usage_monthly, io_usage_monthly"),
            ] {
                if folded {
                    conn.execute(format!("VACUUM (ANALYZE) {tables}").as_str())
                        .await?;
                }
            }
        }
        // Monotonic: a replica with a slow clock never moves them back.
        // After the folds: a reader trusts the rollups below them.
        for (name, to) in [
            (DAILY, new_through),
            (MONTHLY, new_months_through),
            (WATERMARK, now_ms - COMMIT_LAG_MS),
        ] {
            sqlx::query(
                "UPDATE rollup_watermark SET received_ms = $1 WHERE name = $2 AND received_ms < $1",
            )
            .bind(to)
            .bind(name)
            .execute(&mut *conn)
            .await?;
        }
        Ok(hours.len())
    }

    /// Replaces the rows of `grain`'s rollups at `at` (an hour's
    /// node-less rows, a day's per-node daily rows, a month's per-node
    /// monthly rows) with their sums.
    /// The sums are staged in temporary tables first; on SQLite outside
    /// the write transaction, so the writer (ingest) waits only for the
    /// short delete and copy, never for the summing.
    async fn replace(
        &self,
        conn: &mut AnyConnection,
        grain: Grain,
        at: i64,
    ) -> Result<(), LedgerError> {
        if self.backend() == Backend::Sqlite {
            grain.stage(conn, at).await?;
        }
        let mut tx = conn.begin().await?;
        if self.backend() == Backend::Postgres {
            // Inside the lock, so the replica folding last summed last.
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) l")
                .bind(FOLD_LOCK)
                .execute(&mut *tx)
                .await?;
            grain.stage(&mut tx, at).await?;
        }
        if let Grain::Hour = grain {
            // Before the hour's node-less rows are replaced: the totals
            // gain what the new ones add to the old.
            sqlx::query(&totals::add_refolded_hour())
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        let (column, tables) = grain.tables();
        for (table, stage) in tables {
            sqlx::query(&format!("DELETE FROM {table} WHERE {column} = $1"))
                .bind(at)
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("INSERT INTO {table} SELECT * FROM {stage}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What one fold replaces: the node-less rollups of an hour, the
/// per-node daily rollups of a day, or the per-node monthly rollups of a
/// month.
#[derive(Debug, Clone, Copy)]
enum Grain {
    Hour,
    Day,
    Month,
}

impl Grain {
    /// The column naming the hour, day or month, and each rollup with its
    /// staging table.
    fn tables(self) -> (&'static str, [(&'static str, &'static str); 2]) {
        match self {
            Self::Hour => (
                "hour_ms",
                [
                    ("gpu_usage_hourly_tenant", "fold_gpu"),
                    ("io_usage_hourly_tenant", "fold_io"),
                ],
            ),
            Self::Day => (
                "day_ms",
                [
                    ("gpu_usage_daily", "fold_gpu_daily"),
                    ("io_usage_daily", "fold_io_daily"),
                ],
            ),
            Self::Month => (
                "month_ms",
                [
                    ("gpu_usage_monthly", "fold_gpu_monthly"),
                    ("io_usage_monthly", "fold_io_monthly"),
                ],
            ),
        }
    }

    /// Sums the rows at `at` into the staging tables, emptied first.
    async fn stage(self, conn: &mut AnyConnection, at: i64) -> Result<(), sqlx::Error> {
        for (_, stage) in self.tables().1 {
            sqlx::query(&format!("DELETE FROM {stage}"))
                .execute(&mut *conn)
                .await?;
        }
        match self {
            Self::Hour => stage_hour(conn, at).await,
            Self::Day | Self::Month => self.stage_node(conn, at).await,
        }
    }

    /// Sums a day's per-node hourly rows, or a month's per-node daily
    /// rows, into the (empty) staging tables: the rows at `[at, end)` of
    /// the grain below, per node and group.
    async fn stage_node(self, conn: &mut AnyConnection, at: i64) -> Result<(), sqlx::Error> {
        // The rollup summed, its rows in range (the daily ones found by
        // their key's month), and the day of a daily row.
        let (from, range, end, day) = match self {
            Self::Day => (
                "hourly",
                "hour_ms >= $2 AND hour_ms < $3",
                at + DAY_MS,
                ("day_ms, ", "$2, "),
            ),
            _ => (
                "daily",
                "month_ms = $1 AND day_ms >= $2 AND day_ms < $3",
                month_of(at + 32 * DAY_MS),
                ("", ""),
            ),
        };
        let stages = self.tables().1.map(|(_, stage)| stage);
        for (stage, source, key, sums) in [
            (stages[0], "gpu", GPU_NODE_KEY, GPU_NODE_SUMS),
            (stages[1], "io", IO_NODE_KEY, IO_NODE_SUMS),
        ] {
            // Integers summed as integers (exact); byte-seconds as doubles.
            let summed = sums
                .split(", ")
                .map(|c| {
                    let ty = if c == "memory_byte_seconds" {
                        "DOUBLE PRECISION"
                    } else {
                        "BIGINT"
                    };
                    format!("CAST(SUM({c}) AS {ty})")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let (day_col, day_val) = day;
            sqlx::query(&format!(
                "INSERT INTO {stage} (month_ms, {key}, {day_col}{sums}) \
                 SELECT $1, {key}, {day_val}{summed} FROM {source}_usage_{from} \
                 WHERE {range} GROUP BY {key}"
            ))
            .bind(month_of(at))
            .bind(at)
            .bind(end)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// The connection's staging tables, shaped as the rollups they replace.
async fn stage_tables(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    let grains = [Grain::Hour, Grain::Day, Grain::Month];
    for (table, stage) in grains.into_iter().flat_map(|g| g.tables().1) {
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {stage} AS SELECT * FROM {table} WHERE 1 = 0"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Sums `hour`'s per-node rows into the (empty) staging tables.
async fn stage_hour(conn: &mut AnyConnection, hour: i64) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO fold_gpu (hour_ms, {GPU_KEY}, allocated_us, used_us, energy_mj, \
         memory_byte_seconds, over_rows, idle_us, sm_us) \
         SELECT hour_ms, {GPU_KEY}, CAST(SUM(allocated_us) AS BIGINT), \
         CAST(SUM(used_us) AS BIGINT), CAST(SUM(energy_mj) AS BIGINT), \
         CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION), \
         CAST(SUM(CASE WHEN used_us > allocated_us THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(idle_us) AS BIGINT), CAST(SUM(sm_us) AS BIGINT) \
         FROM gpu_usage_hourly WHERE hour_ms = $1 GROUP BY hour_ms, {GPU_KEY}"
    ))
    .bind(hour)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO fold_io (hour_ms, {IO_KEY}, network_ingress_bytes, network_egress_bytes, \
         pcie_h2d_bytes, pcie_d2h_bytes) \
         SELECT hour_ms, {IO_KEY}, CAST(SUM(network_ingress_bytes) AS BIGINT), \
         CAST(SUM(network_egress_bytes) AS BIGINT), CAST(SUM(pcie_h2d_bytes) AS BIGINT), \
         CAST(SUM(pcie_d2h_bytes) AS BIGINT) \
         FROM io_usage_hourly WHERE hour_ms = $1 GROUP BY hour_ms, {IO_KEY}"
    ))
    .bind(hour)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
