//! Freezing and thawing one cgroup, and which cgroup of a process may be
//! frozen.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{
    files::{CgroupError, write},
    layout::Layout,
};
use crate::cgroupfs::Cgroups;

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
    use crate::enforce::cgroup::{
        enable_controllers,
        fixtures::{CGROUP_HYBRID, MOUNTINFO_HYBRID, read},
    };

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
