//! Retention: raw usage rows are removed once older than `[ledger]
//! raw_retention`, rollups once older than `rollup_retention` and audit
//! records once older than `audit_retention` (each if set), in small
//! batches so that ingest never waits for more than one. On
//! PostgreSQL raw rows go a whole day at a time, by dropping the day's
//! partition once all of it is past retention ([`super::partitions`]).
//!
//! Report claims (`reports`) follow the raw rows, so that the ledger's
//! size is bounded: what each (node, boot) lost is kept in
//! `claims_removed`, one row per boot, and ingest refuses a report at or
//! below it ([`super::ingest`]), so that none is stored twice. A claim
//! stays while an audit record refers to it, or while its report is not
//! yet folded into the node-less rollups (the fold finds its hours by the
//! claims received since its watermark).

use std::collections::BTreeMap;

use super::{
    Backend, Ledger, LedgerError,
    fold::{GPU_NODE_KEY, IO_NODE_KEY, WATERMARK},
};
use crate::time::{day_of, month_of};

/// Rows removed per statement (each its own transaction): on SQLite the
/// writer waits for at most one such batch.
const BATCH: i64 = 5_000;

/// What a maintenance pass removes: rows from before these times (ms).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cutoffs {
    /// Raw usage rows and report claims, by interval end (`raw_retention`).
    pub raw: i64,
    /// Rollup rows, by hour (`rollup_retention`); `None`: kept.
    pub rollup: Option<i64>,
    /// Audit records, by their time (`audit_retention`); `None`: kept.
    pub audit: Option<i64>,
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Maintained {
    /// Hours re-folded into the node-less rollups.
    pub folded_hours: usize,
    /// Raw usage rows removed.
    pub raw_rows: u64,
    /// Report claims removed.
    pub claims: u64,
    /// Rollup rows removed.
    pub rollup_rows: u64,
    /// Audit records removed.
    pub audit_records: u64,
}

impl Ledger {
    /// One maintenance pass at `now_ms`: folds the node-less rollups, then
    /// removes what is older than `cutoffs`. Audit records go before the
    /// claims, so a claim kept for its audit record goes in the same pass.
    pub(crate) async fn maintain(
        &self,
        now_ms: i64,
        cutoffs: Cutoffs,
    ) -> Result<Maintained, LedgerError> {
        self.maintain_claims_by(now_ms, cutoffs, BATCH).await
    }

    /// [`Self::maintain`], removing report claims `claims_batch` at a
    /// time (tests use batches of a few).
    async fn maintain_claims_by(
        &self,
        now_ms: i64,
        cutoffs: Cutoffs,
        claims_batch: i64,
    ) -> Result<Maintained, LedgerError> {
        let folded_hours = self.fold(now_ms).await?;
        let mut raw_rows = 0;
        match self.backend() {
            // Whole days at once ([`super::partitions`]).
            Backend::Postgres => {
                self.create_partitions(now_ms).await?;
                raw_rows = self.drop_partitions(cutoffs.raw).await?;
            }
            Backend::Sqlite => {
                for table in ["gpu_usage", "io_usage"] {
                    raw_rows += self
                        .delete_before(table, "interval_end_ms", cutoffs.raw)
                        .await?;
                }
            }
        }
        let audit_records = match cutoffs.audit {
            Some(before) => self.delete_before("audit", "time_ms", before).await?,
            None => 0,
        };
        let claims = self.remove_claims(cutoffs.raw, claims_batch).await?;
        let mut rollup_rows = 0;
        if let Some(before) = cutoffs.rollup {
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
            claims,
            rollup_rows,
            audit_records,
        })
    }

    /// Removes the claims of reports whose interval ended before `before`,
    /// `batch` per transaction, adding each batch to `claims_removed` in
    /// the same transaction. Not those an audit record refers to, nor
    /// those received since the fold's watermark.
    ///
    /// The claims kept for those reasons pile up at the old end (an audit
    /// store kept forever keeps its claims forever), so a batch is found
    /// by a read, from where the batch before it ended, and only then
    /// deleted by id: each kept claim is looked at once per pass, not once
    /// per batch, and on SQLite not while holding the write lock the
    /// ledger writer waits for. The delete checks each claim again.
    async fn remove_claims(&self, before: i64, batch: i64) -> Result<u64, LedgerError> {
        const REMOVABLE: &str = "r.received_ms < (SELECT received_ms FROM rollup_watermark \
             WHERE name = $1) AND NOT EXISTS (SELECT 1 FROM audit a WHERE a.report_id = r.id)";
        let mut total = 0;
        // (interval_end_ms, id) of the last claim of the batch before.
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let found: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT r.interval_end_ms, r.id FROM reports r \
                 WHERE r.interval_end_ms < $2 AND r.interval_end_ms >= $3 \
                 AND (r.interval_end_ms > $3 OR r.id > $4) AND {REMOVABLE} \
                 ORDER BY r.interval_end_ms, r.id LIMIT $5"
            ))
            .bind(WATERMARK)
            .bind(before)
            .bind(after.0)
            .bind(after.1)
            .bind(batch)
            .fetch_all(&self.pool)
            .await?;
            let Some(&last) = found.last() else {
                return Ok(total);
            };
            after = last;
            // Integers only: the list is written into the statement (sqlx's
            // `Any` binds no arrays), which is not kept prepared.
            let ids = found
                .iter()
                .map(|(_, id)| id.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let mut tx = self.pool.begin().await?;
            let gone: Vec<(String, String, i64, i64)> = sqlx::query_as(&format!(
                "DELETE FROM reports WHERE id IN (SELECT r.id FROM reports r \
                 WHERE r.id IN ({ids}) AND {REMOVABLE}) \
                 RETURNING node, boot_id, seq, interval_end_ms"
            ))
            .persistent(false)
            .bind(WATERMARK)
            .fetch_all(&mut *tx)
            .await?;
            let mut removed: BTreeMap<(&str, &str), Removed> = BTreeMap::new();
            for (node, boot, seq, end) in &gone {
                removed
                    .entry((node, boot))
                    .and_modify(|r| r.add(*seq, *end))
                    .or_insert(Removed {
                        claims: 1,
                        first_seq: *seq,
                        last_seq: *seq,
                        last_end_ms: *end,
                    });
            }
            for ((node, boot), r) in removed {
                sqlx::query(add_to_boot_row!("claims_removed"))
                    .bind(node)
                    .bind(boot)
                    .bind(r.claims)
                    .bind(r.first_seq)
                    .bind(r.last_seq)
                    .bind(r.last_end_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            total += gone.len() as u64;
            if found.len() < batch as usize {
                return Ok(total);
            }
        }
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
        let key = match (self.backend(), table) {
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

/// What one batch removed of one (node, boot)'s claims: a row of
/// `claims_removed`, added to the stored one.
struct Removed {
    claims: i64,
    first_seq: i64,
    last_seq: i64,
    last_end_ms: i64,
}

impl Removed {
    fn add(&mut self, seq: i64, end_ms: i64) {
        self.claims += 1;
        self.first_seq = self.first_seq.min(seq);
        self.last_seq = self.last_seq.max(seq);
        self.last_end_ms = self.last_end_ms.max(end_ms);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use tally_contract::wire::{AuditRecord, GENESIS_SHA256};

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            audit::AuditQuery,
            chargeback::tests::{postgres_database, postgres_ledger, sqlite_ledger},
            ingest::{HOUR_MS, Ingested, tests::report},
        },
    };

    const DAY: i64 = 24 * HOUR_MS;
    /// Midnight of a day, in ms.
    const D: i64 = 1_800_000_000_000 / DAY * DAY;

    /// Raw rows and claims before `before`; rollups and audit kept.
    pub(crate) fn raw(before: i64) -> Cutoffs {
        Cutoffs {
            raw: before,
            ..Cutoffs::default()
        }
    }

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
        let m = l.maintain(now, raw(D + 5 * DAY)).await.unwrap();
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
        let m = l.maintain(now, raw(D + 5 * DAY)).await.unwrap();
        assert_eq!((m.raw_rows, m.rollup_rows), (0, 0));
        // Rollups older than day 3 go, from both kinds of rollup.
        let m = l
            .maintain(
                now,
                Cutoffs {
                    rollup: Some(D + 3 * DAY),
                    ..raw(D + 5 * DAY)
                },
            )
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

    /// Claims past raw retention go, counted per (node, boot) in
    /// `claims_removed`: the reports' summary does not change, a removed
    /// report sent again is refused (nothing counted twice), a newer one
    /// of the same boot is stored. A claim an audit record refers to, or
    /// one received since the fold's watermark, stays.
    async fn retention_removes_old_claims(l: &Ledger) {
        let keys = Arc::new(NodeKeys::default());
        let now = D + 11 * DAY;
        // A report every six hours from D; n1's seq 2 carries an audit
        // record.
        let old = |node: &str, seq: u64| {
            let mut r = report(node, seq);
            r.interval_end_ms = (D + seq as i64 * 6 * HOUR_MS - 1) as u64;
            r.interval_start_ms = r.interval_end_ms - 60_000;
            if (node, seq) == ("n1", 2) {
                r.audit = vec![AuditRecord {
                    time_ms: Some(5),
                    tenant: Some("acme".into()),
                    action: Some("alert".into()),
                    prev_sha256: GENESIS_SHA256.into(),
                    sha256: "a".repeat(64),
                    rest: Default::default(),
                }];
            }
            r
        };
        for node in ["n1", "n2"] {
            for seq in 1..=40u64 {
                let r = old(node, seq);
                // n2's seq 3 arrives late: after the fold's watermark.
                let received = if (node, seq) == ("n2", 3) { now } else { 1 };
                let out = l.ingest(&r, &r.digest(), received, &keys).await.unwrap();
                assert!(matches!(out, Ingested::Stored { .. }), "{out:?}");
            }
        }
        let summary = l.report_summary().await.unwrap();
        let by_tenant = l.gpu_groups_by_tenant(D, now, None).await.unwrap();
        // Three at a time: the kept claims (n1's 2, n2's 3) fall inside
        // batches, which each start where the one before ended.
        let m = l
            .maintain_claims_by(now, raw(D + 5 * DAY), 3)
            .await
            .unwrap();
        // Days 0–4: 20 reports per node, less n1's audited one and n2's
        // late one.
        assert_eq!(m.claims, 2 * 20 - 2, "{m:?}");
        assert_eq!(count(l, "reports").await, 2 * 40 - 38);
        let removed: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT node, reports, first_seq, last_seq, last_interval_end_ms \
             FROM claims_removed ORDER BY node",
        )
        .fetch_all(&l.pool)
        .await
        .unwrap();
        let end = |seq: i64| D + seq * 6 * HOUR_MS - 1;
        assert_eq!(
            removed,
            [
                ("n1".into(), 19, 1, 20, end(20)),
                ("n2".into(), 19, 1, 20, end(20))
            ]
        );
        assert_eq!(l.report_summary().await.unwrap(), summary);
        // A removed report again: refused, nothing written (its claim and
        // its node's row, written before it is known, rolled back).
        let node_reports = || async {
            sqlx::query_scalar::<_, i64>("SELECT reports FROM nodes WHERE node = 'n1'")
                .fetch_one(&l.pool)
                .await
                .unwrap()
        };
        let before = node_reports().await;
        let r = old("n1", 7);
        assert_eq!(
            l.ingest(&r, &r.digest(), now, &keys).await.unwrap(),
            Ingested::Expired
        );
        assert_eq!(count(l, "reports").await, 42);
        assert_eq!(node_reports().await, before);
        // Kept claims still answer as before.
        for (node, seq) in [("n1", 2), ("n2", 3), ("n1", 21)] {
            let r = old(node, seq);
            assert_eq!(
                l.ingest(&r, &r.digest(), now, &keys).await.unwrap(),
                Ingested::Duplicate,
                "{node} {seq}"
            );
        }
        assert_eq!(
            l.gpu_groups_by_tenant(D, now, None).await.unwrap(),
            by_tenant
        );
        // The boot's next report is stored, however old its interval.
        let r = old("n1", 41);
        assert!(matches!(
            l.ingest(&r, &r.digest(), now, &keys).await.unwrap(),
            Ingested::Stored { .. }
        ));
        // Again: nothing left to remove; the counts add up.
        let m = l.maintain(now, raw(D + 5 * DAY)).await.unwrap();
        assert_eq!(m.claims, 0);
        let s = l.report_summary().await.unwrap();
        assert_eq!(
            s.iter()
                .map(|s| (s.node.as_str(), s.reports, s.first_seq, s.last_seq))
                .collect::<Vec<_>>(),
            [("n1", 41, 1, 41), ("n2", 40, 1, 40)]
        );

        // Audit records under `audit_retention`: n1's old record goes, and
        // the claim it kept goes with it in the same pass; a record of
        // today stays as it was stored.
        let mut r = old("n1", 42);
        r.audit = vec![AuditRecord {
            time_ms: Some(now as u64),
            tenant: Some("acme".into()),
            action: Some("alert".into()),
            prev_sha256: "a".repeat(64),
            sha256: "b".repeat(64),
            rest: Default::default(),
        }];
        l.ingest(&r, &r.digest(), now, &keys).await.unwrap();
        let every = AuditQuery {
            to_ms: i64::MAX,
            limit: 10,
            ..AuditQuery::default()
        };
        let records = l.audit(&every).await.unwrap();
        assert_eq!(records.len(), 2, "{records:?}");
        let audit_cut = Cutoffs {
            audit: Some(now - DAY),
            ..raw(D + 5 * DAY)
        };
        let m = l.maintain(now, audit_cut).await.unwrap();
        assert_eq!((m.audit_records, m.claims), (1, 1), "{m:?}");
        assert_eq!(l.audit(&every).await.unwrap(), records[1..]);
        let r = old("n1", 2);
        assert_eq!(
            l.ingest(&r, &r.digest(), now, &keys).await.unwrap(),
            Ingested::Expired
        );
        let m = l.maintain(now, audit_cut).await.unwrap();
        assert_eq!((m.audit_records, m.claims), (0, 0), "{m:?}");
        assert_eq!(
            l.report_summary().await.unwrap()[0].reports,
            42,
            "n1's claims, kept and removed"
        );
    }

    #[tokio::test]
    async fn retention_removes_old_claims_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        retention_removes_old_claims(&ledger).await;
        // Nothing refers to a claim but audit records (migration 0014).
        assert_eq!(tables_referring_to_reports(&ledger).await, ["audit"]);
    }

    /// Every raw row of SQLite's two raw tables, rowid and all, as JSON:
    /// one text per table.
    const RAW_ROWS: &str = "SELECT (SELECT json_group_array(json_array(rowid, report_id, node, \
         interval_end_ms, tenant, gpu, uuid, model, mig_profile, slice_fraction, allocated_us, \
         sm_us, memory_byte_seconds, energy_mj, cluster, workload, idle_us)) FROM gpu_usage) \
         UNION ALL SELECT (SELECT json_group_array(json_array(rowid, report_id, node, \
         interval_end_ms, tenant, network_ingress_bytes, network_egress_bytes, \
         network_ingress_packets, network_egress_packets, network_dropped_packets, \
         pcie_h2d_bytes, pcie_d2h_bytes, cluster)) FROM io_usage)";

    /// The tables with a foreign key to `reports`.
    pub(crate) async fn tables_referring_to_reports(l: &Ledger) -> Vec<String> {
        let sql = match l.backend() {
            Backend::Sqlite => {
                "SELECT DISTINCT m.name FROM sqlite_master m, pragma_foreign_key_list(m.name) f \
                 WHERE m.type = 'table' AND f.\"table\" = 'reports' ORDER BY m.name"
            }
            Backend::Postgres => {
                "SELECT DISTINCT CAST(conrelid::regclass AS TEXT) AS t FROM pg_constraint \
                 WHERE contype = 'f' AND confrelid = 'reports'::regclass ORDER BY t"
            }
        };
        sqlx::query_scalar(sql).fetch_all(&l.pool).await.unwrap()
    }

    /// Migration 0014 on SQLite rebuilds the raw tables without their
    /// key to `reports`: their rows, rowids and indexes as they were.
    #[tokio::test]
    async fn migration_0014_keeps_the_raw_rows_it_rebuilds_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
        let before = {
            let pool = crate::ledger::ingest::tests::migrated_before(&url, "sqlite", "0014").await;
            sqlx::query(
                "INSERT INTO reports (id, node, boot_id, seq, interval_start_ms, interval_end_ms, \
                 received_ms, digest) VALUES (7, 'n1', 'boot', 1, 0, 60000, 1, 'd')",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO gpu_usage (rowid, report_id, node, interval_end_ms, tenant, gpu, uuid, \
                 model, mig_profile, slice_fraction, allocated_us, sm_us, memory_byte_seconds, \
                 energy_mj, cluster, workload, idle_us) \
                 VALUES (40, 7, 'n1', 60000, 'acme', '0', 'GPU-0', 'H100', '1g.10gb', 0.25, 9, 8, \
                 7, 6, 'prod', 'job', 5)",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO io_usage (rowid, report_id, node, interval_end_ms, tenant, \
                 network_ingress_bytes, network_egress_bytes, network_ingress_packets, \
                 network_egress_packets, network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes, \
                 cluster) VALUES (41, 7, 'n1', 60000, 'acme', 1, 2, 3, 4, 5, 6, 7, 'prod')",
            )
            .execute(&pool)
            .await
            .unwrap();
            let rows: Vec<String> = sqlx::query_scalar(RAW_ROWS).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows
        };
        let l = Ledger::open(&url, 2).await.unwrap();
        let after: Vec<String> = sqlx::query_scalar(RAW_ROWS)
            .fetch_all(&l.pool)
            .await
            .unwrap();
        assert_eq!(after, before);
        assert!(after[0].contains("[40,7,"), "{after:?}");
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' \
             AND tbl_name IN ('gpu_usage', 'io_usage') ORDER BY name",
        )
        .fetch_all(&l.pool)
        .await
        .unwrap();
        // `gpu_usage_node` went with migration 0015.
        assert_eq!(indexes, ["gpu_usage_end", "io_usage_end"]);
        // Its claim can go while its raw rows are still there.
        sqlx::query("DELETE FROM reports WHERE id = 7")
            .execute(&l.pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn retention_removes_old_claims_on_postgres() {
        let Some(ledger) = postgres_ledger("claims").await else {
            return;
        };
        retention_removes_old_claims(&ledger).await;
        assert_eq!(tables_referring_to_reports(&ledger).await, ["audit"]);
    }

    /// A report sent again while a retention pass removes its claim on
    /// PostgreSQL: its claim waits for the pass, then ingest sees the
    /// pass's `claims_removed` and refuses it, rather than storing it a
    /// second time.
    #[tokio::test]
    async fn a_claim_removed_meanwhile_is_not_stored_twice_on_postgres() {
        use sqlx::Connection;
        let Some(url) = postgres_database("claimrace").await else {
            return;
        };
        let l = Ledger::open(&url, 4).await.unwrap();
        let keys = Arc::new(NodeKeys::default());
        let r = report("n1", 1);
        l.ingest(&r, &r.digest(), 1, &keys).await.unwrap();
        // The pass's transaction, held open after its writes.
        let mut pass = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut tx = pass.begin().await.unwrap();
        sqlx::query("DELETE FROM reports WHERE node = 'n1'")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO claims_removed (node, boot_id, reports, first_seq, last_seq, \
             last_interval_end_ms) VALUES ('n1', 'boot', 1, 1, 1, 0)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        let again = {
            let (l, keys, r) = (l.clone(), keys.clone(), r.clone());
            tokio::spawn(async move { l.ingest(&r, &r.digest(), 2, &keys).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!again.is_finished(), "the claim did not wait for the pass");
        tx.commit().await.unwrap();
        assert_eq!(again.await.unwrap().unwrap(), Ingested::Expired);
        assert_eq!(count(&l, "reports").await, 0);
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
