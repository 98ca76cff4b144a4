//! Where cgroups are, read from `/proc` through `procfs`: which cgroup a
//! process is in (`/proc/<pid>/cgroup`), where the hierarchies are mounted
//! (`/proc/self/mountinfo`), and the cgroup v2 root. The one place Tally
//! reads these files; tenants, enforcement, probes and Kubernetes use it.

use std::{io, path::Path};

use procfs::{
    FromBufRead, ProcessCGroup, ProcessCGroups,
    process::{MountInfos, Process},
};

use crate::paths;

/// Why a process's cgroup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The process is gone (or its `/proc` entry is unreadable).
    #[error("cannot read /proc/{pid}/cgroup: {source}")]
    Read { pid: u32, source: io::Error },
    /// The file has no `0::` (cgroup v2) line.
    #[error("/proc/{pid}/cgroup has no cgroup v2 (`0::`) line")]
    NoUnifiedLine { pid: u32 },
}

/// The cgroups of one process: one entry per hierarchy.
#[derive(Debug, Clone, Default)]
pub struct Cgroups(Vec<ProcessCGroup>);

impl Cgroups {
    /// The cgroups of process `pid`.
    pub fn of(pid: u32) -> io::Result<Cgroups> {
        let groups = Process::new(pid as i32)
            .and_then(|p| p.cgroups())
            .map_err(proc_error)?;
        Ok(Cgroups(groups.0))
    }

    /// The cgroups of this process.
    pub fn own() -> io::Result<Cgroups> {
        let groups = Process::myself()
            .and_then(|p| p.cgroups())
            .map_err(proc_error)?;
        Ok(Cgroups(groups.0))
    }

    /// The cgroups in the text of a `/proc/<pid>/cgroup` file; `None` when
    /// a line is not `hierarchy-id:controllers:path`.
    pub fn parse(text: &str) -> Option<Cgroups> {
        ProcessCGroups::from_buf_read(text.as_bytes())
            .ok()
            .map(|g| Cgroups(g.0))
    }

    /// The cgroup v2 path: the line with hierarchy id `0` and no
    /// controllers (the path may itself contain `:`).
    pub fn unified(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|g| g.hierarchy == 0 && g.controllers.is_empty())
            .map(|g| g.pathname.trim_end())
    }

    /// The v1 path of the hierarchy holding `controller` (`memory` →
    /// `/process_api/abc`).
    pub fn v1(&self, controller: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|g| g.controllers.iter().any(|c| c == controller))
            .map(|g| g.pathname.as_str())
    }
}

/// The cgroup v2 path of a process, or of one that exited if
/// `/proc/<pid>` is gone.
pub fn cgroup_of(pid: u32) -> Result<String, CgroupError> {
    let groups = Cgroups::of(pid).map_err(|source| CgroupError::Read { pid, source })?;
    groups
        .unified()
        .map(str::to_owned)
        .ok_or(CgroupError::NoUnifiedLine { pid })
}

/// This process's mounts (`/proc/self/mountinfo`).
pub fn own_mounts() -> io::Result<MountInfos> {
    Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(proc_error)
}

/// Mounts from the text of a `mountinfo` file (tests, fixtures).
pub fn parse_mounts(text: &str) -> io::Result<MountInfos> {
    MountInfos::from_buf_read(text.as_bytes()).map_err(proc_error)
}

/// Whether a filesystem of type `fs_type` (`bpf`, `cgroup2`) is mounted.
pub fn is_mounted(fs_type: &str) -> bool {
    own_mounts().is_ok_and(|m| m.iter().any(|m| m.fs_type == fs_type))
}

/// The root of the cgroup v2 hierarchy on this host: `/sys/fs/cgroup` on
/// pure v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn unified_root() -> Option<&'static Path> {
    let pure = Path::new(paths::CGROUP_ROOT);
    if pure.join("cgroup.controllers").exists() {
        return Some(pure);
    }
    let hybrid = Path::new(paths::CGROUP_UNIFIED_HYBRID);
    hybrid.join("cgroup.procs").exists().then_some(hybrid)
}

pub(crate) fn proc_error(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        procfs::ProcError::PermissionDenied(_) => {
            io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
        }
        procfs::ProcError::Io(e, _) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "12:memory:/process_api/f88c\n3:cpu,cpuacct:/a\n1:name=systemd:/x\n0::/tally/acme/job1\n";

    #[test]
    fn unified_and_v1_paths() {
        let g = Cgroups::parse(HYBRID).unwrap();
        assert_eq!(g.unified(), Some("/tally/acme/job1"));
        assert_eq!(g.v1("memory"), Some("/process_api/f88c"));
        assert_eq!(g.v1("cpuacct"), Some("/a"));
        assert_eq!(g.v1("blkio"), None);
        assert_eq!(Cgroups::parse("0::/\n").unwrap().unified(), Some("/"));
        assert_eq!(Cgroups::parse("4:memory:/x\n").unwrap().unified(), None);
        assert_eq!(Cgroups::parse("").unwrap().unified(), None);
        // A cgroup name may contain `:`.
        assert_eq!(Cgroups::parse("0::/a:b\n").unwrap().unified(), Some("/a:b"));
        assert!(Cgroups::parse("not a cgroup line\n").is_none());
    }

    #[test]
    fn own_cgroup_and_mounts_are_read() {
        let own = Cgroups::own().unwrap();
        assert!(own.unified().is_some() || !own.0.is_empty());
        assert_eq!(cgroup_of(std::process::id()).ok().as_deref(), own.unified());
        assert!(
            own_mounts()
                .unwrap()
                .iter()
                .any(|m| m.mount_point == Path::new("/"))
        );
        assert!(matches!(cgroup_of(u32::MAX), Err(CgroupError::Read { .. })));
    }
}
