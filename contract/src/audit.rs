//! The append-only, hash-chained audit log (`<state_dir>/audit.log`).
//!
//! One JSON object per line: `seq`, `ts`, `node`, `tenant`, `resource`,
//! `action`, `detail`, `prev_sha256`, `sha256`. `sha256` is the SHA-256 (hex)
//! of the line's JSON without its `sha256` field, fields in that order;
//! `prev_sha256` is the previous line's `sha256` (64 zeros for the first).
//! Changing, removing or reordering any line breaks the chain at that line,
//! which [`verify`] names.
//!
//! A keyed log also carries `hmac_sha256` on each line: HMAC-SHA256 (hex),
//! under the node's [`AuditKey`], of the same bytes `sha256` hashes. Anyone
//! can recompute a plain SHA-256 chain after an edit; only the key's holder
//! can recompute the HMAC, so [`verify_keyed`] finds such an edit. Since the
//! HMAC covers `prev_sha256`, removing or reordering lines cannot be hidden
//! either. Lines written before the node had a key (no `hmac_sha256`) still
//! verify as before and are counted as unkeyed; an unkeyed line after a
//! keyed one is a break (a line rewritten without the key).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use hmac::{Hmac, Mac};
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
    /// The key file could not be read, created or is not a key.
    #[error("audit key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
}

/// A node's audit key: 32 secret bytes, kept in a file as 64 hex digits
/// (`<state_dir>/audit.key` on the node, `<node>.key` at the aggregator).
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// A key of fresh random bytes from the operating system.
    pub fn generate() -> Result<AuditKey, String> {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).map_err(|e| format!("no random bytes: {e}"))?;
        Ok(AuditKey(k))
    }

    /// Parses a key file's text: 64 hex digits, surrounding whitespace and
    /// `#` comment lines ignored.
    pub fn parse(text: &str) -> Result<AuditKey, String> {
        let hex_text = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or("holds no key (64 hex digits expected)")?;
        let bytes = hex::decode(hex_text)
            .map_err(|e| format!("not a key: {e} (64 hex digits expected)"))?;
        let k: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "a key is 32 bytes (64 hex digits), this one is {} bytes",
                b.len()
            )
        })?;
        Ok(AuditKey(k))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<AuditKey, AuditError> {
        let err = |reason: String| AuditError::Key {
            path: path.to_path_buf(),
            reason,
        };
        let text = fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        AuditKey::parse(&text).map_err(err)
    }

    /// Reads the key at `path`, or makes one there (mode 0600, never
    /// replacing a file that appeared meanwhile) when there is none.
    /// Returns the key and whether it was made now.
    ///
    /// The key is written whole to `<path>.tmp`, synced, and only then
    /// linked to `path`: a crash leaves either no key (made again at the
    /// next start; a leftover `.tmp` is replaced) or a whole one, never an
    /// empty or partial file that would stop every later start.
    pub fn load_or_create(path: &Path) -> Result<(AuditKey, bool), AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |reason: String| AuditError::Key {
            path: path.to_path_buf(),
            reason,
        };
        if path.exists() {
            return Ok((AuditKey::load(path)?, false));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let tmp_err = |e: io::Error| err(format!("{}: {e}", tmp.display()));
        // A leftover of an earlier crash: its mode or contents are not ours.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(tmp_err(e)),
            _ => {}
        }
        let key = AuditKey::generate().map_err(err)?;
        let text = format!(
            "# tally audit key of this node: give a copy to the aggregator \
             ([audit] node_keys), keep it secret\n{}\n",
            hex::encode(key.0)
        );
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(tmp_err)?;
        // A link never replaces a file that appeared meanwhile.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Some(dir) = dir {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| err(e.to_string()))?;
                }
                Ok((key, true))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Ok((AuditKey::load(path)?, false))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// The HMAC-SHA256 state under this key, fed with `bytes`.
    fn hmac(&self, bytes: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        m.update(bytes);
        m
    }

    /// HMAC-SHA256 (hex) of `bytes` under this key.
    fn mac(&self, bytes: &[u8]) -> String {
        hex::encode(self.hmac(bytes).finalize().into_bytes())
    }

    /// Whether `tag` is the HMAC-SHA256 of `bytes` under this key,
    /// compared in constant time.
    fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        self.hmac(bytes).verify_slice(tag).is_ok()
    }
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
    /// HMAC-SHA256 (hex) under the node's key of what `sha256` hashes;
    /// absent from lines written without a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_sha256: Option<String>,
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
    /// SHA-256 (hex) of everything but `sha256` and `hmac_sha256`.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.body()))
    }

    /// HMAC-SHA256 (hex) under `key` of what [`Record::digest`] hashes.
    pub fn keyed_digest(&self, key: &AuditKey) -> String {
        key.mac(&self.body())
    }

    /// Whether `hmac_sha256` is this record's HMAC under `key`, compared
    /// in constant time.
    pub fn mac_matches(&self, key: &AuditKey) -> bool {
        let Some(claimed) = self
            .hmac_sha256
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        key.verify(&self.body(), &claimed)
    }

    /// The keyed-chain rule for this record, `after_keyed` when an earlier
    /// record of the same chain carried an HMAC: with the key its HMAC
    /// must match; without the key a keyed record is left unchecked; and
    /// once a chain is keyed, a record without an HMAC is a break (it was
    /// rewritten by someone without the key). Both [`verify_keyed`] and
    /// the aggregator's store apply it.
    pub fn keyed_check(&self, after_keyed: bool, key: Option<&AuditKey>) -> KeyedCheck {
        match (&self.hmac_sha256, key) {
            (None, _) if after_keyed => KeyedCheck::Stripped,
            (None, _) => KeyedCheck::Unkeyed,
            (Some(_), None) => KeyedCheck::Unchecked,
            (Some(_), Some(k)) if !self.mac_matches(k) => KeyedCheck::Mismatch,
            (Some(_), Some(_)) => KeyedCheck::Matches,
        }
    }

    /// The bytes both digests cover.
    fn body(&self) -> Vec<u8> {
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
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// What [`Record::keyed_check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedCheck {
    /// No HMAC, and none before it: a line from before the node had a key.
    Unkeyed,
    /// No HMAC after keyed records: rewritten without the key. A break.
    Stripped,
    /// An HMAC, not checked for want of the key.
    Unchecked,
    /// An HMAC that does not match under the key. A break.
    Mismatch,
    /// An HMAC that matches under the key.
    Matches,
}

/// Appends records, keeping the chain. One writer per file (the agent).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    node: String,
    seq: u64,
    last: String,
    key: Option<AuditKey>,
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain, without a key.
    pub fn open(path: &Path, node: &str) -> Result<AuditLog, AuditError> {
        AuditLog::open_keyed(path, node, None)
    }

    /// Opens (or creates) the log and continues its chain; with a key,
    /// every line appended carries its HMAC.
    pub fn open_keyed(
        path: &Path,
        node: &str,
        key: Option<AuditKey>,
    ) -> Result<AuditLog, AuditError> {
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
            key,
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
            hmac_sha256: None,
        };
        rec.sha256 = rec.digest();
        rec.hmac_sha256 = self.key.as_ref().map(|k| rec.keyed_digest(k));
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

/// What a chain that holds is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verified {
    /// Lines in the log.
    pub records: usize,
    /// Lines without `hmac_sha256`: written before the node had a key, so
    /// only the plain chain protects them.
    pub unkeyed: usize,
    /// Keyed lines whose HMAC was not checked, for want of a key.
    pub unchecked: usize,
}

/// Checks a whole log's plain chain; `Ok(number of records)` when it holds.
pub fn verify(path: &Path) -> Result<Result<usize, Broken>, AuditError> {
    Ok(verify_keyed(path, None)?.map(|v| v.records))
}

/// Checks a whole log's chain, and with `key` every keyed line's HMAC: an
/// edit whose plain chain was recomputed without the key is named here.
pub fn verify_keyed(
    path: &Path,
    key: Option<&AuditKey>,
) -> Result<Result<Verified, Broken>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prev = GENESIS.to_owned();
    let mut seq = 0u64;
    let mut seen = Verified::default();
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
        match rec.keyed_check(seen.records > seen.unkeyed, key) {
            KeyedCheck::Stripped => {
                return broken(
                    "no hmac_sha256 after keyed lines: the line was rewritten without the key"
                        .into(),
                );
            }
            KeyedCheck::Unkeyed => seen.unkeyed += 1,
            KeyedCheck::Unchecked => seen.unchecked += 1,
            KeyedCheck::Mismatch => {
                return broken(
                    "hmac_sha256 does not match the line's content under the key: the line was \
                     changed (or the key is not this node's)"
                        .into(),
                );
            }
            KeyedCheck::Matches => {}
        }
        prev = rec.sha256;
        seq = rec.seq;
        seen.records += 1;
    }
    Ok(Ok(seen))
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

    fn keyed_log(d: &Path, key: &AuditKey, n: usize) -> PathBuf {
        let p = d.join("audit.log");
        let mut log = AuditLog::open_keyed(&p, "node1", Some(key.clone())).unwrap();
        for i in 0..n {
            log.append("acme", "gpu_memory", "alert", json!({ "i": i }))
                .unwrap();
        }
        p
    }

    fn records(p: &Path) -> Vec<Record> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Rewrites the log, recomputing the plain chain from line `from`
    /// (1-based) on, and each HMAC with `key` when given: what someone
    /// without the key (`None`) or with it can do after an edit.
    fn rechain(p: &Path, recs: &mut [Record], from: usize, key: Option<&AuditKey>) {
        for i in from - 1..recs.len() {
            if i > 0 {
                recs[i].prev_sha256 = recs[i - 1].sha256.clone();
            }
            recs[i].sha256 = recs[i].digest();
            if let Some(k) = key {
                recs[i].hmac_sha256 = Some(recs[i].keyed_digest(k));
            }
        }
        let out: String = recs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        fs::write(p, out).unwrap();
    }

    #[test]
    fn a_keyed_chain_verifies_with_its_key_and_links_without() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::generate().unwrap();
        let p = keyed_log(d.path(), &key, 3);
        assert!(records(&p).iter().all(|r| r.hmac_sha256.is_some()));
        let all = Verified {
            records: 3,
            unkeyed: 0,
            unchecked: 0,
        };
        assert_eq!(verify_keyed(&p, Some(&key)).unwrap(), Ok(all));
        // Without the key: the plain chain, as before.
        assert_eq!(verify(&p).unwrap(), Ok(3));
        assert_eq!(verify_keyed(&p, None).unwrap().unwrap().unchecked, 3);
        // Another node's key is not this one.
        let other = AuditKey::generate().unwrap();
        assert_eq!(verify_keyed(&p, Some(&other)).unwrap().unwrap_err().line, 1);
    }

    #[test]
    fn an_edit_rechained_without_the_key_is_named_and_with_it_passes() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::generate().unwrap();
        let p = keyed_log(d.path(), &key, 4);
        let mut recs = records(&p);
        recs[1].tenant = "mallory".into();
        rechain(&p, &mut recs, 2, None);
        // The plain chain alone is fooled ...
        assert_eq!(verify(&p).unwrap(), Ok(4));
        // ... the key is not.
        let broken = verify_keyed(&p, Some(&key)).unwrap().unwrap_err();
        assert_eq!(broken.line, 2, "{broken}");
        assert!(broken.reason.contains("under the key"), "{broken}");
        // Whoever holds the key can rewrite history: that is what the key
        // is for, so it stays secret.
        rechain(&p, &mut recs, 2, Some(&key));
        assert_eq!(verify_keyed(&p, Some(&key)).unwrap().unwrap().records, 4);
    }

    #[test]
    fn stripping_the_hmac_after_keyed_lines_is_a_break() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::generate().unwrap();
        let p = keyed_log(d.path(), &key, 3);
        let mut recs = records(&p);
        recs[2].tenant = "mallory".into();
        recs[2].hmac_sha256 = None;
        rechain(&p, &mut recs, 3, None);
        for k in [None, Some(&key)] {
            let broken = verify_keyed(&p, k).unwrap().unwrap_err();
            assert_eq!(broken.line, 3, "{broken}");
            assert!(broken.reason.contains("without the key"), "{broken}");
        }
    }

    #[test]
    fn an_old_unkeyed_log_continued_with_a_key_marks_the_old_lines() {
        let (d, p) = log_with(2);
        let key = AuditKey::generate().unwrap();
        let mut log = AuditLog::open_keyed(&p, "node1", Some(key.clone())).unwrap();
        log.append("acme", "quota", "quota_set", json!({})).unwrap();
        let v = verify_keyed(&p, Some(&key)).unwrap().unwrap();
        assert_eq!((v.records, v.unkeyed, v.unchecked), (3, 2, 0));
        assert_eq!(verify(&p).unwrap(), Ok(3));
        drop(d);
    }

    #[test]
    fn a_leftover_tmp_key_is_replaced_and_an_existing_key_is_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.key");
        let tmp = d.path().join("audit.key.tmp");
        // A crash between writing the tmp file and linking it.
        fs::write(&tmp, "# half a key\nab").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let (k1, made) = AuditKey::load_or_create(&p).unwrap();
        assert!(made);
        assert!(!tmp.exists());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(AuditKey::load(&p).unwrap(), k1);
        // A leftover beside an existing key changes nothing.
        fs::write(&tmp, "junk").unwrap();
        let (k2, made) = AuditKey::load_or_create(&p).unwrap();
        assert!(!made);
        assert_eq!(k1, k2);
    }

    #[test]
    fn the_key_file_is_made_private_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state/audit.key");
        let (k1, made) = AuditKey::load_or_create(&p).unwrap();
        assert!(made);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, made) = AuditKey::load_or_create(&p).unwrap();
        assert!(!made);
        assert_eq!(k1, k2);
        assert_eq!(format!("{k1:?}"), "AuditKey(..)");
        fs::write(&p, "abc\n").unwrap();
        let e = AuditKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("audit.key") && e.contains("hex"), "{e}");
        fs::write(&p, "# nothing\n").unwrap();
        assert!(
            AuditKey::load(&p)
                .unwrap_err()
                .to_string()
                .contains("no key")
        );
        assert!(
            AuditKey::parse(&"ab".repeat(16))
                .unwrap_err()
                .contains("16 bytes")
        );
    }
}
