//! The test kit: fixtures shared by the end-to-end tests, `cargo xtask
//! bench` and `cargo xtask demo` — the real `tally` binary, the NVML
//! simulator, real processes in real cgroups, an HTTP client and a
//! metrics parser.
//!
//! Everything here cleans up after itself on drop (processes killed,
//! cgroups removed), so a failing test leaves the machine as it found it.
//! Binaries are taken from the workspace's target directory: build them
//! first (`cargo build --workspace`, which `cargo xtask test` does).
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

mod agent;
pub mod aggregator_support;
mod cgroup;
pub mod conservation;
pub mod enforce_support;
pub mod faults_support;
pub mod http;
pub mod kubernetes_support;
pub mod metrics;
pub mod netns;
pub mod other_user;
pub mod pg_server;
pub mod probes_support;
mod sim;

pub use agent::{Agent, Launch};
pub use cgroup::{Cgroup, ChildGuard, own_unified_cgroup, unified_mount};
pub use http::{Client, http_exchange, http_get, http_request};
pub use metrics::{Metrics, Sample};
pub use sim::{H100, STANDARD_SCENARIO, SimNode};

use std::{
    fs,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
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

/// The workspace's target profile directory (`target/debug`) of the
/// running program: a test binary in `target/<profile>/deps/`, or a tool
/// such as xtask in `target/<profile>/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the program is in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("deps is in target/<profile>")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
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

/// Milliseconds since the Unix epoch, as reports and the ledger count
/// time.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
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
