//! What enforcement did, kept: the hash-chained audit log and the action
//! counters behind `tally_enforcement_actions_total`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::json;
use tracing::{error, info, warn};

use tally_contract::audit::{AuditKey, AuditLog};

use super::quota::Quota;
use crate::{paths, snapshot::EnforcementActionCount};

/// Action counters, shared with the action threads.
type Counts = Arc<Mutex<BTreeMap<(String, String, String), u64>>>;
/// The audit log, shared with the action threads; `None` if it cannot open.
type SharedAudit = Arc<Mutex<Option<AuditLog>>>;

/// Audits decisions and counts actions; cheap to clone into action threads.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    audit: SharedAudit,
    counts: Counts,
    /// `(state_dir, node)` of a log to open at the first record; taken
    /// by the first attempt.
    on_demand: Arc<Mutex<Option<(PathBuf, String)>>>,
}

impl Recorder {
    /// Opens `<state_dir>/audit.log`, keyed with `<state_dir>/audit.key`
    /// (made when absent), unless there are no quotas and never was a log.
    /// With `on_demand`, such a log is opened at its first record instead
    /// (Kubernetes allocation checks: most nodes never write one).
    /// A log that cannot open is logged; nothing is audited then.
    pub(crate) fn open(state_dir: &Path, node: &str, no_quotas: bool, on_demand: bool) -> Recorder {
        let deferred = no_quotas && !paths::audit_log(state_dir).exists();
        let audit = if deferred {
            None
        } else {
            open_log(state_dir, node)
        };
        Recorder {
            audit: Arc::new(Mutex::new(audit)),
            counts: Arc::default(),
            on_demand: Arc::new(Mutex::new(
                (deferred && on_demand).then(|| (state_dir.to_path_buf(), node.to_owned())),
            )),
        }
    }

    /// Appends an audit record (a failure is logged, never fatal).
    pub(crate) fn record(
        &self,
        tenant: &str,
        resource: &str,
        action: &str,
        detail: serde_json::Value,
    ) {
        info!(tenant, resource, action, %detail, "enforcement");
        let mut guard = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none()
            && let Some((dir, node)) = self
                .on_demand
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        {
            *guard = open_log(&dir, &node);
        }
        if let Some(log) = guard.as_mut()
            && let Err(e) = log.append(tenant, resource, action, detail)
        {
            warn!("cannot write the audit log: {e}");
        }
    }

    /// Counts an action in `tally_enforcement_actions_total` and audits it.
    pub(crate) fn act(
        &self,
        tenant: &str,
        resource: &str,
        action: &str,
        detail: serde_json::Value,
    ) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant.to_owned(), resource.to_owned(), action.to_owned()))
            .or_default() += 1;
        self.record(tenant, resource, action, detail);
    }

    /// Actions taken so far, counted.
    pub(crate) fn counts(&self) -> Vec<EnforcementActionCount> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((tenant, resource, action), n)| EnforcementActionCount {
                tenant: tenant.clone(),
                resource: resource.clone(),
                action: action.clone(),
                total: *n,
            })
            .collect()
    }

    /// The audit log's path, when it is open.
    pub(crate) fn audit_path(&self) -> Option<PathBuf> {
        let guard = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|l| l.path().to_path_buf())
    }
}

fn open_log(state_dir: &Path, node: &str) -> Option<AuditLog> {
    match AuditLog::open_keyed(&paths::audit_log(state_dir), node, audit_key(state_dir)) {
        Ok(log) => Some(log),
        Err(e) => {
            warn!("enforcement actions will not be audited: {e}");
            None
        }
    }
}

/// The node's audit key; without one, lines are written unkeyed (and a
/// verifier holding the key then names the first of them).
fn audit_key(state_dir: &Path) -> Option<AuditKey> {
    let path = paths::audit_key(state_dir);
    match AuditKey::load_or_create(&path) {
        Ok((key, made)) => {
            if made {
                info!(key = %path.display(), "made this node's audit key: give the aggregator a copy ([audit] node_keys)");
            }
            Some(key)
        }
        Err(e) => {
            error!("audit lines will be written without a key: {e}");
            None
        }
    }
}

/// Audits quotas that appeared, changed or went away since the quotas last
/// applied (`<state_dir>/quotas.json`), then remembers the current ones.
pub(crate) fn audit_quota_changes(
    rec: &Recorder,
    state_dir: &Path,
    quotas: &BTreeMap<String, Quota>,
) {
    let file = paths::applied_quotas(state_dir);
    let old: BTreeMap<String, Quota> = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for (tenant, q) in quotas {
        match old.get(tenant) {
            None => rec.record(tenant, "quota", "quota_set", json!({ "quota": q })),
            Some(o) if o != q => rec.record(
                tenant,
                "quota",
                "quota_change",
                json!({ "old": o, "new": q }),
            ),
            Some(_) => {}
        }
    }
    for (tenant, o) in &old {
        if !quotas.contains_key(tenant) {
            rec.record(tenant, "quota", "quota_removed", json!({ "old": o }));
        }
    }
    if quotas.is_empty() && old.is_empty() {
        return;
    }
    let _ = std::fs::create_dir_all(state_dir);
    if let Err(e) = std::fs::write(&file, serde_json::to_vec_pretty(quotas).unwrap_or_default()) {
        warn!(
            "cannot remember the applied quotas in {}: {e}",
            file.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use tally_contract::audit;

    use super::*;

    fn actions(log: &Path) -> Vec<(String, String)> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(|l| {
                let r: audit::Record = serde_json::from_str(l).unwrap();
                (r.tenant, r.action)
            })
            .collect()
    }

    #[test]
    fn actions_are_counted_and_decisions_only_audited() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::open(d.path(), "n1", false, false);
        rec.act("a", "gpu_memory", "alert", json!({}));
        rec.record("a", "gpu_memory", "resolved", json!({}));
        rec.act("a", "gpu_memory", "alert", json!({}));
        let counts = rec.counts();
        assert_eq!(counts.len(), 1);
        assert_eq!((counts[0].action.as_str(), counts[0].total), ("alert", 2));
        let log = rec.audit_path().unwrap();
        assert_eq!(actions(&log).len(), 3);
        assert_eq!(audit::verify(&log).unwrap(), Ok(3));
        let key = audit::AuditKey::load(&d.path().join("audit.key")).unwrap();
        let v = audit::verify_keyed(&log, Some(&key)).unwrap().unwrap();
        assert_eq!((v.records, v.unkeyed), (3, 0));
    }

    #[test]
    fn no_log_is_made_without_quotas() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::open(d.path(), "n1", true, false);
        rec.record("a", "quota", "quota_removed", json!({}));
        assert_eq!(rec.audit_path(), None);
        assert!(!d.path().join("audit.log").exists());
    }

    #[test]
    fn an_on_demand_log_opens_at_its_first_record() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::open(d.path(), "n1", true, true);
        assert!(!d.path().join("audit.log").exists(), "nothing to say yet");
        rec.clone()
            .record("a", "gpus", "unallocated_use", json!({}));
        rec.record("a", "gpus", "unallocated_use_ended", json!({}));
        let log = rec.audit_path().unwrap();
        assert_eq!(audit::verify(&log).unwrap(), Ok(2));
    }
}
