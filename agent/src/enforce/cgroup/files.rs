//! The one error of cgroup file operations, and the write every part uses.

use std::{
    fs, io,
    path::{Path, PathBuf},
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

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(io_err(&path))
}
