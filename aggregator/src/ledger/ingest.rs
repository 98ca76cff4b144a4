//! Writing a report: one transaction per report (see [`super`]).

use std::collections::BTreeMap;

use tally_contract::wire::Report;

use super::{Ledger, LedgerError, audit, cluster, i, totals::TenantTotals};
use crate::audit_keys::NodeKeys;

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
}

impl Ledger {
    /// Stores `r` exactly once (see the module docs), its audit records
    /// checked with the nodes' `keys`.
    pub(crate) async fn ingest(
        &self,
        r: &Report,
        digest: &str,
        received_ms: i64,
        keys: &NodeKeys,
    ) -> Result<Ingested, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO reports (node, boot_id, seq, interval_start_ms, interval_end_ms, \
             received_ms, digest) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (node, boot_id, seq) DO NOTHING RETURNING id",
        )
        .bind(&r.node)
        .bind(&r.boot_id)
        .bind(i(r.seq))
        .bind(i(r.interval_start_ms))
        .bind(i(r.interval_end_ms))
        .bind(received_ms)
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            let existing: Option<String> = sqlx::query_scalar(
                "SELECT digest FROM reports WHERE node = $1 AND boot_id = $2 AND seq = $3",
            )
            .bind(&r.node)
            .bind(&r.boot_id)
            .bind(i(r.seq))
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(if existing.as_deref() == Some(digest) {
                Ingested::Duplicate
            } else {
                Ingested::Conflict
            });
        };
        let end = i(r.interval_end_ms);
        let mut totals: BTreeMap<&str, TenantTotals> = BTreeMap::new();
        for u in &r.gpu_usage {
            sqlx::query(
                "INSERT INTO gpu_usage (report_id, node, interval_end_ms, tenant, gpu, uuid, \
                 model, mig_profile, slice_fraction, allocated_us, sm_us, memory_byte_seconds, \
                 energy_mj) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(id)
            .bind(&r.node)
            .bind(end)
            .bind(&u.tenant)
            .bind(&u.gpu)
            .bind(&u.uuid)
            .bind(&u.model)
            .bind(u.mig_profile.clone())
            .bind(u.slice_fraction)
            .bind(i(u.allocated_us))
            .bind(u.sm_us.map(i))
            .bind(i(u.memory_byte_seconds))
            .bind(i(u.energy_mj))
            .execute(&mut *tx)
            .await?;
            let t = totals.entry(u.tenant.as_str()).or_default();
            t.allocated_us += u.allocated_us as f64;
            t.sm_us += u.sm_us.unwrap_or(0) as f64;
            t.memory_byte_seconds += u.memory_byte_seconds as f64;
            t.energy_mj += u.energy_mj as f64;
        }
        for u in &r.io_usage {
            sqlx::query(
                "INSERT INTO io_usage (report_id, node, interval_end_ms, tenant, \
                 network_ingress_bytes, network_egress_bytes, network_ingress_packets, \
                 network_egress_packets, network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(id)
            .bind(&r.node)
            .bind(end)
            .bind(&u.tenant)
            .bind(i(u.network_ingress_bytes))
            .bind(i(u.network_egress_bytes))
            .bind(i(u.network_ingress_packets))
            .bind(i(u.network_egress_packets))
            .bind(i(u.network_dropped_packets))
            .bind(i(u.pcie_h2d_bytes))
            .bind(i(u.pcie_d2h_bytes))
            .execute(&mut *tx)
            .await?;
            let t = totals.entry(u.tenant.as_str()).or_default();
            t.network_ingress_bytes += u.network_ingress_bytes as f64;
            t.network_egress_bytes += u.network_egress_bytes as f64;
            t.pcie_h2d_bytes += u.pcie_h2d_bytes as f64;
            t.pcie_d2h_bytes += u.pcie_d2h_bytes as f64;
        }
        // Sorted by tenant (BTreeMap): concurrent ingests lock rows in the
        // same order and cannot deadlock.
        for (tenant, t) in &totals {
            sqlx::query(
                "INSERT INTO tenant_totals (tenant, allocated_us, sm_us, memory_byte_seconds, \
                 energy_mj, network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, \
                 pcie_d2h_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (tenant) DO UPDATE SET \
                 allocated_us = tenant_totals.allocated_us + excluded.allocated_us, \
                 sm_us = tenant_totals.sm_us + excluded.sm_us, \
                 memory_byte_seconds = tenant_totals.memory_byte_seconds + excluded.memory_byte_seconds, \
                 energy_mj = tenant_totals.energy_mj + excluded.energy_mj, \
                 network_ingress_bytes = tenant_totals.network_ingress_bytes + excluded.network_ingress_bytes, \
                 network_egress_bytes = tenant_totals.network_egress_bytes + excluded.network_egress_bytes, \
                 pcie_h2d_bytes = tenant_totals.pcie_h2d_bytes + excluded.pcie_h2d_bytes, \
                 pcie_d2h_bytes = tenant_totals.pcie_d2h_bytes + excluded.pcie_d2h_bytes",
            )
            .bind(*tenant)
            .bind(t.allocated_us)
            .bind(t.sm_us)
            .bind(t.memory_byte_seconds)
            .bind(t.energy_mj)
            .bind(t.network_ingress_bytes)
            .bind(t.network_egress_bytes)
            .bind(t.pcie_h2d_bytes)
            .bind(t.pcie_d2h_bytes)
            .execute(&mut *tx)
            .await?;
        }
        for g in &r.gpus {
            // Absent doubles travel as -1 and become NULL in SQL: sqlx's
            // `Any` driver binds a NULL double as a float4 on PostgreSQL,
            // the prepared statement keeps that type, and the next real
            // double is refused ("incorrect binary data format").
            sqlx::query(
                "INSERT INTO gpu_state (node, uuid, gpu, model, mig_profile, parent_uuid, \
                 slice_fraction, health, utilization_ratio, memory_used_bytes, memory_total_bytes, \
                 processes, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7, -1.0), $8, \
                 NULLIF($9, -1.0), $10, $11, $12, $13) \
                 ON CONFLICT (node, uuid) DO UPDATE SET gpu = excluded.gpu, model = excluded.model, \
                 mig_profile = excluded.mig_profile, parent_uuid = excluded.parent_uuid, \
                 slice_fraction = excluded.slice_fraction, health = excluded.health, \
                 utilization_ratio = excluded.utilization_ratio, \
                 memory_used_bytes = excluded.memory_used_bytes, \
                 memory_total_bytes = excluded.memory_total_bytes, \
                 processes = excluded.processes, updated_ms = excluded.updated_ms \
                 WHERE gpu_state.updated_ms <= excluded.updated_ms",
            )
            .bind(&r.node)
            .bind(&g.uuid)
            .bind(&g.gpu)
            .bind(&g.model)
            .bind(g.mig_profile.clone())
            .bind(g.parent_uuid.clone())
            .bind(g.slice_fraction.unwrap_or(-1.0))
            .bind(&g.health)
            .bind(g.utilization_ratio.unwrap_or(-1.0))
            .bind(i(g.memory_used_bytes))
            .bind(i(g.memory_total_bytes))
            .bind(i64::from(g.processes))
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO nodes (node, reports, last_received_ms, last_interval_end_ms) \
             VALUES ($1, 1, $2, $3) ON CONFLICT (node) DO UPDATE SET \
             reports = nodes.reports + 1, last_received_ms = excluded.last_received_ms, \
             last_interval_end_ms = CASE WHEN excluded.last_interval_end_ms > nodes.last_interval_end_ms \
             THEN excluded.last_interval_end_ms ELSE nodes.last_interval_end_ms END",
        )
        .bind(&r.node)
        .bind(received_ms)
        .bind(end)
        .execute(&mut *tx)
        .await?;

        let audit_breaks = audit::store(&mut tx, r, id, end, keys).await?;
        cluster::store(&mut tx, r, end).await?;
        tx.commit().await?;
        Ok(Ingested::Stored { audit_breaks })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tally_contract::wire::{AuditRecord, GENESIS_SHA256, GpuUsage, IoUsage, SCHEMA_VERSION};

    use super::*;
    use crate::ledger::audit::AuditQuery;

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
        let keys = NodeKeys::default();
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
        let g = ledger.gpu_groups(0, i64::MAX).await.unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].allocated_us, 20_000_000);
        assert_eq!(g[0].used_us, 8_000_000);
        let io = ledger.io_groups(0, i64::MAX).await.unwrap();
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

    #[tokio::test]
    async fn audit_chain_breaks_are_flagged_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        let ledger = Ledger::open(&url, 1).await.unwrap();
        let keys = NodeKeys::default();
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
