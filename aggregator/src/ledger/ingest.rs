//! Writing a report: its rows, its rollups and the node's latest state in
//! one transaction of a few multi-row statements (see [`super`]).

use std::{collections::BTreeMap, sync::Arc};

use tally_contract::wire::{GpuGauge, Report};

use super::{
    Ledger, LedgerError, Side, audit, cluster, i, rows,
    tx::{Tx, Write, args},
};
use crate::audit_keys::NodeKeys;

/// Rollups are by the hour of a row's `interval_end_ms`.
pub(super) const HOUR_MS: i64 = 3_600_000;

/// The start of the hour that `ms` falls in.
pub(super) fn hour_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}

/// What happened to an ingested report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ingested {
    /// Stored now; `audit_breaks` names every audit record that does not
    /// follow its node's chain.
    Stored { audit_breaks: Vec<String> },
    /// The same report was stored before.
    Duplicate,
    /// A different report was stored under the same (node, boot, seq).
    Conflict,
    /// Its (node, boot, seq) is at or below claims that retention removed
    /// (`claims_removed`): stored once already, or too late to tell.
    Expired,
}

impl Ledger {
    /// Stores `r` exactly once (see the module docs), its audit records
    /// checked with the nodes' `keys` (shared: the SQLite writer keeps them
    /// with the queued report instead of copying every node's key). Returns
    /// once the report is durable.
    pub(crate) async fn ingest(
        &self,
        r: &Report,
        digest: &str,
        received_ms: i64,
        keys: &Arc<NodeKeys>,
    ) -> Result<Ingested, LedgerError> {
        let postgres = match &self.side {
            Side::Sqlite(sqlite) => {
                return sqlite.writer.ingest(r, digest, received_ms, keys).await;
            }
            Side::Postgres(postgres) => postgres,
        };
        let mut tx = postgres.begin().await?;
        let out = write(&mut *tx, r, digest, received_ms, keys).await?;
        if matches!(out, Ingested::Stored { .. }) {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }
}

/// Writes `r` on `conn`, inside a transaction the caller commits, unless
/// its (node, boot, seq) is claimed already: then nothing is written.
pub(super) async fn write(
    conn: &mut impl Tx,
    r: &Report,
    digest: &str,
    received_ms: i64,
    keys: &NodeKeys,
) -> Result<Ingested, LedgerError> {
    let id: Option<i64> = conn
        .fetch_optional(
            "INSERT INTO reports (node, boot_id, seq, interval_start_ms, interval_end_ms, \
             received_ms, digest, cluster) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (node, boot_id, seq) DO NOTHING RETURNING id",
            args([
                r.node.as_str().into(),
                r.boot_id.as_str().into(),
                i(r.seq).into(),
                i(r.interval_start_ms).into(),
                i(r.interval_end_ms).into(),
                received_ms.into(),
                digest.into(),
                r.cluster().into(),
            ]),
        )
        .await?;
    let Some(id) = id else {
        let existing: Option<String> = conn
            .fetch_optional(
                "SELECT digest FROM reports WHERE node = $1 AND boot_id = $2 AND seq = $3",
                args([
                    r.node.as_str().into(),
                    r.boot_id.as_str().into(),
                    i(r.seq).into(),
                ]),
            )
            .await?;
        return Ok(if existing.as_deref() == Some(digest) {
            Ingested::Duplicate
        } else {
            Ingested::Conflict
        });
    };
    let end = i(r.interval_end_ms);
    // The node's row, and what retention removed of this boot's claims:
    // read after claiming, in a statement of its own, so a retention pass
    // removing this very claim meanwhile has either committed (its
    // `claims_removed` row is seen here) or made the claim above wait for
    // it.
    let (last_end, removed): (i64, Option<i64>) = conn
        .fetch_optional(
            "INSERT INTO nodes (node, reports, last_received_ms, last_interval_end_ms, \
             report_interval_ms) VALUES ($1, 1, $2, $3, $4) ON CONFLICT (node) DO UPDATE SET \
             reports = nodes.reports + 1, last_received_ms = excluded.last_received_ms, \
             report_interval_ms = CASE WHEN excluded.last_interval_end_ms >= nodes.last_interval_end_ms \
             THEN excluded.report_interval_ms ELSE nodes.report_interval_ms END, \
             last_interval_end_ms = CASE WHEN excluded.last_interval_end_ms > nodes.last_interval_end_ms \
             THEN excluded.last_interval_end_ms ELSE nodes.last_interval_end_ms END \
             RETURNING last_interval_end_ms, \
             (SELECT last_seq FROM claims_removed WHERE node = $1 AND boot_id = $5)",
            args([
                r.node.as_str().into(),
                received_ms.into(),
                end.into(),
                r.report_interval_ms.map(i).into(),
                r.boot_id.as_str().into(),
            ]),
        )
        .await?
        // An upsert returns its row, inserted or updated.
        .ok_or(sqlx::Error::RowNotFound)?;
    let newest = last_end == end;
    if removed.is_some_and(|last| i(r.seq) <= last) {
        // The caller rolls the claim and the node's row back.
        return Ok(Ingested::Expired);
    }
    // Everything else but the quotas' and audit rows, in one go: no write
    // below reads what another writes.
    let mut writes = Vec::with_capacity(8);
    if newest {
        writes.push(cluster::clear_quotas(r));
    }
    usage(&mut writes, r, id, end);
    rollups(&mut writes, r, end);
    writes.push(gpu_state(r, end));
    // The boot's row of `GET /api/v1/reports`: only this node's reports
    // write it, so replicas wait on it no more than on `nodes`.
    writes.push(Write::Execute {
        sql: add_to_boot_row!("boot_reports"),
        args: args([
            r.node.as_str().into(),
            r.boot_id.as_str().into(),
            1.into(),
            i(r.seq).into(),
            i(r.seq).into(),
            end.into(),
        ]),
    });
    conn.write_all(writes).await?;
    if newest {
        cluster::store_quotas(conn, r, end).await?;
    }
    let audit_breaks = audit::store(conn, r, id, end, keys).await?;
    Ok(Ingested::Stored { audit_breaks })
}

/// The raw usage rows of report `id`.
fn usage<'a>(writes: &mut Vec<Write<'a>>, r: &'a Report, id: i64, end: i64) {
    writes.push(rows::write(
        "gpu_usage (report_id, node, interval_end_ms, tenant, gpu, uuid, model, mig_profile, \
         slice_fraction, allocated_us, sm_us, memory_byte_seconds, energy_mj, cluster, workload, \
         idle_us)",
        &["?"; 16],
        "",
        &r.gpu_usage,
        |a, u| {
            a.add(id)?;
            a.add(&r.node)?;
            a.add(end)?;
            a.add(&u.tenant)?;
            a.add(&u.gpu)?;
            a.add(&u.uuid)?;
            a.add(&u.model)?;
            a.add(u.mig_profile.clone())?;
            a.add(u.slice_fraction)?;
            a.add(i(u.allocated_us))?;
            a.add(u.sm_us.map(i))?;
            a.add(i(u.memory_byte_seconds))?;
            a.add(i(u.energy_mj))?;
            a.add(r.cluster())?;
            a.add(u.workload.as_deref().unwrap_or(""))?;
            a.add(i(u.idle_us))
        },
    ));
    writes.push(rows::write(
        "io_usage (report_id, node, interval_end_ms, tenant, network_ingress_bytes, \
         network_egress_bytes, network_ingress_packets, network_egress_packets, \
         network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes, cluster)",
        &["?"; 12],
        "",
        &r.io_usage,
        |a, u| {
            a.add(id)?;
            a.add(&r.node)?;
            a.add(end)?;
            a.add(&u.tenant)?;
            a.add(i(u.network_ingress_bytes))?;
            a.add(i(u.network_egress_bytes))?;
            a.add(i(u.network_ingress_packets))?;
            a.add(i(u.network_egress_packets))?;
            a.add(i(u.network_dropped_packets))?;
            a.add(i(u.pcie_h2d_bytes))?;
            a.add(i(u.pcie_d2h_bytes))?;
            a.add(r.cluster())
        },
    ));
}

/// One hour of GPU usage of one (tenant, model, slice, workload) on the
/// report's node (and its cluster), summed as chargeback sums the raw rows
/// (`used_us`) and as the totals of `/metrics` count SM time (`sm_us`).
#[derive(Default)]
struct GpuHour {
    allocated_us: i64,
    used_us: i64,
    sm_us: i64,
    energy_mj: i64,
    memory_byte_seconds: f64,
    idle_us: i64,
}

/// One hour of I/O of one tenant on the report's node.
#[derive(Default)]
struct IoHour {
    network_ingress_bytes: i64,
    network_egress_bytes: i64,
    pcie_h2d_bytes: i64,
    pcie_d2h_bytes: i64,
}

/// Adds `r` to its node's hourly rollups. Every row written is the
/// report's own node's, each key once per statement, in key order:
/// concurrent reports lock rows in the same order. The totals of
/// `/metrics` are folded from these rows off the ingest path
/// ([`super::totals`]).
fn rollups<'a>(writes: &mut Vec<Write<'a>>, r: &'a Report, end: i64) {
    let hour = hour_of(end);
    let mut gpu: BTreeMap<(&str, &str, u64, &str), GpuHour> = BTreeMap::new();
    let mut io: BTreeMap<&str, IoHour> = BTreeMap::new();
    for u in &r.gpu_usage {
        let key = (
            u.tenant.as_str(),
            u.model.as_str(),
            u.slice_fraction.to_bits(),
            u.workload.as_deref().unwrap_or(""),
        );
        let h = gpu.entry(key).or_default();
        let allocated = i(u.allocated_us);
        h.allocated_us = h.allocated_us.saturating_add(allocated);
        h.used_us = h.used_us.saturating_add(u.sm_us.map_or(allocated, i));
        h.sm_us = h.sm_us.saturating_add(u.sm_us.map_or(0, i));
        h.energy_mj = h.energy_mj.saturating_add(i(u.energy_mj));
        h.idle_us = h.idle_us.saturating_add(i(u.idle_us));
        // As SQL's CAST(BIGINT AS DOUBLE PRECISION) of the raw row.
        h.memory_byte_seconds += i(u.memory_byte_seconds) as f64;
    }
    for u in &r.io_usage {
        let h = io.entry(u.tenant.as_str()).or_default();
        h.network_ingress_bytes = h
            .network_ingress_bytes
            .saturating_add(i(u.network_ingress_bytes));
        h.network_egress_bytes = h
            .network_egress_bytes
            .saturating_add(i(u.network_egress_bytes));
        h.pcie_h2d_bytes = h.pcie_h2d_bytes.saturating_add(i(u.pcie_h2d_bytes));
        h.pcie_d2h_bytes = h.pcie_d2h_bytes.saturating_add(i(u.pcie_d2h_bytes));
    }
    writes.push(rows::write(
        "gpu_usage_hourly (hour_ms, tenant, node, model, slice_fraction, allocated_us, used_us, \
         energy_mj, memory_byte_seconds, cluster, workload, idle_us, sm_us)",
        &["?"; 13],
        "ON CONFLICT (hour_ms, tenant, node, model, slice_fraction, cluster, workload) DO UPDATE SET \
         allocated_us = gpu_usage_hourly.allocated_us + excluded.allocated_us, \
         used_us = gpu_usage_hourly.used_us + excluded.used_us, \
         energy_mj = gpu_usage_hourly.energy_mj + excluded.energy_mj, \
         memory_byte_seconds = gpu_usage_hourly.memory_byte_seconds + excluded.memory_byte_seconds, \
         idle_us = gpu_usage_hourly.idle_us + excluded.idle_us, \
         sm_us = gpu_usage_hourly.sm_us + excluded.sm_us",
        gpu,
        |a, ((tenant, model, slice, workload), h)| {
            a.add(hour)?;
            a.add(tenant)?;
            a.add(&r.node)?;
            a.add(model)?;
            a.add(f64::from_bits(slice))?;
            a.add(h.allocated_us)?;
            a.add(h.used_us)?;
            a.add(h.energy_mj)?;
            a.add(h.memory_byte_seconds)?;
            a.add(r.cluster())?;
            a.add(workload)?;
            a.add(h.idle_us)?;
            a.add(h.sm_us)
        },
    ));
    writes.push(rows::write(
        "io_usage_hourly (hour_ms, tenant, node, network_ingress_bytes, network_egress_bytes, \
         pcie_h2d_bytes, pcie_d2h_bytes, cluster)",
        &["?"; 8],
        "ON CONFLICT (hour_ms, tenant, node, cluster) DO UPDATE SET \
         network_ingress_bytes = io_usage_hourly.network_ingress_bytes + excluded.network_ingress_bytes, \
         network_egress_bytes = io_usage_hourly.network_egress_bytes + excluded.network_egress_bytes, \
         pcie_h2d_bytes = io_usage_hourly.pcie_h2d_bytes + excluded.pcie_h2d_bytes, \
         pcie_d2h_bytes = io_usage_hourly.pcie_d2h_bytes + excluded.pcie_d2h_bytes",
        io,
        |a, (tenant, h)| {
            a.add(hour)?;
            a.add(tenant)?;
            a.add(&r.node)?;
            a.add(h.network_ingress_bytes)?;
            a.add(h.network_egress_bytes)?;
            a.add(h.pcie_h2d_bytes)?;
            a.add(h.pcie_d2h_bytes)?;
            a.add(r.cluster())
        },
    ));
}

/// One `gpu_state` row's values: absent doubles and idle times travel as
/// -1 and become NULL (see [`gpu_state`]).
#[rustfmt::skip]
const GPU_STATE_ROW: &[&str] = &[
    "?", "?", "?", "?", "?", "?",               // node … parent_uuid
    "NULLIF(?, -1.0)", "?", "NULLIF(?, -1.0)",  // slice_fraction, health, utilization_ratio
    "?", "?", "?", "?", "?", "?", "?",          // memory_used_bytes … mig_mode
    "NULLIF(?, -1)", "?",                       // idle_since_ms, workloads
];

/// The gauges of the report's devices, where the report is newer than
/// what is stored (a report replayed from a spool changes nothing).
fn gpu_state(r: &Report, end: i64) -> Write<'_> {
    // One row per device (the last wins), in key order.
    let gpus: BTreeMap<&str, &GpuGauge> = r.gpus.iter().map(|g| (g.uuid.as_str(), g)).collect();
    // Absent doubles travel as -1 and become NULL in SQL: a value (`Arg`)
    // has no NULL double, since sqlx's `Any` driver, which wrote these
    // rows first, bound one as a float4 that the prepared statement kept,
    // and refused the next real double ("incorrect binary data format").
    rows::write(
        "gpu_state (node, uuid, gpu, model, mig_profile, parent_uuid, slice_fraction, health, \
         utilization_ratio, memory_used_bytes, memory_total_bytes, processes, updated_ms, state, \
         tenants, mig_mode, idle_since_ms, workloads)",
        GPU_STATE_ROW,
        "ON CONFLICT (node, uuid) DO UPDATE SET gpu = excluded.gpu, model = excluded.model, \
         mig_profile = excluded.mig_profile, parent_uuid = excluded.parent_uuid, \
         slice_fraction = excluded.slice_fraction, health = excluded.health, \
         utilization_ratio = excluded.utilization_ratio, \
         memory_used_bytes = excluded.memory_used_bytes, \
         memory_total_bytes = excluded.memory_total_bytes, \
         processes = excluded.processes, updated_ms = excluded.updated_ms, \
         state = excluded.state, tenants = excluded.tenants, mig_mode = excluded.mig_mode, \
         idle_since_ms = excluded.idle_since_ms, workloads = excluded.workloads \
         WHERE gpu_state.updated_ms <= excluded.updated_ms",
        gpus.into_values(),
        |a, g| {
            a.add(&r.node)?;
            a.add(&g.uuid)?;
            a.add(&g.gpu)?;
            a.add(&g.model)?;
            a.add(g.mig_profile.clone())?;
            a.add(g.parent_uuid.clone())?;
            a.add(g.slice_fraction.unwrap_or(-1.0))?;
            a.add(&g.health)?;
            a.add(g.utilization_ratio.unwrap_or(-1.0))?;
            a.add(i(g.memory_used_bytes))?;
            a.add(i(g.memory_total_bytes))?;
            a.add(i64::from(g.processes))?;
            a.add(end)?;
            a.add((!g.state.is_empty()).then(|| g.state.clone()))?;
            a.add(serde_json::to_string(&g.tenants).unwrap_or_else(|_| "[]".into()))?;
            a.add(i64::from(g.mig_mode))?;
            // Absent travels as -1, NULL in SQL (as the doubles above).
            a.add(g.idle_since_ms.map_or(-1, i))?;
            a.add(serde_json::to_string(&g.workloads).unwrap_or_else(|_| "[]".into()))
        },
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use tally_contract::wire::{AuditRecord, GENESIS_SHA256, GpuUsage, IoUsage, SCHEMA_VERSION};

    use super::*;
    use crate::ledger::{audit::AuditQuery, chargeback::tests::sqlite_ledger};

    pub(crate) fn report(node: &str, seq: u64) -> Report {
        Report {
            version: SCHEMA_VERSION,
            node: node.into(),
            boot_id: "boot".into(),
            seq,
            interval_start_ms: 1_000_000 + seq * 10_000,
            interval_end_ms: 1_010_000 + seq * 10_000,
            gpu_usage: vec![GpuUsage {
                tenant: "acme".into(),
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                model: "H100".into(),
                mig_profile: None,
                slice_fraction: 1.0,
                allocated_us: 10_000_000,
                sm_us: Some(4_000_000),
                memory_byte_seconds: 1 << 33,
                energy_mj: 2_000_000,
                workload: None,
                idle_us: 3_000_000,
            }],
            io_usage: vec![IoUsage {
                tenant: "acme".into(),
                network_egress_bytes: 1 << 30,
                ..Default::default()
            }],
            gpus: vec![],
            audit: vec![],
            report_interval_ms: None,
            tenant_quotas: vec![],
            cluster: None,
        }
    }

    fn audit(prev: &str, sha: &str) -> AuditRecord {
        AuditRecord {
            time_ms: Some(5),
            tenant: Some("acme".into()),
            action: Some("alert".into()),
            prev_sha256: prev.into(),
            sha256: sha.into(),
            rest: Default::default(),
        }
    }

    #[tokio::test]
    async fn exactly_once_and_sums_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/ledger.db", dir.path().display());
        let ledger = Ledger::open(&url, 2).await.unwrap();
        let keys = Arc::new(NodeKeys::default());
        let r = report("n1", 1);
        let d = r.digest();
        assert!(matches!(
            ledger.ingest(&r, &d, 1, &keys).await.unwrap(),
            Ingested::Stored { .. }
        ));
        assert_eq!(
            ledger.ingest(&r, &d, 2, &keys).await.unwrap(),
            Ingested::Duplicate
        );
        let mut other = r.clone();
        other.gpu_usage[0].allocated_us = 1;
        assert_eq!(
            ledger
                .ingest(&other, &other.digest(), 3, &keys)
                .await
                .unwrap(),
            Ingested::Conflict
        );
        ledger
            .ingest(&report("n1", 2), &report("n1", 2).digest(), 4, &keys)
            .await
            .unwrap();
        let g = ledger.gpu_groups(0, i64::MAX, None).await.unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].allocated_us, 20_000_000);
        assert_eq!(g[0].used_us, 8_000_000);
        let io = ledger.io_groups(0, i64::MAX, None).await.unwrap();
        assert_eq!(io[0].network_egress_bytes, 2 << 30);
        let t = ledger.totals().await.unwrap();
        assert_eq!(t[0].energy_mj, 4_000_000.0);
        let s = ledger.report_summary().await.unwrap();
        assert_eq!((s[0].reports, s[0].first_seq, s[0].last_seq), (2, 1, 2));
        // Reopening runs the migrations again: nothing changes.
        drop(ledger);
        let ledger = Ledger::open(&url, 2).await.unwrap();
        assert_eq!(ledger.report_summary().await.unwrap(), s);
    }

    /// A report from an agent older than workloads and clusters (its JSON
    /// as such an agent sent it) is stored, in the `default` cluster with
    /// no workload, and its retry is still known by its digest.
    #[tokio::test]
    async fn reports_without_workload_or_cluster_ingest() {
        let (_dir, ledger) = sqlite_ledger(2).await;
        let keys = Arc::new(NodeKeys::default());
        let old = r#"{"version":1,"node":"n1","boot_id":"b","seq":1,"interval_start_ms":1000000,"interval_end_ms":1010000,"gpu_usage":[{"tenant":"acme","gpu":"0","uuid":"GPU-0","model":"H100","mig_profile":null,"slice_fraction":1.0,"allocated_us":10000000,"sm_us":null,"memory_byte_seconds":1,"energy_mj":1}],"io_usage":[{"tenant":"acme","network_ingress_bytes":5,"network_egress_bytes":0,"network_ingress_packets":0,"network_egress_packets":0,"network_dropped_packets":0,"pcie_h2d_bytes":0,"pcie_d2h_bytes":0}],"gpus":[],"audit":[]}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        r.validate().unwrap();
        let digest = r.digest();
        assert!(matches!(
            ledger.ingest(&r, &digest, 1, &keys).await.unwrap(),
            Ingested::Stored { .. }
        ));
        assert_eq!(
            ledger.ingest(&r, &digest, 2, &keys).await.unwrap(),
            Ingested::Duplicate
        );
        let mut new = report("n2", 1);
        new.cluster = Some("prod-eu".into());
        new.gpu_usage[0].workload = Some("job-7".into());
        ledger.ingest(&new, &new.digest(), 3, &keys).await.unwrap();
        let g = ledger.gpu_groups(0, i64::MAX, None).await.unwrap();
        let keys: Vec<(&str, &str, &str)> = g
            .iter()
            .map(|g| (g.node.as_str(), g.cluster.as_str(), g.workload.as_str()))
            .collect();
        assert_eq!(keys, [("n1", "default", ""), ("n2", "prod-eu", "job-7")]);
        let io = ledger
            .io_groups(0, i64::MAX, Some("default"))
            .await
            .unwrap();
        assert_eq!(io.len(), 1);
        assert_eq!(io[0].network_ingress_bytes, 5);
    }

    /// A pool on `url` with `dialect`'s migrations applied up to, not
    /// including, `version` (`"0006"`): a ledger as an older aggregator
    /// left it.
    pub(crate) async fn migrated_before(url: &str, dialect: &str, version: &str) -> sqlx::AnyPool {
        let dir = tempfile::tempdir().unwrap();
        let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dialect);
        for e in std::fs::read_dir(&all).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if name.as_str() < version {
                std::fs::copy(e.path(), dir.path().join(&name)).unwrap();
            }
        }
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(url).await.unwrap();
        sqlx::migrate::Migrator::new(dir.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        pool
    }

    /// Migration 0006 on a ledger that already holds rollups: they are
    /// kept, in the `default` cluster with no workload.
    #[tokio::test]
    async fn migration_0006_keeps_the_rollups_it_rekeys() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db?mode=rwc", dir.path().display());
        {
            let pool = migrated_before(&url, "sqlite", "0006").await;
            sqlx::query(
                "INSERT INTO gpu_usage_hourly (hour_ms, tenant, node, model, slice_fraction, \
                 allocated_us, used_us, energy_mj, memory_byte_seconds) \
                 VALUES (3600000, 'acme', 'n1', 'H100', 1.0, 7, 5, 3, 2.0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO io_usage_hourly (hour_ms, tenant, node, network_ingress_bytes, \
                 network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes) \
                 VALUES (3600000, 'acme', 'n1', 11, 0, 0, 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let ledger = Ledger::open(&url, 2).await.unwrap();
        let g = ledger.gpu_groups(3_600_000, 7_200_000, None).await.unwrap();
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!(
            (
                g[0].cluster.as_str(),
                g[0].workload.as_str(),
                g[0].allocated_us
            ),
            ("default", "", 7)
        );
        let io = ledger
            .io_groups(3_600_000, 7_200_000, Some("default"))
            .await
            .unwrap();
        assert_eq!(io[0].network_ingress_bytes, 11);
    }

    #[tokio::test]
    async fn audit_chain_breaks_are_flagged_not_hidden() {
        let (_dir, ledger) = sqlite_ledger(1).await;
        let keys = Arc::new(NodeKeys::default());
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(64);
        let mut r = report("n1", 1);
        r.audit = vec![audit(GENESIS_SHA256, &a), audit(&a, &b)];
        let Ingested::Stored { audit_breaks } =
            ledger.ingest(&r, &r.digest(), 1, &keys).await.unwrap()
        else {
            panic!("not stored")
        };
        assert!(audit_breaks.is_empty(), "{audit_breaks:?}");
        // The next report skips a record: its first one does not follow b.
        let mut r = report("n1", 2);
        r.audit = vec![audit(&c, &a)];
        let Ingested::Stored { audit_breaks } =
            ledger.ingest(&r, &r.digest(), 2, &keys).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(audit_breaks.len(), 1);
        let rows = ledger
            .audit(&AuditQuery {
                from_ms: 0,
                to_ms: i64::MAX,
                tenant: Some("acme".into()),
                node: None,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].chain_ok && rows[1].chain_ok && !rows[2].chain_ok);
    }
}
