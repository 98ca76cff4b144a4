//! Cost of the eBPF probes, measured in one run on this machine (root):
//! loopback TCP throughput without and with the network programs attached,
//! alternating, and the per-call cost of a uprobe hit on a fake libcuda
//! copy function. Prints one JSON object. Not a test: no pass/fail, the
//! numbers are for `cargo xtask bench` to record and compare.
//!
//! `tally-probe-bench [--bytes N] [--rounds N] [--calls N]`

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use tally::probes::{Probes, ProbesConfig};
use tally_e2e::probes_support::{FakeCuda, PinDir, TcpServer, build_helpers};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds to push `bytes` through loopback TCP (client → server).
fn tcp_seconds(h: &FakeCuda, bytes: u64) -> f64 {
    let server = TcpServer::start_with(&h.netload, bytes, 0);
    let port = server.addr.port().to_string();
    let start = Instant::now();
    let status = Command::new(&h.netload)
        .args(["tcp-client", "127.0.0.1", &port, &bytes.to_string(), "0"])
        .stdout(Stdio::null())
        .status()
        .expect("run netload");
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "netload tcp-client failed");
    server.finish();
    secs
}

/// Seconds for `calls` calls of cuMemcpyHtoD_v2 (one process).
fn copy_seconds(h: &FakeCuda, calls: u64) -> f64 {
    let start = Instant::now();
    let status = Command::new(&h.caller)
        .arg(&h.lib)
        .args(["cuMemcpyHtoD_v2", "8", &calls.to_string()])
        .status()
        .expect("run cuda-copy");
    assert!(status.success(), "cuda-copy failed");
    start.elapsed().as_secs_f64()
}

fn probes(pin: &Path, state: &Path, network: bool, lib: Option<&Path>) -> Probes {
    let config = ProbesConfig {
        network,
        pcie: lib.is_some(),
        process: false,
        cuda_libs: lib.map(|l| vec![l.to_path_buf()]),
        pin_dir: pin.to_path_buf(),
    };
    let p = Probes::start(&config, state);
    for s in p.statuses() {
        let wanted = (network && s.probe.starts_with("network_"))
            || (lib.is_some() && s.probe == "pcie_uprobes");
        assert!(!wanted || s.up, "probe did not start: {s:?}");
    }
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: tally-probe-bench needs root (eBPF)");
        return;
    }
    let bytes = arg("--bytes", 512 << 20);
    let rounds = arg("--rounds", 5).max(1);
    let calls = arg("--calls", 1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let h = build_helpers(dir.path());
    let state = dir.path().join("state");

    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        off.push(bytes as f64 / tcp_seconds(&h, bytes));
        let pin = PinDir::new();
        let p = probes(&pin.0, &state, true, None);
        on.push(bytes as f64 / tcp_seconds(&h, bytes));
        drop(p);
    }
    let (tcp_off, tcp_on) = (median(off), median(on));

    let (mut plain, mut probed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(copy_seconds(&h, calls));
        let pin = PinDir::new();
        let p = probes(&pin.0, &state, false, Some(&h.lib));
        probed.push(copy_seconds(&h, calls));
        drop(p);
    }
    let (c_off, c_on) = (median(plain), median(probed));
    let per_call_ns = (c_on - c_off) / calls as f64 * 1e9;

    println!(
        "{}",
        serde_json::json!({
            "loopback_tcp_bytes_per_second": {
                "without_probes": tcp_off.round(),
                "with_network_probes": tcp_on.round(),
                "overhead_ratio": 1.0 - tcp_on / tcp_off,
                "bytes_per_round": bytes,
                "rounds": rounds,
            },
            "uprobe_hit": {
                "ns_per_call": per_call_ns,
                "calls_per_round": calls,
                "seconds_without": c_off,
                "seconds_with": c_on,
            },
        })
    );
}
