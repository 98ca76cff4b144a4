//! Every kind of process: an MPS client and a graphics process are charged
//! to their own tenants, not to `_unattributed` or the MPS server's
//! tenant, and the spine's conservation checks hold.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use tally_e2e::{
    Agent, Cgroup, SimNode,
    conservation::{Scrape, assert_conserved, close},
    require_root, unique,
};

const GIB: f64 = (1u64 << 30) as f64;

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA L40S"
memory_mib = 46068
power_idle_w = 40
power_max_w = 350
"#;

#[test]
fn mps_clients_and_graphics_processes_are_charged_to_their_tenants() {
    if !require_root() {
        return;
    }
    let node = SimNode::new(SCENARIO);
    let base = unique("e2e-kinds");
    // The MPS server runs as the platform's; NVML lists it as a compute
    // process and its clients only on the MPS call.
    let platform = Cgroup::create(&format!("{base}/tally/platform/mps"));
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));
    let server = platform.spawn("sleep", &["600"]);
    let client = acme.spawn("sleep", &["600"]);
    let viz = beta.spawn("sleep", &["600"]);
    node.register_kind(server.pid(), 0, None, 1024, 0.0, "compute");
    node.register_kind(client.pid(), 0, None, 4096, 0.3, "mps");
    node.register_kind(viz.pid(), 0, None, 2048, 0.2, "graphics");
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(3);

    let m = agent.metrics();
    let memory = |t: &str| {
        m.value(
            "tally_tenant_gpu_memory_bytes",
            &[("tenant", t), ("gpu", "0")],
        )
    };
    assert_eq!(memory("platform"), Some(GIB));
    assert_eq!(memory("acme"), Some(4.0 * GIB));
    assert_eq!(memory("beta"), Some(2.0 * GIB));
    assert_eq!(memory("_unattributed"), None);

    let before = Scrape::of(&agent);
    agent.wait_samples(10);
    let after = Scrape::of(&agent);
    assert_conserved(&before, &after);
    let delta = |name: &str, t: &str| {
        after
            .metrics
            .increase(&before.metrics, name, &[("tenant", t), ("gpu", "0")])
    };
    let observed = after.metrics.increase(
        &before.metrics,
        "tally_gpu_observed_seconds_total",
        &[("gpu", "0")],
    );
    // Time by memory held: 1 : 4 : 2 of 7 GiB.
    let allocated = "tally_tenant_gpu_allocated_seconds_total";
    close(
        delta(allocated, "acme"),
        observed * 4.0 / 7.0,
        "acme's time",
    );
    close(
        delta(allocated, "beta"),
        observed * 2.0 / 7.0,
        "beta's time",
    );
    close(
        delta(allocated, "platform"),
        observed / 7.0,
        "the server's time",
    );
    // SM where NVML samples it: each client its own.
    let sm = "tally_tenant_gpu_sm_seconds_total";
    close(delta(sm, "acme"), 0.3 * observed, "acme's SM seconds");
    close(delta(sm, "beta"), 0.2 * observed, "beta's SM seconds");
    // The clients do the work, so they draw the energy above idle.
    let energy = "tally_tenant_gpu_energy_joules_total";
    assert!(
        delta(energy, "acme") > delta(energy, "platform"),
        "acme {} vs the MPS server {}",
        delta(energy, "acme"),
        delta(energy, "platform")
    );
    drop((server, client, viz));
}
