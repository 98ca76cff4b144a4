//! Tenant cgroups on cgroup v1, v2 and hybrid hosts: `<parent>/tally/<tenant>/<job>`.
//!
//! Why plain file writes and not `cgroups-rs` (0.5): its v2 hierarchy is
//! hard-wired to `/sys/fs/cgroup` (`UNIFIED_MOUNTPOINT`), so on hybrid hosts,
//! where the v2 tree is `/sys/fs/cgroup/unified` and the limits live in v1
//! hierarchies, it can drive either the v1 controllers or a v2 tree at the
//! wrong place, never both; and `auto()` picks one mode for the whole host.
//! Tally needs both at once (v2 for attribution and BPF, v1 for limits), per
//! controller, beneath a parent that differs per hierarchy (the agent's own
//! cgroup). What it writes is a handful of files, listed below, each covered
//! by unit tests against a temp directory.
//!
//! Cgroups are only ever made beneath the configured parent, by default the
//! process's own cgroup on each hierarchy (`/proc/self/cgroup`), never beside
//! or above it.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use procfs::process::MountInfos;

use crate::{
    cgroupfs::{self, Cgroups},
    enforce::quota::Quota,
    paths::{PROC_SELF_CGROUP, PROC_SELF_MOUNTINFO},
};

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading or writing a cgroup file or directory failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// No cgroup hierarchy is mounted at all.
    #[error("no cgroup hierarchy is mounted (see /proc/self/mountinfo)")]
    NoHierarchy,
    /// A name would escape its directory.
    #[error("`{name}` is not a valid cgroup name (no `/`, `.`, `..`, empty)")]
    BadName { name: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One mounted cgroup hierarchy and where this process sits in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point (`/sys/fs/cgroup/memory`, `/sys/fs/cgroup/unified`).
    pub mount: PathBuf,
    /// Root of the mount inside the hierarchy (`/` unless in a container).
    pub mount_root: String,
    /// v1 controllers of this mount; empty for the v2 hierarchy.
    pub controllers: Vec<String>,
    /// This process's cgroup path in the hierarchy.
    pub own: String,
}

impl Hierarchy {
    pub fn is_v2(&self) -> bool {
        self.controllers.is_empty()
    }

    /// Directory of the cgroup `path` (a path in the hierarchy).
    pub fn dir(&self, path: &str) -> PathBuf {
        let rel = if self.mount_root == "/" {
            path
        } else {
            path.strip_prefix(self.mount_root.as_str()).unwrap_or(path)
        };
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(rel)
        }
    }
}

/// v1 controllers a tenant job joins on hybrid and v1 hosts.
pub const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer"];

/// The host's cgroup layout, as seen by this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The v2 hierarchy (pure v2: `/sys/fs/cgroup`; hybrid: `…/unified`).
    pub unified: Option<Hierarchy>,
    /// v1 hierarchies with at least one controller.
    pub v1: Vec<Hierarchy>,
}

impl Layout {
    /// Reads `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn detect() -> Result<Layout, CgroupError> {
        let mounts = cgroupfs::own_mounts().map_err(io_err(Path::new(PROC_SELF_MOUNTINFO)))?;
        let own = Cgroups::own().map_err(io_err(Path::new(PROC_SELF_CGROUP)))?;
        let layout = Self::from_mounts(&mounts, &own);
        if layout.unified.is_none() && layout.v1.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(layout)
    }

    /// The layout from this process's mounts and its own cgroups.
    pub fn from_mounts(mounts: &MountInfos, own: &Cgroups) -> Layout {
        let mut layout = Layout::default();
        for m in mounts.iter() {
            let root = unescape(&m.root);
            let mount = PathBuf::from(unescape(&m.mount_point.to_string_lossy()));
            match m.fs_type.as_str() {
                "cgroup2" if layout.unified.is_none() => {
                    layout.unified = Some(Hierarchy {
                        mount,
                        mount_root: root,
                        controllers: Vec::new(),
                        own: own.unified().unwrap_or("/").to_owned(),
                    });
                }
                "cgroup" => {
                    // Super options name the controllers, beside `rw`,
                    // `name=systemd` and flags such as `xattr`.
                    let mut controllers: Vec<String> = m
                        .super_options
                        .iter()
                        .filter(|(o, value)| {
                            value.is_none()
                                && !matches!(
                                    o.as_str(),
                                    "rw" | "ro"
                                        | "relatime"
                                        | "noprefix"
                                        | "xattr"
                                        | "clone_children"
                                )
                        })
                        .map(|(o, _)| o.clone())
                        .collect();
                    controllers.sort();
                    let Some(first) = controllers.first() else {
                        continue; // named hierarchy (name=systemd): no controller
                    };
                    if layout.v1.iter().any(|h| h.mount == mount) {
                        continue;
                    }
                    let own = own.v1(first).unwrap_or("/").to_owned();
                    layout.v1.push(Hierarchy {
                        mount,
                        mount_root: root,
                        controllers,
                        own,
                    });
                }
                _ => {}
            }
        }
        layout
    }

    /// The layout from the texts of `mountinfo` and `/proc/<pid>/cgroup`.
    #[cfg(test)]
    fn parse(mountinfo: &str, proc_cgroup: &str) -> Layout {
        Self::from_mounts(
            &cgroupfs::parse_mounts(mountinfo).unwrap(),
            &Cgroups::parse(proc_cgroup).unwrap(),
        )
    }

    /// The v1 hierarchy that holds `controller`.
    pub fn v1(&self, controller: &str) -> Option<&Hierarchy> {
        self.v1
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    /// Controllers enabled in the v2 hierarchy at its root.
    fn v2_controllers(&self) -> Vec<String> {
        self.unified
            .as_ref()
            .and_then(|h| fs::read_to_string(h.dir("/").join("cgroup.controllers")).ok())
            .map(|t| t.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Where `controller`'s limits are written: v2 when the unified tree has
    /// it, else its v1 hierarchy.
    pub fn backend(&self, controller: &str) -> Option<Backend<'_>> {
        if self.v2_controllers().iter().any(|c| c == controller) {
            return self.unified.as_ref().map(Backend::V2);
        }
        self.v1(controller).map(Backend::V1)
    }

    /// Every hierarchy a tenant job joins: the v2 tree and the v1 ones with
    /// a controller Tally uses (each mount once).
    pub fn job_hierarchies(&self) -> Vec<&Hierarchy> {
        let mut out: Vec<&Hierarchy> = self.unified.iter().collect();
        for h in &self.v1 {
            if h.controllers
                .iter()
                .any(|c| V1_CONTROLLERS.contains(&c.as_str()))
            {
                out.push(h);
            }
        }
        out
    }
}

/// Which hierarchy a controller's files live in.
#[derive(Debug, Clone, Copy)]
pub enum Backend<'a> {
    V1(&'a Hierarchy),
    V2(&'a Hierarchy),
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(n as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Checks a tenant or job name before it becomes a directory.
pub fn check_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 200
    {
        return Err(CgroupError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The tree `<parent>/tally/<tenant>/<job>` on every hierarchy.
#[derive(Debug, Clone)]
pub struct TenantTree {
    pub layout: Layout,
    /// Configured parent, the same path on every hierarchy; `None` = the
    /// process's own cgroup on each.
    pub parent: Option<String>,
}

/// Directory name under the parent.
pub const TALLY_DIR: &str = "tally";

impl TenantTree {
    pub fn new(layout: Layout, parent: Option<String>) -> Self {
        Self { layout, parent }
    }

    /// cgroup path of the parent in hierarchy `h`: the configured absolute
    /// path, or the own cgroup (joined with a relative configured path).
    pub fn parent_path(&self, h: &Hierarchy) -> String {
        match self.parent.as_deref() {
            None => h.own.clone(),
            Some(p) if p.starts_with('/') => p.to_owned(),
            Some(rel) => join_cg(&h.own, rel.trim_end_matches('/')),
        }
    }

    /// cgroup path of `<parent>/tally` in hierarchy `h`.
    pub fn base_path(&self, h: &Hierarchy) -> String {
        join_cg(&self.parent_path(h), TALLY_DIR)
    }

    /// cgroup path of a tenant in `h`.
    pub fn tenant_path(&self, h: &Hierarchy, tenant: &str) -> String {
        join_cg(&self.base_path(h), tenant)
    }

    /// cgroup path of a job in `h`.
    pub fn job_path(&self, h: &Hierarchy, tenant: &str, job: &str) -> String {
        join_cg(&self.tenant_path(h, tenant), job)
    }

    /// The tenant's cgroup v2 directory, when there is a v2 hierarchy.
    pub fn tenant_v2_dir(&self, tenant: &str) -> Option<PathBuf> {
        let h = self.layout.unified.as_ref()?;
        Some(h.dir(&self.tenant_path(h, tenant)))
    }

    /// Creates `<parent>/tally/<tenant>` on every job hierarchy and, on v2,
    /// enables the limit controllers the tree has along the way.
    pub fn ensure_tenant(&self, tenant: &str) -> Result<(), CgroupError> {
        check_name(tenant)?;
        for h in self.layout.job_hierarchies() {
            let parent_dir = h.dir(&self.parent_path(h));
            let base = h.dir(&self.base_path(h));
            let dir = h.dir(&self.tenant_path(h, tenant));
            if let Some(rel) = self.parent.as_deref().filter(|p| !p.starts_with('/')) {
                // A relative parent is ours to make, beneath our own cgroup.
                let mut d = h.dir(&h.own);
                for part in rel.split('/').filter(|p| !p.is_empty()) {
                    d = d.join(part);
                    mkdir(&d)?;
                    if h.is_v2() {
                        let _ = enable_controllers(d.parent().unwrap_or(&d));
                    }
                }
            }
            mkdir(&base)?;
            mkdir(&dir)?;
            if h.is_v2() {
                // Best effort: fails (EBUSY) when the parent holds processes
                // on a pure v2 host; a delegated `cgroup_parent` avoids that.
                let _ = enable_controllers(&parent_dir);
                let _ = enable_controllers(&base);
            }
        }
        Ok(())
    }

    /// Creates `<parent>/tally/<tenant>/<job>` and moves `pid` into it on
    /// every job hierarchy.
    pub fn join(&self, tenant: &str, job: &str, pid: u32) -> Result<(), CgroupError> {
        check_name(job)?;
        self.ensure_tenant(tenant)?;
        for h in self.layout.job_hierarchies() {
            let dir = h.dir(&self.job_path(h, tenant, job));
            mkdir(&dir)?;
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io_err(&procs))?;
        }
        Ok(())
    }

    /// Writes the tenant's cpu / memory / pids limits; one result each.
    pub fn apply_limits(
        &self,
        tenant: &str,
        quota: &Quota,
    ) -> Vec<(&'static str, Result<(), CgroupError>)> {
        let mut out = Vec::new();
        for (resource, controller) in [("cpu_cores", "cpu"), ("memory", "memory"), ("pids", "pids")]
        {
            let result = match self.layout.backend(controller) {
                None => continue,
                Some(Backend::V2(h)) => {
                    let dir = h.dir(&self.tenant_path(h, tenant));
                    write_limit_v2(&dir, resource, quota)
                }
                Some(Backend::V1(h)) => {
                    let dir = h.dir(&self.tenant_path(h, tenant));
                    write_limit_v1(&dir, resource, quota)
                }
            };
            out.push((resource, result));
        }
        out
    }

    /// Current memory (bytes) and task count of a tenant, where readable.
    pub fn usage(&self, tenant: &str) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::new();
        if let Some(b) = self.layout.backend("memory") {
            let (h, file) = match b {
                Backend::V2(h) => (h, "memory.current"),
                Backend::V1(h) => (h, "memory.usage_in_bytes"),
            };
            if let Some(v) = read_u64(&h.dir(&self.tenant_path(h, tenant)).join(file)) {
                out.insert("memory", v as f64);
            }
        }
        if let Some(Backend::V2(h) | Backend::V1(h)) = self.layout.backend("pids")
            && let Some(v) = read_u64(&h.dir(&self.tenant_path(h, tenant)).join("pids.current"))
        {
            out.insert("pids", v as f64);
        }
        // Cumulative CPU time in seconds (the enforcer turns it into cores).
        match self.layout.backend("cpu") {
            Some(Backend::V2(h)) => {
                let stat = h.dir(&self.tenant_path(h, tenant)).join("cpu.stat");
                if let Some(us) = fs::read_to_string(stat).ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                }) {
                    out.insert("cpu_seconds", us as f64 / 1e6);
                }
            }
            _ => {
                if let Some(h) = self.layout.v1("cpuacct")
                    && let Some(ns) =
                        read_u64(&h.dir(&self.tenant_path(h, tenant)).join("cpuacct.usage"))
                {
                    out.insert("cpu_seconds", ns as f64 / 1e9);
                }
            }
        }
        out
    }

    /// Removes job cgroups of `tenant` that no process is in any more
    /// (`tally run` execs the command and cannot clean up after it). Only
    /// jobs older than [`JOB_GC_AGE`]: a `tally run` that just made its
    /// directory has not written its pid yet.
    pub fn remove_empty_jobs(&self, tenant: &str) {
        for h in self.layout.job_hierarchies() {
            let dir = h.dir(&self.tenant_path(h, tenant));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let old_enough = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= JOB_GC_AGE);
                if p.is_dir()
                    && old_enough
                    && fs::read_to_string(p.join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty())
                {
                    // Fails harmlessly (EBUSY) if a process joined meanwhile.
                    let _ = fs::remove_dir(&p);
                }
            }
        }
    }
}

/// Age below which an empty job cgroup is left alone.
pub const JOB_GC_AGE: std::time::Duration = std::time::Duration::from_secs(60);

fn join_cg(parent: &str, child: &str) -> String {
    if parent.ends_with('/') {
        format!("{parent}{child}")
    } else {
        format!("{parent}/{child}")
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Turns on `cpu memory pids` (those available) for the children of `dir`.
pub fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(io_err(&dir.join("cgroup.controllers")))?;
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|c| matches!(*c, "cpu" | "memory" | "pids"))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    fs::write(&file, wanted.join(" ")).map_err(io_err(&file))
}

/// CFS period Tally uses, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(io_err(&path))
}

/// Writes one limit in a cgroup v2 directory: `cpu.max`, `memory.max`,
/// `pids.max` ("max" when the quota has none).
pub fn write_limit_v2(dir: &Path, resource: &str, q: &Quota) -> Result<(), CgroupError> {
    match resource {
        "cpu_cores" => {
            let quota = q.cpu_cores.map_or("max".to_owned(), |c| {
                ((c * CPU_PERIOD_US as f64).round() as u64)
                    .max(1000)
                    .to_string()
            });
            write(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))
        }
        "memory" => write(
            dir,
            "memory.max",
            &q.memory.map_or("max".to_owned(), |m| m.to_string()),
        ),
        "pids" => write(
            dir,
            "pids.max",
            &q.pids.map_or("max".to_owned(), |m| m.to_string()),
        ),
        _ => Ok(()),
    }
}

/// Writes one limit in a cgroup v1 directory: `cpu.cfs_period_us` +
/// `cpu.cfs_quota_us`, `memory.limit_in_bytes`, `pids.max` (-1 / "max").
pub fn write_limit_v1(dir: &Path, resource: &str, q: &Quota) -> Result<(), CgroupError> {
    match resource {
        "cpu_cores" => {
            write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            let quota = q.cpu_cores.map_or("-1".to_owned(), |c| {
                ((c * CPU_PERIOD_US as f64).round() as u64)
                    .max(1000)
                    .to_string()
            });
            write(dir, "cpu.cfs_quota_us", &quota)
        }
        "memory" => write(
            dir,
            "memory.limit_in_bytes",
            &q.memory.map_or("-1".to_owned(), |m| m.to_string()),
        ),
        "pids" => write(
            dir,
            "pids.max",
            &q.pids.map_or("max".to_owned(), |m| m.to_string()),
        ),
        _ => Ok(()),
    }
}

/// A cgroup that can be frozen: v2 `cgroup.freeze` or v1 `freezer.state`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Freezer {
    V2(PathBuf),
    V1(PathBuf),
}

impl Freezer {
    /// Freezes (`true`) or thaws the cgroup.
    pub fn set(&self, frozen: bool) -> Result<(), CgroupError> {
        match self {
            Freezer::V2(dir) => write(dir, "cgroup.freeze", if frozen { "1" } else { "0" }),
            Freezer::V1(dir) => write(
                dir,
                "freezer.state",
                if frozen { "FROZEN" } else { "THAWED" },
            ),
        }
    }

    /// Whether the kernel reports the cgroup frozen.
    pub fn is_frozen(&self) -> Option<bool> {
        match self {
            Freezer::V2(dir) => {
                let t = fs::read_to_string(dir.join("cgroup.events")).ok()?;
                t.lines()
                    .find_map(|l| l.strip_prefix("frozen "))
                    .map(|v| v.trim() == "1")
            }
            Freezer::V1(dir) => {
                let t = fs::read_to_string(dir.join("freezer.state")).ok()?;
                Some(t.trim() == "FROZEN")
            }
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Freezer::V2(d) | Freezer::V1(d) => d,
        }
    }
}

impl Layout {
    /// The freezer of a process's cgroup, given its cgroups and the
    /// agent's own: v2 when the process sits in
    /// a non-root v2 cgroup, else the v1 freezer hierarchy. `None` when the
    /// cgroup is a root, or contains the agent itself (freezing it would
    /// freeze the agent).
    pub fn freezer_for(&self, process: &Cgroups, own: &Cgroups) -> Option<Freezer> {
        let contains_self = |target: &str, own: Option<&str>| {
            let Some(own) = own else { return false };
            own == target || own.starts_with(&format!("{}/", target.trim_end_matches('/')))
        };
        if let Some(h) = &self.unified
            && let Some(path) = process.unified()
            && path != "/"
            && !contains_self(path, own.unified())
        {
            let dir = h.dir(path);
            if dir.join("cgroup.freeze").exists() {
                return Some(Freezer::V2(dir));
            }
        }
        let h = self.v1("freezer")?;
        let path = process.v1("freezer")?;
        if path == "/" || contains_self(path, own.v1("freezer")) {
            return None;
        }
        Some(Freezer::V1(h.dir(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/pids rw,nosuid shared:14 - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/freezer rw,nosuid shared:15 - cgroup cgroup rw,freezer
37 30 0:33 / /sys/fs/cgroup/devices rw,nosuid shared:16 - cgroup cgroup rw,devices
";
    const CGROUP_HYBRID: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
5:devices:/
4:memory:/process_api/abc
2:cpu,cpuacct:/
0::/
";

    #[test]
    fn hybrid_layout_is_parsed() {
        let l = Layout::parse(MOUNTINFO_HYBRID, CGROUP_HYBRID);
        let u = l.unified.as_ref().unwrap();
        assert_eq!(u.mount, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(u.own, "/");
        assert_eq!(l.v1.len(), 5, "{l:?}");
        let mem = l.v1("memory").unwrap();
        assert_eq!(mem.own, "/process_api/abc");
        assert_eq!(
            l.v1("cpuacct").unwrap().mount,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        // Jobs join v2 + memory + cpu,cpuacct + pids + freezer, not devices.
        assert_eq!(l.job_hierarchies().len(), 5);
    }

    #[test]
    fn tenant_tree_stays_beneath_own_cgroup() {
        let l = Layout::parse(MOUNTINFO_HYBRID, CGROUP_HYBRID);
        let t = TenantTree::new(l.clone(), None);
        let mem = l.v1("memory").unwrap();
        assert_eq!(
            t.job_path(mem, "acme", "j1"),
            "/process_api/abc/tally/acme/j1"
        );
        assert_eq!(
            mem.dir(&t.job_path(mem, "acme", "j1")),
            Path::new("/sys/fs/cgroup/memory/process_api/abc/tally/acme/j1")
        );
        assert_eq!(
            t.tenant_v2_dir("acme").unwrap(),
            Path::new("/sys/fs/cgroup/unified/tally/acme")
        );
        let t = TenantTree::new(l.clone(), Some("/tally.slice".into()));
        assert_eq!(t.tenant_path(mem, "acme"), "/tally.slice/tally/acme");
        let t = TenantTree::new(l.clone(), Some("e2e-1".into()));
        assert_eq!(
            t.tenant_path(mem, "acme"),
            "/process_api/abc/e2e-1/tally/acme"
        );
        assert_eq!(
            t.tenant_path(l.unified.as_ref().unwrap(), "acme"),
            "/e2e-1/tally/acme"
        );
    }

    #[test]
    fn pure_v2_in_a_container_maps_mount_root() {
        let mi = "40 30 0:40 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = Layout::parse(mi, "0::/kubepods/pod1/c1\n");
        let u = l.unified.as_ref().unwrap();
        assert!(l.v1.is_empty());
        assert_eq!(
            u.dir("/kubepods/pod1/c1/tally"),
            Path::new("/sys/fs/cgroup/c1/tally")
        );
    }

    #[test]
    fn names_cannot_escape() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("job-1").is_ok());
    }

    fn read(dir: &Path, f: &str) -> String {
        fs::read_to_string(dir.join(f)).unwrap()
    }

    // This host's v2 tree has no controllers, so the v2 limit files are
    // checked here against a plain directory.
    #[test]
    fn v2_limit_files() {
        let d = tempfile::tempdir().unwrap();
        let q = Quota {
            cpu_cores: Some(1.5),
            memory: Some(8 << 30),
            pids: Some(512),
            ..Quota::default()
        };
        for r in ["cpu_cores", "memory", "pids"] {
            write_limit_v2(d.path(), r, &q).unwrap();
        }
        assert_eq!(read(d.path(), "cpu.max"), "150000 100000");
        assert_eq!(read(d.path(), "memory.max"), (8u64 << 30).to_string());
        assert_eq!(read(d.path(), "pids.max"), "512");
        let none = Quota::default();
        for r in ["cpu_cores", "memory", "pids"] {
            write_limit_v2(d.path(), r, &none).unwrap();
        }
        assert_eq!(read(d.path(), "cpu.max"), "max 100000");
        assert_eq!(read(d.path(), "memory.max"), "max");
        assert_eq!(read(d.path(), "pids.max"), "max");
    }

    #[test]
    fn v1_limit_files() {
        let d = tempfile::tempdir().unwrap();
        let q = Quota {
            cpu_cores: Some(0.25),
            memory: Some(1 << 20),
            ..Quota::default()
        };
        for r in ["cpu_cores", "memory", "pids"] {
            write_limit_v1(d.path(), r, &q).unwrap();
        }
        assert_eq!(read(d.path(), "cpu.cfs_period_us"), "100000");
        assert_eq!(read(d.path(), "cpu.cfs_quota_us"), "25000");
        assert_eq!(read(d.path(), "memory.limit_in_bytes"), "1048576");
        assert_eq!(read(d.path(), "pids.max"), "max");
    }

    #[test]
    fn v2_freeze_and_controller_files() {
        let d = tempfile::tempdir().unwrap();
        let f = Freezer::V2(d.path().to_path_buf());
        f.set(true).unwrap();
        assert_eq!(read(d.path(), "cgroup.freeze"), "1");
        fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert_eq!(f.is_frozen(), Some(true));
        f.set(false).unwrap();
        assert_eq!(read(d.path(), "cgroup.freeze"), "0");
        fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        enable_controllers(d.path()).unwrap();
        assert_eq!(
            read(d.path(), "cgroup.subtree_control"),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn never_freezes_a_root_or_our_own_cgroup() {
        let l = Layout::parse(MOUNTINFO_HYBRID, CGROUP_HYBRID);
        // Root in every hierarchy: nothing to freeze.
        let cg = |text: &str| Cgroups::parse(text).unwrap();
        assert_eq!(l.freezer_for(&cg(CGROUP_HYBRID), &cg(CGROUP_HYBRID)), None);
        // The agent sits in /a on the freezer hierarchy; /a is refused.
        let own = cg("6:freezer:/a/agent\n0::/\n");
        assert_eq!(l.freezer_for(&cg("6:freezer:/a\n0::/\n"), &own), None);
        assert_eq!(
            l.freezer_for(&cg("6:freezer:/b/job\n0::/\n"), &own),
            Some(Freezer::V1(PathBuf::from("/sys/fs/cgroup/freezer/b/job")))
        );
    }
}
