//! What time-of-use energy pricing reads: GPU energy per UTC hour of a
//! period, so that each hour's energy is charged at that hour's price.
//!
//! Read only when `[prices] energy_kwh` is a table; with one price, the
//! energy summed over the period with the GPU groups is all chargeback
//! needs ([`super::chargeback`]). Hours come from the same places as
//! there: rollups for whole hours, raw rows (their interval end's hour)
//! for the partial hours at the edges, so the sums per hour are the raw
//! rows' sums.

use super::{
    Ledger, LedgerError,
    chargeback::{DIRTY, in_cluster, whole_hours},
    sqlite::decoded_by_name,
};

/// Energy of one (tenant, node, model, cluster, workload) in one UTC hour.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct EnergyHour {
    pub tenant: String,
    /// Empty when read summed over nodes.
    pub node: String,
    pub cluster: String,
    pub workload: String,
    pub model: String,
    /// Start of the UTC hour the reports' intervals end in.
    pub hour_ms: i64,
    pub energy_mj: i64,
}

decoded_by_name!(EnergyHour {
    tenant,
    node,
    cluster,
    workload,
    model,
    hour_ms,
    energy_mj,
});

/// A raw row's hour, as the rollups key it.
const RAW_HOUR: &str = "(interval_end_ms / 3600000) * 3600000";

impl Ledger {
    /// GPU energy per hour and node of reports whose interval ends in
    /// `[from_ms, to_ms)` (only `cluster`'s, when given); hours without
    /// energy are left out.
    pub(crate) async fn energy_hours(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<EnergyHour>, LedgerError> {
        let (a, b) = whole_hours(from_ms, to_ms);
        let only = in_cluster(cluster);
        let raw = format!(
            "SELECT tenant, node, cluster, workload, model, {RAW_HOUR} AS hour_ms, energy_mj \
             FROM gpu_usage"
        );
        let query = format!(
            "SELECT tenant, node, cluster, workload, model, hour_ms, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj \
             FROM (SELECT tenant, node, cluster, workload, model, hour_ms, energy_mj \
             FROM gpu_usage_hourly WHERE hour_ms >= $3 AND hour_ms < $4{only} \
             UNION ALL {raw} WHERE interval_end_ms >= $1 AND interval_end_ms < $3{only} \
             UNION ALL {raw} WHERE interval_end_ms >= $4 AND interval_end_ms < $2{only}) u \
             GROUP BY tenant, node, cluster, workload, model, hour_ms \
             HAVING SUM(energy_mj) <> 0 \
             ORDER BY tenant, node, cluster, workload, model, hour_ms"
        );
        self.period_query(&query, from_ms, to_ms, (a, b), cluster)
            .await
    }

    /// As [`Self::energy_hours`], summed over nodes (every `node` empty):
    /// whole hours from the node-less rollup, except hours with reports
    /// received since its fold, read per node.
    pub(crate) async fn energy_hours_by_tenant(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<EnergyHour>, LedgerError> {
        let (a, b) = whole_hours(from_ms, to_ms);
        let only = in_cluster(cluster);
        let h_only = only.replace("cluster", "h.cluster");
        let raw = format!(
            "SELECT tenant, cluster, workload, model, {RAW_HOUR} AS hour_ms, energy_mj \
             FROM gpu_usage"
        );
        let query = format!(
            "WITH {DIRTY} SELECT tenant, '' AS node, cluster, workload, model, hour_ms, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj \
             FROM (SELECT tenant, cluster, workload, model, hour_ms, energy_mj \
             FROM gpu_usage_hourly_tenant WHERE hour_ms >= $3 AND hour_ms < $4 \
             AND hour_ms NOT IN (SELECT hour_ms FROM dirty){only} \
             UNION ALL SELECT h.tenant, h.cluster, h.workload, h.model, h.hour_ms, h.energy_mj \
             FROM dirty d CROSS JOIN gpu_usage_hourly h WHERE h.hour_ms = d.hour_ms{h_only} \
             UNION ALL {raw} WHERE interval_end_ms >= $1 AND interval_end_ms < $3{only} \
             UNION ALL {raw} WHERE interval_end_ms >= $4 AND interval_end_ms < $2{only}) u \
             GROUP BY tenant, cluster, workload, model, hour_ms \
             HAVING SUM(energy_mj) <> 0 \
             ORDER BY tenant, cluster, workload, model, hour_ms"
        );
        self.period_query(&query, from_ms, to_ms, (a, b), cluster)
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Energy per hour summed from raw rows alone, per node or (`by_node`
    /// false) over nodes: what the reads above must give.
    pub(crate) async fn raw_energy(
        l: &Ledger,
        from: i64,
        to: i64,
        cluster: Option<&str>,
        by_node: bool,
    ) -> Vec<EnergyHour> {
        let node = if by_node { "node" } else { "''" };
        let group = if by_node { "node, " } else { "" };
        let mut rows: Vec<EnergyHour> = sqlx::query_as(&format!(
            "SELECT tenant, {node} AS node, cluster, workload, model, {RAW_HOUR} AS hour_ms, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj \
             FROM gpu_usage WHERE interval_end_ms >= $1 AND interval_end_ms < $2 \
             GROUP BY tenant, {group}cluster, workload, model, {RAW_HOUR} \
             HAVING SUM(energy_mj) <> 0 \
             ORDER BY tenant, {group}cluster, workload, model, {RAW_HOUR}"
        ))
        .bind(from)
        .bind(to)
        .fetch_all(&l.pool)
        .await
        .unwrap();
        if let Some(c) = cluster {
            rows.retain(|r| r.cluster == c);
        }
        rows
    }
}
