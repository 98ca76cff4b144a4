//! The pin directory: bpffs mounted under it when missing, and an exclusive
//! lock so that only one agent attaches probes that count into its maps.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use procfs::process::MountInfos;
use tracing::info;

use super::ProbeError;
use crate::{cgroupfs, paths};

/// The pinned-map directory, mounted and locked for this agent.
#[derive(Debug)]
pub(super) struct PinDir {
    pub(super) path: PathBuf,
    /// Held while the agent runs; released by the kernel if it dies.
    _lock: nix::fcntl::Flock<File>,
}

impl PinDir {
    pub(super) fn open(path: &Path) -> Result<Self, ProbeError> {
        ensure_bpffs(path)?;
        std::fs::create_dir_all(path).map_err(|source| ProbeError::PinDir {
            path: path.to_owned(),
            source,
        })?;
        let dir = File::open(path).map_err(|source| ProbeError::PinDir {
            path: path.to_owned(),
            source,
        })?;
        let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| ProbeError::PinDirBusy {
                path: path.to_owned(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub(super) fn pinned(&self, map: &str) -> bool {
        self.path.join(map).exists()
    }
}

/// Is a bpffs mounted at `dir` or one of its parents?
fn bpffs_mounted_over(dir: &Path) -> bool {
    cgroupfs::own_mounts().is_ok_and(|m| bpffs_in(&m, dir))
}

/// Is one of `mounts` a bpffs at `dir` or one of its parents?
fn bpffs_in(mounts: &MountInfos, dir: &Path) -> bool {
    mounts
        .iter()
        .any(|m| m.fs_type == "bpf" && dir.starts_with(&m.mount_point))
}

/// Mounts bpffs at `/sys/fs/bpf` when `dir` is not on a bpffs yet.
fn ensure_bpffs(dir: &Path) -> Result<(), ProbeError> {
    if bpffs_mounted_over(dir) {
        return Ok(());
    }
    let mount_err = |reason: String| ProbeError::Mount {
        path: PathBuf::from(paths::BPFFS),
        reason,
    };
    if !dir.starts_with(paths::BPFFS) {
        return Err(mount_err(format!(
            "{} is not under {} and not on a bpffs",
            dir.display(),
            paths::BPFFS
        )));
    }
    let out = mount_bpffs()
        .output()
        .map_err(|e| mount_err(format!("cannot run mount: {e}")))?;
    if !out.status.success() {
        return Err(mount_err(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    info!(path = paths::BPFFS, "mounted bpffs");
    Ok(())
}

/// `mount` of bpffs at [`paths::BPFFS`], 0700 as systemd mounts it: without
/// a mode bpffs is 1777 and any user may create entries in it.
fn mount_bpffs() -> Command {
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "-o", "mode=0700", "bpf", paths::BPFFS]);
    mount
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_dir_under_a_bpffs_mount_needs_no_mount() {
        let mounts = cgroupfs::parse_mounts(
            "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
             40 22 0:34 / /sys/fs/bpf rw,relatime shared:14 - bpf bpf rw,mode=700\n\
             41 22 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        )
        .unwrap();
        assert!(bpffs_in(&mounts, Path::new("/sys/fs/bpf/tally")));
        assert!(bpffs_in(&mounts, Path::new("/sys/fs/bpf")));
        assert!(!bpffs_in(&mounts, Path::new("/sys/fs/bpffoo")));
        assert!(!bpffs_in(&mounts, Path::new("/sys/fs/cgroup/unified/x")));
    }

    #[test]
    fn bpffs_is_mounted_for_root_only() {
        let mount = mount_bpffs();
        let args: Vec<_> = mount.get_args().collect();
        assert_eq!(mount.get_program(), "mount");
        assert_eq!(
            args,
            ["-t", "bpf", "-o", "mode=0700", "bpf", paths::BPFFS],
            "0700 as systemd mounts it, not bpffs's default 1777"
        );
    }
}
