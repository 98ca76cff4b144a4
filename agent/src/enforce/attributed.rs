//! The cgroups the tenant rules attribute to tenants with an eBPF quota
//! (`gpus`, `network_*`), found by walking the cgroup v2 tree: the network
//! buckets and device programs reach pods, Slurm jobs and any cgroup a rule
//! matches, not only Tally's own `tally/<tenant>`.
//!
//! Only the topmost cgroup of each attributed subtree is kept: the programs
//! cover what lies beneath (a `cgroup/dev` link is inherited, and the
//! network policer takes a packet's deepest attributed ancestor), so a pod's
//! containers or a job's steps add no entries. A cgroup attributed to
//! another tenant beneath one is kept too.

use std::collections::BTreeMap;

use super::{cgroup::Hierarchy, network::level};

/// Deepest level walked (`TALLY_MAX_CGROUP_LEVEL` in `ebpf/include/tally.h`,
/// as deep as the network policer looks).
pub(crate) const MAX_LEVEL: u32 = 32;

/// A walk starts at least this many times its last duration after the
/// last one began: at most 1/20 of a core on a host with a huge tree (6,500
/// cgroups took ~0.1 s of CPU here), every sample on an ordinary node.
pub(crate) const WALK_SHARE: u32 = 20;

/// Cgroup v2 path (`/kubepods/…`) → tenant.
pub(crate) type Attributed = BTreeMap<String, String>;

/// Walks the v2 hierarchy `h` (from its mount's root). `fixed` names cgroups whose
/// tenant is known (Tally's own `tally/<tenant>`); other cgroups get
/// `tenant_of` (the tenant rules). Only tenants `wanted` accepts are kept.
pub(crate) fn walk(
    h: &Hierarchy,
    fixed: &BTreeMap<String, String>,
    wanted: &dyn Fn(&str) -> bool,
    tenant_of: &dyn Fn(&str) -> Option<String>,
) -> Attributed {
    let mut out = Attributed::new();
    // (path, level, tenant of the nearest attributed ancestor)
    let start = h.mount_root.trim_end_matches('/').to_owned();
    let mut stack: Vec<(String, u32, Option<String>)> = vec![(start.clone(), level(&start), None)];
    while let Some((path, level, above)) = stack.pop() {
        if level >= MAX_LEVEL {
            continue;
        }
        let dir = h.dir(&path);
        // A cgroup removed mid-walk is simply not there.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let child = format!("{path}/{name}");
            let tenant = fixed.get(&child).cloned().or_else(|| tenant_of(&child));
            let here = match tenant {
                Some(t) if wanted(&t) => {
                    if above.as_ref() != Some(&t) {
                        out.insert(child.clone(), t.clone());
                    }
                    Some(t)
                }
                _ => above.clone(),
            };
            stack.push((child, level + 1, here));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_topmost_cgroup_of_each_tenant_subtree() {
        let d = tempfile::tempdir().unwrap();
        for p in [
            "team/a/job1/step0",
            "team/a/job2",
            "team/b",
            "team/c",
            "srv/tally/x/job",
            "other",
        ] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        let re = regex::Regex::new("^/team/(?P<tenant>[^/]+)").unwrap();
        let rules = |p: &str| {
            if p == "/team/a/job2" {
                return Some("b".to_owned());
            }
            re.captures(p).map(|c| c["tenant"].to_owned())
        };
        let fixed = BTreeMap::from([("/srv/tally/x".to_owned(), "x".to_owned())]);
        let h = Hierarchy {
            mount: d.path().to_path_buf(),
            mount_root: "/".into(),
            controllers: Vec::new(),
            own: "/".into(),
        };
        let got = walk(&h, &fixed, &|t| t != "c", &rules);
        let want: Attributed = [
            ("/srv/tally/x", "x"),
            ("/team/a", "a"),
            ("/team/a/job2", "b"),
            ("/team/b", "b"),
        ]
        .into_iter()
        .map(|(p, t)| (p.to_owned(), t.to_owned()))
        .collect();
        assert_eq!(got, want);
    }
}
