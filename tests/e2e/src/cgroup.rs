//! Cgroup v2 directories beneath this process's own cgroup, and child
//! processes; both cleaned up on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::wait_for;

/// The cgroup v2 mount: `/sys/fs/cgroup` (pure v2) or
/// `/sys/fs/cgroup/unified` (hybrid).
pub fn unified_mount() -> Option<PathBuf> {
    let pure = Path::new("/sys/fs/cgroup");
    if pure.join("cgroup.controllers").exists() {
        return Some(pure.to_path_buf());
    }
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    hybrid
        .join("cgroup.procs")
        .exists()
        .then(|| hybrid.to_path_buf())
}

/// This process's own cgroup v2 path (`0::` line).
pub fn own_unified_cgroup() -> String {
    let text = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim()
        .to_owned()
}

/// A cgroup v2 directory beneath this process's own cgroup, removed (with
/// every process in it killed) on drop.
pub struct Cgroup {
    mount: PathBuf,
    /// Absolute directory in the cgroup filesystem.
    pub dir: PathBuf,
    /// Path as `/proc/PID/cgroup` shows it (relative to the v2 root).
    pub path: String,
    /// Directories created, innermost last, removed in reverse.
    created: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `<own cgroup>/<relative>` (e.g. `tally-e2e-1/tally/acme/job`),
    /// with every intermediate directory.
    pub fn create(relative: &str) -> Cgroup {
        let mount = unified_mount().expect("no cgroup v2 hierarchy mounted");
        let own = mount.join(own_unified_cgroup().trim_start_matches('/'));
        Cgroup::beneath(mount, own, relative)
    }

    /// Creates `<this cgroup>/<relative>`; it is removed on its own drop,
    /// or with this one's.
    pub fn child(&self, relative: &str) -> Cgroup {
        Cgroup::beneath(self.mount.clone(), self.dir.clone(), relative)
    }

    fn beneath(mount: PathBuf, mut dir: PathBuf, relative: &str) -> Cgroup {
        let mut created = Vec::new();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            dir = dir.join(part);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        let path = format!(
            "/{}",
            dir.strip_prefix(&mount).expect("under the mount").display()
        );
        Cgroup {
            mount,
            dir,
            path,
            created,
        }
    }

    /// The cgroup v2 mount this cgroup lives on.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Cgroup id as eBPF sees it (the directory's inode).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.dir).expect("stat cgroup").ino()
    }

    /// Starts `program args…` inside this cgroup: a shell moves itself in,
    /// then execs the program, so the process never runs outside it.
    pub fn command(&self, program: impl AsRef<Path>, args: &[&str]) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.dir.join("cgroup.procs"))
            .arg(program.as_ref())
            .args(args);
        cmd
    }

    /// Starts `program args…` inside this cgroup without waiting for it
    /// to get there (for starting many; [`Cgroup::spawn`] waits).
    pub fn start(&self, program: impl AsRef<Path>, args: &[&str]) -> ChildGuard {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn in cgroup");
        ChildGuard(child)
    }

    /// Spawns `program args…` inside this cgroup; returns once it is there.
    pub fn spawn(&self, program: impl AsRef<Path>, args: &[&str]) -> ChildGuard {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn in cgroup");
        let guard = ChildGuard(child);
        self.wait_entered(guard.pid());
        guard
    }

    /// Waits until `pid` sits in this cgroup.
    pub fn wait_entered(&self, pid: u32) {
        wait_for(
            "process to enter its cgroup",
            Duration::from_secs(10),
            || {
                let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                text.lines()
                    .any(|l| l.strip_prefix("0::") == Some(self.path.as_str()))
                    .then_some(())
            },
        );
    }

    /// Pids currently in this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            kill_all_in(dir);
            for _ in 0..100 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn kill_all_in(dir: &Path) {
    // Children first: a cgroup with sub-cgroups cannot be removed.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_all_in(&e.path());
                let _ = fs::remove_dir(e.path());
            }
        }
    }
    for _ in 0..100 {
        let pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed and reaped on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process has exited (it stays a zombie, with its
    /// `/proc/PID`, until reaped, so that directory alone does not say).
    pub fn has_exited(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The state follows the command name, which may hold spaces.
        stat.rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z'))
    }

    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
