//! What chargeback reads: usage summed per group over a period.

use super::{Ledger, LedgerError};

/// Usage of one (tenant, node, model, slice) over a period.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct GpuGroup {
    pub tenant: String,
    pub node: String,
    pub model: String,
    pub slice_fraction: f64,
    pub allocated_us: i64,
    /// SM-weighted time; allocated time where the device has none (MIG).
    pub used_us: i64,
    pub energy_mj: i64,
    /// Summed as a double: a long period outgrows 64-bit integers.
    pub memory_byte_seconds: f64,
}

/// I/O of one (tenant, node) over a period.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub(crate) struct IoGroup {
    pub tenant: String,
    pub node: String,
    pub network_ingress_bytes: i64,
    pub network_egress_bytes: i64,
    pub pcie_h2d_bytes: i64,
    pub pcie_d2h_bytes: i64,
}

impl Ledger {
    /// GPU usage of reports whose interval ends in `[from_ms, to_ms)`.
    pub(crate) async fn gpu_groups(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<GpuGroup>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT tenant, node, model, slice_fraction, \
             CAST(SUM(allocated_us) AS BIGINT) AS allocated_us, \
             CAST(SUM(COALESCE(sm_us, allocated_us)) AS BIGINT) AS used_us, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj, \
             CAST(SUM(CAST(memory_byte_seconds AS DOUBLE PRECISION)) AS DOUBLE PRECISION) \
             AS memory_byte_seconds \
             FROM gpu_usage WHERE interval_end_ms >= $1 AND interval_end_ms < $2 \
             GROUP BY tenant, node, model, slice_fraction \
             ORDER BY tenant, node, model, slice_fraction",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// I/O of reports whose interval ends in `[from_ms, to_ms)`.
    pub(crate) async fn io_groups(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<IoGroup>, LedgerError> {
        Ok(sqlx::query_as(
            "SELECT tenant, node, \
             CAST(SUM(network_ingress_bytes) AS BIGINT) AS network_ingress_bytes, \
             CAST(SUM(network_egress_bytes) AS BIGINT) AS network_egress_bytes, \
             CAST(SUM(pcie_h2d_bytes) AS BIGINT) AS pcie_h2d_bytes, \
             CAST(SUM(pcie_d2h_bytes) AS BIGINT) AS pcie_d2h_bytes \
             FROM io_usage WHERE interval_end_ms >= $1 AND interval_end_ms < $2 \
             GROUP BY tenant, node ORDER BY tenant, node",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?)
    }
}
