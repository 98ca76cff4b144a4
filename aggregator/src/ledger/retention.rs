//! Retention: raw usage rows are removed once older than `[ledger]
//! raw_retention`, rollups once older than `rollup_retention` (if set),
//! in small batches so that ingest never waits for more than one. On
//! PostgreSQL raw rows go a whole day at a time, by dropping the day's
//! partition once all of it is past retention ([`super::partitions`]).

use super::{
    Backend, Ledger, LedgerError,
    fold::{GPU_NODE_KEY, IO_NODE_KEY},
};
use crate::time::{day_of, month_of};

/// Rows removed per statement (each its own transaction): on SQLite the
/// writer waits for at most one such batch.
const BATCH: i64 = 5_000;

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Maintained {
    /// Hours re-folded into the node-less rollups.
    pub folded_hours: usize,
    /// Raw usage rows removed.
    pub raw_rows: u64,
    /// Rollup rows removed.
    pub rollup_rows: u64,
}

impl Ledger {
    /// One maintenance pass at `now_ms`: folds the node-less rollups, then
    /// removes raw rows whose interval ended before `raw_before_ms` and
    /// rollup rows of hours before `rollup_before_ms`.
    pub(crate) async fn maintain(
        &self,
        now_ms: i64,
        raw_before_ms: i64,
        rollup_before_ms: Option<i64>,
    ) -> Result<Maintained, LedgerError> {
        let folded_hours = self.fold(now_ms).await?;
        let mut raw_rows = 0;
        match self.backend {
            // Whole days at once ([`super::partitions`]).
            Backend::Postgres => {
                self.create_partitions(now_ms).await?;
                raw_rows = self.drop_partitions(raw_before_ms).await?;
            }
            Backend::Sqlite => {
                for table in ["gpu_usage", "io_usage"] {
                    raw_rows += self
                        .delete_before(table, "interval_end_ms", raw_before_ms)
                        .await?;
                }
            }
        }
        let mut rollup_rows = 0;
        if let Some(before) = rollup_before_ms {
            for table in [
                "gpu_usage_hourly",
                "io_usage_hourly",
                "gpu_usage_hourly_tenant",
                "io_usage_hourly_tenant",
            ] {
                rollup_rows += self.delete_before(table, "hour_ms", before).await?;
            }
            // Days wholly before: a day's row holds all of its hours.
            for table in ["gpu_usage_daily", "io_usage_daily"] {
                rollup_rows += self.delete_before(table, "day_ms", day_of(before)).await?;
            }
            // Months wholly before, likewise.
            for table in ["gpu_usage_monthly", "io_usage_monthly"] {
                rollup_rows += self
                    .delete_before(table, "month_ms", month_of(before))
                    .await?;
            }
        }
        Ok(Maintained {
            folded_hours,
            raw_rows,
            rollup_rows,
        })
    }

    /// Deletes `table`'s rows whose `column` is below `before`, [`BATCH`]
    /// at a time. `table` is not a partitioned one: a `ctid` is unique
    /// only within one table.
    pub(super) async fn delete_before(
        &self,
        table: &str,
        column: &str,
        before: i64,
    ) -> Result<u64, LedgerError> {
        // A row's address: PostgreSQL's ctid; SQLite's rowid, or the
        // primary key of the daily and monthly rollups (tables without a
        // rowid).
        let key = match (self.backend, table) {
            (Backend::Postgres, _) => "ctid".to_owned(),
            (Backend::Sqlite, "gpu_usage_daily") => format!("month_ms, {GPU_NODE_KEY}, day_ms"),
            (Backend::Sqlite, "io_usage_daily") => format!("month_ms, {IO_NODE_KEY}, day_ms"),
            (Backend::Sqlite, "gpu_usage_monthly") => format!("month_ms, {GPU_NODE_KEY}"),
            (Backend::Sqlite, "io_usage_monthly") => format!("month_ms, {IO_NODE_KEY}"),
            (Backend::Sqlite, _) => "rowid".to_owned(),
        };
        let sql = format!(
            "DELETE FROM {table} WHERE ({key}) IN \
             (SELECT {key} FROM {table} WHERE {column} < $1 LIMIT $2)"
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(before)
                .bind(BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += n;
            if n < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            chargeback::tests::{postgres_ledger, sqlite_ledger},
            ingest::{HOUR_MS, tests::report},
        },
    };

    const DAY: i64 = 24 * HOUR_MS;
    /// Midnight of a day, in ms.
    const D: i64 = 1_800_000_000_000 / DAY * DAY;

    async fn count(l: &Ledger, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&l.pool)
            .await
            .unwrap()
    }

    /// Raw rows past retention go, rollups stay and still answer for
    /// their hours; rollups past theirs go too.
    async fn retention_removes_old_rows(l: &Ledger) {
        let keys = Arc::new(NodeKeys::default());
        // Ten days, a report every six hours, two nodes.
        for node in ["n1", "n2"] {
            for seq in 1..=40u64 {
                let mut r = report(node, seq);
                r.interval_end_ms = (D + seq as i64 * 6 * HOUR_MS - 1) as u64;
                r.interval_start_ms = r.interval_end_ms - 60_000;
                l.ingest(&r, &r.digest(), 1, &keys).await.unwrap();
            }
        }
        let now = D + 11 * DAY;
        let before = l.gpu_groups_by_tenant(D, D + 11 * DAY, None).await.unwrap();
        let by_node = l.gpu_groups(D, D + 11 * DAY, None).await.unwrap();
        let hourly = count(l, "gpu_usage_hourly").await;
        let m = l.maintain(now, D + 5 * DAY, None).await.unwrap();
        // Reports of days 0–4 (20 per node), a GPU and an I/O row each.
        assert_eq!(m.raw_rows, 2 * 20 * 2, "{m:?}");
        assert_eq!(m.rollup_rows, 0);
        assert!(m.folded_hours > 0);
        let oldest: i64 = sqlx::query_scalar("SELECT MIN(interval_end_ms) FROM gpu_usage")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert!(oldest >= D + 5 * DAY, "{oldest}");
        assert_eq!(count(l, "gpu_usage_hourly").await, hourly);
        // Whole hours are still answered, from the rollups.
        assert_eq!(
            l.gpu_groups_by_tenant(D, D + 11 * DAY, None).await.unwrap(),
            before
        );
        assert_eq!(l.gpu_groups(D, D + 11 * DAY, None).await.unwrap(), by_node);
        // Again: nothing left to remove.
        let m = l.maintain(now, D + 5 * DAY, None).await.unwrap();
        assert_eq!((m.raw_rows, m.rollup_rows), (0, 0));
        // Rollups older than day 3 go, from both kinds of rollup.
        let m = l
            .maintain(now, D + 5 * DAY, Some(D + 3 * DAY))
            .await
            .unwrap();
        // 12 hours with reports before day 3: GPU and I/O rows per node
        // (two) and node-less; and days 0–2 per node, GPU and I/O.
        assert_eq!(m.rollup_rows, 12 * 2 * 2 + 12 * 2 + 3 * 2 * 2, "{m:?}");
        for (table, column) in [
            ("gpu_usage_hourly", "hour_ms"),
            ("gpu_usage_hourly_tenant", "hour_ms"),
            ("io_usage_hourly_tenant", "hour_ms"),
            ("gpu_usage_daily", "day_ms"),
            ("io_usage_daily", "day_ms"),
        ] {
            let oldest: i64 = sqlx::query_scalar(&format!("SELECT MIN({column}) FROM {table}"))
                .fetch_one(&l.pool)
                .await
                .unwrap();
            assert!(oldest >= D + 3 * DAY, "{table}: {oldest}");
        }
    }

    #[tokio::test]
    async fn retention_removes_old_rows_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        retention_removes_old_rows(&ledger).await;
    }

    #[tokio::test]
    async fn retention_removes_old_rows_on_postgres() {
        let Some(ledger) = postgres_ledger("retention").await else {
            return;
        };
        retention_removes_old_rows(&ledger).await;
    }
}
