//! The central audit store: each node's records with their hash chain
//! checked on the way in, and read back by `GET /api/v1/audit`.

use tally_contract::wire::{AuditRecord, GENESIS_SHA256, Report};

use super::{Ledger, LedgerError, i};

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AuditRow {
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

/// A row of `audit` as stored.
#[derive(sqlx::FromRow)]
struct StoredAudit {
    id: i64,
    node: String,
    time_ms: i64,
    tenant: Option<String>,
    action: Option<String>,
    prev_sha256: String,
    sha256: String,
    problem: Option<String>,
    /// The record as JSON text.
    record: String,
}

impl From<StoredAudit> for AuditRow {
    fn from(r: StoredAudit) -> Self {
        AuditRow {
            id: r.id,
            node: r.node,
            time_ms: r.time_ms,
            tenant: r.tenant,
            action: r.action,
            prev_sha256: r.prev_sha256,
            sha256: r.sha256,
            chain_ok: r.problem.is_none(),
            problem: r.problem,
            record: serde_json::from_str(&r.record).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Filter of `GET /api/v1/audit`.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
    pub node: Option<String>,
    pub limit: i64,
}

/// Stored in the ingest transaction of report `id`: its audit records,
/// each checked against its node's chain. Returns why each record that
/// does not follow the chain does not.
pub(super) async fn store(
    conn: &mut sqlx::AnyConnection,
    r: &Report,
    id: i64,
    end: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut audit_breaks = Vec::new();
    if !r.audit.is_empty() {
        let mut head: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM audit_heads WHERE node = $1")
                .bind(&r.node)
                .fetch_optional(&mut *conn)
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
            .execute(&mut *conn)
            .await?;
            head = Some(a.sha256.clone());
        }
        sqlx::query(
            "INSERT INTO audit_heads (node, sha256) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET sha256 = excluded.sha256",
        )
        .bind(&r.node)
        .bind(head)
        .execute(&mut *conn)
        .await?;
    }
    Ok(audit_breaks)
}

impl Ledger {
    /// Stored audit records, oldest first.
    pub(crate) async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, LedgerError> {
        let rows: Vec<StoredAudit> = sqlx::query_as(
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
        Ok(rows.into_iter().map(AuditRow::from).collect())
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
