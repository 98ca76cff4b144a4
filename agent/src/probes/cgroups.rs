//! cgroup v2 id → path: the id the kernel hands eBPF programs
//! (`bpf_get_current_cgroup_id`, `bpf_skb_cgroup_id`) is the inode number of
//! the cgroup's directory, and also its kernfs file handle. An unknown id is
//! opened directly by that handle (`open_by_handle_at`); the hierarchy is
//! walked only where the kernel refuses that.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use nix::libc;
use tracing::{debug, info};

/// Cache of cgroup id → path relative to the v2 root (`/`, `/a/b`).
#[derive(Debug)]
pub struct CgroupPaths {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    walks: u64,
    /// The v2 root opened for `open_by_handle_at`; `None` once the kernel
    /// refused it (see [`CgroupPaths::by_handle`]).
    handles: Option<HandleRoot>,
}

#[derive(Debug)]
struct HandleRoot {
    dir: File,
    /// The root as the kernel names it in `/proc/self/fd` links.
    canonical: PathBuf,
}

/// What opening a cgroup by its id gave.
enum ByHandle {
    Found(String),
    /// The kernel knows no such cgroup (removed): a walk would not find it.
    Gone,
    /// No handle answer for this id (handles do not work here, logged
    /// once, or the call failed this time): walk instead.
    Walk,
}

impl CgroupPaths {
    /// A cache over the v2 hierarchy mounted at `root`; nothing is read yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            by_id: HashMap::new(),
            walks: 0,
            handles: None,
        }
        .open_root()
    }

    fn open_root(mut self) -> Self {
        // Other filesystems read a kernfs handle as their own kind (ext4
        // and tmpfs answer "stale", which would read as "no such cgroup").
        let cgroup2 = nix::sys::statfs::statfs(&self.root)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
        if !cgroup2 {
            return self;
        }
        self.handles = File::open(&self.root).ok().and_then(|dir| {
            Some(HandleRoot {
                dir,
                canonical: std::fs::canonicalize(&self.root).ok()?,
            })
        });
        self
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

    /// Path of `id`: from the cache, else by its handle, else by a walk.
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cached(id) {
            return Some(p.to_owned());
        }
        match self.by_handle(id) {
            ByHandle::Found(path) => Some(path),
            ByHandle::Gone => None,
            ByHandle::Walk => {
                self.walk();
                self.by_id.get(&id).cloned()
            }
        }
    }

    /// Opens cgroup `id` by its kernfs file handle, and reads back the
    /// directory's path. Needs `CAP_DAC_READ_SEARCH` and a cgroup2 root;
    /// on the first refusal (a plain directory tree in tests, an agent
    /// without the capability, an older kernel) handles are given up for
    /// good and the caller walks the tree, which needs neither. Any other
    /// failure (out of fds or memory, an interrupted call, a cgroup
    /// vanishing halfway) costs this call a walk and no more.
    fn by_handle(&mut self, id: u64) -> ByHandle {
        let Some(root) = &self.handles else {
            return ByHandle::Walk;
        };
        match open_by_id(root, id) {
            Ok(Some(rel)) => {
                self.by_id.insert(id, rel.clone());
                ByHandle::Found(rel)
            }
            Ok(None) => ByHandle::Gone,
            Err(e) if refused(&e) => {
                info!(
                    root = %self.root.display(),
                    error = %e,
                    "cgroup ids cannot be opened by handle; walking the cgroup tree instead"
                );
                self.handles = None;
                ByHandle::Walk
            }
            Err(e) => {
                debug!(id, error = %e, "cannot open a cgroup by handle this time; walking the tree");
                ByHandle::Walk
            }
        }
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
            if path.is_none() {
                match self.by_handle(id) {
                    ByHandle::Found(p) => path = Some(p),
                    ByHandle::Gone => {}
                    ByHandle::Walk if !walked => {
                        self.walk();
                        walked = true;
                        path = self.cached(id).map(str::to_owned);
                    }
                    // Walked already this call: the cache has it or not.
                    ByHandle::Walk => {}
                }
            }
            paths.insert(id, path);
        }
        self.forget_all_but(&paths);
        paths
    }

    /// Keeps the cache near the live ids: a cgroup opened by its handle
    /// stays cached, and job cgroups come and go by the hundred thousand
    /// an hour (the soak found +23 MiB/h). Once the cache outgrows the
    /// ids of a sample well, only theirs are kept; the rest are found
    /// again by handle if they are ever asked for.
    fn forget_all_but(&mut self, live: &HashMap<u64, Option<String>>) {
        if self.by_id.len() > 4 * live.len() + 1024 {
            self.by_id.retain(|id, _| live.contains_key(id));
        }
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

/// `FILEID_KERNFS` (include/linux/exportfs.h): a kernfs node by its id.
const FILEID_KERNFS: libc::c_int = 0xfe;

/// `struct file_handle` with room for a kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    id: u64,
}

/// The path below `root` of the cgroup whose id is `id`; `Ok(None)` when
/// the kernel has no such cgroup (or it is not below `root`); `Err` when
/// it could not be opened ([`refused`]: handles cannot be used here).
fn open_by_id(root: &HandleRoot, id: u64) -> io::Result<Option<String>> {
    let fd = open_by_handle(&root.dir, id);
    let fd = match fd {
        Ok(fd) => fd,
        // A removed cgroup's handle is stale.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let dir = File::from(fd);
    // Another filesystem would read the handle differently: only a
    // directory with that inode is the cgroup asked for.
    let ino = dir.metadata()?.ino();
    if ino != id {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("handle {id} opened inode {ino}: not a kernfs id"),
        ));
    }
    let full = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    Ok(full.strip_prefix(&root.canonical).ok().map(|rel| {
        let rel = rel.to_string_lossy();
        format!("/{rel}")
    }))
}

/// Whether `e` says handles cannot work here at all (no capability, no
/// kernfs handles on this filesystem or kernel, a bad root), rather than
/// that this one call failed.
fn refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::EBADF)
        )
}

/// `open_by_handle_at(2)`, which neither `nix` 0.29 nor `rustix` wrap.
#[allow(unsafe_code)]
fn open_by_handle(root: &File, id: u64) -> io::Result<OwnedFd> {
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a valid `struct file_handle` with `handle_bytes`
    // bytes of payload, alive for the call; the fd returned is new and
    // owned by nobody else.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            &mut handle as *mut KernfsHandle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as libc::c_int))
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
    fn only_a_refusal_gives_handles_up() {
        for errno in [
            libc::EPERM,
            libc::EOPNOTSUPP,
            libc::EINVAL,
            libc::ENOSYS,
            libc::EBADF,
        ] {
            assert!(refused(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::EINTR,
            libc::ENOTDIR,
        ] {
            assert!(!refused(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(refused(&io::Error::new(
            io::ErrorKind::Unsupported,
            "not kernfs"
        )));
    }

    #[test]
    fn cgroups_no_sample_asks_for_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        let id_a = cgroup_id(&dir.path().join("a")).unwrap();
        let mut paths = CgroupPaths::new(dir.path());
        paths.walk();
        // Job cgroups opened by handle earlier, removed since.
        for id in 1_000_000..1_005_000 {
            paths.by_id.insert(id, format!("/job{id}"));
        }
        let found = paths.resolve_all([id_a]);
        assert_eq!(found[&id_a].as_deref(), Some("/a"));
        assert_eq!(paths.walks(), 1, "answered from the cache");
        assert_eq!(paths.by_id.len(), 1, "only the live id is kept");
        // A cache no bigger than the live ids allow is left alone.
        paths.by_id.insert(7, "/seven".into());
        paths.resolve_all([id_a]);
        assert!(paths.by_id.contains_key(&7));
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

    #[test]
    fn a_cgroup_id_opens_by_handle_without_a_walk() {
        // Needs root (CAP_DAC_READ_SEARCH, mkdir in cgroupfs) and cgroup2.
        let (Some(root), Ok(own)) = (
            crate::cgroupfs::unified_root(),
            crate::cgroupfs::Cgroups::own(),
        ) else {
            eprintln!("skipped: no cgroup v2 hierarchy");
            return;
        };
        let Some(own) = own.unified().map(str::to_owned) else {
            eprintln!("skipped: this process has no cgroup v2 path");
            return;
        };
        let rel = format!(
            "{}/tally-handle-test-{}",
            own.trim_end_matches('/'),
            std::process::id()
        );
        let dir = root.join(rel.trim_start_matches('/'));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("skipped: cannot make {} ({e}): needs root", dir.display());
            return;
        }
        let id = cgroup_id(&dir).unwrap();
        let mut paths = CgroupPaths::new(root);
        let found = paths.resolve(id);
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(found.as_deref(), Some(rel.as_str()));
        assert_eq!(paths.walks(), 0, "resolved by handle, not by a walk");
        // Removed: the kernel says so, no walk either.
        assert_eq!(paths.resolve_all([id])[&id], None);
        assert_eq!(paths.walks(), 0);
    }
}
