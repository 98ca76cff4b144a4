//! Health signals end to end: what the simulated driver reports about a
//! GPU's ECC errors, remapped rows and clock throttling reaches `/metrics`
//! (the series the tally-gpu-health alert rules read), healthy GPUs report
//! zeros, and the spine's conservation checks still hold.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::Duration;

use tally_e2e::{
    Agent, Cgroup, SimNode,
    conservation::{Scrape, assert_conserved},
    require_root, unique, wait_for,
};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

#[test]
fn ecc_remapped_rows_and_throttling_reach_metrics() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/acme/job", unique("e2e-health")));
    let p = cg.spawn("sleep", &["600"]);
    node.register(p.pid(), 0, None, 4096, 0.5);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(2);
    let m = agent.metrics();
    // Healthy GPUs: zero counts, no remap, not throttled by hardware.
    let ecc = |m: &tally_e2e::Metrics, gpu: &str, t: &str| {
        m.value("tally_gpu_ecc_errors_total", &[("gpu", gpu), ("type", t)])
    };
    assert_eq!(ecc(&m, "0", "uncorrected"), Some(0.0));
    assert_eq!(
        m.value("tally_gpu_row_remap_pending", &[("gpu", "1")]),
        Some(0.0)
    );
    assert_eq!(
        m.value(
            "tally_gpu_throttle_reasons",
            &[("gpu", "0"), ("reason", "hw_slowdown")]
        ),
        Some(0.0)
    );
    // GPU 1 is free: the simulated driver says its clocks idle.
    assert_eq!(
        m.value(
            "tally_gpu_throttle_reasons",
            &[("gpu", "1"), ("reason", "gpu_idle")]
        ),
        Some(1.0)
    );
    // MIG instances have no physical health series of their own.
    assert_eq!(
        m.select("tally_gpu_ecc_errors_total", &[])
            .filter(|s| s.labels["gpu"].contains('/'))
            .count(),
        0
    );

    node.set_health(
        0,
        "ecc_corrected = 12\necc_uncorrected = 1\nremapped_uncorrectable = 2\n\
         remap_pending = true\nthrottle = [\"hw_thermal\"]\n",
    );
    node.set_health(1, "remap_failed = true\n");
    let m = wait_for(
        "health signals on /metrics",
        Duration::from_secs(30),
        || {
            let m = agent.metrics();
            (ecc(&m, "0", "uncorrected") == Some(1.0)).then_some(m)
        },
    );
    assert_eq!(ecc(&m, "0", "corrected"), Some(12.0));
    assert_eq!(
        m.value(
            "tally_gpu_remapped_rows",
            &[("gpu", "0"), ("cause", "uncorrectable")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.value("tally_gpu_row_remap_pending", &[("gpu", "0")]),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "tally_gpu_throttle_reasons",
            &[("gpu", "0"), ("reason", "hw_thermal")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("tally_gpu_row_remap_failed", &[("gpu", "1")]),
        Some(1.0)
    );
    // A health signal is not a failure: accounting goes on and adds up.
    let before = Scrape::of(&agent);
    agent.wait_samples(5);
    assert_conserved(&before, &Scrape::of(&agent));
    drop(p);
}
