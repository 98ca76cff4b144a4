//! The append-only, hash-chained audit log (`<state_dir>/audit.log`).
//!
//! One JSON object per line: `seq`, `ts`, `node`, `tenant`, `resource`,
//! `action`, `detail`, `prev_sha256`, `sha256`. `sha256` is the SHA-256 (hex)
//! of the line's JSON without its `sha256` field, fields in that order;
//! `prev_sha256` is the previous line's `sha256` (64 zeros for the first).
//! Changing, removing or reordering any line breaks the chain at that line,
//! which [`verify`] names.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_sha256` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the audit log cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, read or written.
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    pub node: String,
    pub tenant: String,
    /// `gpu_memory`, `gpu_seconds_per_hour`, `memory`, `quota`, …
    pub resource: String,
    /// `alert`, `throttle`, `throttle_end`, `terminate`, `kill`, `skip`,
    /// `quota_set`, `quota_change`, `quota_removed`, `limit_error`, …
    pub action: String,
    /// Structured facts (pids, usage, limit, reason).
    pub detail: serde_json::Value,
    pub prev_sha256: String,
    pub sha256: String,
}

/// The hashed part of a record: every field but `sha256`, in order.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    ts: &'a str,
    node: &'a str,
    tenant: &'a str,
    resource: &'a str,
    action: &'a str,
    detail: &'a serde_json::Value,
    prev_sha256: &'a str,
}

impl Record {
    /// SHA-256 (hex) of everything but `sha256`.
    pub fn digest(&self) -> String {
        let body = Body {
            seq: self.seq,
            ts: &self.ts,
            node: &self.node,
            tenant: &self.tenant,
            resource: &self.resource,
            action: &self.action,
            detail: &self.detail,
            prev_sha256: &self.prev_sha256,
        };
        // Serializing plain strings and a JSON value cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// Appends records, keeping the chain. One writer per file (the agent).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    node: String,
    seq: u64,
    last: String,
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain.
    pub fn open(path: &Path, node: &str) -> Result<AuditLog, AuditError> {
        let err = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(err)?;
        let (seq, last, torn) = tail(&mut file).map_err(err)?;
        if torn {
            // A crash mid-write left half a line; end it so that the next
            // record starts on its own line (verify still names the torn one).
            file.write_all(b"\n").map_err(err)?;
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            node: node.to_owned(),
            seq,
            last,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and syncs it to disk.
    pub fn append(
        &mut self,
        tenant: &str,
        resource: &str,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<Record, AuditError> {
        let mut rec = Record {
            seq: self.seq + 1,
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            node: self.node.clone(),
            tenant: tenant.to_owned(),
            resource: resource.to_owned(),
            action: action.to_owned(),
            detail,
            prev_sha256: self.last.clone(),
            sha256: String::new(),
        };
        rec.sha256 = rec.digest();
        let mut line = serde_json::to_vec(&rec).unwrap_or_default();
        line.push(b'\n');
        let err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&line).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.seq = rec.seq;
        self.last = rec.sha256.clone();
        Ok(rec)
    }
}

/// Last `seq` and `sha256` of an existing log, and whether it ends mid-line.
fn tail(file: &mut File) -> io::Result<(u64, String, bool)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, GENESIS.to_owned(), false));
    }
    // Lines are short; the last 64 KiB hold the last complete one.
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let torn = buf.last() != Some(&b'\n');
    let text = String::from_utf8_lossy(&buf);
    for line in text.lines().rev() {
        if let Ok(rec) = serde_json::from_str::<Record>(line) {
            return Ok((rec.seq, rec.sha256, torn));
        }
    }
    Ok((0, GENESIS.to_owned(), torn))
}

/// The first line that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct Broken {
    /// 1-based line number.
    pub line: usize,
    pub reason: String,
}

/// Checks a whole log; `Ok(number of records)` when the chain holds.
pub fn verify(path: &Path) -> Result<Result<usize, Broken>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prev = GENESIS.to_owned();
    let mut seq = 0u64;
    let mut n = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let broken = |reason: String| {
            Ok(Err(Broken {
                line: line_no,
                reason,
            }))
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => return broken(format!("unreadable: {e}")),
        };
        let rec: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return broken(format!("not an audit record: {e}")),
        };
        if rec.prev_sha256 != prev {
            return broken(format!(
                "prev_sha256 {} does not match the previous line's sha256 {prev}",
                rec.prev_sha256
            ));
        }
        if rec.seq != seq + 1 {
            return broken(format!("seq {} follows seq {seq}", rec.seq));
        }
        let digest = rec.digest();
        if rec.sha256 != digest {
            return broken(format!(
                "sha256 {} does not match the line's content ({digest}): the line was changed",
                rec.sha256
            ));
        }
        prev = rec.sha256;
        seq = rec.seq;
        n += 1;
    }
    Ok(Ok(n))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state/audit.log");
        let mut log = AuditLog::open(&p, "node1").unwrap();
        for i in 0..n {
            log.append("acme", "gpu_memory", "alert", json!({ "i": i }))
                .unwrap();
        }
        (d, p)
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen() {
        let (_d, p) = log_with(3);
        let mut log = AuditLog::open(&p, "node1").unwrap();
        let r = log.append("beta", "quota", "quota_set", json!({})).unwrap();
        assert_eq!(r.seq, 4);
        assert_eq!(verify(&p).unwrap(), Ok(4));
        let first: Record =
            serde_json::from_str(fs::read_to_string(&p).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first.prev_sha256, GENESIS);
        assert_eq!(first.node, "node1");
    }

    #[test]
    fn an_edited_line_is_named() {
        let (_d, p) = log_with(4);
        let text = fs::read_to_string(&p).unwrap();
        let tampered = text.replacen("\"i\":2", "\"i\":7", 1);
        fs::write(&p, tampered).unwrap();
        let broken = verify(&p).unwrap().unwrap_err();
        assert_eq!(broken.line, 3, "{broken}");
        assert!(broken.reason.contains("changed"), "{broken}");
    }

    #[test]
    fn a_removed_line_is_named() {
        let (_d, p) = log_with(4);
        let text = fs::read_to_string(&p).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(1);
        fs::write(&p, lines.join("\n") + "\n").unwrap();
        assert_eq!(verify(&p).unwrap().unwrap_err().line, 2);
    }

    #[test]
    fn a_rehashed_edit_still_breaks_the_next_line() {
        let (_d, p) = log_with(3);
        let text = fs::read_to_string(&p).unwrap();
        let mut recs: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        recs[0].tenant = "mallory".into();
        recs[0].sha256 = recs[0].digest();
        let out: String = recs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        fs::write(&p, out).unwrap();
        assert_eq!(verify(&p).unwrap().unwrap_err().line, 2);
    }

    #[test]
    fn a_torn_tail_is_ended_and_reported() {
        let (_d, p) = log_with(2);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":3,\"ts").unwrap();
        drop(f);
        let mut log = AuditLog::open(&p, "node1").unwrap();
        log.append("acme", "gpu_memory", "alert", json!({}))
            .unwrap();
        assert_eq!(verify(&p).unwrap().unwrap_err().line, 3);
    }
}
