//! MIG utilization where the hardware has it: on an H100 GPM measures each
//! instance's SM activity, so a held instance that does nothing becomes
//! `idle` (and its holder is on the idle alert's memory series) and busy
//! instances earn SM seconds; on an A100, which has no GPM, a held instance
//! stays `busy` with no SM series. The spine's conservation checks hold.
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

[states]
idle_after = "1s"
"#;

/// GPU 0: H100 with instances 0/1/0 (3g) and 0/2/0 (1g); GPU 1: A100 with
/// instances 1/1/0 (3g) and 1/2/0 (1g).
const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
mig = ["3g.40gb", "1g.10gb"]

[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40960
power_idle_w = 50
power_max_w = 400
mig = ["3g.20gb", "1g.5gb"]
"#;

fn state_of(agent: &Agent, gpu: &str) -> String {
    agent
        .metrics()
        .select("tally_gpu_state", &[("gpu", gpu)])
        .find(|s| s.value == 1.0)
        .map(|s| s.labels["state"].clone())
        .unwrap_or_else(|| panic!("no state for gpu {gpu}"))
}

#[test]
fn an_idle_mig_instance_is_idle_on_h100_and_busy_on_a100() {
    if !require_root() {
        return;
    }
    let node = SimNode::new(SCENARIO);
    let base = unique("e2e-mig-gpm");
    let cgroups: Vec<Cgroup> = ["acme", "beta", "gamma"]
        .iter()
        .map(|t| Cgroup::create(&format!("{base}/tally/{t}/job")))
        .collect();
    let procs: Vec<ChildGuard> = cgroups.iter().map(|c| c.spawn("sleep", &["600"])).collect();
    // acme holds an H100 instance and does nothing; beta works on the
    // other; gamma holds an A100 instance and does nothing.
    node.register(procs[0].pid(), 0, Some(0), 4096, 0.0);
    node.register(procs[1].pid(), 0, Some(1), 2048, 0.6);
    node.register(procs[2].pid(), 1, Some(0), 4096, 0.0);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);

    wait_for(
        "H100 instance 0/1/0 to be idle",
        Duration::from_secs(30),
        || (state_of(&agent, "0/1/0") == "idle").then_some(()),
    );
    // Well past idle_after: the A100 instance is still busy, not guessed.
    agent.wait_samples(10);
    assert_eq!(state_of(&agent, "1/1/0"), "busy");
    assert_eq!(state_of(&agent, "0/1/0"), "idle");
    assert_eq!(state_of(&agent, "0/2/0"), "busy");
    let m = agent.metrics();
    // The idle alert joins the idle state with the holder's memory.
    assert_eq!(
        m.value(
            "tally_tenant_gpu_memory_bytes",
            &[("tenant", "acme"), ("gpu", "0/1/0")]
        ),
        Some(4096.0 * 1024.0 * 1024.0)
    );
    close(
        m.value("tally_gpu_utilization_ratio", &[("gpu", "0/2/0")])
            .expect("GPM utilization of an H100 instance"),
        0.6,
        "0/2/0 utilization",
    );
    assert_eq!(
        m.value("tally_gpu_utilization_ratio", &[("gpu", "1/1/0")]),
        None,
        "no utilization without GPM"
    );

    let before = Scrape::of(&agent);
    agent.wait_samples(10);
    let after = Scrape::of(&agent);
    assert_conserved(&before, &after);
    let sm = |tenant: &str, gpu: &str| {
        after.metrics.increase(
            &before.metrics,
            "tally_tenant_gpu_sm_seconds_total",
            &[("tenant", tenant), ("gpu", gpu)],
        )
    };
    let observed = after.metrics.increase(
        &before.metrics,
        "tally_gpu_observed_seconds_total",
        &[("gpu", "0/2/0")],
    );
    close(sm("beta", "0/2/0"), 0.6 * observed, "beta's SM seconds");
    assert_eq!(sm("acme", "0/1/0"), 0.0, "idle acme does no SM work");
    assert_eq!(
        after
            .metrics
            .select("tally_tenant_gpu_sm_seconds_total", &[("tenant", "gamma")])
            .count(),
        0,
        "no SM series on an A100 instance"
    );
    drop(procs);
}
