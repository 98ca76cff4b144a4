//! Leaving the root of a delegated cgroup v2 subtree.
//!
//! Under systemd's `Delegate=yes` the agent starts in its unit's cgroup,
//! which it owns. cgroup v2 lets a cgroup give controllers to its children
//! only while it holds no process itself (the "no internal processes"
//! rule), so an agent sitting there could make tenant cgroups but never
//! limit them. It moves itself into a leaf, [`LEAF`], and manages the
//! delegated root from there. systemd marks the cgroups it delegates with
//! the `trusted.delegate` extended attribute (`user.delegate` for user
//! managers), which is how the agent tells a delegated cgroup from one it
//! merely sits in (it never moves out of a cgroup it was not given).

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{
    files::{CgroupError, io_err},
    layout::{Hierarchy, Layout},
};
use crate::cgroupfs::{self, Cgroups};

/// The leaf the agent moves into, beside the `tally/` tree.
pub const LEAF: &str = "agent";

/// Extended attributes with which systemd marks a delegated cgroup.
pub const DELEGATE_XATTRS: &[&str] = &["trusted.delegate", "user.delegate"];

/// Whether the cgroup directory `dir` is marked delegated.
pub fn is_delegated(dir: &Path) -> bool {
    DELEGATE_XATTRS.iter().any(|name| {
        let mut value = [0u8; 8];
        matches!(
            rustix::fs::getxattr(dir, *name, &mut value[..]),
            Ok(n) if value[..n].starts_with(b"1")
        )
    })
}

/// The delegated root this process manages, given its own v2 cgroup
/// `own`: `own` itself when it is delegated, its parent when the process
/// already sits in that parent's [`LEAF`]; `None` otherwise. Pure, with
/// `delegated` asked of cgroup paths.
pub fn delegated_root(own: &str, delegated: impl Fn(&str) -> bool) -> Option<String> {
    if own == "/" {
        return None; // the root has no internal-process rule, and no parent
    }
    if let Some(parent) = own.strip_suffix(&format!("/{LEAF}"))
        && !parent.is_empty()
        && delegated(parent)
    {
        return Some(parent.to_owned());
    }
    delegated(own).then(|| own.to_owned())
}

/// What [`enter_leaf`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// This process now sits in `leaf`, beneath the delegated `root`.
    Into { root: PathBuf, leaf: PathBuf },
    /// It already sat there (e.g. after a re-exec).
    Already { leaf: PathBuf },
    /// Its own cgroup is not delegated: it stays where it is.
    NotDelegated,
}

/// Moves this process into `<delegated root>/agent` when its own cgroup
/// in the v2 hierarchy `h` is delegated. Only this process moves: others
/// in the root stay where they are.
pub fn enter_leaf(h: &Hierarchy) -> Result<Moved, CgroupError> {
    let dir = |p: &str| h.dir(p);
    let own = h.own.as_str();
    let Some(root) = delegated_root(own, |p| is_delegated(&dir(p))) else {
        return Ok(Moved::NotDelegated);
    };
    let leaf = dir(&root).join(LEAF);
    if root != own {
        return Ok(Moved::Already { leaf });
    }
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&leaf)(e)),
    }
    let procs = leaf.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(io_err(&procs))?;
    Ok(Moved::Into {
        root: dir(&root),
        leaf,
    })
}

/// At the agent's start: [`enter_leaf`] on the v2 hierarchy, logged.
/// Failing to move is a warning: the agent runs on, and creating tenant
/// cgroups reports what the kernel refuses.
pub fn settle() {
    let layout = match (cgroupfs::own_mounts(), Cgroups::own()) {
        (Ok(mounts), Ok(own)) => Layout::from_mounts(&mounts, &own),
        _ => return,
    };
    let Some(h) = layout.unified else { return };
    match enter_leaf(&h) {
        Ok(Moved::Into { root, leaf }) => info!(
            delegated = %root.display(),
            leaf = %leaf.display(),
            "moved into a leaf of the delegated cgroup, so that tenant cgroups beneath it can get controllers"
        ),
        Ok(Moved::Already { leaf }) => {
            info!(leaf = %leaf.display(), "already in the leaf of the delegated cgroup");
        }
        Ok(Moved::NotDelegated) => {}
        Err(e) => {
            warn!(error = %e, "cannot move into a leaf of the delegated cgroup; tenant cgroups may get no controllers")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_the_delegated_cgroup_or_the_parent_of_its_leaf() {
        let unit = "/system.slice/tally-agent.service";
        let delegated = |p: &str| p == unit;
        assert_eq!(delegated_root(unit, delegated), Some(unit.to_owned()));
        assert_eq!(
            delegated_root(&format!("{unit}/agent"), delegated),
            Some(unit.to_owned())
        );
        // Not delegated: stay; a leaf named `agent` elsewhere means nothing.
        assert_eq!(
            delegated_root("/user.slice/session-3.scope", delegated),
            None
        );
        assert_eq!(delegated_root("/other/agent", delegated), None);
        assert_eq!(delegated_root("/", |_| true), None);
        assert_eq!(delegated_root("/agent", |_| true), Some("/agent".into()));
    }

    #[test]
    fn a_cgroup_without_the_mark_is_not_delegated() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("unit")).unwrap();
        assert!(!is_delegated(&d.path().join("unit")));
        let h = Hierarchy {
            mount: d.path().to_path_buf(),
            mount_root: "/".into(),
            controllers: Vec::new(),
            own: "/unit".into(),
        };
        assert_eq!(enter_leaf(&h).unwrap(), Moved::NotDelegated);
        assert!(!d.path().join("unit/agent").exists());
    }
}
