//! Running a program as another user (`nobody`), from a checkout that user
//! may not be able to read.
//!
//! A checkout made with `mktemp -d`, or under `/root`, is mode 0700: another
//! user can read nothing in it, `target/` included. So whatever such a
//! program needs (the binary, the NVML simulator, configs, scenarios) is
//! copied into a [`SharedDir`], and what the kernel says when it refuses
//! that user is read through [`refusal`], which accepts either errno.
//!
//! A leaf module: it imports nothing of the crate, so every fixture can use
//! it.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    errno::Errno,
    unistd::{Gid, Uid, User},
};

/// A temporary directory every user can read and search, removed on drop.
pub struct SharedDir {
    dir: tempfile::TempDir,
}

impl SharedDir {
    /// A new directory under the system temporary directory, mode 0755.
    /// Panics, naming the directory, when one of its parents cannot be
    /// searched by other users (a private `TMPDIR`).
    pub fn new() -> SharedDir {
        let dir = tempfile::Builder::new()
            .prefix("tally-e2e-shared-")
            .tempdir()
            .expect("tempdir");
        set_mode(dir.path(), 0o755);
        assert_reachable(dir.path());
        SharedDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the file `src` in as `name`, readable by all (and executable
    /// by all when `src` is executable); returns the copy's path.
    pub fn copy_as(&self, src: &Path, name: &str) -> PathBuf {
        let dst = self.dir.path().join(name);
        fs::copy(src, &dst)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        let exec = fs::metadata(src).expect("stat source").permissions().mode() & 0o111 != 0;
        set_mode(&dst, if exec { 0o755 } else { 0o644 });
        dst
    }

    /// Copies the file `src` in under its own file name.
    pub fn copy(&self, src: &Path) -> PathBuf {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("{} has no file name", src.display()));
        self.copy_as(src, name)
    }

    /// Writes a file readable by all; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        set_mode(&path, 0o644);
        path
    }
}

impl Default for SharedDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes the directory `dir` and everything in it readable by all (and
/// directories searchable), for a tree the test and the other user share
/// while it runs (a simulator's state). Panics when a parent of `dir`
/// cannot be searched by other users.
pub fn open_to_all(dir: &Path) {
    set_mode(dir, 0o755);
    for e in fs::read_dir(dir).expect("read dir").flatten() {
        if e.path().is_dir() {
            open_to_all(&e.path());
        } else {
            set_mode(&e.path(), 0o644);
        }
    }
    assert_reachable(dir);
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Panics unless every parent of `path` is searchable by other users.
fn assert_reachable(path: &Path) {
    for parent in path.ancestors().skip(1) {
        let mode = fs::metadata(parent)
            .unwrap_or_else(|e| panic!("stat {}: {e}", parent.display()))
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {:o}) cannot be searched by other users, so nothing under it can be \
             shared with them: set TMPDIR to a directory they can reach (e.g. /tmp)",
            parent.display(),
            mode & 0o7777
        );
    }
}

/// The `nobody` user's ids: from the user database, else 65534 (the
/// kernel's overflow ids, which `setpriv` takes with no database entry).
pub fn nobody() -> (Uid, Gid) {
    match User::from_name("nobody") {
        Ok(Some(u)) => (u.uid, u.gid),
        _ => (Uid::from_raw(65534), Gid::from_raw(65534)),
    }
}

/// `setpriv` running `program` as `uid`/`gid`, with no supplementary
/// groups and no capabilities (inheritable and bounding sets emptied).
/// `program` must be readable by that user: a [`SharedDir`] copy.
pub fn as_user(uid: Uid, gid: Gid, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(program);
    cmd
}

/// [`as_user`] as [`nobody`].
pub fn as_nobody(program: &Path) -> Command {
    let (uid, gid) = nobody();
    as_user(uid, gid, program)
}

/// The errno in `text` by which the kernel refused an unprivileged caller,
/// if any: EPERM (a missing capability; `bpf()` under
/// `kernel.unprivileged_bpf_disabled`) or EACCES (file modes, LSMs, older
/// kernels' `bpf()`). Which one a host gives depends on its kernel and
/// sysctls, so tests accept either, by its C library text.
pub fn refusal(text: &str) -> Option<Errno> {
    [Errno::EPERM, Errno::EACCES]
        .into_iter()
        .find(|e| text.contains(e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_by_either_errno() {
        let eperm = std::io::Error::from_raw_os_error(Errno::EPERM as i32).to_string();
        assert_eq!(refusal(&format!("map error: {eperm}")), Some(Errno::EPERM));
        assert_eq!(
            refusal("cannot open: Permission denied (os error 13)"),
            Some(Errno::EACCES)
        );
        assert_eq!(refusal("No such file or directory (os error 2)"), None);
    }

    #[test]
    fn a_shared_dir_is_readable_by_all() {
        let shared = SharedDir::new();
        let src = tempfile::NamedTempFile::new().unwrap();
        set_mode(src.path(), 0o700);
        let exe = shared.copy_as(src.path(), "exe");
        let file = shared.write("config.toml", "x = 1\n");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(shared.path()), 0o755);
        assert_eq!(mode(&exe), 0o755);
        assert_eq!(mode(&file), 0o644);
    }
}
