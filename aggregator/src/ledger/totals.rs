//! What `/metrics` and `GET /api/v1/reports` read: running totals per
//! tenant (kept per tenant and node by ingest), nodes and stored reports
//! (kept per node and boot by ingest).

use super::{Ledger, LedgerError};

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

impl Ledger {
    /// Running totals of every tenant.
    pub(crate) async fn totals(&self) -> Result<Vec<TenantTotals>, LedgerError> {
        Ok(sqlx::query_as(
            // tenant_totals holds what was counted before the totals were
            // kept per node (migration 0005) and is no longer written.
            "SELECT tenant, \
             CAST(SUM(allocated_us) AS DOUBLE PRECISION) AS allocated_us, \
             CAST(SUM(sm_us) AS DOUBLE PRECISION) AS sm_us, \
             CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION) AS memory_byte_seconds, \
             CAST(SUM(energy_mj) AS DOUBLE PRECISION) AS energy_mj, \
             CAST(SUM(network_ingress_bytes) AS DOUBLE PRECISION) AS network_ingress_bytes, \
             CAST(SUM(network_egress_bytes) AS DOUBLE PRECISION) AS network_egress_bytes, \
             CAST(SUM(pcie_h2d_bytes) AS DOUBLE PRECISION) AS pcie_h2d_bytes, \
             CAST(SUM(pcie_d2h_bytes) AS DOUBLE PRECISION) AS pcie_d2h_bytes \
             FROM (SELECT tenant, \
             CAST(allocated_us AS DOUBLE PRECISION) AS allocated_us, \
             CAST(sm_us AS DOUBLE PRECISION) AS sm_us, \
             CAST(memory_byte_seconds AS DOUBLE PRECISION) AS memory_byte_seconds, \
             CAST(energy_mj AS DOUBLE PRECISION) AS energy_mj, \
             CAST(network_ingress_bytes AS DOUBLE PRECISION) AS network_ingress_bytes, \
             CAST(network_egress_bytes AS DOUBLE PRECISION) AS network_egress_bytes, \
             CAST(pcie_h2d_bytes AS DOUBLE PRECISION) AS pcie_h2d_bytes, \
             CAST(pcie_d2h_bytes AS DOUBLE PRECISION) AS pcie_d2h_bytes \
             FROM tenant_totals UNION ALL SELECT tenant, allocated_us, sm_us, \
             memory_byte_seconds, energy_mj, network_ingress_bytes, network_egress_bytes, \
             pcie_h2d_bytes, pcie_d2h_bytes FROM tenant_node_totals) t \
             GROUP BY tenant ORDER BY tenant",
        )
        .fetch_all(&self.pool)
        .await?)
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
    use std::sync::Arc;

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            chargeback::tests::postgres_database,
            ingest::tests::{migrated_before, report},
        },
    };

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
