//! What chargeback reads: usage summed per group over a period, from the
//! hourly rollups and, for partial hours, the raw rows.
//!
//! For every grouping but by node, whole hours come from the node-less
//! rollups ([`super::fold`]) except where those could differ from the
//! per-node sums: hours with reports received since the fold's watermark, and keys
//! where pricing `basis=used` clamps a node's used time to its allocated
//! time (a piece with `used_us > allocated_us`), which are read per node.
//!
//! By node, whole UTC calendar months come from the per-node monthly
//! rollups and the other whole UTC days from the per-node daily ones (one
//! month bucket at a time, in the order they are grouped by), except days
//! not folded yet or with reports received since the watermark, whose
//! hours come from the per-node hourly rollups; a month with such a day
//! is read by day. Each of those parts is summed per group by the
//! database, and the parts are added up here ([`merged`]): a month by
//! node is 200,000 groups, and SQLite sorting the union of the parts into
//! groups took three times as long as reading them.

use super::{
    Ledger, LedgerError, Side,
    fold::{DAILY, GPU_NODE_KEY, GPU_NODE_SUMS, IO_NODE_KEY, IO_NODE_SUMS, MONTHLY},
    ingest::{HOUR_MS, hour_of},
    sqlite::{Decode, decoded_by_name},
    tx::{Args, args},
};
use crate::time::{DAY_MS, day_of, month_of};

/// Usage of one (tenant, node, model, slice, cluster, workload) over a
/// period.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct GpuGroup {
    pub tenant: String,
    pub node: String,
    pub cluster: String,
    /// Empty for usage outside any named workload.
    pub workload: String,
    pub model: String,
    pub slice_fraction: f64,
    pub allocated_us: i64,
    /// SM-weighted time; allocated time where the device has none (MIG).
    pub used_us: i64,
    pub energy_mj: i64,
    /// Summed as a double: a long period outgrows 64-bit integers.
    pub memory_byte_seconds: f64,
    /// The part of `allocated_us` the device was idle (held, unused).
    pub idle_us: i64,
}

decoded_by_name!(GpuGroup {
    tenant,
    node,
    cluster,
    workload,
    model,
    slice_fraction,
    allocated_us,
    used_us,
    energy_mj,
    memory_byte_seconds,
    idle_us,
});

/// I/O of one (tenant, node, cluster) over a period.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub(crate) struct IoGroup {
    pub tenant: String,
    pub node: String,
    pub cluster: String,
    pub network_ingress_bytes: i64,
    pub network_egress_bytes: i64,
    pub pcie_h2d_bytes: i64,
    pub pcie_d2h_bytes: i64,
}

decoded_by_name!(IoGroup {
    tenant,
    node,
    cluster,
    network_ingress_bytes,
    network_egress_bytes,
    pcie_h2d_bytes,
    pcie_d2h_bytes,
});

/// The whole hours `[a, b)` inside `[from_ms, to_ms)`, read from the
/// rollups; the rest of the period, `[from_ms, a)` and `[b, to_ms)`, is
/// read from raw rows. `a == b` when the period holds no whole hour.
pub(super) fn whole_hours(from_ms: i64, to_ms: i64) -> (i64, i64) {
    let a = hour_of(from_ms.saturating_add(HOUR_MS - 1));
    let b = hour_of(to_ms);
    if a < b { (a, b) } else { (to_ms, to_ms) }
}

/// The condition that keeps only `cluster`'s rows (its parameter is `$5`).
pub(super) fn in_cluster(cluster: Option<&str>) -> &'static str {
    if cluster.is_some() {
        " AND cluster = $5"
    } else {
        ""
    }
}

impl Ledger {
    /// Runs a period read: `$1`/`$2` the period, `$3`/`$4` its whole
    /// hours (`(a, b)` of [`whole_hours`]), `$5` the cluster when given.
    pub(super) async fn period_query<T>(
        &self,
        query: &str,
        from_ms: i64,
        to_ms: i64,
        (a, b): (i64, i64),
        cluster: Option<&str>,
    ) -> Result<Vec<T>, LedgerError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Decode + Send + Unpin + 'static,
    {
        if let Side::Sqlite(sqlite) = &self.side {
            let mut params: Args<'static> =
                args([from_ms.into(), to_ms.into(), a.into(), b.into()]);
            if let Some(c) = cluster {
                let Ok(()) = params.add(c.to_owned());
            }
            return sqlite.reads.period(query.to_owned(), params).await;
        }
        let mut q = sqlx::query_as(query)
            .bind(from_ms)
            .bind(to_ms)
            .bind(a)
            .bind(b);
        if let Some(c) = cluster {
            q = q.bind(c);
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// GPU usage of reports whose interval ends in `[from_ms, to_ms)`:
    /// the monthly rollup for whole months, the daily one for the other
    /// whole days, the hourly one for the other
    /// whole hours, raw rows for partial ones. The rollups hold the raw
    /// rows' integer sums, so the result is the same as summing the raw
    /// rows (memory byte-seconds, summed as doubles, exactly so while the
    /// sums stay below 2^53).
    /// Only `cluster`'s, when given.
    pub(crate) async fn gpu_groups(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<GpuGroup>, LedgerError> {
        self.by_node(&GPU_BY_NODE, from_ms, to_ms, cluster).await
    }

    /// I/O of reports whose interval ends in `[from_ms, to_ms)`, read as
    /// [`Self::gpu_groups`] reads GPU usage.
    pub(crate) async fn io_groups(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<IoGroup>, LedgerError> {
        self.by_node(&IO_BY_NODE, from_ms, to_ms, cluster).await
    }

    /// A read by node of `[from_ms, to_ms)`: the rollups' parts and the
    /// raw rows of the partial hours, each summed per group, added up
    /// ([`merged`]).
    async fn by_node<T>(
        &self,
        read: &ByNode,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<T>, LedgerError>
    where
        T: PartSum + for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Decode + Send + Unpin + 'static,
    {
        let (a, b) = whole_hours(from_ms, to_ms);
        let only = in_cluster(cluster);
        let (key, ctes, summed) = (read.key, read.ctes(), summed("", read.sums));
        let parts = self.rollup_parts(read, (a, b), only).await?;
        let raw = |ends: &str| {
            format!(
                "SELECT {key}, {summed} FROM ({} WHERE {ends}{only}) r GROUP BY {key}",
                read.raw
            )
        };
        let query = format!(
            "WITH {ctes} {parts} UNION ALL {} UNION ALL {}",
            raw("interval_end_ms >= $1 AND interval_end_ms < $3"),
            raw("interval_end_ms >= $4 AND interval_end_ms < $2"),
        );
        merged(
            self.period_query(&query, from_ms, to_ms, (a, b), cluster)
                .await?,
        )
    }

    /// The rollups' part of a read by node of the whole hours `[$3, $4)`
    /// (`(a, b)`), summed per group of `read.key`: the whole days its
    /// daily rollup holds, one month bucket at a time, each whole month
    /// its monthly rollup holds taken from there instead (unless it has
    /// a dirty day), then the hourly rollup for the hours outside those
    /// days and for every hour of the dirty days inside them.
    async fn rollup_parts(
        &self,
        read: &ByNode,
        (a, b): (i64, i64),
        only: &str,
    ) -> Result<String, LedgerError> {
        let ByNode {
            monthly,
            daily,
            hourly,
            key,
            sums,
            ..
        } = *read;
        let (through, months_through, first, last): (i64, i64, Option<i64>, Option<i64>) =
            sqlx::query_as(&format!(
                "SELECT (SELECT received_ms FROM rollup_watermark WHERE name = $1), \
                 (SELECT received_ms FROM rollup_watermark WHERE name = $2), \
                 (SELECT MIN(day_ms) FROM {daily}), (SELECT MAX(day_ms) FROM {daily})"
            ))
            .bind(DAILY)
            .bind(MONTHLY)
            .fetch_one(&self.pool)
            .await?;
        let (days_from, days_to) = whole_days(a, b, through);
        let (months_from, months_to) = whole_months(days_from, days_to, months_through);
        let mut parts = Vec::new();
        // Only the buckets that hold rows: a period from 0 would otherwise
        // name every month since 1970.
        if let (Some(first), Some(last)) = (first, last) {
            // From the first month with rows: its monthly row outlives
            // the days that rollup retention removes first.
            let (lo, hi) = (days_from.max(month_of(first)), days_to.min(last + DAY_MS));
            let summed = summed("", sums);
            let dirty = "day_ms NOT IN (SELECT day_ms FROM dirty_days)";
            let part = |source: &str, bucket: &str, from: i64, to: i64| {
                format!(
                    "SELECT {key}, {summed} FROM {source} WHERE {bucket}day_ms >= {from} \
                     AND day_ms < {to} AND {dirty}{only} GROUP BY {key}"
                )
            };
            // A folded month's rows, unless one of its days is dirty: one
            // row per group, so no GROUP BY.
            let whole = |months: &str, dirty_month: String| {
                format!(
                    "SELECT {key}, {sums} FROM {monthly} WHERE {months} \
                     AND NOT {dirty_month}{only}"
                )
            };
            // Many months: summed per group.
            let wholes = |months: &str, dirty_month: String| {
                format!(
                    "SELECT {key}, {summed} FROM {monthly} WHERE {months} \
                     AND NOT {dirty_month}{only} GROUP BY {key}"
                )
            };
            let mut month = month_of(lo);
            let mut buckets = 0;
            while month < hi && buckets <= MAX_BUCKETS {
                let next = month_of(month + 32 * DAY_MS);
                let bucket = format!("month_ms = {month} AND ");
                if month >= months_from && next <= months_to {
                    let dirty_month = dirty_month(&month.to_string());
                    parts.push(whole(&format!("month_ms = {month}"), dirty_month.clone()));
                    // Its days only when it is dirty, without reading
                    // them otherwise: SQLite tested the condition on each
                    // of the month's daily rows, but reads a `CROSS JOIN`
                    // from its left, here nothing; PostgreSQL tests the
                    // constant condition once, before the join.
                    let source = format!(
                        "(SELECT DISTINCT month_ms FROM dirty_months WHERE month_ms = {month}) x \
                         CROSS JOIN {daily}"
                    );
                    let on = format!("{daily}.month_ms = x.month_ms AND {dirty_month} AND ");
                    parts.push(part(&source, &on, month, next));
                } else {
                    parts.push(part(daily, &bucket, lo.max(month), hi.min(next)));
                }
                buckets += 1;
                month = next;
            }
            if buckets > MAX_BUCKETS {
                // Years: one read of each rollup, sorted into groups by
                // the database.
                let months = format!("month_ms >= {months_from} AND month_ms < {months_to}");
                parts = vec![
                    wholes(&months, dirty_month("month_ms")),
                    part(
                        daily,
                        &format!("NOT ({months} AND NOT {}) AND ", dirty_month("month_ms")),
                        lo,
                        hi,
                    ),
                ];
            }
        }
        let (from, to) = (days_from, days_to);
        let h_only = only.replace("cluster", "h.cluster");
        let h_key = qualified("h", key);
        let (summed, h_summed) = (summed("", sums), summed("h.", sums));
        parts.push(format!(
            "SELECT {key}, {summed} FROM {hourly} WHERE hour_ms >= $3 AND hour_ms < {from}{only} \
             GROUP BY {key}"
        ));
        parts.push(format!(
            "SELECT {key}, {summed} FROM {hourly} WHERE hour_ms >= {to} AND hour_ms < $4{only} \
             GROUP BY {key}"
        ));
        parts.push(format!(
            "SELECT {h_key}, {h_summed} FROM dirty_days d CROSS JOIN {hourly} h \
             WHERE h.hour_ms >= d.day_ms AND h.hour_ms < d.day_ms + {DAY_MS} \
             AND d.day_ms >= {from} AND d.day_ms < {to}{h_only} GROUP BY {h_key}"
        ));
        Ok(parts.join(" UNION ALL "))
    }
}

/// `SUM` of each of `sums` (a comma-separated list of columns of the
/// table `alias`, `""` or `"h."`), named as the column. Cast back to the
/// column's type: PostgreSQL sums `BIGINT`s as `NUMERIC`.
fn summed(alias: &str, sums: &str) -> String {
    sums.split(", ")
        .map(|c| {
            let sql_type = if DOUBLE_SUMS.contains(&c) {
                "DOUBLE PRECISION"
            } else {
                "BIGINT"
            };
            format!("CAST(SUM({alias}{c}) AS {sql_type}) AS {c}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The per-node rollups' sums that are doubles; the others are integers.
const DOUBLE_SUMS: [&str; 1] = ["memory_byte_seconds"];

/// A group read in parts, each part summed per group by the database.
trait PartSum: Sized {
    /// The order of the groups' keys, as `ORDER BY` the key (bytes).
    fn key_cmp(&self, other: &Self) -> std::cmp::Ordering;
    /// Adds `other`, a part of the same group; `false` on overflow.
    fn absorb(&mut self, other: &Self) -> bool;
}

impl PartSum for GpuGroup {
    fn key_cmp(&self, o: &Self) -> std::cmp::Ordering {
        (
            &self.tenant,
            &self.node,
            &self.cluster,
            &self.workload,
            &self.model,
        )
            .cmp(&(&o.tenant, &o.node, &o.cluster, &o.workload, &o.model))
            .then(self.slice_fraction.total_cmp(&o.slice_fraction))
    }

    fn absorb(&mut self, o: &Self) -> bool {
        let add = |a: &mut i64, b: i64| a.checked_add(b).map(|s| *a = s).is_some();
        self.memory_byte_seconds += o.memory_byte_seconds;
        add(&mut self.allocated_us, o.allocated_us)
            & add(&mut self.used_us, o.used_us)
            & add(&mut self.energy_mj, o.energy_mj)
            & add(&mut self.idle_us, o.idle_us)
    }
}

impl PartSum for IoGroup {
    fn key_cmp(&self, o: &Self) -> std::cmp::Ordering {
        (&self.tenant, &self.node, &self.cluster).cmp(&(&o.tenant, &o.node, &o.cluster))
    }

    fn absorb(&mut self, o: &Self) -> bool {
        let add = |a: &mut i64, b: i64| a.checked_add(b).map(|s| *a = s).is_some();
        add(&mut self.network_ingress_bytes, o.network_ingress_bytes)
            & add(&mut self.network_egress_bytes, o.network_egress_bytes)
            & add(&mut self.pcie_h2d_bytes, o.pcie_h2d_bytes)
            & add(&mut self.pcie_d2h_bytes, o.pcie_d2h_bytes)
    }
}

/// The parts' rows summed per group, in key order. The rows mostly come
/// in key order already (a month's rows in its rollup's key order), which
/// the sort finds in one pass.
fn merged<T: PartSum>(mut rows: Vec<T>) -> Result<Vec<T>, LedgerError> {
    rows.sort_by(T::key_cmp);
    let mut out: Vec<T> = Vec::with_capacity(rows.len());
    for row in rows {
        match out.last_mut() {
            Some(last) if last.key_cmp(&row).is_eq() => {
                if !last.absorb(&row) {
                    return Err(LedgerError::SumOverflow);
                }
            }
            _ => out.push(row),
        }
    }
    Ok(out)
}

/// `cols` (a comma-separated list) each prefixed with `alias.`.
fn qualified(alias: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The join condition of `a` and `b` on every column of `cols`.
fn same_key(a: &str, b: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{a}.{c} = {b}.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A read by node: its raw rows (shaped as the rollups' rows), its
/// monthly, daily and hourly rollups, the group key they share and the
/// columns it sums.
#[derive(Clone, Copy)]
struct ByNode {
    raw: &'static str,
    monthly: &'static str,
    daily: &'static str,
    hourly: &'static str,
    key: &'static str,
    sums: &'static str,
}

const GPU_BY_NODE: ByNode = ByNode {
    // Used time is SM-weighted time where the device has it, allocated
    // time where it has none (MIG), as the rollups hold it.
    raw: "SELECT tenant, node, cluster, workload, model, slice_fraction, allocated_us, \
          COALESCE(sm_us, allocated_us) AS used_us, energy_mj, \
          CAST(memory_byte_seconds AS DOUBLE PRECISION) AS memory_byte_seconds, idle_us \
          FROM gpu_usage",
    monthly: "gpu_usage_monthly",
    daily: "gpu_usage_daily",
    hourly: "gpu_usage_hourly",
    key: GPU_NODE_KEY,
    sums: GPU_NODE_SUMS,
};

const IO_BY_NODE: ByNode = ByNode {
    raw: "SELECT tenant, node, cluster, network_ingress_bytes, network_egress_bytes, \
          pcie_h2d_bytes, pcie_d2h_bytes FROM io_usage",
    monthly: "io_usage_monthly",
    daily: "io_usage_daily",
    hourly: "io_usage_hourly",
    key: IO_NODE_KEY,
    sums: IO_NODE_SUMS,
};

impl ByNode {
    /// The read's common table expressions: [`DIRTY`], [`DIRTY_DAYS`]
    /// and the months (`dirty_months`) the monthly rollup holds stale or
    /// incomplete sums of while their dirty days are not re-folded.
    fn ctes(&self) -> String {
        // A dirty day without daily rows (a late first report of the
        // day) is in none of the month's sums: only days with rows make
        // a month dirty. LIMIT 1: one key lookup per dirty day, not the
        // day's rows; no NULLs, which would make `NOT IN` no row at all.
        let daily = self.daily;
        format!(
            "{DIRTY}, {DIRTY_DAYS}, dirty_months AS (SELECT month_ms FROM \
             (SELECT (SELECT y.month_ms FROM {daily} y WHERE y.day_ms = d.day_ms LIMIT 1) \
             AS month_ms FROM dirty_days d) m WHERE month_ms IS NOT NULL)"
        )
    }
}

/// Whether `month` (a column or a constant) is read by day, its monthly
/// rows stale: see [`ByNode::ctes`].
fn dirty_month(month: &str) -> String {
    format!("({month} IN (SELECT month_ms FROM dirty_months))")
}

/// Month buckets read one by one; a longer period is read at once.
const MAX_BUCKETS: usize = 24;

/// The whole UTC days inside the whole hours `[a, b)` that the daily
/// rollups hold: those before `through`. `(b, b)` when there are none.
pub(super) fn whole_days(a: i64, b: i64, through: i64) -> (i64, i64) {
    let from = day_of(a.saturating_add(DAY_MS - 1));
    let to = day_of(b).min(through);
    if from < to { (from, to) } else { (b, b) }
}

/// The whole UTC calendar months inside the whole days `[from, to)`
/// that the monthly rollups hold: those before `through`. `(to, to)`
/// when there are none.
pub(super) fn whole_months(from: i64, to: i64, through: i64) -> (i64, i64) {
    let first = match month_of(from) {
        m if m == from => m,
        // No whole day: `from` may be near `i64::MAX`.
        m => month_of(m.saturating_add(32 * DAY_MS)),
    };
    let last = month_of(to).min(through);
    if first < last {
        (first, last)
    } else {
        (to, to)
    }
}

/// The hours of `[$3, $4)` with reports received since the fold's
/// watermark: not folded yet, so read per node. (`+` keeps SQLite on the
/// `received_ms` index: a month of `interval_end_ms` is every report.)
///
/// The reads below join `CROSS JOIN` from these small sets (dirty hours,
/// clamped keys) into the per-node rollup: SQLite keeps that order, and
/// with `IN (…)` it scanned the whole month of the per-node rollup
/// (1.5 s of the 2 s per chargeback on the benchmark's month).
pub(super) const DIRTY: &str = concat!(
    "dirty AS (",
    unfolded_hours!(),
    " AND +interval_end_ms >= $3 AND +interval_end_ms < $4)"
);

/// The days of [`DIRTY`]'s hours: read from the hourly rollups by node.
const DIRTY_DAYS: &str =
    "dirty_days AS (SELECT DISTINCT (hour_ms / 86400000) * 86400000 AS day_ms FROM dirty)";

impl Ledger {
    /// As [`Self::gpu_groups`], but summed over nodes wherever that
    /// prices the same: groups read from the node-less rollup have an
    /// empty `node`. For every grouping but by node.
    pub(crate) async fn gpu_groups_by_tenant(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<GpuGroup>, LedgerError> {
        let (a, b) = whole_hours(from_ms, to_ms);
        let only = in_cluster(cluster);
        let h_only = only.replace("cluster", "h.cluster");
        let sums = GPU_NODE_SUMS;
        let raw = GPU_BY_NODE.raw;
        let cols = "tenant, cluster, workload, model, slice_fraction";
        let rest = "cluster, workload, model, slice_fraction";
        let (f, p, h) = (
            qualified("f", &format!("{rest}, {sums}")),
            qualified("p", &format!("{rest}, {sums}")),
            qualified("h", &format!("tenant, node, {rest}, {sums}")),
        );
        let over = |t: &str| same_key(t, "o", cols);
        // Joins to `over`, not `IN (SELECT * FROM over)`: PostgreSQL
        // cannot estimate a CTE's rows, and where its guess outgrew
        // work_mem it tested every row against every key of `over`
        // instead of hashing them. The per-node branch only runs where
        // `over` has a key (a one-time filter on PostgreSQL): otherwise
        // PostgreSQL sorted the month of the per-node rollup to join it
        // with nothing.
        let query = format!(
            "WITH {DIRTY}, \
             pieces AS (SELECT tenant, node, {rest}, {sums} \
             FROM dirty d CROSS JOIN gpu_usage_hourly h WHERE h.hour_ms = d.hour_ms{h_only} \
             UNION ALL {raw} WHERE interval_end_ms >= $1 AND interval_end_ms < $3{only} \
             UNION ALL {raw} WHERE interval_end_ms >= $4 AND interval_end_ms < $2{only}), \
             folded AS (SELECT {cols}, {sums}, over_rows \
             FROM gpu_usage_hourly_tenant WHERE hour_ms >= $3 AND hour_ms < $4{only} \
             AND hour_ms NOT IN (SELECT hour_ms FROM dirty)), \
             over AS (SELECT {cols} FROM folded WHERE over_rows > 0 \
             UNION SELECT {cols} FROM pieces WHERE used_us > allocated_us) \
             SELECT tenant, node, {rest}, \
             CAST(SUM(allocated_us) AS BIGINT) AS allocated_us, \
             CAST(SUM(used_us) AS BIGINT) AS used_us, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj, \
             CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION) AS memory_byte_seconds, \
             CAST(SUM(idle_us) AS BIGINT) AS idle_us \
             FROM (SELECT f.tenant, '' AS node, {f} FROM folded f \
             LEFT JOIN over o ON {over_f} WHERE o.tenant IS NULL \
             UNION ALL SELECT p.tenant, CASE WHEN o.tenant IS NULL THEN '' ELSE p.node END, {p} \
             FROM pieces p LEFT JOIN over o ON {over_p} \
             UNION ALL SELECT {h} FROM over o CROSS JOIN gpu_usage_hourly h WHERE {over_h} \
             AND h.hour_ms >= $3 AND h.hour_ms < $4 \
             AND h.hour_ms NOT IN (SELECT hour_ms FROM dirty) \
             AND EXISTS (SELECT 1 FROM over)) u \
             GROUP BY tenant, node, {rest} \
             ORDER BY tenant, node, {rest}",
            over_f = over("f"),
            over_p = over("p"),
            over_h = over("h"),
        );
        self.period_query(&query, from_ms, to_ms, (a, b), cluster)
            .await
    }

    /// As [`Self::io_groups`], summed over nodes: every group's `node` is
    /// empty.
    pub(crate) async fn io_groups_by_tenant(
        &self,
        from_ms: i64,
        to_ms: i64,
        cluster: Option<&str>,
    ) -> Result<Vec<IoGroup>, LedgerError> {
        let (a, b) = whole_hours(from_ms, to_ms);
        let only = in_cluster(cluster);
        let h_only = only.replace("cluster", "h.cluster");
        let cols = "tenant, cluster, network_ingress_bytes, network_egress_bytes, \
                    pcie_h2d_bytes, pcie_d2h_bytes";
        let h_cols = "h.tenant, h.cluster, h.network_ingress_bytes, h.network_egress_bytes, \
                      h.pcie_h2d_bytes, h.pcie_d2h_bytes";
        let query = format!(
            "WITH {DIRTY} SELECT tenant, '' AS node, cluster, \
             CAST(SUM(network_ingress_bytes) AS BIGINT) AS network_ingress_bytes, \
             CAST(SUM(network_egress_bytes) AS BIGINT) AS network_egress_bytes, \
             CAST(SUM(pcie_h2d_bytes) AS BIGINT) AS pcie_h2d_bytes, \
             CAST(SUM(pcie_d2h_bytes) AS BIGINT) AS pcie_d2h_bytes \
             FROM (SELECT {cols} FROM io_usage_hourly_tenant WHERE hour_ms >= $3 AND hour_ms < $4 \
             AND hour_ms NOT IN (SELECT hour_ms FROM dirty){only} \
             UNION ALL SELECT {h_cols} FROM dirty d CROSS JOIN io_usage_hourly h \
             WHERE h.hour_ms = d.hour_ms{h_only} \
             UNION ALL SELECT {cols} FROM io_usage \
             WHERE interval_end_ms >= $1 AND interval_end_ms < $3{only} \
             UNION ALL SELECT {cols} FROM io_usage \
             WHERE interval_end_ms >= $4 AND interval_end_ms < $2{only}) u \
             GROUP BY tenant, cluster ORDER BY tenant, cluster"
        );
        self.period_query(&query, from_ms, to_ms, (a, b), cluster)
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tally_contract::wire::GpuUsage;

    use super::*;
    use crate::{
        audit_keys::NodeKeys,
        ledger::{
            Cutoffs,
            energy::{EnergyHour, tests::raw_energy},
            ingest::{Ingested, tests::report},
        },
    };

    /// An hour boundary, in ms.
    const H: i64 = 1_800_000_000_000 / HOUR_MS * HOUR_MS;

    /// GPU usage summed from raw rows alone: what chargeback read before
    /// the rollups.
    async fn raw_gpu(l: &Ledger, from: i64, to: i64) -> Vec<GpuGroup> {
        sqlx::query_as(
            "SELECT tenant, node, cluster, workload, model, slice_fraction, \
             CAST(SUM(allocated_us) AS BIGINT) AS allocated_us, \
             CAST(SUM(COALESCE(sm_us, allocated_us)) AS BIGINT) AS used_us, \
             CAST(SUM(energy_mj) AS BIGINT) AS energy_mj, \
             CAST(SUM(CAST(memory_byte_seconds AS DOUBLE PRECISION)) AS DOUBLE PRECISION) \
             AS memory_byte_seconds, CAST(SUM(idle_us) AS BIGINT) AS idle_us \
             FROM gpu_usage WHERE interval_end_ms >= $1 AND interval_end_ms < $2 \
             GROUP BY tenant, node, cluster, workload, model, slice_fraction \
             ORDER BY tenant, node, cluster, workload, model, slice_fraction",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&l.pool)
        .await
        .unwrap()
    }

    /// I/O summed from raw rows alone.
    async fn raw_io(l: &Ledger, from: i64, to: i64) -> Vec<IoGroup> {
        sqlx::query_as(
            "SELECT tenant, node, cluster, \
             CAST(SUM(network_ingress_bytes) AS BIGINT) AS network_ingress_bytes, \
             CAST(SUM(network_egress_bytes) AS BIGINT) AS network_egress_bytes, \
             CAST(SUM(pcie_h2d_bytes) AS BIGINT) AS pcie_h2d_bytes, \
             CAST(SUM(pcie_d2h_bytes) AS BIGINT) AS pcie_d2h_bytes \
             FROM io_usage WHERE interval_end_ms >= $1 AND interval_end_ms < $2 \
             GROUP BY tenant, node, cluster ORDER BY tenant, node, cluster",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&l.pool)
        .await
        .unwrap()
    }

    /// Reports of two nodes every 7 minutes over five hours, with usage of
    /// three tenants on two models, MIG slices and GPUs without SM time.
    async fn fill(l: &Ledger) {
        fill_from(l, H, 7 * 60_000, 43).await;
    }

    /// As [`fill`]: `count` reports per node, `step_ms` apart from `start`.
    async fn fill_from(l: &Ledger, start: i64, step_ms: u64, count: u64) {
        let keys = std::sync::Arc::new(NodeKeys::default());
        for node in ["n1", "n2"] {
            for seq in 1..=count {
                let mut r = report(node, seq);
                // Two clusters, and workloads on some rows: the rollups
                // are keyed by both.
                r.cluster = (node == "n2").then(|| "prod-eu".to_owned());
                let end = start as u64 + seq * step_ms - 1 + u64::from(node == "n2") * 1_000;
                r.interval_end_ms = end;
                r.interval_start_ms = end - step_ms.min(7 * 60_000);
                let template = r.gpu_usage[0].clone();
                r.gpu_usage = (0..6u64)
                    .map(|k| GpuUsage {
                        tenant: format!("t{}", (seq + k) % 3),
                        gpu: k.to_string(),
                        uuid: format!("GPU-{k}"),
                        model: if k % 2 == 0 { "H100" } else { "A100" }.into(),
                        slice_fraction: if k == 5 { 3.0 / 7.0 } else { 1.0 },
                        allocated_us: 420_000_000 - seq * 1_000 - k,
                        sm_us: (k != 3).then_some(100_000_000 + seq * 7 + k),
                        memory_byte_seconds: (1 << 40) + seq * 12_345 + k,
                        energy_mj: 84_000_000 + seq + k,
                        workload: (k % 3 != 0).then(|| format!("w{}", (seq + k) % 2)),
                        // Idle on some devices only, and none from older
                        // agents' rows.
                        idle_us: if k % 2 == 1 {
                            60_000_000 + seq * 11 + k
                        } else {
                            0
                        },
                        ..template.clone()
                    })
                    .collect();
                r.io_usage[0].tenant = format!("t{}", seq % 3);
                r.io_usage[0].network_ingress_bytes = seq * 1_000_003;
                r.io_usage[0].pcie_h2d_bytes = seq * 77;
                let Ingested::Stored { .. } = l.ingest(&r, &r.digest(), 1, &keys).await.unwrap()
                else {
                    panic!("report {node}/{seq} not stored")
                };
            }
        }
    }

    /// The parts of one group are added up, in key order; a sum past 64
    /// bits is an error, as the database's own `SUM` is.
    #[test]
    fn parts_are_summed_per_group_and_overflow_is_refused() {
        let io = |tenant: &str, node: &str, bytes: i64| IoGroup {
            tenant: tenant.into(),
            node: node.into(),
            cluster: "c".into(),
            network_ingress_bytes: bytes,
            ..Default::default()
        };
        let sums = merged(vec![io("b", "n1", 1), io("a", "n2", 2), io("b", "n1", 3)]).unwrap();
        assert_eq!(sums, vec![io("a", "n2", 2), io("b", "n1", 4)]);
        assert!(matches!(
            merged(vec![io("a", "n", i64::MAX), io("a", "n", 1)]),
            Err(LedgerError::SumOverflow)
        ));
    }

    /// Every kind of period: whole hours, partial hours at either edge or
    /// both, inside one hour, empty, and everything.
    fn periods() -> Vec<(i64, i64)> {
        let m = 60_000;
        vec![
            (0, i64::MAX),
            (H, H + 3 * HOUR_MS),
            (H + HOUR_MS, H + 2 * HOUR_MS),
            (H + 1, H + 3 * HOUR_MS - 1),
            (H + 13 * m, H + 4 * HOUR_MS + 5 * m),
            (H - HOUR_MS / 2, H + 2 * HOUR_MS + 7 * m - 1),
            (H + 7 * m - 1, H + 14 * m - 1),
            (H + 10 * m, H + 50 * m),
            (H + HOUR_MS, H + HOUR_MS),
            (H + 2 * HOUR_MS + 1, H + 5 * HOUR_MS + 31 * m),
        ]
    }

    async fn rollups_match_raw_rows(l: &Ledger) {
        fill(l).await;
        for (from, to) in periods() {
            let gpu = l.gpu_groups(from, to, None).await.unwrap();
            assert_eq!(
                gpu,
                raw_gpu(l, from, to).await,
                "GPU usage in [{from}, {to})"
            );
            let io = l.io_groups(from, to, None).await.unwrap();
            assert_eq!(io, raw_io(l, from, to).await, "I/O in [{from}, {to})");
            for c in [None, Some("prod-eu")] {
                assert_eq!(
                    l.energy_hours(from, to, c).await.unwrap(),
                    raw_energy(l, from, to, c, true).await,
                    "energy per hour in [{from}, {to}) of {c:?}"
                );
            }
            let mut eu = raw_gpu(l, from, to).await;
            eu.retain(|g| g.cluster == "prod-eu");
            assert_eq!(l.gpu_groups(from, to, Some("prod-eu")).await.unwrap(), eu);
            let mut eu = raw_io(l, from, to).await;
            eu.retain(|g| g.cluster == "prod-eu");
            assert_eq!(l.io_groups(from, to, Some("prod-eu")).await.unwrap(), eu);
        }
        // Not vacuous: the whole period has every group, read from rollups.
        let all = l.gpu_groups(H, H + 6 * HOUR_MS, None).await.unwrap();
        // Per node (each its own cluster), tenant and model: the rows
        // without a workload, and two workloads on the rest.
        assert!(all.len() > 2 * 3 * 3, "{all:?}");
        assert!(
            all.iter()
                .any(|g| g.cluster == "prod-eu" && g.workload == "w1")
        );
        assert!(all.iter().any(|g| g.idle_us > 0), "idle time is summed");
        let hourly: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gpu_usage_hourly")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert!(hourly > 0);
    }

    #[tokio::test]
    async fn rollups_give_the_raw_rows_sums_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        rollups_match_raw_rows(&ledger).await;
    }

    /// Runs on the test PostgreSQL that `cargo xtask test` starts
    /// (`TALLY_TEST_POSTGRES_URL`); says skipped without one.
    #[tokio::test]
    async fn rollups_give_the_raw_rows_sums_on_postgres() {
        let Some(ledger) = postgres_ledger("rollups").await else {
            return;
        };
        rollups_match_raw_rows(&ledger).await;
    }

    /// A ledger in a new SQLite file, kept as long as the directory.
    pub(crate) async fn sqlite_ledger(max_connections: u32) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        let ledger = Ledger::open(&url, max_connections).await.unwrap();
        (dir, ledger)
    }

    /// A ledger in a new database on the test PostgreSQL that `cargo xtask
    /// test` starts (`TALLY_TEST_POSTGRES_URL`); `None`, saying skipped,
    /// without one.
    pub(crate) async fn postgres_ledger(prefix: &str) -> Option<Ledger> {
        let url = postgres_database(prefix).await?;
        Some(Ledger::open(&url, 4).await.unwrap())
    }

    /// The URL of the test PostgreSQL that `cargo xtask test` starts
    /// (`TALLY_TEST_POSTGRES_URL`); `None`, saying skipped, without one.
    pub(crate) fn postgres_server() -> Option<String> {
        let server = std::env::var("TALLY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty());
        if server.is_none() {
            eprintln!("skipped: no TALLY_TEST_POSTGRES_URL (cargo xtask test sets it)");
        }
        server
    }

    /// The URL of a new, empty database on the test PostgreSQL; `None`,
    /// saying skipped, without one.
    pub(crate) async fn postgres_database(prefix: &str) -> Option<String> {
        let server = postgres_server()?;
        let name = format!(
            "tally_{prefix}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&server).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let (base, _) = server.rsplit_once('/').unwrap();
        Some(format!("{base}/{name}"))
    }

    /// Reports of node n3 whose `sm_us` exceeds `allocated_us` for one key
    /// (t1 on H100) in some hours: where `basis=used` clamps per node.
    async fn fill_clamped(l: &Ledger, received_ms: i64) {
        let keys = std::sync::Arc::new(NodeKeys::default());
        for seq in 1..=9u64 {
            let mut r = report("n3", seq);
            let end = H as u64 + seq * 31 * 60_000 + 17;
            r.interval_end_ms = end;
            r.interval_start_ms = end - 31 * 60_000;
            let template = r.gpu_usage[0].clone();
            r.gpu_usage = vec![
                GpuUsage {
                    tenant: "t1".into(),
                    model: "H100".into(),
                    allocated_us: 1_000_000 * seq,
                    // Over in odd reports, far under in even ones.
                    sm_us: Some(if seq % 2 == 1 { 3_000_000 * seq } else { 1_000 }),
                    ..template.clone()
                },
                GpuUsage {
                    tenant: "t2".into(),
                    model: "A100".into(),
                    slice_fraction: 3.0 / 7.0,
                    allocated_us: 1_234_567 * seq,
                    sm_us: Some(1_000_000 * seq),
                    ..template.clone()
                },
            ];
            let Ingested::Stored { .. } =
                l.ingest(&r, &r.digest(), received_ms, &keys).await.unwrap()
            else {
                panic!("report n3/{seq} not stored")
            };
        }
    }

    /// Every grouping the node-less read serves, priced both ways.
    async fn prices_match(l: &Ledger, when: &str) {
        use crate::chargeback::{Basis, GroupBy, compute};
        let prices = crate::config::Prices {
            gpu_hour: [("H100", 2.49), ("A100", 1.37), ("default", 1.0)]
                .into_iter()
                .map(|(m, p)| (m.to_owned(), p))
                .collect(),
            energy_kwh: 0.123,
            network_gib: 0.011,
            pcie_gib: 0.007,
            ..Default::default()
        };
        // Time of use in a zone half an hour off UTC; H is 13:30 there, so
        // the window holds two of the filled hours.
        let (default, tou) = crate::config::TimeOfUse::parse(
            r#"{ default = 0.123, "15:00-17:00" = 0.05 }"#,
            "Asia/Kolkata",
        );
        let tou_prices = crate::config::Prices {
            energy_kwh: default,
            energy_tou: Some(tou),
            ..prices.clone()
        };
        let (mut priced, mut tou_differs) = (0, false);
        for ((from, to), cluster) in periods()
            .into_iter()
            .flat_map(|p| [(p, None), (p, Some("prod-eu"))])
        {
            let (mut gpu, mut io) = (raw_gpu(l, from, to).await, raw_io(l, from, to).await);
            if let Some(c) = cluster {
                gpu.retain(|g| g.cluster == c);
                io.retain(|g| g.cluster == c);
            }
            let by_tenant = l.gpu_groups_by_tenant(from, to, cluster).await.unwrap();
            let io_by_tenant = l.io_groups_by_tenant(from, to, cluster).await.unwrap();
            let hours = raw_energy(l, from, to, cluster, false).await;
            let hours_by_tenant = l.energy_hours_by_tenant(from, to, cluster).await.unwrap();
            assert_eq!(
                hours_by_tenant, hours,
                "{when}: energy per hour in [{from}, {to}) of {cluster:?}"
            );
            for group_by in [
                GroupBy::Tenant,
                GroupBy::TenantModel,
                GroupBy::TenantWorkload,
                GroupBy::ClusterTenant,
                GroupBy::ClusterTenantWorkload,
            ] {
                for basis in [Basis::Allocated, Basis::Used] {
                    let price = |gpu: &[GpuGroup], io: &[IoGroup]| {
                        compute(
                            &prices,
                            gpu,
                            io,
                            None,
                            group_by,
                            basis,
                            "f".into(),
                            "t".into(),
                        )
                    };
                    let want = price(&gpu, &io);
                    assert_eq!(
                        price(&by_tenant, &io_by_tenant),
                        want,
                        "{when}: {group_by:?} {basis:?} in [{from}, {to}) of {cluster:?}"
                    );
                    priced += want.total_minor;
                    let tou = |gpu: &[GpuGroup], io: &[IoGroup], hours: &[EnergyHour]| {
                        let (f, t) = ("f".into(), "t".into());
                        compute(&tou_prices, gpu, io, Some(hours), group_by, basis, f, t)
                    };
                    let want_tou = tou(&gpu, &io, &hours);
                    assert_eq!(
                        tou(&by_tenant, &io_by_tenant, &hours_by_tenant),
                        want_tou,
                        "{when}: time of use, {group_by:?} {basis:?} in [{from}, {to}) of \
                         {cluster:?}"
                    );
                    tou_differs |= want_tou.total_minor != want.total_minor;
                }
            }
        }
        assert!(priced > 0, "{when}: nothing was priced");
        assert!(tou_differs, "{when}: no energy fell in the cheap window");
    }

    /// The node-less read prices every period, grouping and basis to the
    /// cent as the raw rows do: before any fold, after one, with a late
    /// report since, and after folding again (re-folds count once).
    async fn node_less_reads_price_as_raw_rows(l: &Ledger) {
        use crate::chargeback::{Basis, GroupBy, compute};
        fill(l).await;
        fill_clamped(l, 1).await;
        prices_match(l, "nothing folded").await;
        assert!(l.fold(COMMIT + 100).await.unwrap() > 0);
        let folded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gpu_usage_hourly_tenant")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert!(folded > 0);
        prices_match(l, "folded").await;
        // Read from the fold: clean keys summed over nodes, the clamped
        // key per node.
        let g = l
            .gpu_groups_by_tenant(H, H + 5 * HOUR_MS, None)
            .await
            .unwrap();
        assert!(
            g.iter().any(|g| g.node.is_empty() && g.tenant == "t0"),
            "{g:?}"
        );
        assert!(
            g.iter()
                .any(|g| g.node == "n3" && g.tenant == "t1" && g.model == "H100"),
            "{g:?}"
        );
        // Not vacuous: summed over nodes before the clamp, the cents
        // would differ.
        let raw = raw_gpu(l, H, H + 5 * HOUR_MS).await;
        let mut naive: Vec<GpuGroup> = Vec::new();
        for r in raw.iter().cloned() {
            match naive.iter_mut().find(|n| {
                (&n.tenant, &n.model, n.slice_fraction) == (&r.tenant, &r.model, r.slice_fraction)
            }) {
                Some(n) => {
                    n.allocated_us += r.allocated_us;
                    n.used_us += r.used_us;
                }
                None => naive.push(GpuGroup {
                    node: String::new(),
                    ..r
                }),
            }
        }
        let used = |gpu: &[GpuGroup]| {
            let prices = crate::config::Prices {
                gpu_hour: [("default".to_owned(), 1.0)].into(),
                ..Default::default()
            };
            compute(
                &prices,
                gpu,
                &[],
                None,
                GroupBy::Tenant,
                Basis::Used,
                "f".into(),
                "t".into(),
            )
        };
        assert_ne!(used(&naive), used(&raw));
        assert_eq!(used(&g), used(&raw));
        // A late report into a folded hour, received after the watermark.
        let keys = std::sync::Arc::new(NodeKeys::default());
        let mut late = report("n1", 999);
        late.interval_end_ms = H as u64 + HOUR_MS as u64 + 5;
        late.interval_start_ms = late.interval_end_ms - 60_000;
        l.ingest(&late, &late.digest(), 200, &keys).await.unwrap();
        prices_match(l, "late report, not folded").await;
        l.fold(COMMIT + 300).await.unwrap();
        l.fold(COMMIT + 300).await.unwrap();
        prices_match(l, "folded twice").await;
    }

    /// The fold's commit lag, as a `now` that moves the watermark past 0.
    const COMMIT: i64 = 10 * 60_000;

    #[tokio::test]
    async fn node_less_reads_price_as_raw_rows_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        node_less_reads_price_as_raw_rows(&ledger).await;
    }

    #[tokio::test]
    async fn node_less_reads_price_as_raw_rows_on_postgres() {
        let Some(ledger) = postgres_ledger("nodeless").await else {
            return;
        };
        node_less_reads_price_as_raw_rows(&ledger).await;
    }

    /// 2027-01-30T08:00:00Z: reports from here cross a month's end.
    const M: i64 = 1_801_296_000_000;

    /// The reads by node give the raw rows' sums for every period.
    async fn by_node_matches_raw_rows(l: &Ledger, periods: &[(i64, i64)], when: &str) {
        for &(from, to) in periods {
            let raw = raw_gpu(l, from, to).await;
            assert_eq!(
                l.gpu_groups(from, to, None).await.unwrap(),
                raw,
                "{when}: GPU usage in [{from}, {to})"
            );
            assert_eq!(
                l.io_groups(from, to, None).await.unwrap(),
                raw_io(l, from, to).await,
                "{when}: I/O in [{from}, {to})"
            );
            let mut eu = raw;
            eu.retain(|g| g.cluster == "prod-eu");
            assert_eq!(
                l.gpu_groups(from, to, Some("prod-eu")).await.unwrap(),
                eu,
                "{when}: prod-eu's GPU usage in [{from}, {to})"
            );
        }
    }

    /// The per-node daily rollups: every period reads as the raw rows
    /// before any fold, with days folded (across a month's end), with a
    /// late report into a folded day, and after folding again.
    async fn daily_reads_match_raw_rows(l: &Ledger) {
        // Every 97 minutes for four and a half days.
        fill_from(l, M, 97 * 60_000 + 13, 68).await;
        let d0 = day_of(M);
        let m = 60_000;
        let periods = [
            (0, i64::MAX),
            (d0, d0 + 6 * DAY_MS),
            (d0 + DAY_MS, d0 + 3 * DAY_MS),
            (d0 + DAY_MS + HOUR_MS, d0 + 4 * DAY_MS - HOUR_MS),
            (d0 + DAY_MS + 1, d0 + 4 * DAY_MS - 1),
            (M + 13 * m, M + 3 * DAY_MS + 5 * m),
            (d0 + 2 * DAY_MS + 5, d0 + 2 * DAY_MS + 7 * HOUR_MS),
            (d0 + 2 * DAY_MS, d0 + 3 * DAY_MS),
        ];
        by_node_matches_raw_rows(l, &periods, "nothing folded").await;
        // Folded through Feb 1: Jan 30 and 31 in January's bucket, Feb 1
        // in February's; later days are read per hour.
        let now = d0 + 3 * DAY_MS + COMMIT;
        l.fold(now).await.unwrap();
        let days: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT day_ms FROM gpu_usage_daily ORDER BY day_ms")
                .fetch_all(&l.pool)
                .await
                .unwrap();
        assert_eq!(days, [d0, d0 + DAY_MS, d0 + 2 * DAY_MS]);
        let months: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT month_ms) FROM io_usage_daily")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert_eq!(months, 2);
        by_node_matches_raw_rows(l, &periods, "folded through Feb 1").await;
        // January is over: folded from its days, not read (no whole
        // month in these periods).
        let months: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT month_ms FROM gpu_usage_monthly")
                .fetch_all(&l.pool)
                .await
                .unwrap();
        assert_eq!(months, [month_of(d0)]);
        // Not vacuous: the whole days are read from the daily rollup.
        let (from, to) = (d0 + DAY_MS, d0 + 3 * DAY_MS);
        sqlx::query("UPDATE gpu_usage_daily SET allocated_us = allocated_us + 1")
            .execute(&l.pool)
            .await
            .unwrap();
        assert_ne!(
            l.gpu_groups(from, to, None).await.unwrap(),
            raw_gpu(l, from, to).await
        );
        sqlx::query("UPDATE gpu_usage_daily SET allocated_us = allocated_us - 1")
            .execute(&l.pool)
            .await
            .unwrap();
        // A late report into a folded day, received after the watermark:
        // its day is read per hour until the next fold.
        let keys = std::sync::Arc::new(NodeKeys::default());
        let mut late = report("n1", 999);
        late.interval_end_ms = (d0 + DAY_MS + 5 * HOUR_MS + 7) as u64;
        late.interval_start_ms = late.interval_end_ms - 60_000;
        l.ingest(&late, &late.digest(), now, &keys).await.unwrap();
        by_node_matches_raw_rows(l, &periods, "late report, not folded").await;
        l.fold(now + 3 * DAY_MS).await.unwrap();
        l.fold(now + 3 * DAY_MS).await.unwrap();
        let days: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT day_ms) FROM gpu_usage_daily")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert_eq!(days, 5, "every day folded once over");
        by_node_matches_raw_rows(l, &periods, "folded again").await;
    }

    /// PostgreSQL vacuumed each of `tables` `times` times.
    async fn assert_vacuumed(ledger: &Ledger, tables: [&str; 2], times: i64) {
        for table in tables {
            let vacuums: i64 = sqlx::query_scalar(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = $1",
            )
            .bind(table)
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
            assert_eq!(vacuums, times, "{table}");
        }
    }

    #[tokio::test]
    async fn daily_reads_give_the_raw_rows_sums_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        daily_reads_match_raw_rows(&ledger).await;
    }

    #[tokio::test]
    async fn daily_reads_give_the_raw_rows_sums_on_postgres() {
        let Some(ledger) = postgres_ledger("daily").await else {
            return;
        };
        daily_reads_match_raw_rows(&ledger).await;
        // The two folds that folded days vacuumed the daily rollups (their
        // reads scan the keys alone only on pages marked all-visible); the
        // repeated fold, with no day to fold, did not.
        assert_vacuumed(&ledger, ["gpu_usage_daily", "io_usage_daily"], 2).await;
    }

    /// 2027-02-01 and 2027-03-01, midnight UTC.
    const FEB: i64 = 1_801_440_000_000;
    const MAR: i64 = 1_803_859_200_000;

    /// The per-node monthly rollups: periods with a whole month and
    /// partial days and hours at both ends read as the raw rows before
    /// any fold, with months folded, with a late report into a folded
    /// month, after its re-fold, and after rollup retention removed the
    /// month's first days.
    async fn monthly_reads_match_raw_rows(l: &Ledger) {
        // Every 7 h 13 min from Jan 30 08:00 to Mar 4: all of February.
        fill_from(l, M, 433 * 60_000 + 13, 110).await;
        let (d0, m) = (day_of(M), 60_000);
        let periods = [
            (0, i64::MAX),
            (FEB, MAR),
            (FEB - HOUR_MS, MAR + HOUR_MS),
            (M + 13 * m + 7, MAR + 2 * DAY_MS + 5 * HOUR_MS + 7 * m),
            (d0 + DAY_MS, MAR + DAY_MS),
            (FEB + 1, MAR - 1),
            (FEB + 9 * DAY_MS, FEB + 11 * DAY_MS + 3),
        ];
        by_node_matches_raw_rows(l, &periods, "nothing folded").await;
        // Days folded through Mar 3, months through February.
        let now = MAR + 3 * DAY_MS + COMMIT;
        l.fold(now).await.unwrap();
        let months = |l: &Ledger| {
            let pool = l.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT DISTINCT month_ms FROM io_usage_monthly ORDER BY month_ms",
                )
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        assert_eq!(months(l).await, [month_of(d0), FEB]);
        let through: i64 = sqlx::query_scalar(
            "SELECT received_ms FROM rollup_watermark WHERE name = 'node_monthly'",
        )
        .fetch_one(&l.pool)
        .await
        .unwrap();
        assert_eq!(through, MAR);
        by_node_matches_raw_rows(l, &periods, "folded through February").await;
        // Not vacuous: February is read from the monthly rollup.
        let bump = |by: i64| {
            let pool = l.pool.clone();
            async move {
                sqlx::query("UPDATE gpu_usage_monthly SET allocated_us = allocated_us + $1")
                    .bind(by)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        bump(1).await;
        assert_ne!(
            l.gpu_groups(FEB, MAR, None).await.unwrap(),
            raw_gpu(l, FEB, MAR).await
        );
        bump(-1).await;
        // A late report into a folded day of February, received after the
        // watermark: February is read by day until the next fold.
        let keys = std::sync::Arc::new(NodeKeys::default());
        let mut late = report("n1", 999);
        late.interval_end_ms = (FEB + 9 * DAY_MS + 5 * HOUR_MS + 7) as u64;
        late.interval_start_ms = late.interval_end_ms - 60_000;
        l.ingest(&late, &late.digest(), now, &keys).await.unwrap();
        by_node_matches_raw_rows(l, &periods, "late report, not folded").await;
        l.fold(now + DAY_MS).await.unwrap();
        l.fold(now + DAY_MS).await.unwrap();
        by_node_matches_raw_rows(l, &periods, "re-folded").await;
        // February's monthly rows hold the late report now.
        bump(1).await;
        assert_ne!(
            l.gpu_groups(FEB, MAR, None).await.unwrap(),
            raw_gpu(l, FEB, MAR).await
        );
        bump(-1).await;
        // Rollup retention from Feb 15: January's month goes, with the
        // days before; February's month stays and still answers for all
        // of February (raw rows kept).
        let m = l
            .maintain(
                now + DAY_MS,
                Cutoffs {
                    rollup: Some(FEB + 14 * DAY_MS),
                    ..Cutoffs::default()
                },
            )
            .await;
        assert!(m.unwrap().rollup_rows > 0);
        assert_eq!(months(l).await, [FEB]);
        let first: i64 = sqlx::query_scalar("SELECT MIN(day_ms) FROM gpu_usage_daily")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert_eq!(first, FEB + 14 * DAY_MS);
        by_node_matches_raw_rows(l, &[(FEB, MAR), (FEB, MAR + DAY_MS)], "after retention").await;
    }

    #[tokio::test]
    async fn monthly_reads_give_the_raw_rows_sums_on_sqlite() {
        let (_dir, ledger) = sqlite_ledger(4).await;
        monthly_reads_match_raw_rows(&ledger).await;
    }

    #[tokio::test]
    async fn monthly_reads_give_the_raw_rows_sums_on_postgres() {
        let Some(ledger) = postgres_ledger("monthly").await else {
            return;
        };
        monthly_reads_match_raw_rows(&ledger).await;
        // The fold that folded January and February and the one that
        // re-folded February vacuumed the monthly rollups; the repeated
        // fold and the one under retention, with no month to fold, did
        // not.
        assert_vacuumed(&ledger, ["gpu_usage_monthly", "io_usage_monthly"], 2).await;
    }

    #[test]
    fn months_and_days_are_utc() {
        // 2027-01-30T08:00Z: January 1st and the 30th, midnight.
        assert_eq!(month_of(day_of(M)), 1_798_761_600_000);
        assert_eq!(day_of(M), 1_801_267_200_000);
        // The 32 days after a month's first are in the next month.
        assert_eq!(month_of(1_798_761_600_000 + 32 * DAY_MS), 1_801_440_000_000);
        assert_eq!(
            whole_days(M, M + 3 * DAY_MS, i64::MAX),
            (M - 8 * HOUR_MS + DAY_MS, M - 8 * HOUR_MS + 3 * DAY_MS)
        );
        // Nothing folded yet: every hour is read from the hourly rollup.
        assert_eq!(
            whole_days(M, M + 3 * DAY_MS, 0),
            (M + 3 * DAY_MS, M + 3 * DAY_MS)
        );
        // February whole; January's end and March's start are days.
        assert_eq!(whole_months(day_of(M), MAR + DAY_MS, i64::MAX), (FEB, MAR));
        assert_eq!(whole_months(FEB, MAR, i64::MAX), (FEB, MAR));
        assert_eq!(whole_months(FEB + DAY_MS, MAR, i64::MAX), (MAR, MAR));
        // Not folded yet: read by day.
        assert_eq!(whole_months(FEB, MAR, FEB), (MAR, MAR));
    }

    #[test]
    fn whole_hours_are_inside_the_period() {
        assert_eq!(whole_hours(H, H + HOUR_MS), (H, H + HOUR_MS));
        assert_eq!(
            whole_hours(H + 1, H + 3 * HOUR_MS - 1),
            (H + HOUR_MS, H + 2 * HOUR_MS)
        );
        assert_eq!(whole_hours(H + 1, H + HOUR_MS), (H + HOUR_MS, H + HOUR_MS));
        assert_eq!(whole_hours(H + 1, H + 2), (H + 2, H + 2));
    }
}
