//! The nodes' audit keys (`[audit] node_keys`): a directory holding one
//! `<node>.key` per node, a copy of that node's `<state_dir>/audit.key`,
//! with which the chain check on ingest checks each keyed record's HMAC.
//! Keys stay on disk and in this process; they never cross the wire.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use tally_contract::audit::AuditKey;

/// The keys read from `[audit] node_keys`, by node name.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeKeys {
    /// The directory, when `[audit] node_keys` is set.
    dir: Option<PathBuf>,
    keys: BTreeMap<String, AuditKey>,
}

/// What the aggregator holds for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyFor<'a> {
    /// The node's key.
    Key(&'a AuditKey),
    /// `[audit] node_keys` is set but has no `<node>.key`.
    Missing,
    /// No `[audit] node_keys`: keyed records are checked by their plain
    /// chain only.
    NotConfigured,
}

impl NodeKeys {
    /// Reads every `*.key` file of `dir`; returns every problem at once.
    pub(crate) fn load(dir: &Path) -> Result<NodeKeys, Vec<String>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| vec![format!("cannot read the directory {}: {e}", dir.display())])?;
        let mut keys = BTreeMap::new();
        let mut problems = Vec::new();
        for entry in entries {
            let path = match entry {
                Ok(e) => e.path(),
                Err(e) => {
                    problems.push(format!("cannot list {}: {e}", dir.display()));
                    continue;
                }
            };
            if path.extension().and_then(|e| e.to_str()) != Some("key") {
                continue;
            }
            let Some(node) = path.file_stem().and_then(|s| s.to_str()) else {
                problems.push(format!("{}: the name is not UTF-8", path.display()));
                continue;
            };
            match AuditKey::load(&path) {
                Ok(k) => {
                    keys.insert(node.to_owned(), k);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            Ok(NodeKeys {
                dir: Some(dir.to_path_buf()),
                keys,
            })
        } else {
            Err(problems)
        }
    }

    /// The directory read, if any (to read it again on reload).
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How many nodes have a key.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// What is held for `node`.
    pub(crate) fn get(&self, node: &str) -> KeyFor<'_> {
        match (&self.dir, self.keys.get(node)) {
            (_, Some(k)) => KeyFor::Key(k),
            (Some(_), None) => KeyFor::Missing,
            (None, None) => KeyFor::NotConfigured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_by_node_and_bad_ones_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("n1.key"), "aa".repeat(32)).unwrap();
        std::fs::write(d.path().join("README"), "not a key").unwrap();
        let keys = NodeKeys::load(d.path()).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(matches!(keys.get("n1"), KeyFor::Key(_)));
        assert_eq!(keys.get("n2"), KeyFor::Missing);
        assert_eq!(NodeKeys::default().get("n1"), KeyFor::NotConfigured);
        std::fs::write(d.path().join("n2.key"), "short").unwrap();
        let problems = NodeKeys::load(d.path()).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("n2.key"), "{problems:?}");
        let missing = NodeKeys::load(&d.path().join("nope")).unwrap_err();
        assert!(missing[0].contains("cannot read"), "{missing:?}");
    }
}
