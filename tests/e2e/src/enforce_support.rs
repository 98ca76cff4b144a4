//! Fixtures of the enforcement tests: an isolated tenant tree
//! (`<own cgroup>/<unique parent>/tally/<tenant>/<job>` on every hierarchy),
//! `tally run`, the audit log, and `mknod`-made NVIDIA device nodes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tally_agent::enforce::cgroup::{Hierarchy, Layout};

use crate::{ChildGuard, tally_bin, unique, wait_for};

/// A unique `[tenant] cgroup_parent` beneath our own cgroup on every
/// hierarchy, with its state directory; everything in it is thawed, killed
/// and removed on drop.
pub struct TenantEnv {
    /// Relative parent (`e2e-enf-<pid>-<n>`).
    pub parent: String,
    pub layout: Layout,
    pub dir: tempfile::TempDir,
}

impl TenantEnv {
    pub fn new() -> TenantEnv {
        Self::named("e2e-enf")
    }

    /// A tree whose parent is named `<prefix>-<pid>-<n>`.
    pub fn named(prefix: &str) -> TenantEnv {
        TenantEnv {
            parent: unique(prefix),
            layout: Layout::detect().expect("cgroup layout"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The agent's state directory (audit log).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.state_dir().join("audit.log")
    }

    /// A full agent config: state dir, node name, tenant rule for the tree,
    /// our parent, then `quotas` (`[tenant.quota.x]` tables).
    pub fn config(&self, quotas: &str) -> String {
        format!(
            "[agent]\nstate_dir = '{}'\nnode = 'e2e-node'\n\n\
             [[tenant.rule]]\ncgroup = '/tally/(?P<tenant>[^/]+)/'\n{}",
            self.state_dir().display(),
            self.tenant_section(quotas)
        )
    }

    /// `[tenant] cgroup_parent` set to our parent, then `quotas`: what any
    /// agent config with quotas appends, so that the enforcer's tenant
    /// cgroups land in this tree and go with it.
    pub fn tenant_section(&self, quotas: &str) -> String {
        format!("\n[tenant]\ncgroup_parent = '{}'\n\n{quotas}", self.parent)
    }

    /// Writes `config(quotas)` to a file and returns its path.
    pub fn write_config(&self, quotas: &str) -> PathBuf {
        let p = self.dir.path().join(unique("tally") + ".toml");
        fs::write(&p, self.config(quotas)).expect("write config");
        p
    }

    /// cgroup path of `<parent>/tally/<tenant>[/<job>]` in `h`.
    pub fn path_in(&self, h: &Hierarchy, tenant: &str, job: Option<&str>) -> String {
        let own = h.own.trim_end_matches('/');
        let mut p = format!("{own}/{}/tally/{tenant}", self.parent);
        if let Some(j) = job {
            p = format!("{p}/{j}");
        }
        p
    }

    /// The v2 directory of a tenant or job.
    pub fn v2_dir(&self, tenant: &str, job: Option<&str>) -> PathBuf {
        let h = self.layout.unified.as_ref().expect("cgroup v2 mounted");
        h.dir(&self.path_in(h, tenant, job))
    }

    /// The v1 directory of a tenant or job on `controller`'s hierarchy.
    pub fn v1_dir(&self, controller: &str, tenant: &str, job: Option<&str>) -> Option<PathBuf> {
        let h = self.layout.v1(controller)?;
        Some(h.dir(&self.path_in(h, tenant, job)))
    }

    /// `tally run -c CONFIG --tenant T --job J -- program args…`, spawned;
    /// waits until the command runs in the job's v2 cgroup.
    pub fn run(
        &self,
        config: &Path,
        tenant: &str,
        job: &str,
        program: &str,
        args: &[&str],
    ) -> ChildGuard {
        let child = self
            .run_command(config, tenant, job, program, args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tally run");
        let guard = ChildGuard(child);
        self.wait_in_job(guard.pid(), tenant, job);
        guard
    }

    /// The `tally run` command line (not spawned).
    pub fn run_command(
        &self,
        config: &Path,
        tenant: &str,
        job: &str,
        program: &str,
        args: &[&str],
    ) -> Command {
        let mut cmd = Command::new(tally_bin());
        cmd.args(["run", "-c"])
            .arg(config)
            .args(["--tenant", tenant, "--job", job, "--", program])
            .args(args)
            .env("TALLY_LOG", "warn");
        cmd
    }

    /// Waits until `pid` sits in the job's v2 cgroup (it moved there and
    /// exec'd its command).
    pub fn wait_in_job(&self, pid: u32, tenant: &str, job: &str) {
        let h = self.layout.unified.as_ref().expect("cgroup v2 mounted");
        let want = self.path_in(h, tenant, Some(job));
        wait_for(
            "the command to enter its job cgroup",
            Duration::from_secs(20),
            || {
                let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                let ours = exe.file_name().is_some_and(|n| n == "tally");
                (!ours
                    && text
                        .lines()
                        .any(|l| l.strip_prefix("0::") == Some(want.as_str())))
                .then_some(())
            },
        );
    }

    /// Every record of the audit log, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        audit_records(&self.audit_log())
    }

    /// Waits for an audit record matching `pred`; returns it.
    pub fn wait_audit(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(60), || {
            self.audit().into_iter().find(|r| pred(r))
        })
    }

    /// Audit records of `tenant` with `action`.
    pub fn audited(&self, tenant: &str, action: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["tenant"] == tenant && r["action"] == action)
            .collect()
    }
}

impl Default for TenantEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TenantEnv {
    fn drop(&mut self) {
        let hierarchies: Vec<&Hierarchy> = self
            .layout
            .unified
            .iter()
            .chain(self.layout.v1.iter())
            .collect();
        for h in hierarchies {
            let own = h.own.trim_end_matches('/');
            let top = h.dir(&format!("{own}/{}", self.parent));
            if top.exists() {
                remove_tree(&top);
            }
        }
    }
}

/// Every record of the audit log at `path`, parsed (none while it does
/// not exist).
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Thaws, kills and removes a cgroup directory tree, deepest first.
pub fn remove_tree(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.freeze"), "0");
    let _ = fs::write(dir.join("freezer.state"), "THAWED");
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        let pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whether the v2 cgroup reports itself frozen (`cgroup.events`).
pub fn v2_frozen(dir: &Path) -> Option<bool> {
    let t = fs::read_to_string(dir.join("cgroup.events")).ok()?;
    t.lines()
        .find_map(|l| l.strip_prefix("frozen "))
        .map(|v| v.trim() == "1")
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(after != 'Z' && after != 'X')
        })
        .unwrap_or(false)
}

/// A temporary directory with NVIDIA's device nodes `nvidia0`, `nvidia1`
/// and `nvidiactl`: real character nodes 195:0, 195:1 and 195:255, made
/// with mknod. No driver is behind them, so an open the device cgroup
/// allows fails with ENXIO, and one it denies with EPERM.
pub fn nvidia_nodes() -> tempfile::TempDir {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, minor) in [("nvidia0", 0), ("nvidia1", 1), ("nvidiactl", 255)] {
        mknod(
            &dir.path().join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, minor),
        )
        .unwrap_or_else(|e| panic!("mknod {name} c 195 {minor}: {e}"));
    }
    dir
}

/// Samples a tenant's network byte counter (`field` of its `tenant_io`
/// row) with the agent's sample times, while a transfer runs. `start`
/// returns once the first reading is in, so a transfer started after it is
/// seen whole however loaded the machine is.
pub struct ByteSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The readings so far: (sample time, bytes).
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl ByteSampler {
    pub fn start(addr: std::net::SocketAddr, tenant: &'static str, field: &'static str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
        let (first_tx, first) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((200, body)) = crate::http_get(addr, "/api/v1/snapshot") {
                        let snap: serde_json::Value =
                            serde_json::from_str(&body).unwrap_or_default();
                        let at = snap["taken_at_ms"].as_u64().unwrap_or(0);
                        let bytes = snap["tenant_io"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|r| r["tenant"] == tenant)
                            .and_then(|r| r[field].as_u64())
                            .unwrap_or(0);
                        let mut seen = seen.lock().unwrap();
                        if seen.last().is_none_or(|l| l.0 != at) {
                            seen.push((at, bytes));
                            let _ = first_tx.send(());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        first
            .recv_timeout(Duration::from_secs(60))
            .expect("a first reading of the agent's snapshot");
        ByteSampler { stop, seen, thread }
    }

    /// Stops sampling; the rate (bytes/s, skb lengths as the policer
    /// counts them) over the steady middle of the transfer, 10 %..90 % of
    /// its bytes: away from process start-up, the initial burst and the
    /// tail.
    pub fn steady_rate(self, at_least: u64) -> f64 {
        // A sender may exit with its last segments still queued (and, being
        // policed, retransmitted): wait, bounded, for the count to reach
        // the payload rather than a fixed number of samples.
        let reached = || {
            let seen = self.seen.lock().unwrap();
            matches!((seen.first(), seen.last()), (Some(f), Some(l)) if l.1 - f.1 >= at_least)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !reached() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("sampler thread");
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let (b0, b1) = (seen.first().unwrap().1, seen.last().unwrap().1);
        assert!(
            b1 - b0 >= at_least,
            "counted {} bytes of {at_least}: {seen:?}",
            b1 - b0
        );
        let total = (b1 - b0) as f64;
        let middle: Vec<&(u64, u64)> = seen
            .iter()
            .filter(|(_, b)| (0.1..=0.9).contains(&((b - b0) as f64 / total)))
            .collect();
        assert!(
            middle.len() >= 4,
            "too few samples in the transfer: {seen:?}"
        );
        let (first, last) = (middle[0], middle[middle.len() - 1]);
        (last.1 - first.1) as f64 / ((last.0 - first.0) as f64 / 1000.0)
    }
}
