//! Shared fixtures of the end-to-end tests: the real `tally` binary, the
//! NVML simulator, real processes in real cgroups, and plain HTTP.
//!
//! Everything here cleans up after itself on drop (processes killed,
//! cgroups removed), so a failing test leaves the machine as it found it.
//! Binaries are taken from the workspace's target directory: build them
//! first (`cargo build --workspace`, which `cargo xtask test` does).

pub mod aggregator_support;
pub mod enforce_support;
pub mod faults_support;
pub mod other_user;
pub mod probes_support;

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// True when the tests run as root (CI does).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Marks the calling test as skipped: prints why, and records it in
/// `$TALLY_SKIP_LOG` (when set) so `cargo xtask test` counts it as skipped
/// rather than passed. The caller returns right after.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_owned();
    eprintln!("SKIPPED: {test}: {reason}");
    if let Ok(log) = std::env::var("TALLY_SKIP_LOG")
        && let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log)
    {
        let _ = writeln!(f, "{test}: {reason}");
    }
}

/// Skips the test unless root; returns whether to go on.
#[must_use]
pub fn require_root() -> bool {
    if is_root() {
        true
    } else {
        skip("needs root (cgroups, eBPF); CI runs as root");
        false
    }
}

/// The workspace's target profile directory (`target/debug`).
pub fn target_dir() -> PathBuf {
    // Test binaries live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps")
        .to_path_buf()
}

fn built(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// The `tally` binary.
pub fn tally_bin() -> PathBuf {
    built("tally")
}

/// The NVML simulator library: the newer of `target/<profile>/` (copied
/// there by `cargo build`) and `deps/` (where `cargo test` builds it).
pub fn sim_lib() -> PathBuf {
    let top = target_dir().join("libnvml_sim.so");
    let deps = target_dir().join("deps/libnvml_sim.so");
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&top), mtime(&deps)) {
        (Some(a), Some(b)) if b > a => deps,
        (None, Some(_)) => deps,
        _ => built("libnvml_sim.so"),
    }
}

/// The `tally-sim-run` helper of the simulator.
pub fn sim_run_bin() -> PathBuf {
    built("tally-sim-run")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what`
/// after `limit` (a generous limit: this is a liveness bound, not a
/// performance assertion).
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for cgroups and files.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------- simulator

/// A simulated node: a scenario file and a state directory.
pub struct SimNode {
    pub dir: tempfile::TempDir,
    pub scenario: PathBuf,
    pub state: PathBuf,
}

impl SimNode {
    /// A node with the given scenario TOML (`[[gpu]]` tables).
    pub fn new(scenario_toml: &str) -> SimNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let scenario = dir.path().join("scenario.toml");
        fs::write(&scenario, scenario_toml).expect("write scenario");
        let state = dir.path().join("state");
        fs::create_dir_all(state.join("procs")).expect("state dir");
        SimNode {
            dir,
            scenario,
            state,
        }
    }

    /// Two H100s and an A100 in MIG mode (3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb).
    pub fn standard() -> SimNode {
        SimNode::new(STANDARD_SCENARIO)
    }

    /// Registers `pid` as a GPU process (`mig` selects a MIG instance).
    pub fn register(&self, pid: u32, gpu: u32, mig: Option<u32>, memory_mib: u64, sm: f64) {
        let mut text = format!("gpu = {gpu}\nmemory_mib = {memory_mib}\nsm = {sm}\n");
        if let Some(m) = mig {
            text.push_str(&format!("mig = {m}\n"));
        }
        let procs = self.state.join("procs");
        let tmp = procs.join(format!(".{pid}.tmp"));
        fs::write(&tmp, text).expect("write registration");
        fs::rename(&tmp, procs.join(format!("{pid}.toml"))).expect("rename registration");
    }

    /// Removes a registration (the process stops using the GPU).
    pub fn unregister(&self, pid: u32) {
        let _ = fs::remove_file(self.state.join("procs").join(format!("{pid}.toml")));
    }

    /// Makes GPU `index` fall off the bus (or come back).
    pub fn set_lost(&self, index: u32, lost: bool) {
        let dir = self.state.join("lost");
        fs::create_dir_all(&dir).expect("lost dir");
        let f = dir.join(index.to_string());
        if lost {
            fs::write(f, "").expect("mark lost");
        } else {
            let _ = fs::remove_file(f);
        }
    }

    /// Queues one XID event on GPU `index`.
    pub fn inject_xid(&self, index: u32, xid: u64) {
        let dir = self.state.join("xid");
        fs::create_dir_all(&dir).expect("xid dir");
        let name = unique("xid");
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, format!("gpu = {index}\nxid = {xid}\n")).expect("write xid");
        fs::rename(&tmp, dir.join(format!("{name}.toml"))).expect("rename xid");
    }

    /// Environment for anything that loads the simulator.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            ("TALLY_SIM_SCENARIO", self.scenario.clone()),
            ("TALLY_SIM_STATE", self.state.clone()),
        ]
    }
}

/// The scenario most tests use.
pub const STANDARD_SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40960
power_idle_w = 50
power_max_w = 400
mig = ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]
"#;

// ------------------------------------------------------------------ cgroups

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
        let own = own_unified_cgroup();
        let mut dir = mount.join(own.trim_start_matches('/'));
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
        Cgroup { dir, path, created }
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

    /// Spawns `program args…` inside this cgroup.
    pub fn spawn(&self, program: impl AsRef<Path>, args: &[&str]) -> ChildGuard {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn in cgroup");
        let guard = ChildGuard(child);
        let pid = guard.pid();
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
        guard
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

// -------------------------------------------------------------------- agent

/// A running `tally agent` on the simulator, killed on drop.
pub struct Agent {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `tally agent` with `config_toml`, the simulator of `node`,
    /// and `extra` arguments; waits until `/readyz` answers 200.
    pub fn start(node: &SimNode, config_toml: &str, extra: &[&str]) -> Agent {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = node.dir.path().join(unique("agent") + ".toml");
        fs::write(&config, config_toml).expect("write agent config");
        Self::start_with(node, &config, addr, extra)
    }

    /// Starts an agent on a given config file and address (for restarts).
    pub fn start_with(node: &SimNode, config: &Path, addr: SocketAddr, extra: &[&str]) -> Agent {
        let agent = Self::spawn_with(node, config, addr, extra);
        agent.wait_ready();
        agent
    }

    /// [`Agent::start_with`] without waiting for `/readyz`.
    pub fn spawn_with(node: &SimNode, config: &Path, addr: SocketAddr, extra: &[&str]) -> Agent {
        let log = node.dir.path().join(unique("agent") + ".log");
        let mut cmd = Command::new(tally_bin());
        cmd.arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--nvml-lib")
            .arg(sim_lib())
            .args(extra)
            .envs(node.env())
            .env("TALLY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"));
        let child = ChildGuard(cmd.spawn().expect("spawn tally agent"));
        Agent {
            child,
            addr,
            config: config.to_path_buf(),
            log,
        }
    }

    /// Waits for `/readyz` to answer 200 (panics with the agent's log).
    pub fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/readyz") {
                return;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("agent not ready after 30s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The parsed `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = http_get(self.addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// The `/api/v1/snapshot` JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let (status, body) = http_get(self.addr, "/api/v1/snapshot").expect("GET snapshot");
        assert_eq!(status, 200, "/api/v1/snapshot answered {status}: {body}");
        serde_json::from_str(&body).expect("snapshot is JSON")
    }

    /// Waits until the agent has completed `n` more samples.
    pub fn wait_samples(&self, n: u64) {
        let start = self.snapshot()["samples"].as_u64().unwrap_or(0);
        wait_for("agent samples", Duration::from_secs(60), || {
            (self.snapshot()["samples"].as_u64().unwrap_or(0) >= start + n).then_some(())
        });
    }

    /// Stops the agent with SIGTERM and waits for it to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.0.wait().expect("wait agent")
    }
}

// --------------------------------------------------------------------- http

/// A GET request; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"")
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    http_exchange(addr, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`http_request`], with the response's header lines too (status line
/// first, as received).
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, head.to_owned(), body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ------------------------------------------------------------------ metrics

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus/OpenMetrics text exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format (comments skipped, label values unescaped).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name_labels, value) = match line.find('{') {
                Some(_) => {
                    let close = line.rfind('}').expect("closing brace");
                    (&line[..=close], line[close + 1..].trim())
                }
                None => {
                    let (n, v) = line.split_once(' ').expect("name value");
                    (n, v.trim())
                }
            };
            let value = value.split_whitespace().next().unwrap_or("");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match name_labels.find('{') {
                Some(open) => (
                    &name_labels[..open],
                    parse_labels(&name_labels[open + 1..name_labels.len() - 1]),
                ),
                None => (name_labels, BTreeMap::new()),
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Metrics { samples }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample matching, if exactly one does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.select(name, labels);
        let first = it.next()?;
        assert!(
            it.next().is_none(),
            "more than one series of {name} matches {labels:?}"
        );
        Some(first.value)
    }

    /// Sum over every sample matching.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|s| s.value).sum()
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let after = after.strip_prefix('"').expect("quoted label value");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_parses() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE a counter\na_total{tenant=\"ac\\\"me\",gpu=\"0\"} 1.5\nb 2\nc{x=\"1\"} 3 1700000000\n# EOF\n",
        );
        assert_eq!(m.value("a_total", &[("tenant", "ac\"me")]), Some(1.5));
        assert_eq!(m.value("b", &[]), Some(2.0));
        assert_eq!(m.value("c", &[("x", "1")]), Some(3.0));
        assert_eq!(m.sum("a_total", &[]), 1.5);
        assert_eq!(m.value("a_total", &[("gpu", "1")]), None);
    }
}
