//! A running `tally agent` on the simulator.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{ChildGuard, Metrics, SimNode, free_port, netns, sim_lib, tally_bin, unique, wait_for};

/// A running `tally agent` on the simulator, killed on drop.
pub struct Agent {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The network namespace it runs in (`None`: this machine's).
    pub netns: Option<String>,
}

/// How [`Agent::launch`] starts an agent.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `tally` binary.
    pub tally: PathBuf,
    /// The NVML simulator library.
    pub sim_lib: PathBuf,
    /// `TALLY_LOG`.
    pub log_level: String,
    /// How long `/readyz` may take to answer 200.
    pub ready_within: Duration,
    /// More environment for the agent (e.g. a preloaded shim).
    pub env: Vec<(&'static str, PathBuf)>,
    /// A network namespace to run it in (`crate::netns`).
    pub netns: Option<String>,
    /// A cgroup v2 directory the agent starts in (as a systemd unit's
    /// does); `None`: ours.
    pub cgroup: Option<PathBuf>,
}

impl Default for Launch {
    /// This build's binaries, `info` logs, 30 s to be ready.
    fn default() -> Launch {
        Launch {
            tally: tally_bin(),
            sim_lib: sim_lib(),
            log_level: "info".into(),
            ready_within: Duration::from_secs(30),
            env: Vec::new(),
            netns: None,
            cgroup: None,
        }
    }
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
        Self::launch(&Launch::default(), node, config, addr, extra)
    }

    /// [`Agent::start_with`] without waiting for `/readyz`.
    pub fn spawn_with(node: &SimNode, config: &Path, addr: SocketAddr, extra: &[&str]) -> Agent {
        let how = Launch {
            ready_within: Duration::ZERO,
            ..Launch::default()
        };
        Self::launch(&how, node, config, addr, extra)
    }

    /// Starts an agent as `how` says (other binaries, log level, patience).
    pub fn launch(
        how: &Launch,
        node: &SimNode,
        config: &Path,
        addr: SocketAddr,
        extra: &[&str],
    ) -> Agent {
        let log = node.dir.path().join(unique("agent") + ".log");
        node.pin_here(config);
        // In a network namespace: `ip netns exec NS tally …`.
        let tally = netns::command(how.netns.as_deref(), &how.tally);
        let mut cmd = match &how.cgroup {
            // A shell moves itself in, then execs the agent: it never runs
            // outside the cgroup.
            Some(dir) => {
                let mut sh = Command::new("/bin/sh");
                sh.arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(dir.join("cgroup.procs"))
                    .arg(tally.get_program())
                    .args(tally.get_args());
                sh
            }
            None => tally,
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--nvml-lib")
            .arg(&how.sim_lib)
            .args(extra)
            .envs(node.env())
            .envs(how.env.iter().cloned())
            .env("TALLY_LOG", &how.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"));
        let child = ChildGuard(cmd.spawn().expect("spawn tally agent"));
        let agent = Agent {
            child,
            addr,
            config: config.to_path_buf(),
            log,
            netns: how.netns.clone(),
        };
        if !how.ready_within.is_zero() {
            agent.wait_ready_within(how.ready_within);
        }
        agent
    }

    /// Waits for `/readyz` to answer 200 (panics with the agent's log).
    pub fn wait_ready(&self) {
        self.wait_ready_within(Duration::from_secs(30));
    }

    fn wait_ready_within(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.get("/readyz") {
                return;
            }
            if self.child.has_exited() {
                panic!("agent exited; log:\n{}", self.log_text());
            }
            if start.elapsed() > limit {
                panic!("agent not ready after {limit:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on the agent, from inside its network namespace.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        netns::http_get(self.netns.as_deref(), self.addr, path)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The parsed `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// The `/api/v1/snapshot` JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let (status, body) = self.get("/api/v1/snapshot").expect("GET snapshot");
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

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the agent process.
    pub fn freeze(&self, frozen: bool) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.child.pid() as i32);
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(pid, signal).expect("signal the agent");
    }

    /// Stops the agent with SIGTERM and waits for it to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.0.wait().expect("wait agent")
    }
}
