//! The durable usage ledger on SQLite or PostgreSQL (sqlx's `Any` driver,
//! one schema per dialect, migrations embedded and run at start).
//!
//! A report and everything in it is written in one transaction that first
//! claims `(node, boot_id, seq)`: a retry finds the claim and is
//! acknowledged without writing, so each report is stored exactly once,
//! also with several aggregator replicas on one PostgreSQL.

use std::{collections::BTreeMap, path::Path, sync::Once};

use sqlx::{
    AnyPool, Executor, Row,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

use tally_contract::wire::{AuditRecord, GENESIS_SHA256, Report};

static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be reached or refused a statement.
    #[error("ledger database: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema migrations failed.
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The SQLite file's directory could not be created.
    #[error("cannot create {path}: {source}")]
    Directory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Which database is behind the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The ledger: a connection pool.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    pub backend: Backend,
}

/// What happened to an ingested report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Stored now; `audit_breaks` names every audit record that does not
    /// follow its node's chain.
    Stored { audit_breaks: Vec<String> },
    /// The same report was stored before.
    Duplicate,
    /// A different report was stored under the same (node, boot, seq).
    Conflict,
}

/// Usage of one (tenant, node, model, slice) over a period.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuGroup {
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IoGroup {
    pub tenant: String,
    pub node: String,
    pub network_ingress_bytes: i64,
    pub network_egress_bytes: i64,
    pub pcie_h2d_bytes: i64,
    pub pcie_d2h_bytes: i64,
}

/// Running totals of one tenant (for `/metrics`), as doubles: over a
/// cluster's lifetime they outgrow 64-bit integers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantTotals {
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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportSummary {
    pub node: String,
    pub boot_id: String,
    pub reports: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub last_interval_end_ms: i64,
}

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditRow {
    pub id: i64,
    pub node: String,
    pub time_ms: i64,
    pub tenant: Option<String>,
    pub action: Option<String>,
    pub prev_sha256: String,
    pub sha256: String,
    /// Whether the record follows its node's chain.
    pub chain_ok: bool,
    /// Why not, when it does not.
    pub problem: Option<String>,
    pub record: serde_json::Value,
}

/// Filter of `GET /api/v1/audit`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
    pub node: Option<String>,
    pub limit: i64,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A URL sqlx accepts: SQLite files are created (with their directory).
fn prepare_url(url: &str) -> Result<(String, Backend), LedgerError> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let file = path.split('?').next().unwrap_or(path);
        if !file.is_empty()
            && file != ":memory:"
            && let Some(dir) = Path::new(file).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        let url = if url.contains("mode=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        Ok((url, Backend::Sqlite))
    } else {
        Ok((url.to_owned(), Backend::Postgres))
    }
}

impl Ledger {
    /// Connects and brings the schema up to date.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (url, backend) = prepare_url(url)?;
        let options: AnyConnectOptions = url.parse()?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers do not block the writer; FULL: a
                        // committed report survives power loss too.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE.run(&pool).await?,
            Backend::Postgres => POSTGRES.run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    /// The connection pool (the cluster view's reads live in `cluster`).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores `r` exactly once (see the module docs).
    pub async fn ingest(
        &self,
        r: &Report,
        digest: &str,
        received_ms: i64,
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

        let mut audit_breaks = Vec::new();
        if !r.audit.is_empty() {
            let mut head: Option<String> =
                sqlx::query_scalar("SELECT sha256 FROM audit_heads WHERE node = $1")
                    .bind(&r.node)
                    .fetch_optional(&mut *tx)
                    .await?;
            for a in &r.audit {
                let problem = chain_problem(head.as_deref(), a);
                if let Some(p) = &problem {
                    audit_breaks.push(p.clone());
                }
                let record = serde_json::to_string(a).unwrap_or_default();
                sqlx::query(
                    "INSERT INTO audit (report_id, node, time_ms, tenant, action, prev_sha256, \
                     sha256, problem, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(id)
                .bind(&r.node)
                .bind(audit_time(a).map(i).unwrap_or(end))
                .bind(a.tenant.clone().filter(|t| !t.is_empty()))
                .bind(a.action.clone())
                .bind(&a.prev_sha256)
                .bind(&a.sha256)
                .bind(problem)
                .bind(record)
                .execute(&mut *tx)
                .await?;
                head = Some(a.sha256.clone());
            }
            sqlx::query(
                "INSERT INTO audit_heads (node, sha256) VALUES ($1, $2) \
                 ON CONFLICT (node) DO UPDATE SET sha256 = excluded.sha256",
            )
            .bind(&r.node)
            .bind(head)
            .execute(&mut *tx)
            .await?;
        }
        crate::cluster::store(&mut tx, r, end).await?;
        tx.commit().await?;
        Ok(Ingested::Stored { audit_breaks })
    }

    /// GPU usage of reports whose interval ends in `[from_ms, to_ms)`.
    pub async fn gpu_groups(&self, from_ms: i64, to_ms: i64) -> Result<Vec<GpuGroup>, LedgerError> {
        let rows = sqlx::query(
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
        .await?;
        rows.iter()
            .map(|row| {
                Ok(GpuGroup {
                    tenant: row.try_get("tenant")?,
                    node: row.try_get("node")?,
                    model: row.try_get("model")?,
                    slice_fraction: row.try_get("slice_fraction")?,
                    allocated_us: row.try_get("allocated_us")?,
                    used_us: row.try_get("used_us")?,
                    energy_mj: row.try_get("energy_mj")?,
                    memory_byte_seconds: row.try_get("memory_byte_seconds")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// I/O of reports whose interval ends in `[from_ms, to_ms)`.
    pub async fn io_groups(&self, from_ms: i64, to_ms: i64) -> Result<Vec<IoGroup>, LedgerError> {
        let rows = sqlx::query(
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
        .await?;
        rows.iter()
            .map(|row| {
                Ok(IoGroup {
                    tenant: row.try_get("tenant")?,
                    node: row.try_get("node")?,
                    network_ingress_bytes: row.try_get("network_ingress_bytes")?,
                    network_egress_bytes: row.try_get("network_egress_bytes")?,
                    pcie_h2d_bytes: row.try_get("pcie_h2d_bytes")?,
                    pcie_d2h_bytes: row.try_get("pcie_d2h_bytes")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Running totals of every tenant.
    pub async fn totals(&self) -> Result<Vec<TenantTotals>, LedgerError> {
        let rows = sqlx::query(
            "SELECT tenant, CAST(allocated_us AS DOUBLE PRECISION) AS allocated_us, \
             CAST(sm_us AS DOUBLE PRECISION) AS sm_us, \
             CAST(memory_byte_seconds AS DOUBLE PRECISION) AS memory_byte_seconds, \
             CAST(energy_mj AS DOUBLE PRECISION) AS energy_mj, \
             CAST(network_ingress_bytes AS DOUBLE PRECISION) AS network_ingress_bytes, \
             CAST(network_egress_bytes AS DOUBLE PRECISION) AS network_egress_bytes, \
             CAST(pcie_h2d_bytes AS DOUBLE PRECISION) AS pcie_h2d_bytes, \
             CAST(pcie_d2h_bytes AS DOUBLE PRECISION) AS pcie_d2h_bytes \
             FROM tenant_totals ORDER BY tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TenantTotals {
                    tenant: row.try_get("tenant")?,
                    allocated_us: row.try_get("allocated_us")?,
                    sm_us: row.try_get("sm_us")?,
                    memory_byte_seconds: row.try_get("memory_byte_seconds")?,
                    energy_mj: row.try_get("energy_mj")?,
                    network_ingress_bytes: row.try_get("network_ingress_bytes")?,
                    network_egress_bytes: row.try_get("network_egress_bytes")?,
                    pcie_h2d_bytes: row.try_get("pcie_h2d_bytes")?,
                    pcie_d2h_bytes: row.try_get("pcie_d2h_bytes")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Last report time of every node: `(node, received_ms)`.
    pub async fn nodes(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        let rows = sqlx::query("SELECT node, last_received_ms FROM nodes ORDER BY node")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("node")?, row.try_get("last_received_ms")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The stored reports, per (node, boot).
    pub async fn report_summary(&self) -> Result<Vec<ReportSummary>, LedgerError> {
        let rows = sqlx::query(
            "SELECT node, boot_id, COUNT(*) AS reports, MIN(seq) AS first_seq, \
             MAX(seq) AS last_seq, MAX(interval_end_ms) AS last_end \
             FROM reports GROUP BY node, boot_id ORDER BY node, boot_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ReportSummary {
                    node: row.try_get("node")?,
                    boot_id: row.try_get("boot_id")?,
                    reports: row.try_get("reports")?,
                    first_seq: row.try_get("first_seq")?,
                    last_seq: row.try_get("last_seq")?,
                    last_interval_end_ms: row.try_get("last_end")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Stored audit records, oldest first.
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, node, time_ms, tenant, action, prev_sha256, sha256, problem, record \
             FROM audit WHERE time_ms >= $1 AND time_ms < $2 \
             AND ($3 = '' OR tenant = $3) AND ($4 = '' OR node = $4) \
             ORDER BY id LIMIT $5",
        )
        .bind(q.from_ms)
        .bind(q.to_ms)
        .bind(q.tenant.clone().unwrap_or_default())
        .bind(q.node.clone().unwrap_or_default())
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let problem: Option<String> = row.try_get("problem")?;
                let record: String = row.try_get("record")?;
                Ok(AuditRow {
                    id: row.try_get("id")?,
                    node: row.try_get("node")?,
                    time_ms: row.try_get("time_ms")?,
                    tenant: row.try_get("tenant")?,
                    action: row.try_get("action")?,
                    prev_sha256: row.try_get("prev_sha256")?,
                    sha256: row.try_get("sha256")?,
                    chain_ok: problem.is_none(),
                    problem,
                    record: serde_json::from_str(&record).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

/// When an audit record happened: `time_ms`, else its RFC 3339 `ts`.
fn audit_time(a: &AuditRecord) -> Option<u64> {
    a.time_ms.or_else(|| {
        let ts = a.rest.get("ts")?.as_str()?;
        let t = humantime::parse_rfc3339_weak(ts).ok()?;
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64)
    })
}

/// Why `a` does not continue the chain whose last hash is `head`, if it
/// does not. Records in the enforcement log's own format also have their
/// content hash checked.
fn chain_problem(head: Option<&str>, a: &AuditRecord) -> Option<String> {
    let link = match head {
        Some(h) if a.prev_sha256 != h => Some(format!(
            "chain break: prev_sha256 {} does not match the node's previous record {h}",
            a.prev_sha256
        )),
        None if a.prev_sha256 != GENESIS_SHA256 => Some(format!(
            "chain break: the first record seen from this node has prev_sha256 {} (not the \
             start of a log): earlier records are missing",
            a.prev_sha256
        )),
        _ => None,
    };
    if link.is_some() {
        return link;
    }
    let value = serde_json::to_value(a).ok()?;
    let native: tally_contract::audit::Record = serde_json::from_value(value).ok()?;
    let digest = native.digest();
    (digest != a.sha256).then(|| {
        format!(
            "content changed: sha256 {} does not match the record ({digest})",
            a.sha256
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_contract::wire::{GpuUsage, IoUsage, SCHEMA_VERSION};

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
        let r = report("n1", 1);
        let d = r.digest();
        assert!(matches!(
            ledger.ingest(&r, &d, 1).await.unwrap(),
            Ingested::Stored { .. }
        ));
        assert_eq!(ledger.ingest(&r, &d, 2).await.unwrap(), Ingested::Duplicate);
        let mut other = r.clone();
        other.gpu_usage[0].allocated_us = 1;
        assert_eq!(
            ledger.ingest(&other, &other.digest(), 3).await.unwrap(),
            Ingested::Conflict
        );
        ledger
            .ingest(&report("n1", 2), &report("n1", 2).digest(), 4)
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
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(64);
        let mut r = report("n1", 1);
        r.audit = vec![audit(GENESIS_SHA256, &a), audit(&a, &b)];
        let Ingested::Stored { audit_breaks } = ledger.ingest(&r, &r.digest(), 1).await.unwrap()
        else {
            panic!("not stored")
        };
        assert!(audit_breaks.is_empty(), "{audit_breaks:?}");
        // The next report skips a record: its first one does not follow b.
        let mut r = report("n1", 2);
        r.audit = vec![audit(&c, &a)];
        let Ingested::Stored { audit_breaks } = ledger.ingest(&r, &r.digest(), 2).await.unwrap()
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
