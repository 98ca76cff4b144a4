//! The central audit store: each node's records with their hash chain
//! (and, with the node's key, each record's HMAC) checked on the way in,
//! and read back by `GET /api/v1/audit`.

use tally_contract::{
    audit::KeyedCheck,
    wire::{AuditRecord, GENESIS_SHA256, Report},
};

use super::{
    Ledger, LedgerError, i, rows,
    tx::{Tx, args},
};
use crate::audit_keys::{KeyFor, NodeKeys};

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
/// each checked against its node's chain and key. Returns why each record
/// that does not follow the chain does not.
pub(super) async fn store(
    conn: &mut impl Tx,
    r: &Report,
    id: i64,
    end: i64,
    keys: &NodeKeys,
) -> Result<Vec<String>, LedgerError> {
    let mut audit_breaks = Vec::new();
    if !r.audit.is_empty() {
        // The node's last stored hash, and whether its chain has carried an
        // HMAC: an unkeyed record after that was rewritten by someone
        // without the key.
        // (`keyed` read as a BIGINT 0 or 1, one type on both backends.)
        let stored: Option<(String, i64)> = conn
            .fetch_optional(
                "SELECT sha256, CAST(CASE WHEN keyed THEN 1 ELSE 0 END AS BIGINT) FROM audit_heads \
                 WHERE node = $1",
                args([r.node.as_str().into()]),
            )
            .await?;
        let (mut head, mut keyed) = match stored {
            Some((h, k)) => (Some(h), k != 0),
            None => (None, false),
        };
        let key = keys.get(&r.node);
        let mut records = Vec::with_capacity(r.audit.len());
        for a in &r.audit {
            let problem = chain_problem(head.as_deref(), keyed, a, &r.node, key);
            keyed |= a.rest.contains_key("hmac_sha256");
            if let Some(p) = &problem {
                audit_breaks.push(p.clone());
            }
            let record = serde_json::to_string(a).unwrap_or_default();
            records.push((a, problem, record));
            head = Some(a.sha256.clone());
        }
        // In the report's order: the ids keep the chain's order.
        rows::insert(
            conn,
            "audit (report_id, node, time_ms, tenant, action, prev_sha256, sha256, problem, \
             record)",
            &["?"; 9],
            "",
            &records,
            |q, (a, problem, record)| {
                q.add(id)?;
                q.add(&r.node)?;
                q.add(audit_time(a).map(i).unwrap_or(end))?;
                q.add(a.tenant.clone().filter(|t| !t.is_empty()))?;
                q.add(a.action.clone())?;
                q.add(&a.prev_sha256)?;
                q.add(&a.sha256)?;
                q.add(problem.clone())?;
                q.add(record.as_str())
            },
        )
        .await?;
        conn.execute(
            "INSERT INTO audit_heads (node, sha256, keyed) VALUES ($1, $2, $3) \
             ON CONFLICT (node) DO UPDATE SET sha256 = excluded.sha256, keyed = excluded.keyed",
            args([r.node.as_str().into(), head.into(), keyed.into()]),
        )
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

/// Why `a` does not continue the chain whose last hash is `head` (and
/// whose last record was `keyed` or not), if it does not. Records in the
/// enforcement log's own format also have their content hash checked, and
/// their HMAC under `node`'s key when the aggregator holds it.
fn chain_problem(
    head: Option<&str>,
    keyed: bool,
    a: &AuditRecord,
    node: &str,
    key: KeyFor<'_>,
) -> Option<String> {
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
    if digest != a.sha256 {
        return Some(format!(
            "content changed: sha256 {} does not match the record ({digest})",
            a.sha256
        ));
    }
    let k = match key {
        KeyFor::Key(k) => Some(k),
        KeyFor::Missing | KeyFor::NotConfigured => None,
    };
    match native.keyed_check(keyed, k) {
        KeyedCheck::Stripped => Some(
            "no hmac_sha256 after keyed records from this node: the record was rewritten \
             without the node's key"
                .into(),
        ),
        KeyedCheck::Unkeyed | KeyedCheck::Matches => None,
        // Without [audit] node_keys only the plain chain is checked; with
        // it, a node whose key is missing is named.
        KeyedCheck::Unchecked => matches!(key, KeyFor::Missing).then(|| {
            format!(
                "keyed record, but [audit] node_keys holds no {node}.key: its HMAC is not checked"
            )
        }),
        KeyedCheck::Mismatch => Some(
            "content changed: hmac_sha256 does not match the record under the node's key \
             (rewritten without the key, or the key is not this node's)"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use tally_contract::audit::{AuditKey, AuditLog, Record};

    use super::*;
    use crate::ledger::{
        chargeback::tests::sqlite_ledger,
        ingest::{Ingested, tests::report},
    };

    /// `n` records of a log written with `key`, as the agent sends them.
    fn records(key: Option<&AuditKey>, n: usize) -> Vec<Record> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        let mut log = AuditLog::open_keyed(&p, "n1", key.cloned()).unwrap();
        (0..n)
            .map(|i| {
                log.append("acme", "gpu_memory", "alert", json!({ "i": i }))
                    .unwrap()
            })
            .collect()
    }

    fn wire(r: &Record) -> AuditRecord {
        serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap()
    }

    #[test]
    fn keyed_records_are_checked_with_the_nodes_key() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
        std::fs::copy(dir.path().join("audit.key"), dir.path().join("n1.key")).unwrap();
        std::fs::remove_file(dir.path().join("audit.key")).unwrap();
        let keys = Arc::new(NodeKeys::load(dir.path()).unwrap());
        let recs = records(Some(&key), 3);
        let ok = |head: Option<&str>, keyed, r: &Record, k| {
            chain_problem(head, keyed, &wire(r), "n1", k)
        };
        assert_eq!(ok(None, false, &recs[0], keys.get("n1")), None);
        assert_eq!(
            ok(Some(&recs[0].sha256), true, &recs[1], keys.get("n1")),
            None
        );

        // An edit with the plain chain recomputed: what anyone can do.
        let mut edited = recs[1].clone();
        edited.tenant = "mallory".into();
        edited.sha256 = edited.digest();
        let p = ok(Some(&recs[0].sha256), true, &edited, keys.get("n1")).unwrap();
        assert!(p.contains("hmac_sha256"), "{p}");
        // Without [audit] node_keys only the plain chain is checked.
        assert_eq!(
            ok(Some(&recs[0].sha256), true, &edited, KeyFor::NotConfigured),
            None
        );
        // A node whose key the aggregator lacks is named.
        let p = ok(None, false, &recs[0], keys.get("n2")).unwrap();
        assert!(p.contains("n1.key"), "{p}");
        // Stripping the HMAC off after keyed records is a break.
        edited.hmac_sha256 = None;
        edited.sha256 = edited.digest();
        let p = ok(Some(&recs[0].sha256), true, &edited, KeyFor::NotConfigured).unwrap();
        assert!(p.contains("without the node's key"), "{p}");
        // Old unkeyed records verify as before.
        let old = records(None, 1);
        assert_eq!(ok(None, false, &old[0], keys.get("n1")), None);
    }

    #[tokio::test]
    async fn an_unkeyed_record_after_stored_keyed_ones_is_flagged() {
        let (_dir, ledger) = sqlite_ledger(1).await;
        let key = AuditKey::generate().unwrap();
        let recs = records(Some(&key), 2);
        let mut r = report("n1", 1);
        r.audit = vec![wire(&recs[0])];
        let keys = Arc::new(NodeKeys::default());
        let stored = ledger.ingest(&r, &r.digest(), 1, &keys).await;
        assert_eq!(
            stored.unwrap(),
            Ingested::Stored {
                audit_breaks: vec![]
            }
        );
        let mut stripped = recs[1].clone();
        stripped.hmac_sha256 = None;
        stripped.sha256 = stripped.digest();
        let mut r = report("n1", 2);
        r.audit = vec![wire(&stripped)];
        let Ingested::Stored { audit_breaks } =
            ledger.ingest(&r, &r.digest(), 2, &keys).await.unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(audit_breaks.len(), 1, "{audit_breaks:?}");
        assert!(audit_breaks[0].contains("without the node's key"));
    }

    #[tokio::test]
    async fn a_ledger_from_before_the_keyed_column_knows_its_keyed_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        let ledger = Ledger::open(&url, 1).await.unwrap();
        let keys = Arc::new(NodeKeys::default());
        let key = AuditKey::generate().unwrap();
        let keyed = records(Some(&key), 2);
        let plain = records(None, 2);
        for (node, rec) in [("n1", &keyed[0]), ("n2", &plain[0])] {
            let mut r = report(node, 1);
            r.audit = vec![wire(rec)];
            ledger.ingest(&r, &r.digest(), 1, &keys).await.unwrap();
        }
        // Back to the schema before 0004, as an older aggregator left it.
        for sql in [
            "ALTER TABLE audit_heads DROP COLUMN keyed",
            "DELETE FROM _sqlx_migrations WHERE version = 4",
        ] {
            sqlx::query(sql).execute(&ledger.pool).await.unwrap();
        }
        drop(ledger);
        let ledger = Ledger::open(&url, 1).await.unwrap();
        let mut stripped = keyed[1].clone();
        stripped.hmac_sha256 = None;
        stripped.sha256 = stripped.digest();
        let mut breaks = Vec::new();
        for (node, rec) in [("n1", &stripped), ("n2", &plain[1])] {
            let mut r = report(node, 2);
            r.audit = vec![wire(rec)];
            let Ingested::Stored { audit_breaks } =
                ledger.ingest(&r, &r.digest(), 2, &keys).await.unwrap()
            else {
                panic!("not stored")
            };
            breaks.push(audit_breaks);
        }
        assert_eq!(breaks[0].len(), 1, "{breaks:?}");
        assert!(breaks[0][0].contains("without the node's key"));
        assert!(breaks[1].is_empty(), "{breaks:?}");
    }
}
