//! cgroup v2 id → path: the id the kernel hands eBPF programs
//! (`bpf_get_current_cgroup_id`, `bpf_skb_cgroup_id`) is the inode number of
//! the cgroup's directory. The hierarchy is walked once and then only when an
//! id is unknown or a cached path no longer has that inode.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Cache of cgroup id → path relative to the v2 root (`/`, `/a/b`).
#[derive(Debug)]
pub struct CgroupPaths {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    walks: u64,
}

impl CgroupPaths {
    /// A cache over the v2 hierarchy mounted at `root`; nothing is read yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            by_id: HashMap::new(),
            walks: 0,
        }
    }

    /// How many times the hierarchy was walked (for tests and logs).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Path of `id` from the cache, checked to still be that cgroup.
    pub fn cached(&self, id: u64) -> Option<&str> {
        let path = self.by_id.get(&id)?;
        let full = self.full(path);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.ino() == id => Some(path),
            _ => None,
        }
    }

    /// Path of `id`, walking the hierarchy when the cache does not know it.
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cached(id) {
            return Some(p.to_owned());
        }
        self.walk();
        self.by_id.get(&id).cloned()
    }

    /// Paths of `ids` (`None`: no such cgroup now), walking the hierarchy
    /// at most once for all of them.
    pub fn resolve_all(
        &mut self,
        ids: impl IntoIterator<Item = u64>,
    ) -> HashMap<u64, Option<String>> {
        let mut paths = HashMap::new();
        let mut walked = false;
        for id in ids {
            if paths.contains_key(&id) {
                continue;
            }
            let mut path = self.cached(id).map(str::to_owned);
            if path.is_none() && !walked {
                self.walk();
                walked = true;
                path = self.cached(id).map(str::to_owned);
            }
            paths.insert(id, path);
        }
        paths
    }

    /// Re-reads the whole hierarchy into the cache.
    pub fn walk(&mut self) {
        self.walks += 1;
        let mut found = HashMap::new();
        if let Ok(m) = std::fs::metadata(&self.root) {
            found.insert(m.ino(), "/".to_owned());
        }
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // `file_type` of a kernfs entry needs no extra stat.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
                found.insert(meta.ino(), rel.clone());
                stack.push((entry.path(), rel));
            }
        }
        self.by_id = found;
    }

    fn full(&self, rel: &str) -> PathBuf {
        if rel == "/" {
            self.root.clone()
        } else {
            self.root.join(rel.trim_start_matches('/'))
        }
    }
}

/// The inode (= cgroup id) of a cgroup v2 directory.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_of_plain_directories_resolves_by_inode() {
        // Any directory tree works the same as cgroupfs for the walk.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::write(dir.path().join("a/file"), "x").unwrap();
        let mut paths = CgroupPaths::new(dir.path());
        let id_b = cgroup_id(&dir.path().join("a/b")).unwrap();
        let id_root = cgroup_id(dir.path()).unwrap();
        assert_eq!(paths.resolve(id_b).as_deref(), Some("/a/b"));
        assert_eq!(paths.resolve(id_root).as_deref(), Some("/"));
        assert_eq!(paths.walks(), 1, "the second id came from the cache");

        // Renamed: the cached path no longer has that inode, a walk finds it.
        std::fs::rename(dir.path().join("a/b"), dir.path().join("a/d")).unwrap();
        assert_eq!(paths.cached(id_b), None);
        assert_eq!(paths.resolve(id_b).as_deref(), Some("/a/d"));

        // Removed: unknown even after a walk.
        std::fs::remove_dir(dir.path().join("a/d")).unwrap();
        assert_eq!(paths.resolve(id_b), None);
    }

    #[test]
    fn ids_of_one_sample_cost_at_most_one_walk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        let id_a = cgroup_id(&dir.path().join("a")).unwrap();
        let id_b = cgroup_id(&dir.path().join("b")).unwrap();
        let gone = u64::MAX;
        let mut paths = CgroupPaths::new(dir.path());
        let found = paths.resolve_all([id_a, gone, id_b, id_a]);
        assert_eq!(paths.walks(), 1);
        assert_eq!(found.len(), 3);
        assert_eq!(found[&id_a].as_deref(), Some("/a"));
        assert_eq!(found[&id_b].as_deref(), Some("/b"));
        assert_eq!(found[&gone], None);
    }
}
