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
//! The same tick folds the per-node hourly rollups into per-node daily
//! ones, which chargeback by node reads: a UTC day once it is over (by
//! the commit lag), and again whenever one of its hours is re-folded.
//! `node_daily` in `rollup_watermark` is the day below which every day
//! is folded; days with reports received since the watermark are read
//! from the hourly rollup instead, as hours are.

use std::collections::BTreeSet;

use sqlx::{Acquire, AnyConnection};

use super::{Backend, Ledger, LedgerError};

/// Milliseconds per day: the daily rollups' granularity.
pub(super) const DAY_MS: i64 = 86_400_000;

/// The start of `ms`'s UTC day.
pub(super) fn day_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY_MS)
}

/// The first day of `day_ms`'s UTC month, in ms: the daily rollups'
/// leading key.
pub(super) fn month_of(day_ms: i64) -> i64 {
    time::OffsetDateTime::from_unix_timestamp(day_ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.date().replace_day(1).ok())
        // Beyond year ±9999: a bucket per day, found the same way.
        .map_or_else(
            || day_of(day_ms),
            |d| d.midnight().assume_utc().unix_timestamp() * 1000,
        )
}

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

/// The watermark's row in `rollup_watermark`.
pub(super) const WATERMARK: &str = "tenant_hourly";

/// The daily rollups' row in `rollup_watermark`: not a time of receipt
/// but the day below which every day is folded.
pub(super) const DAILY: &str = "node_daily";

/// PostgreSQL advisory lock key of the fold (any constant unique to it).
const FOLD_LOCK: i64 = 0x7a11_f01d;

impl Ledger {
    /// Re-folds every hour in which a report arrived since the watermark
    /// and moves the watermark up to `now_ms` less the commit lag.
    /// Returns how many hours were folded.
    pub(crate) async fn fold(&self, now_ms: i64) -> Result<usize, LedgerError> {
        let since: i64 =
            sqlx::query_scalar("SELECT received_ms FROM rollup_watermark WHERE name = $1")
                .bind(WATERMARK)
                .fetch_one(&self.pool)
                .await?;
        let hours: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT (interval_end_ms / 3600000) * 3600000 AS hour_ms FROM reports \
             WHERE received_ms >= $1 ORDER BY hour_ms",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut conn = self.pool.acquire().await?;
        stage_tables(&mut conn).await?;
        for &hour in &hours {
            self.fold_hour(&mut conn, hour).await?;
        }
        // Days: those of the hours above, and those over since the last
        // tick (all of them on the first), once the commit lag is past.
        let through: i64 =
            sqlx::query_scalar("SELECT received_ms FROM rollup_watermark WHERE name = $1")
                .bind(DAILY)
                .fetch_one(&mut *conn)
                .await?;
        let new_through = day_of(now_ms - COMMIT_LAG_MS);
        let mut days: BTreeSet<i64> = hours
            .iter()
            .map(|&h| day_of(h))
            .filter(|&d| d < new_through)
            .collect();
        if new_through > through {
            let over: Vec<i64> = sqlx::query_scalar(
                "SELECT DISTINCT (hour_ms / 86400000) * 86400000 AS day_ms FROM gpu_usage_hourly \
                 WHERE hour_ms >= $1 AND hour_ms < $2 \
                 UNION SELECT DISTINCT (hour_ms / 86400000) * 86400000 AS day_ms \
                 FROM io_usage_hourly WHERE hour_ms >= $1 AND hour_ms < $2",
            )
            .bind(through)
            .bind(new_through)
            .fetch_all(&mut *conn)
            .await?;
            days.extend(over);
        }
        for &day in &days {
            self.fold_day(&mut conn, day).await?;
        }
        // Monotonic: a replica with a slow clock never moves them back.
        for (name, to) in [(DAILY, new_through), (WATERMARK, now_ms - COMMIT_LAG_MS)] {
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

    /// Replaces `day`'s per-node daily rows with the sums of its per-node
    /// hourly rows, staged as [`Self::fold_hour`] stages an hour's.
    async fn fold_day(&self, conn: &mut AnyConnection, day: i64) -> Result<(), LedgerError> {
        if self.backend == Backend::Sqlite {
            stage_day(conn, day).await?;
        }
        let mut tx = conn.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) l")
                .bind(FOLD_LOCK)
                .execute(&mut *tx)
                .await?;
            stage_day(&mut tx, day).await?;
        }
        for (table, stage) in [
            ("gpu_usage_daily", "fold_gpu_daily"),
            ("io_usage_daily", "fold_io_daily"),
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE day_ms = $1"))
                .bind(day)
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("INSERT INTO {table} SELECT * FROM {stage}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces `hour`'s node-less rows with the sums of its per-node rows.
    /// The sums are staged in temporary tables first; on SQLite outside
    /// the write transaction, so the writer (ingest) waits only for the
    /// short delete and copy, never for the summing.
    async fn fold_hour(&self, conn: &mut AnyConnection, hour: i64) -> Result<(), LedgerError> {
        if self.backend == Backend::Sqlite {
            stage(conn, hour).await?;
        }
        let mut tx = conn.begin().await?;
        if self.backend == Backend::Postgres {
            // Inside the lock, so the replica folding last summed last.
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) l")
                .bind(FOLD_LOCK)
                .execute(&mut *tx)
                .await?;
            stage(&mut tx, hour).await?;
        }
        for table in ["gpu_usage_hourly_tenant", "io_usage_hourly_tenant"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE hour_ms = $1"))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO gpu_usage_hourly_tenant SELECT * FROM fold_gpu")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO io_usage_hourly_tenant SELECT * FROM fold_io")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The connection's staging tables, shaped as the node-less rollups.
async fn stage_tables(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for (stage, table) in [
        ("fold_gpu", "gpu_usage_hourly_tenant"),
        ("fold_io", "io_usage_hourly_tenant"),
        ("fold_gpu_daily", "gpu_usage_daily"),
        ("fold_io_daily", "io_usage_daily"),
    ] {
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {stage} AS SELECT * FROM {table} WHERE 1 = 0"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Sums `hour`'s per-node rows into the staging tables.
async fn stage(conn: &mut AnyConnection, hour: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM fold_gpu")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM fold_io")
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO fold_gpu (hour_ms, {GPU_KEY}, allocated_us, used_us, energy_mj, \
         memory_byte_seconds, over_rows, idle_us) \
         SELECT hour_ms, {GPU_KEY}, CAST(SUM(allocated_us) AS BIGINT), \
         CAST(SUM(used_us) AS BIGINT), CAST(SUM(energy_mj) AS BIGINT), \
         CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION), \
         CAST(SUM(CASE WHEN used_us > allocated_us THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(idle_us) AS BIGINT) \
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

/// Sums `day`'s per-node hourly rows into the daily staging tables.
async fn stage_day(conn: &mut AnyConnection, day: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM fold_gpu_daily")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM fold_io_daily")
        .execute(&mut *conn)
        .await?;
    let key = "tenant, node, cluster, workload, model, slice_fraction";
    sqlx::query(&format!(
        "INSERT INTO fold_gpu_daily (month_ms, {key}, day_ms, allocated_us, used_us, energy_mj, \
         memory_byte_seconds, idle_us) \
         SELECT $1, {key}, $2, CAST(SUM(allocated_us) AS BIGINT), CAST(SUM(used_us) AS BIGINT), \
         CAST(SUM(energy_mj) AS BIGINT), CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION), \
         CAST(SUM(idle_us) AS BIGINT) \
         FROM gpu_usage_hourly WHERE hour_ms >= $2 AND hour_ms < $3 GROUP BY {key}"
    ))
    .bind(month_of(day))
    .bind(day)
    .bind(day + DAY_MS)
    .execute(&mut *conn)
    .await?;
    let key = "tenant, node, cluster";
    sqlx::query(&format!(
        "INSERT INTO fold_io_daily (month_ms, {key}, day_ms, network_ingress_bytes, \
         network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes) \
         SELECT $1, {key}, $2, CAST(SUM(network_ingress_bytes) AS BIGINT), \
         CAST(SUM(network_egress_bytes) AS BIGINT), CAST(SUM(pcie_h2d_bytes) AS BIGINT), \
         CAST(SUM(pcie_d2h_bytes) AS BIGINT) \
         FROM io_usage_hourly WHERE hour_ms >= $2 AND hour_ms < $3 GROUP BY {key}"
    ))
    .bind(month_of(day))
    .bind(day)
    .bind(day + DAY_MS)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
