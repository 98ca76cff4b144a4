//! The cluster tables, both ways: what ingest leaves of each node's newest
//! report (GPU states, tenants, MIG mode, report interval, quotas), and
//! the rows [`crate::cluster`] builds its view from.

use std::collections::BTreeMap;

use tally_contract::wire::Report;

use super::{
    Ledger, LedgerError, rows,
    tx::{Tx, Write, args},
};

/// One row of `nodes`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct NodeRow {
    pub node: String,
    pub reports: i64,
    pub last_received_ms: i64,
    pub last_interval_end_ms: i64,
    pub report_interval_ms: Option<i64>,
}

/// One row of `gpu_state`: a device as the node's newest report left it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct GpuRow {
    pub node: String,
    pub uuid: String,
    pub gpu: String,
    pub model: String,
    pub mig_profile: Option<String>,
    pub parent_uuid: Option<String>,
    pub slice_fraction: Option<f64>,
    pub health: String,
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub processes: i64,
    pub updated_ms: i64,
    /// Empty or NULL from agents that do not send a state.
    pub state: Option<String>,
    /// The holding tenants as a JSON array.
    pub tenants: Option<String>,
    /// 0 or 1; NULL from agents that do not send it.
    pub mig_mode: Option<i64>,
    /// Since when the device is idle (node clock); NULL unless idle.
    pub idle_since_ms: Option<i64>,
    /// The named workloads holding it, a JSON array of `{tenant, workload}`.
    pub workloads: Option<String>,
}

/// One row of `tenant_quota_state`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct QuotaRow {
    pub node: String,
    pub tenant: String,
    pub resource: String,
    pub limit_value: f64,
    pub usage_value: Option<f64>,
}

/// Everything the cluster view is built from, read on every request.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ClusterRows {
    /// By node name.
    pub nodes: Vec<NodeRow>,
    /// Only the devices of each node's newest report.
    pub gpus: Vec<GpuRow>,
    /// By node, tenant, resource.
    pub quotas: Vec<QuotaRow>,
}

/// The first write of a report that is its node's newest: its quotas
/// replace the node's (an older report replayed from a spool changes
/// nothing here, like it changes nothing in `gpu_state`, whose GPU
/// states, tenants and MIG mode ingest writes with the gauges). One of
/// the report's [`Tx::write_all`]; [`store_quotas`] follows it.
pub(super) fn clear_quotas(r: &Report) -> Write<'_> {
    Write::Execute {
        sql: "DELETE FROM tenant_quota_state WHERE node = $1",
        args: args([r.node.as_str().into()]),
    }
}

/// The quotas of a report that is its node's newest, in a statement after
/// [`clear_quotas`]: PostgreSQL's statements of one `write_all` do not
/// see each other's rows.
pub(super) async fn store_quotas(
    conn: &mut impl Tx,
    r: &Report,
    end: i64,
) -> Result<(), LedgerError> {
    // One row per (tenant, resource): the last one wins.
    let quotas: BTreeMap<(&str, &str), _> = r
        .tenant_quotas
        .iter()
        .map(|q| ((q.tenant.as_str(), q.resource.as_str()), q))
        .collect();
    let quotas: Vec<_> = quotas.into_iter().collect();
    rows::insert(
        conn,
        "tenant_quota_state (node, tenant, resource, limit_value, usage_value, updated_ms)",
        &["?", "?", "?", "?", "NULLIF(?, -1.0)", "?"],
        "",
        &quotas,
        |a, ((tenant, resource), quota)| {
            a.add(&r.node)?;
            a.add(*tenant)?;
            a.add(*resource)?;
            a.add(quota.limit)?;
            // A value has no NULL double (see `ingest::gpu_state`): an
            // unknown usage travels as -1 (usage is never negative) and
            // becomes NULL in SQL.
            a.add(quota.usage.unwrap_or(-1.0))?;
            a.add(end)
        },
    )
    .await
}

impl Ledger {
    /// The rows of the cluster view (see [`ClusterRows`]).
    pub(crate) async fn cluster_rows(&self) -> Result<ClusterRows, LedgerError> {
        let nodes = sqlx::query_as(
            "SELECT node, reports, last_received_ms, last_interval_end_ms, report_interval_ms \
             FROM nodes ORDER BY node",
        )
        .fetch_all(&self.pool)
        .await?;
        // Only the devices of each node's newest report: a MIG instance that
        // was destroyed (or a GPU removed) is not shown forever.
        let gpus = sqlx::query_as(
            "SELECT g.node, g.uuid, g.gpu, g.model, g.mig_profile, g.parent_uuid, g.slice_fraction, \
             g.health, g.utilization_ratio, g.memory_used_bytes, g.memory_total_bytes, g.processes, \
             g.updated_ms, g.state, g.tenants, g.mig_mode, g.idle_since_ms, g.workloads \
             FROM gpu_state g JOIN nodes n ON n.node = g.node \
             WHERE g.updated_ms >= n.last_interval_end_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        let quotas = sqlx::query_as(
            "SELECT node, tenant, resource, limit_value, usage_value FROM tenant_quota_state \
             ORDER BY node, tenant, resource",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ClusterRows {
            nodes,
            gpus,
            quotas,
        })
    }
}
