//! The keyed audit chain against a deliberate edit: someone without the
//! node's key changes a record and recomputes the plain SHA-256 chain (all
//! they can do); `tally audit verify --key-file` and the aggregator's chain
//! check (`[audit] node_keys`) both name the record, while the same edit
//! re-signed with the key passes, and old unkeyed logs verify as before.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::json;
use tally_contract::audit::{AuditKey, AuditLog, Record};
use tally_e2e::{
    aggregator_support::{ADMIN_TOKEN, AGENT_TOKEN, Aggregator, sqlite},
    tally_bin, wait_for,
};

/// A keyed log of `n` records in `dir` (`audit.log`, `audit.key`).
fn keyed_log(dir: &Path, n: usize) -> (PathBuf, AuditKey) {
    let (key, made) = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    assert!(made);
    let path = dir.join("audit.log");
    let mut log = AuditLog::open_keyed(&path, "n1", Some(key.clone())).unwrap();
    for i in 0..n {
        log.append("acme", "gpu_memory", "alert", json!({ "usage": i }))
            .unwrap();
    }
    (path, key)
}

fn records(path: &Path) -> Vec<Record> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Recomputes the chain from record `from` (0-based) on: the plain
/// SHA-256, and the HMAC too when the editor holds `key`.
fn rechain(recs: &mut [Record], from: usize, key: Option<&AuditKey>) {
    for i in from..recs.len() {
        if i > 0 {
            recs[i].prev_sha256 = recs[i - 1].sha256.clone();
        }
        recs[i].sha256 = recs[i].digest();
        if let Some(k) = key {
            recs[i].hmac_sha256 = Some(recs[i].keyed_digest(k));
        }
    }
}

fn write(path: &Path, recs: &[Record]) {
    let text: String = recs
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    fs::write(path, text).unwrap();
}

fn verify(log: &Path, args: &[&str]) -> Output {
    Command::new(tally_bin())
        .args(["audit", "verify"])
        .arg(log)
        .args(args)
        .output()
        .expect("run tally audit verify")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn verify_with_the_key_names_an_edit_rechained_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, key) = keyed_log(dir.path(), 4);
    let key_file = dir.path().join("audit.key");
    let key_arg = key_file.to_str().unwrap();
    let ok = verify(&log, &["--key-file", key_arg]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("HMAC matches"), "{}", text(&ok));

    // The attacker's edit: a record changed, the plain chain recomputed.
    let mut recs = records(&log);
    recs[1].tenant = "mallory".into();
    rechain(&mut recs, 1, None);
    write(&log, &recs);
    let plain = verify(&log, &[]);
    assert!(
        plain.status.success() && text(&plain).contains("not checked (give --key-file)"),
        "without the key only the plain chain is checked, and it says so: {}",
        text(&plain)
    );
    let keyed = verify(&log, &["--key-file", key_arg]);
    assert_eq!(keyed.status.code(), Some(1), "{}", text(&keyed));
    assert!(text(&keyed).contains("line 2:"), "{}", text(&keyed));

    // Stripping the HMACs from that record on is a break too.
    let mut stripped = recs.clone();
    for r in &mut stripped[1..] {
        r.hmac_sha256 = None;
    }
    rechain(&mut stripped, 1, None);
    write(&log, &stripped);
    let out = verify(&log, &["--key-file", key_arg]);
    assert!(
        !out.status.success() && text(&out).contains("line 2:"),
        "{}",
        text(&out)
    );

    // The same edit by the key's holder passes: the key is the secret.
    rechain(&mut recs, 1, Some(&key));
    write(&log, &recs);
    let out = verify(&log, &["--key-file", key_arg]);
    assert!(out.status.success(), "{}", text(&out));

    // Another node's key does not fit.
    let other = dir.path().join("other.key");
    AuditKey::load_or_create(&other).unwrap();
    let out = verify(&log, &["--key-file", other.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("line 1:"),
        "{}",
        text(&out)
    );
    // A key file that is no key is named (exit 66, like a missing log).
    let bad = dir.path().join("bad.key");
    fs::write(&bad, "not hex\n").unwrap();
    let out = verify(&log, &["--key-file", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66), "{}", text(&out));
    assert!(text(&out).contains("bad.key"), "{}", text(&out));
}

#[test]
fn an_old_unkeyed_log_verifies_as_before_and_is_marked_unkeyed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut old = AuditLog::open(&log, "n1").unwrap();
    for i in 0..2 {
        old.append("acme", "quota", "quota_set", json!({ "i": i }))
            .unwrap();
    }
    drop(old);
    let out = verify(&log, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ok, 2 records, chain intact"),
        "{}",
        text(&out)
    );
    // The node gets a key and continues the same log.
    let (key, _) = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
    let mut log_keyed = AuditLog::open_keyed(&log, "n1", Some(key)).unwrap();
    log_keyed
        .append("acme", "gpu_memory", "alert", json!({}))
        .unwrap();
    let key_file = dir.path().join("audit.key");
    let out = verify(&log, &["--key-file", key_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 unkeyed (lines 1-2"),
        "{}",
        text(&out)
    );
    let strict = verify(
        &log,
        &["--key-file", key_file.to_str().unwrap(), "--require-keyed"],
    );
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict));
}

/// A report of node `n1` carrying `audit`.
fn report(seq: u64, audit: &[Record]) -> Vec<u8> {
    let end = 1_700_000_000_000 + seq * 10_000;
    serde_json::to_vec(&json!({
        "version": tally_contract::wire::SCHEMA_VERSION,
        "node": "n1",
        "boot_id": "b",
        "seq": seq,
        "interval_start_ms": end - 10_000,
        "interval_end_ms": end,
        "gpu_usage": [],
        "io_usage": [],
        "gpus": [],
        "audit": audit,
    }))
    .unwrap()
}

#[test]
fn the_aggregator_checks_each_record_with_the_nodes_key() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    fs::create_dir_all(&node_dir).unwrap();
    let (log, _key) = keyed_log(&node_dir, 3);
    // The operator gives the aggregator a copy of the node's key.
    let keys = dir.path().join("audit-keys");
    fs::create_dir_all(&keys).unwrap();
    fs::copy(node_dir.join("audit.key"), keys.join("n1.key")).unwrap();
    let agg = Aggregator::start(
        &dir.path().join("agg"),
        &sqlite(dir.path()),
        &format!("[audit]\nnode_keys = \"{}\"\n", keys.display()),
    );
    let mut recs = records(&log);
    let (status, body) = agg.post(&report(1, &recs[..1]), Some(AGENT_TOKEN));
    assert_eq!(status, 200, "{body}");

    // Records 2 and 3 edited on the node before they were sent, the plain
    // chain recomputed: the aggregator flags record 2 (and 3, which the
    // edit's new hashes now link to).
    recs[1].action = "resolved".into();
    rechain(&mut recs, 1, None);
    let (status, body) = agg.post(&report(2, &recs[1..]), Some(AGENT_TOKEN));
    assert_eq!(status, 200, "{body}");
    let rows = wait_for("three audit records", Duration::from_secs(30), || {
        let (_, body) = agg.get("/api/v1/audit", Some(ADMIN_TOKEN));
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let r = v["records"].as_array()?.clone();
        (r.len() == 3).then_some(r)
    });
    assert_eq!(rows[0]["chain_ok"], true, "{rows:?}");
    assert_eq!(rows[1]["chain_ok"], false, "{rows:?}");
    let problem = rows[1]["problem"].as_str().unwrap();
    assert!(problem.contains("hmac_sha256"), "{problem}");
    assert!(agg.log_text().contains("hmac_sha256"), "{}", agg.log_text());
    let metrics = agg.get("/metrics", None).1;
    assert!(
        metrics.contains("tally_aggregator_audit_chain_breaks_total{node=\"n1\"} 2"),
        "{metrics}"
    );
    // The key never crossed the wire: it is in no stored record.
    let key_hex = fs::read_to_string(keys.join("n1.key")).unwrap();
    let key_hex = key_hex.lines().last().unwrap();
    let (_, all) = agg.get("/api/v1/audit", Some(ADMIN_TOKEN));
    assert!(!all.contains(key_hex));
}
