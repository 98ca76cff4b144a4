//! Tenant cgroups on cgroup v1, v2 and hybrid hosts: `<parent>/tally/<tenant>/<job>`.
//!
//! [`Layout`] finds where the hierarchies are, [`TenantTree`] makes and
//! limits tenant cgroups in them, [`Freezer`] stops and resumes one.
//!
//! Why plain file writes and not `cgroups-rs` (0.5): its v2 hierarchy is
//! hard-wired to `/sys/fs/cgroup` (`UNIFIED_MOUNTPOINT`), so on hybrid hosts,
//! where the v2 tree is `/sys/fs/cgroup/unified` and the limits live in v1
//! hierarchies, it can drive either the v1 controllers or a v2 tree at the
//! wrong place, never both; and `auto()` picks one mode for the whole host.
//! Tally needs both at once (v2 for attribution and BPF, v1 for limits), per
//! controller, beneath a parent that differs per hierarchy (the agent's own
//! cgroup). What it writes is a handful of files, named in `tree` (limits)
//! and `freezer`, each covered by unit tests against a temp directory.
//!
//! Cgroups are only ever made beneath the configured parent, by default the
//! process's own cgroup on each hierarchy (`/proc/self/cgroup`), never beside
//! or above it. In a delegated v2 cgroup the agent sits in a leaf of it and
//! the delegated root is its "own" cgroup ([`delegate`]).

pub mod delegate;
mod files;
mod freezer;
mod layout;
mod tree;

pub use self::{
    files::CgroupError,
    freezer::Freezer,
    layout::{Backend, Hierarchy, Layout, V1_CONTROLLERS},
    tree::{
        CPU_PERIOD_US, JOB_GC_AGE, TALLY_DIR, TenantTree, check_name, enable_controllers,
        write_limit_v1, write_limit_v2,
    },
};

/// Texts of a hybrid host, shared by the tests of every part.
#[cfg(test)]
mod fixtures {
    use std::{fs, path::Path};

    pub(super) const MOUNTINFO_HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/pids rw,nosuid shared:14 - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/freezer rw,nosuid shared:15 - cgroup cgroup rw,freezer
37 30 0:33 / /sys/fs/cgroup/devices rw,nosuid shared:16 - cgroup cgroup rw,devices
";
    pub(super) const CGROUP_HYBRID: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
5:devices:/
4:memory:/process_api/abc
2:cpu,cpuacct:/
0::/
";

    pub(super) fn read(dir: &Path, f: &str) -> String {
        fs::read_to_string(dir.join(f)).unwrap()
    }
}
