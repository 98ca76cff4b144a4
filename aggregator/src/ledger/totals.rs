//! What `/metrics` and `GET /api/v1/reports` read: running totals per
//! tenant (kept per tenant and node by ingest), nodes and stored reports.

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

    /// The stored reports, per (node, boot): the claims kept and those
    /// retention removed.
    pub(crate) async fn report_summary(&self) -> Result<Vec<ReportSummary>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT node, boot_id, CAST(SUM(reports) AS BIGINT) AS reports, \
             MIN(first_seq) AS first_seq, MAX(last_seq) AS last_seq, MAX(last_end) AS last_end \
             FROM (SELECT node, boot_id, COUNT(*) AS reports, MIN(seq) AS first_seq, \
             MAX(seq) AS last_seq, MAX(interval_end_ms) AS last_end \
             FROM reports GROUP BY node, boot_id \
             UNION ALL SELECT node, boot_id, reports, first_seq, last_seq, \
             last_interval_end_ms FROM claims_removed) s \
             GROUP BY node, boot_id ORDER BY node, boot_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
