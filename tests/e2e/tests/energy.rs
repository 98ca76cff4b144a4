//! Every interval accounted whatever the energy counter does: a GPU with no
//! counter (NVML answers NOT_SUPPORTED) is charged from its power, and a
//! counter that restarts from 0 (a driver reload) loses no interval. The
//! spine's conservation checks hold on both.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::Duration;

use tally_e2e::{
    Agent, Cgroup, ChildGuard, SimNode,
    conservation::{Scrape, assert_conserved, close},
    require_root, unique, wait_for,
};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

/// GPU 0 has no energy counter; GPU 1 has one.
const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA GeForce RTX 3090"
memory_mib = 24576
power_idle_w = 30
power_max_w = 350
energy_counter = false

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
"#;

/// acme on GPU 0 at SM 0.5 (190 W), beta on GPU 1 at SM 0.2 (196 W).
const ACME_WATTS: f64 = 30.0 + 320.0 * 0.5;
const BETA_WATTS: f64 = 70.0 + 630.0 * 0.2;

struct Tenants {
    _cgroups: Vec<Cgroup>,
    _procs: Vec<ChildGuard>,
}

fn start_tenants(node: &SimNode) -> Tenants {
    let base = unique("e2e-energy");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));
    let a = acme.spawn("sleep", &["600"]);
    let b = beta.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 8192, 0.5);
    node.register(b.pid(), 1, None, 4096, 0.2);
    Tenants {
        _cgroups: vec![acme, beta],
        _procs: vec![a, b],
    }
}

/// `got` within ±1 % of `want`.
fn within_1pct(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 0.01 * want.abs(),
        "{what}: {got} not within 1 % of {want}"
    );
}

#[test]
fn a_gpu_without_an_energy_counter_is_accounted_from_its_power() {
    if !require_root() {
        return;
    }
    let node = SimNode::new(SCENARIO);
    let _tenants = start_tenants(&node);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(3);
    let m = agent.metrics();
    let source = |gpu: &str| {
        m.select("tally_gpu_info", &[("gpu", gpu)])
            .next()
            .map(|s| s.labels["energy_source"].clone())
    };
    assert_eq!(source("0").as_deref(), Some("power"));
    assert_eq!(source("1").as_deref(), Some("counter"));

    let before = Scrape::of(&agent);
    agent.wait_samples(10);
    let after = Scrape::of(&agent);
    assert_conserved(&before, &after);
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.metrics.increase(&before.metrics, name, labels);
    let observed = delta("tally_gpu_observed_seconds_total", &[("gpu", "0")]);
    assert!(observed > 1.0, "GPU 0 is accounted: {observed}s");
    // acme is the only holder: all the time, its SM, and the power integral.
    close(
        delta(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        ),
        observed,
        "acme's time",
    );
    close(
        delta(
            "tally_tenant_gpu_sm_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        ),
        0.5 * observed,
        "acme's SM seconds",
    );
    within_1pct(
        delta("tally_tenant_gpu_energy_joules_total", &[("gpu", "0")]),
        ACME_WATTS * observed,
        "tenant energy on GPU 0 vs the power integral",
    );
}

#[test]
fn a_counter_reset_loses_no_interval() {
    if !require_root() {
        return;
    }
    let node = SimNode::new(SCENARIO);
    let _tenants = start_tenants(&node);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(3);
    let before = Scrape::of(&agent);
    node.reset_energy(1);
    wait_for(
        "the simulator to reset GPU 1's counter",
        Duration::from_secs(30),
        || (!node.reset_pending(1)).then_some(()),
    );
    agent.wait_samples(5);
    let after = Scrape::of(&agent);
    // Time observed is the wall time, tenants sum to the device's energy,
    // and the device's energy went on growing.
    assert_conserved(&before, &after);
    let observed = after.metrics.increase(
        &before.metrics,
        "tally_gpu_observed_seconds_total",
        &[("gpu", "1")],
    );
    within_1pct(
        after.metrics.increase(
            &before.metrics,
            "tally_gpu_energy_joules_total",
            &[("gpu", "1")],
        ),
        BETA_WATTS * observed,
        "GPU 1's energy across the reset",
    );
    assert_eq!(
        after
            .metrics
            .select("tally_gpu_info", &[("gpu", "1")])
            .next()
            .map(|s| s.labels["energy_source"].clone())
            .as_deref(),
        Some("counter")
    );
}
