//! PostgreSQL's day partitions of the raw usage tables (migration 0010):
//! one per UTC day of `interval_end_ms`, created a few days ahead so an
//! insert never waits for one, and dropped whole once the day is past raw
//! retention. Rows no day partition takes (an agent's clock far off) wait
//! in `<table>_default` and move into their day's partition when it is
//! created; the rows from before the migration stay in `<table>_legacy`.
//! Those two are trimmed row by row, as SQLite's tables are.

use sqlx::{Acquire, AnyConnection};

use super::{Ledger, LedgerError};
use crate::time::DAY_MS;

/// The partitioned raw tables.
const TABLES: [&str; 2] = ["gpu_usage", "io_usage"];

/// Days past today that already have their partition.
const AHEAD_DAYS: i64 = 3;

/// Advisory lock key: replicas take turns creating and dropping.
const PARTITION_LOCK: i64 = 0x7a11_da75;

/// Longest wait for a table lock: attaching or dropping a partition waits
/// for running queries on the table, and inserts queue behind it; better
/// to give up and try again next pass.
const LOCK_TIMEOUT: &str = "2s";

/// One partition and its range `[from, to)` (`None`: the default).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    name: String,
    range: Option<(i64, i64)>,
}

/// Reads a bound as `pg_get_expr` writes it: `('123')`, `(MINVALUE)`.
fn bound(s: &str) -> Option<i64> {
    let v = s
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    match v {
        "MINVALUE" => Some(i64::MIN),
        "MAXVALUE" => Some(i64::MAX),
        _ => v.trim_matches('\'').parse().ok(),
    }
}

/// The range of `FOR VALUES FROM (…) TO (…)`; `None` for `DEFAULT`.
fn range(expr: &str) -> Option<(i64, i64)> {
    let rest = expr.strip_prefix("FOR VALUES FROM ")?;
    let (from, to) = rest.split_once(" TO ")?;
    Some((bound(from)?, bound(to)?))
}

/// `gpu_usage_d20261201` for the day starting at `day_ms`.
fn day_name(table: &str, day_ms: i64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(day_ms / 1000)
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN);
    format!(
        "{table}_d{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

async fn partitions(conn: &mut AnyConnection, table: &str) -> Result<Vec<Partition>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(c.relname AS TEXT), pg_get_expr(c.relpartbound, c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = CAST($1 AS regclass) ORDER BY 1",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, expr)| Partition {
            range: range(&expr),
            name,
        })
        .collect())
}

/// Takes the partition lock and bounds lock waits, for this transaction.
async fn lock(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) l")
        .bind(PARTITION_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Ledger {
    /// Creates the day partitions from yesterday to [`AHEAD_DAYS`] after
    /// `now_ms` that no partition covers yet, each with the rows the
    /// default partition held for its day. Returns how many it created.
    pub(super) async fn create_partitions(&self, now_ms: i64) -> Result<usize, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        let mut created = 0;
        let today = now_ms.div_euclid(DAY_MS);
        for table in TABLES {
            let parts = partitions(&mut tx, table).await?;
            for day in today - 1..=today + AHEAD_DAYS {
                let (from, to) = (day * DAY_MS, (day + 1) * DAY_MS);
                let covered = parts
                    .iter()
                    .filter_map(|p| p.range)
                    .any(|(a, b)| a < to && from < b);
                if covered {
                    continue;
                }
                let name = day_name(table, from);
                // Filled before it is attached: attaching checks the
                // default holds nothing of its day any more.
                for sql in [
                    format!(
                        "CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    ),
                    format!(
                        "WITH moved AS (DELETE FROM {table}_default WHERE interval_end_ms >= {from} \
                         AND interval_end_ms < {to} RETURNING *) INSERT INTO {name} SELECT * FROM moved"
                    ),
                    format!(
                        "ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to})"
                    ),
                ] {
                    sqlx::query(&sql).execute(&mut *tx).await?;
                }
                created += 1;
            }
        }
        tx.commit().await?;
        Ok(created)
    }

    /// Drops the partitions whose whole range ended before `before_ms`
    /// and trims the legacy and default partitions row by row. Returns
    /// the rows removed.
    pub(super) async fn drop_partitions(&self, before_ms: i64) -> Result<u64, LedgerError> {
        let mut removed = 0;
        for table in TABLES {
            let parts = partitions(&mut *self.pool.acquire().await?, table).await?;
            for p in parts {
                match p.range {
                    Some((_, to)) if to <= before_ms => {
                        let mut conn = self.pool.acquire().await?;
                        let mut tx = conn.begin().await?;
                        lock(&mut tx).await?;
                        let rows: i64 =
                            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", p.name))
                                .fetch_one(&mut *tx)
                                .await?;
                        sqlx::query(&format!("DROP TABLE {}", p.name))
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        removed += u64::try_from(rows).unwrap_or(0);
                    }
                    // A day partition is kept whole until its day is past.
                    Some(_) if p.name != format!("{table}_legacy") => {}
                    _ => {
                        removed += self
                            .delete_before(&p.name, "interval_end_ms", before_ms)
                            .await?;
                    }
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            chargeback::tests::{postgres_database, postgres_ledger},
            ingest::tests::{migrated_before, report},
            retention::tests::raw,
        },
    };

    /// Midnight of a day after the test ledgers' migration, in ms.
    const D: i64 = 1_800_000_000_000 / DAY_MS * DAY_MS;

    async fn count(l: &Ledger, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&l.pool)
            .await
            .unwrap()
    }

    async fn names(l: &Ledger, table: &str) -> Vec<String> {
        let mut conn = l.pool.acquire().await.unwrap();
        partitions(&mut conn, table)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// A report of node `n1` whose interval ends at `end_ms`: a GPU row
    /// and an I/O row.
    async fn put(l: &Ledger, seq: u64, end_ms: i64) {
        let mut r = report("n1", seq);
        r.interval_end_ms = end_ms as u64;
        r.interval_start_ms = r.interval_end_ms - 60_000;
        l.ingest(&r, &r.digest(), 1, &Arc::new(NodeKeys::default()))
            .await
            .unwrap();
    }

    /// Rows land in their day's partition, or the default one until the
    /// day has a partition; a day's partition goes whole once the day is
    /// past retention, not before.
    #[tokio::test]
    async fn days_are_partitions_dropped_whole_on_postgres() {
        let Some(l) = postgres_ledger("partitions").await else {
            return;
        };
        // Ten days, a report every six hours, each day's partition made
        // as the maintenance pass would.
        let mut seq = 0;
        for day in 0..10 {
            assert!(l.create_partitions(D + day * DAY_MS).await.unwrap() <= 2 * 5);
            for quarter in 0..4 {
                seq += 1;
                put(&l, seq, D + day * DAY_MS + quarter * 6 * 3_600_000 + 1).await;
            }
        }
        // A clock far ahead: no partition yet.
        put(&l, 1_000, D + 400 * DAY_MS).await;
        assert_eq!(count(&l, "gpu_usage_default").await, 1);
        assert_eq!(count(&l, &day_name("gpu_usage", D + DAY_MS)).await, 4);
        assert_eq!(count(&l, "gpu_usage").await, 41);

        // Retention ends six hours into day 5: days 0–4 go whole, day 5
        // stays whole (its first report is older than the cut).
        let cut = D + 5 * DAY_MS + 6 * 3_600_000;
        let m = l.maintain(D + 11 * DAY_MS, raw(cut)).await.unwrap();
        assert_eq!(m.raw_rows, 2 * 5 * 4, "{m:?}");
        assert_eq!(count(&l, "gpu_usage").await, 41 - 20);
        let oldest: i64 = sqlx::query_scalar("SELECT MIN(interval_end_ms) FROM io_usage")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert_eq!(oldest, D + 5 * DAY_MS + 1);
        let gpu = names(&l, "gpu_usage").await;
        assert!(
            !gpu.contains(&day_name("gpu_usage", D + 4 * DAY_MS)),
            "{gpu:?}"
        );
        assert!(
            gpu.contains(&day_name("gpu_usage", D + 5 * DAY_MS)),
            "{gpu:?}"
        );
        // Nothing more to remove.
        assert_eq!(
            l.maintain(D + 11 * DAY_MS, raw(cut))
                .await
                .unwrap()
                .raw_rows,
            0
        );

        // The far day's partition takes its row out of the default.
        l.create_partitions(D + 400 * DAY_MS).await.unwrap();
        assert_eq!(count(&l, "gpu_usage_default").await, 0);
        assert_eq!(count(&l, &day_name("gpu_usage", D + 400 * DAY_MS)).await, 1);
        assert_eq!(count(&l, &day_name("io_usage", D + 400 * DAY_MS)).await, 1);
        // Every row is still read through the parent.
        assert_eq!(count(&l, "gpu_usage").await, 21);
    }

    /// Migration 0010 on a ledger with rows keeps every one: those up to
    /// today in the legacy partition, one from a clock far ahead in the
    /// default.
    #[tokio::test]
    async fn migration_0010_keeps_the_rows_it_partitions_on_postgres() {
        let Some(url) = postgres_database("migration0010").await else {
            return;
        };
        {
            // Rows as an aggregator before 0010 wrote them (by hand: this
            // aggregator's ingest reads tables of later migrations).
            let pool = migrated_before(&url, "postgres", "0010").await;
            for (seq, end) in [(1, 1_000_000), (2, D + 400 * DAY_MS)] {
                sqlx::query(
                    "WITH r AS (INSERT INTO reports (node, boot_id, seq, interval_start_ms, \
                     interval_end_ms, received_ms, digest) VALUES ('n1', 'boot', $1, $2 - 60000, \
                     $2, 1, 'd') RETURNING id), \
                     g AS (INSERT INTO gpu_usage (report_id, node, interval_end_ms, tenant, gpu, \
                     uuid, model, slice_fraction, allocated_us, memory_byte_seconds, energy_mj) \
                     SELECT id, 'n1', $2, 'acme', '0', 'GPU-0', 'H100', 1.0, 1, 1, 1 FROM r) \
                     INSERT INTO io_usage (report_id, node, interval_end_ms, tenant, \
                     network_ingress_bytes, network_egress_bytes, network_ingress_packets, \
                     network_egress_packets, network_dropped_packets, pcie_h2d_bytes, \
                     pcie_d2h_bytes) SELECT id, 'n1', $2, 'acme', 1, 0, 0, 0, 0, 0, 0 FROM r",
                )
                .bind(seq)
                .bind(end)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let l = Ledger::open(&url, 4).await.unwrap();
        assert_eq!(count(&l, "gpu_usage").await, 2);
        assert_eq!(count(&l, "io_usage").await, 2);
        assert_eq!(count(&l, "gpu_usage_legacy").await, 1);
        assert_eq!(count(&l, "io_usage_default").await, 1);
        // The legacy partition ends at tomorrow; opening made the day
        // partitions from there.
        let tomorrow = (crate::time::now_ms().div_euclid(DAY_MS) + 1) * DAY_MS;
        assert!(
            names(&l, "gpu_usage")
                .await
                .contains(&day_name("gpu_usage", tomorrow))
        );
        // New rows are written and read through the parent.
        put(&l, 3, tomorrow + 1).await;
        assert_eq!(count(&l, &day_name("gpu_usage", tomorrow)).await, 1);
        assert_eq!(count(&l, "gpu_usage").await, 3);
        // Migration 0014 dropped every raw table's key to `reports`, the
        // legacy partitions' own ones (from 0001) too.
        assert_eq!(
            crate::ledger::retention::tests::tables_referring_to_reports(&l).await,
            ["audit"]
        );
    }

    #[test]
    fn bounds_are_read_as_postgres_writes_them() {
        assert_eq!(
            range("FOR VALUES FROM ('1796083200000') TO ('1796169600000')"),
            Some((1_796_083_200_000, 1_796_169_600_000))
        );
        assert_eq!(
            range("FOR VALUES FROM (MINVALUE) TO ('86400000')"),
            Some((i64::MIN, 86_400_000))
        );
        assert_eq!(range("DEFAULT"), None);
    }

    #[test]
    fn day_partitions_are_named_by_their_utc_date() {
        assert_eq!(
            day_name("gpu_usage", 1_796_083_200_000),
            "gpu_usage_d20261201"
        );
        assert_eq!(day_name("io_usage", 0), "io_usage_d19700101");
    }
}
