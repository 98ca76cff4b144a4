//! Making tenant and job cgroups beneath the parent on every hierarchy,
//! writing their limits and reading their usage.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use super::{
    files::{CgroupError, io_err, write},
    layout::{Backend, Hierarchy, Layout},
};
use crate::enforce::quota::Quota;

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::enforce::cgroup::fixtures::{CGROUP_HYBRID, MOUNTINFO_HYBRID, read};

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
    fn names_cannot_escape() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("job-1").is_ok());
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
}
