//! What `/metrics` and `GET /api/v1/reports` read: the cluster-lifetime
//! totals per tenant, nodes and stored reports (kept per node and boot by
//! ingest).
//!
//! The totals are not written by ingest (every report would update a row
//! per tenant). The fold keeps `tenant_folded_totals`: each re-fold of an
//! hour adds what it changed in the hour's node-less rollup rows, in the
//! transaction that changes them ([`add_refolded_hour`]). So the folded
//! totals are the sums of every node-less row ever folded, and a reader
//! adds, for each hour with reports received since the fold's watermark,
//! its per-node rows less its node-less ones: the hours the fold has not
//! caught up with. Every other hour's per-node rows are all folded, so the
//! sum is exact whenever it is read, in one statement (one snapshot), and
//! never waits for a fold.

use super::{Ledger, LedgerError};

/// The totals' sums, as named in `tenant_folded_totals` and the rollups.
const GPU_SUMS: [&str; 4] = ["allocated_us", "sm_us", "memory_byte_seconds", "energy_mj"];
const IO_SUMS: [&str; 4] = [
    "network_ingress_bytes",
    "network_egress_bytes",
    "pcie_h2d_bytes",
    "pcie_d2h_bytes",
];

/// Running totals of one tenant (for `/metrics`), as doubles: over a
/// cluster's lifetime they outgrow 64-bit integers.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub(crate) struct TenantTotals {
    pub tenant: String,
    pub allocated_us: f64,
    pub sm_us: f64,
    pub memory_byte_seconds: f64,
    pub energy_mj: f64,
    pub network_ingress_bytes: f64,
    pub network_egress_bytes: f64,
    pub pcie_h2d_bytes: f64,
    pub pcie_d2h_bytes: f64,
}

impl TenantTotals {
    fn add(&mut self, o: &Self) {
        self.allocated_us += o.allocated_us;
        self.sm_us += o.sm_us;
        self.memory_byte_seconds += o.memory_byte_seconds;
        self.energy_mj += o.energy_mj;
        self.network_ingress_bytes += o.network_ingress_bytes;
        self.network_egress_bytes += o.network_egress_bytes;
        self.pcie_h2d_bytes += o.pcie_h2d_bytes;
        self.pcie_d2h_bytes += o.pcie_d2h_bytes;
    }
}

/// The reports of one (node, boot).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub(crate) struct ReportSummary {
    pub node: String,
    pub boot_id: String,
    pub reports: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    #[sqlx(rename = "last_end")]
    pub last_interval_end_ms: i64,
}

/// A row of [`Ledger::totals`]' read: folded totals, or what the hours
/// not yet folded add to them. The two are added in Rust, one addition
/// per field in a set order, where SQL's `SUM` over both would add the
/// doubles in no set order: the same ledger reads the same totals.
#[derive(sqlx::FromRow)]
struct Part {
    unfolded: i64,
    #[sqlx(flatten)]
    totals: TenantTotals,
}

/// Per tenant, the rows of `gpu` and `io` (per-node rollups, or a fold's
/// staged node-less rows) at the hours `hours` selects, less the
/// node-less rows there: what those hours add to the folded totals.
/// Integers are summed as integers (exact) before they become doubles.
fn change(gpu: &str, io: &str, hours: &str) -> String {
    let io_named = IO_SUMS.map(|c| format!("0 AS {c}")).join(", ");
    let negated = |sums: [&str; 4]| sums.map(|c| format!("-{c}")).join(", ");
    let gpu_sums = GPU_SUMS.join(", ");
    let io_sums = IO_SUMS.join(", ");
    let summed = GPU_SUMS
        .iter()
        .chain(&IO_SUMS)
        .map(|c| format!("CAST(SUM({c}) AS DOUBLE PRECISION) AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    // The first branch names the columns; the I/O branches' byte-seconds
    // are a double, as the GPU branches' are.
    let io_zeros = "0, 0, CAST(0 AS DOUBLE PRECISION), 0";
    format!(
        "SELECT tenant, {summed} FROM (\
         SELECT tenant, {gpu_sums}, {io_named} FROM {gpu} WHERE hour_ms {hours} \
         UNION ALL SELECT tenant, {gpu_neg}, 0, 0, 0, 0 FROM gpu_usage_hourly_tenant \
         WHERE hour_ms {hours} \
         UNION ALL SELECT tenant, {io_zeros}, {io_sums} FROM {io} WHERE hour_ms {hours} \
         UNION ALL SELECT tenant, {io_zeros}, {io_neg} FROM io_usage_hourly_tenant \
         WHERE hour_ms {hours}) d WHERE true GROUP BY tenant",
        gpu_neg = negated(GPU_SUMS),
        io_neg = negated(IO_SUMS),
    )
}

/// The fold's statement (bound: the hour, `$1`), run before it replaces
/// the hour's node-less rows with the staged ones: the totals gain the
/// staged rows less the rows they replace.
pub(super) fn add_refolded_hour() -> String {
    let sums = GPU_SUMS.iter().chain(&IO_SUMS);
    let columns = sums.clone().copied().collect::<Vec<_>>().join(", ");
    let set = sums
        .map(|c| format!("{c} = tenant_folded_totals.{c} + excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO tenant_folded_totals (tenant, {columns}) {} \
         ON CONFLICT (tenant) DO UPDATE SET {set}",
        change("fold_gpu", "fold_io", "= $1")
    )
}

impl Ledger {
    /// Running totals of every tenant: the folded totals, plus what the
    /// hours with reports received since the fold's watermark add.
    pub(crate) async fn totals(&self) -> Result<Vec<TenantTotals>, LedgerError> {
        let columns = GPU_SUMS.iter().chain(&IO_SUMS).copied().collect::<Vec<_>>();
        let columns = columns.join(", ");
        let parts: Vec<Part> = sqlx::query_as(&format!(
            "WITH unfolded AS ({}) \
             SELECT CAST(0 AS BIGINT) AS unfolded, tenant, {columns} FROM tenant_folded_totals \
             UNION ALL SELECT CAST(1 AS BIGINT), c.* FROM ({}) c \
             ORDER BY tenant, unfolded",
            unfolded_hours!(),
            change(
                "gpu_usage_hourly",
                "io_usage_hourly",
                "IN (SELECT hour_ms FROM unfolded)"
            )
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut totals: Vec<TenantTotals> = Vec::new();
        for p in parts {
            match totals.last_mut() {
                Some(t) if p.unfolded == 1 && t.tenant == p.totals.tenant => t.add(&p.totals),
                _ => totals.push(p.totals),
            }
        }
        Ok(totals)
    }

    /// Last report time of every node: `(node, received_ms)`.
    pub(crate) async fn nodes(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        Ok(
            sqlx::query_as("SELECT node, last_received_ms FROM nodes ORDER BY node")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The stored reports, per (node, boot), counted by ingest as it
    /// stored them (claims that retention removed included).
    pub(crate) async fn report_summary(&self) -> Result<Vec<ReportSummary>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT node, boot_id, reports, first_seq, last_seq, \
             last_interval_end_ms AS last_end FROM boot_reports ORDER BY node, boot_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use tally_contract::wire::{GpuUsage, IoUsage, Report};

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            chargeback::tests::postgres_database,
            ingest::{
                HOUR_MS,
                tests::{migrated_before, report},
            },
            retention::Cutoffs,
        },
    };

    const MINUTE: i64 = 60_000;

    /// A report of `node` at `seq` ending in `hour`: two tenants' GPU rows
    /// (one without SM time) and I/O of a tenant with GPU time and of one
    /// without, all differing by seq.
    fn usage_report(node: &str, seq: u64, hour: u64) -> Report {
        let mut r = report(node, seq);
        r.interval_end_ms = hour * HOUR_MS as u64 + 600_000 + seq * 1_000;
        r.interval_start_ms = r.interval_end_ms - 10_000;
        let gpu = r.gpu_usage[0].clone();
        r.gpu_usage = ["acme", "beta"]
            .into_iter()
            .zip(1..)
            .map(|(tenant, k)| GpuUsage {
                tenant: tenant.into(),
                allocated_us: 1_000_000 * (seq + k),
                sm_us: (k == 1).then_some(400_000 * seq),
                memory_byte_seconds: (1 << 30) + seq * k,
                energy_mj: 7 * seq + k,
                ..gpu.clone()
            })
            .collect();
        r.io_usage = vec![
            IoUsage {
                tenant: "beta".into(),
                network_ingress_bytes: 100 * seq,
                network_egress_bytes: 3,
                pcie_h2d_bytes: seq,
                pcie_d2h_bytes: 5,
                ..Default::default()
            },
            IoUsage {
                tenant: "io-only".into(),
                network_egress_bytes: 9 * seq,
                ..Default::default()
            },
        ];
        r
    }

    /// The totals of `reports`, summed from the reports themselves.
    fn expected(reports: &[Report]) -> Vec<TenantTotals> {
        let mut by: BTreeMap<&str, TenantTotals> = BTreeMap::new();
        for r in reports {
            for u in &r.gpu_usage {
                let t = by.entry(&u.tenant).or_default();
                t.allocated_us += u.allocated_us as f64;
                t.sm_us += u.sm_us.unwrap_or(0) as f64;
                t.memory_byte_seconds += u.memory_byte_seconds as f64;
                t.energy_mj += u.energy_mj as f64;
            }
            for u in &r.io_usage {
                let t = by.entry(&u.tenant).or_default();
                t.network_ingress_bytes += u.network_ingress_bytes as f64;
                t.network_egress_bytes += u.network_egress_bytes as f64;
                t.pcie_h2d_bytes += u.pcie_h2d_bytes as f64;
                t.pcie_d2h_bytes += u.pcie_d2h_bytes as f64;
            }
        }
        by.into_iter()
            .map(|(tenant, t)| TenantTotals {
                tenant: tenant.into(),
                ..t
            })
            .collect()
    }

    /// `tenant_folded_totals` alone: what the fold has carried.
    async fn folded(l: &Ledger) -> Vec<TenantTotals> {
        sqlx::query_as(
            "SELECT tenant, allocated_us, sm_us, memory_byte_seconds, energy_mj, \
             network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes \
             FROM tenant_folded_totals ORDER BY tenant",
        )
        .fetch_all(&l.pool)
        .await
        .unwrap()
    }

    /// The totals equal the reports' sums before any fold, after one,
    /// with late reports in a folded hour and a new one not yet folded,
    /// after folding those, after folding again, and after rollup
    /// retention removed the hours; and the fold carries all of it.
    async fn totals_are_exact_before_and_after_each_fold(url: &str) {
        let l = Ledger::open(url, 2).await.unwrap();
        let keys = Arc::new(NodeKeys::default());
        let mut sent = Vec::new();
        let t0 = 100 * HOUR_MS;
        for (node, seq, hour, received) in [
            ("n1", 1, 10, t0),
            ("n2", 1, 10, t0),
            ("n1", 2, 11, t0),
            ("n2", 2, 11, t0),
        ] {
            let r = usage_report(node, seq, hour);
            l.ingest(&r, &r.digest(), received, &keys).await.unwrap();
            sent.push(r);
        }
        assert_eq!(l.totals().await.unwrap(), expected(&sent));
        assert_eq!(folded(&l).await, []);
        // The watermark passes every report: all of it is folded.
        l.fold(t0 + 11 * MINUTE).await.unwrap();
        assert_eq!(l.totals().await.unwrap(), expected(&sent));
        assert_eq!(folded(&l).await, expected(&sent));
        // Late: another report for hour 10 (folded) and one for hour 12.
        for (node, seq, hour) in [("n1", 3, 10), ("n3", 1, 12)] {
            let r = usage_report(node, seq, hour);
            l.ingest(&r, &r.digest(), t0 + 20 * MINUTE, &keys)
                .await
                .unwrap();
            sent.push(r);
        }
        assert_eq!(l.totals().await.unwrap(), expected(&sent));
        assert_ne!(folded(&l).await, expected(&sent));
        l.fold(t0 + 40 * MINUTE).await.unwrap();
        assert_eq!(l.totals().await.unwrap(), expected(&sent));
        assert_eq!(folded(&l).await, expected(&sent));
        // A fold that re-folds nothing, and rollup retention, change none.
        l.fold(t0 + 41 * MINUTE).await.unwrap();
        let cutoffs = Cutoffs {
            raw: 0,
            rollup: Some(12 * HOUR_MS),
            audit: None,
        };
        let m = l.maintain(t0 + 42 * MINUTE, cutoffs).await.unwrap();
        assert!(m.rollup_rows > 0, "{m:?}");
        assert_eq!(l.totals().await.unwrap(), expected(&sent));
        assert_eq!(folded(&l).await, expected(&sent));
    }

    #[tokio::test]
    async fn totals_are_exact_before_and_after_each_fold_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        totals_are_exact_before_and_after_each_fold(&url).await;
    }

    #[tokio::test]
    async fn totals_are_exact_before_and_after_each_fold_on_postgres() {
        let Some(url) = postgres_database("foldedtotals").await else {
            return;
        };
        totals_are_exact_before_and_after_each_fold(&url).await;
    }

    /// Migration 0017 on a ledger whose totals were kept by ingest, with
    /// an hour folded and one partly folded: the totals read the same
    /// before and after it, and after the fold catches up.
    async fn migration_0017_keeps_the_totals(url: &str, dialect: &str) {
        let statements = [
            // Counted before migration 0005, and by node since.
            "INSERT INTO tenant_totals VALUES ('acme', 1, 2, 3, 4, 5, 6, 7, 8)",
            "INSERT INTO tenant_node_totals VALUES ('acme', 'n1', 10, 20, 30, 40, 50, 60, 70, 80), \
             ('beta', 'n1', 100, 200, 300, 400, 500, 600, 700, 800)",
            // Hour 1 is folded; hour 2 has a report received since the
            // watermark, and node-less rows of an earlier fold.
            "INSERT INTO reports (node, boot_id, seq, interval_start_ms, interval_end_ms, \
             received_ms, digest) VALUES ('n1', 'b', 1, 0, 3600500, 1000, 'd'), \
             ('n1', 'b', 2, 0, 7200500, 5000, 'd')",
            "UPDATE rollup_watermark SET received_ms = 4000 WHERE name = 'tenant_hourly'",
            "INSERT INTO gpu_usage_hourly (hour_ms, tenant, node, model, slice_fraction, \
             allocated_us, used_us, energy_mj, memory_byte_seconds, cluster, workload, idle_us) \
             VALUES (3600000, 'acme', 'n1', 'H100', 1.0, 5, 5, 3, 2.0, 'default', '', 0), \
             (7200000, 'acme', 'n1', 'H100', 1.0, 7, 7, 4, 1.0, 'default', '', 0), \
             (7200000, 'beta', 'n1', 'H100', 1.0, 9, 9, 9, 9.0, 'default', '', 0)",
            "INSERT INTO gpu_usage_hourly_tenant (hour_ms, tenant, model, slice_fraction, \
             allocated_us, used_us, energy_mj, memory_byte_seconds, over_rows, cluster, workload, \
             idle_us) VALUES (3600000, 'acme', 'H100', 1.0, 5, 5, 3, 2.0, 0, 'default', '', 0), \
             (7200000, 'acme', 'H100', 1.0, 2, 2, 1, 0.5, 0, 'default', '', 0)",
            "INSERT INTO io_usage_hourly (hour_ms, tenant, node, network_ingress_bytes, \
             network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes, cluster) \
             VALUES (7200000, 'beta', 'n1', 11, 0, 0, 0, 'default')",
        ];
        {
            let pool = migrated_before(url, dialect, "0017").await;
            for s in statements {
                sqlx::query(s).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let l = Ledger::open(url, 2).await.unwrap();
        let totals = |tenant: &str, k: f64| TenantTotals {
            tenant: tenant.into(),
            allocated_us: k,
            sm_us: 2.0 * k,
            memory_byte_seconds: 3.0 * k,
            energy_mj: 4.0 * k,
            network_ingress_bytes: 5.0 * k,
            network_egress_bytes: 6.0 * k,
            pcie_h2d_bytes: 7.0 * k,
            pcie_d2h_bytes: 8.0 * k,
        };
        let mut before = vec![totals("acme", 11.0), totals("beta", 100.0)];
        assert_eq!(l.totals().await.unwrap(), before);
        l.fold(10 * 24 * HOUR_MS).await.unwrap();
        assert_eq!(l.totals().await.unwrap(), before);
        assert_eq!(folded(&l).await, before);
        // And ingest counts on from there.
        let r = usage_report("n2", 1, 30);
        l.ingest(
            &r,
            &r.digest(),
            10 * 24 * HOUR_MS,
            &Arc::new(NodeKeys::default()),
        )
        .await
        .unwrap();
        for new in expected(std::slice::from_ref(&r)) {
            match before.iter_mut().find(|t| t.tenant == new.tenant) {
                Some(t) => t.add(&new),
                None => before.push(new),
            }
        }
        assert_eq!(l.totals().await.unwrap(), before);
    }

    #[tokio::test]
    async fn migration_0017_keeps_the_totals_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
        migration_0017_keeps_the_totals(&url, "sqlite").await;
    }

    #[tokio::test]
    async fn migration_0017_keeps_the_totals_on_postgres() {
        let Some(url) = postgres_database("migration0017").await else {
            return;
        };
        migration_0017_keeps_the_totals(&url, "postgres").await;
    }

    /// Migration 0016 on a ledger with kept and removed claims: the summary
    /// counts both, as it did when every request grouped them, and ingest
    /// goes on counting from there.
    async fn migration_0016_counts_kept_and_removed_claims(url: &str, dialect: &str) {
        {
            let pool = migrated_before(url, dialect, "0016").await;
            // n1: seqs 1-3 removed, 4, 5 and 7 kept; n2: all removed; n3:
            // all kept.
            for (node, seq) in [("n1", 4), ("n1", 5), ("n1", 7), ("n3", 9)] {
                sqlx::query(
                    "INSERT INTO reports (node, boot_id, seq, interval_start_ms, \
                     interval_end_ms, received_ms, digest) VALUES ($1, 'boot', $2, 0, $3, 1, 'd')",
                )
                .bind(node)
                .bind(seq)
                .bind(seq * 1000)
                .execute(&pool)
                .await
                .unwrap();
            }
            for (node, reports, last) in [("n1", 3, 3), ("n2", 2, 2)] {
                sqlx::query(
                    "INSERT INTO claims_removed (node, boot_id, reports, first_seq, last_seq, \
                     last_interval_end_ms) VALUES ($1, 'boot', $2, 1, $3, $4)",
                )
                .bind(node)
                .bind(reports)
                .bind(last)
                .bind(last * 1000)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let l = Ledger::open(url, 2).await.unwrap();
        let summary = |node: &str, reports, first_seq, last_seq| ReportSummary {
            node: node.into(),
            boot_id: "boot".into(),
            reports,
            first_seq,
            last_seq,
            last_interval_end_ms: last_seq * 1000,
        };
        assert_eq!(
            l.report_summary().await.unwrap(),
            [
                summary("n1", 6, 1, 7),
                summary("n2", 2, 1, 2),
                summary("n3", 1, 9, 9)
            ]
        );
        // A report of n1 after the upgrade, and one before its first
        // (sent late from a spool), are counted once each; a duplicate is
        // not counted.
        let keys = Arc::new(NodeKeys::default());
        for seq in [8, 6, 8] {
            let mut r = report("n1", seq);
            r.interval_start_ms = 0;
            r.interval_end_ms = seq * 1000;
            l.ingest(&r, &r.digest(), 2, &keys).await.unwrap();
        }
        let mut n1 = summary("n1", 8, 1, 8);
        assert_eq!(l.report_summary().await.unwrap()[0], n1);
        let r = report("n4", 3);
        l.ingest(&r, &r.digest(), 2, &keys).await.unwrap();
        n1.node = "n4".into();
        (n1.reports, n1.first_seq, n1.last_seq) = (1, 3, 3);
        n1.last_interval_end_ms = r.interval_end_ms as i64;
        assert_eq!(l.report_summary().await.unwrap()[3], n1);
    }

    #[tokio::test]
    async fn migration_0016_counts_kept_and_removed_claims_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
        migration_0016_counts_kept_and_removed_claims(&url, "sqlite").await;
    }

    #[tokio::test]
    async fn migration_0016_counts_kept_and_removed_claims_on_postgres() {
        let Some(url) = postgres_database("migration0016").await else {
            return;
        };
        migration_0016_counts_kept_and_removed_claims(&url, "postgres").await;
    }
}
