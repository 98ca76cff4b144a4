//! Where the cgroup hierarchies are mounted, which controllers each holds
//! and where this process sits in them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use procfs::process::MountInfos;

use super::{
    delegate,
    files::{CgroupError, io_err},
};
use crate::{
    cgroupfs::{self, Cgroups},
    paths::{PROC_SELF_CGROUP, PROC_SELF_MOUNTINFO},
};

/// One mounted cgroup hierarchy and where this process sits in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point (`/sys/fs/cgroup/memory`, `/sys/fs/cgroup/unified`).
    pub mount: PathBuf,
    /// Root of the mount inside the hierarchy (`/` unless in a container).
    pub mount_root: String,
    /// v1 controllers of this mount; empty for the v2 hierarchy.
    pub controllers: Vec<String>,
    /// This process's cgroup path in the hierarchy; from
    /// [`Layout::detect`] on v2, the delegated root when the process sits
    /// in its leaf (see `delegate`).
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
        let mut layout = Self::from_mounts(&mounts, &own);
        // In the leaf of a delegated cgroup, the delegated root is ours.
        if let Some(h) = layout.unified.as_mut()
            && let Some(root) =
                delegate::delegated_root(&h.own, |p| delegate::is_delegated(&h.dir(p)))
        {
            h.own = root;
        }
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
    pub(super) fn parse(mountinfo: &str, proc_cgroup: &str) -> Layout {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::cgroup::fixtures::{CGROUP_HYBRID, MOUNTINFO_HYBRID};

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
}
