//! The on-disk spool: reports waiting to be delivered, one file each,
//! named by sequence number so that name order is send order.
//!
//! Every report goes through the spool (write-ahead): it is written with
//! fsync and an atomic rename before the first send attempt, and removed
//! once the aggregator has acknowledged it. Reports the aggregator refuses
//! for good (a 4xx that a retry cannot fix) move to `rejected/` for an
//! operator to look at.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::state::write_durably;

/// Why the spool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One spooled report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: u64,
}

/// The spool directory and its bounds.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    max_reports: usize,
    max_bytes: u64,
}

impl Spool {
    /// Opens (creating) `<state_dir>/spool`.
    pub fn open(state_dir: &Path, max_reports: usize, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = state_dir.join(crate::paths::SPOOL_DIR);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self {
            dir,
            max_reports,
            max_bytes,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// Spooled reports, oldest first.
    pub fn entries(&self) -> Result<Vec<Entry>, SpoolError> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let item = item.map_err(io(&self.dir))?;
            let name = item.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = item.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(Entry {
                seq,
                path: item.path(),
                bytes,
            });
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// Whether one more report of about `bytes` would exceed a bound.
    pub fn is_full(&self, entries: &[Entry], bytes: u64) -> bool {
        let used: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.len() >= self.max_reports || used + bytes > self.max_bytes
    }

    /// Whether the report `seq` is spooled.
    pub fn contains(&self, seq: u64) -> bool {
        self.file(seq).exists()
    }

    /// Writes report `seq` durably.
    pub fn put(&self, seq: u64, body: &[u8]) -> Result<(), SpoolError> {
        let file = self.file(seq);
        write_durably(&file, body).map_err(io(&file))
    }

    /// Removes a delivered report.
    pub fn remove(&self, entry: &Entry) -> Result<(), SpoolError> {
        match fs::remove_file(&entry.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&entry.path)(e)),
            _ => Ok(()),
        }
    }

    /// Moves a report the aggregator refused for good to `rejected/`.
    pub fn reject(&self, entry: &Entry, reason: &str) -> Result<PathBuf, SpoolError> {
        let dir = self.dir.join("rejected");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let name = entry.path.file_name().unwrap_or_default();
        let to = dir.join(name);
        fs::rename(&entry.path, &to).map_err(io(&to))?;
        let why = to.with_extension("reason.txt");
        fs::write(&why, reason).map_err(io(&why))?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_oldest_first_and_bounds_hold() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 3, 1 << 20).unwrap();
        for seq in [10, 9, 100] {
            spool.put(seq, b"{}").unwrap();
        }
        fs::write(spool.dir().join(".junk.tmp"), "x").unwrap();
        let e = spool.entries().unwrap();
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), [9, 10, 100]);
        assert!(spool.is_full(&e, 2));
        spool.remove(&e[0]).unwrap();
        let e = spool.entries().unwrap();
        assert!(!spool.is_full(&e, 2));
        assert!(spool.is_full(&e, 1 << 20), "byte bound");
        let to = spool.reject(&e[0], "422: bad").unwrap();
        assert!(to.exists());
        assert_eq!(spool.entries().unwrap().len(), 1);
        // A reopened spool (agent restart) sees the same reports.
        let again = Spool::open(dir.path(), 3, 1 << 20).unwrap();
        assert_eq!(again.entries().unwrap().len(), 1);
    }
}
