//! `cargo xtask demo`, run as a newcomer would pipe it: every item of the
//! whole-system screen appears in its plain output — the idle and the
//! stuck GPU, a quota acting, money from the aggregator, the scheduler's
//! ranking, and the summary with where to look further.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::process::{Command, Stdio};

use tally_e2e::{free_port, require_root, target_dir};

#[test]
fn the_demo_shows_the_whole_system_when_piped() {
    if !require_root() {
        return;
    }
    // The xtask binary itself: `cargo xtask` would wait on the build lock
    // that the running `cargo test` may hold, hence `--no-build` too.
    let xtask = target_dir().join("xtask");
    assert!(
        xtask.exists(),
        "{} is not built: run `cargo build --workspace` first",
        xtask.display()
    );
    let out = Command::new(&xtask)
        .args(["demo", "--no-build", "--seconds", "40", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run xtask demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{text}", out.status);

    assert!(
        text.starts_with("starting the simulated node…"),
        "first line:\n{text}"
    );
    assert!(!text.contains('\x1b'), "escape codes while piped:\n{text}");
    let has = |what: &str, needle: &str| {
        assert!(text.contains(needle), "no {what} ({needle:?}) in:\n{text}");
    };
    has("idle GPU", "(NVIDIA L4) is now idle");
    has("stuck GPU", "is now stuck");
    has("quota acting", "beta is over its gpu_memory quota");
    has("throttled tenant in the table", "OVER, throttled");
    has("per-tenant network and PCIe", "NETWORK (per s)");
    has("chargeback in money", "COST USD");
    has(
        "scheduler ranking",
        "scheduler ranking (POST /scheduler/prioritize",
    );
    has("ranking drop on the stuck GPU", "(was 10/10)");
    has("summary", "Tally demo summary");
    has("summary's chargeback table", "Chargeback of the run");
    has("ledger path", "ledger:     ");
    has("tally report command", "tally report --aggregator");
    has("metrics command", "/metrics");
    has("tally top command", "tally top --agent");
    assert!(
        !text.contains("refused"),
        "the aggregator refused reports:\n{text}"
    );
    // Money moved: the run's total is not zero.
    let summary = text.split("Chargeback of the run").nth(1).unwrap();
    let total: f64 = summary
        .lines()
        .find_map(|l| l.strip_prefix("total"))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total in the summary:\n{summary}"));
    assert!(total > 0.0, "a zero chargeback:\n{summary}");
    // Only the demo's tenants: nothing else on the machine leaks in.
    let table = summary.split("\n\n").next().unwrap_or_default();
    for line in table.lines().skip(2) {
        let tenant = line.split_whitespace().next().unwrap_or_default();
        assert!(
            ["_idle", "_unattributed", "acme", "beta", "gamma", "total"].contains(&tenant),
            "a tenant that is not the demo's: {line:?} in\n{table}"
        );
    }
}
