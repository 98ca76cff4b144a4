//! GPU states end to end: every transition driven by the simulator and
//! real processes (a zombie and a stopped process among them), with short
//! thresholds.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{fs, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tally_e2e::{Agent, Cgroup, SimNode, require_root, unique, wait_for};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'

[states]
idle_after = "1s"
stuck_after = "1s"
fatal_xid_clear_after = "3s"
"#;

fn state_of(agent: &Agent, gpu: &str) -> String {
    let m = agent.metrics();
    m.select("tally_gpu_state", &[("gpu", gpu)])
        .find(|s| s.value == 1.0)
        .map(|s| s.labels["state"].clone())
        .unwrap_or_else(|| panic!("no state for gpu {gpu}"))
}

fn wait_state(agent: &Agent, gpu: &str, want: &str) {
    wait_for(
        &format!("gpu {gpu} to be {want}"),
        Duration::from_secs(30),
        || (state_of(agent, gpu) == want).then_some(()),
    );
}

#[test]
fn free_busy_idle_busy_free() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/acme/job", unique("e2e-states")));
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    wait_state(&agent, "0", "free");

    let mut p = cg.spawn("sleep", &["600"]);
    node.register(p.pid(), 0, None, 1024, 0.8);
    wait_state(&agent, "0", "busy");
    // Held but doing nothing: idle once idle_after has passed, with its
    // tenant on the memory series.
    node.register(p.pid(), 0, None, 1024, 0.0);
    wait_state(&agent, "0", "idle");
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "tally_tenant_gpu_memory_bytes",
            &[("tenant", "acme"), ("gpu", "0")]
        ),
        Some(1024.0 * 1024.0 * 1024.0)
    );
    node.register(p.pid(), 0, None, 1024, 0.5);
    wait_state(&agent, "0", "busy");
    p.kill();
    wait_state(&agent, "0", "free");
}

#[test]
fn a_zombie_holder_makes_the_gpu_stuck() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/acme/job", unique("e2e-states")));
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    // The shell forks a short child, then execs `sleep`, which never reaps
    // it: the child stays a zombie.
    let parent = cg.spawn("/bin/sh", &["-c", "sleep 0.1 & exec sleep 600"]);
    let zombie = wait_for("a zombie child", Duration::from_secs(10), || {
        let children =
            fs::read_to_string(format!("/proc/{0}/task/{0}/children", parent.pid())).ok()?;
        let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .to_owned();
        (state == "Z").then_some(pid)
    });
    node.register(zombie, 1, None, 2048, 0.0);
    wait_state(&agent, "1", "stuck");
    drop(parent);
}

#[test]
fn a_stopped_process_spinning_the_gpu_is_stuck() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/acme/job", unique("e2e-states")));
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    let p = cg.spawn("sleep", &["600"]);
    kill(Pid::from_raw(p.pid() as i32), Signal::SIGSTOP).unwrap();
    node.register(p.pid(), 0, None, 4096, 1.0);
    wait_state(&agent, "0", "stuck");
    // It resumes and does CPU work: busy again.
    kill(Pid::from_raw(p.pid() as i32), Signal::SIGCONT).unwrap();
    node.unregister(p.pid());
    let worker = cg.spawn("/bin/sh", &["-c", "while :; do :; done"]);
    node.register(worker.pid(), 0, None, 4096, 1.0);
    wait_state(&agent, "0", "busy");
}

#[test]
fn lost_by_the_bus_and_by_a_fatal_xid_and_back() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/beta/job", unique("e2e-states")));
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    let p = cg.spawn("sleep", &["600"]);
    node.register(p.pid(), 1, None, 2048, 0.6);
    wait_state(&agent, "1", "busy");

    node.set_lost(1, true);
    wait_state(&agent, "1", "lost");
    node.set_lost(1, false);
    wait_state(&agent, "1", "busy");

    // A fatal XID: lost until fatal_xid_clear_after, tied to its tenant.
    node.inject_xid(1, 79);
    wait_state(&agent, "1", "lost");
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "tally_tenant_gpu_xid_errors_total",
            &[("tenant", "beta"), ("gpu", "1"), ("xid", "79")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("tally_gpu_xid_errors_total", &[("gpu", "1"), ("xid", "79")]),
        Some(1.0)
    );
    wait_state(&agent, "1", "busy");
    // A non-fatal XID counts but does not change the state.
    node.inject_xid(1, 31);
    wait_for("xid 31 counted", Duration::from_secs(30), || {
        agent
            .metrics()
            .value("tally_gpu_xid_errors_total", &[("gpu", "1"), ("xid", "31")])
            .filter(|v| *v == 1.0)
    });
    assert_eq!(state_of(&agent, "1"), "busy");
    assert!(
        agent
            .log_text()
            .contains("XID error on a GPU held by these tenants")
    );
}

#[test]
fn mig_instances_are_free_or_busy_and_lost_with_their_parent() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/gamma/job", unique("e2e-states")));
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    let p = cg.spawn("sleep", &["600"]);
    node.register(p.pid(), 2, Some(1), 1024, 0.0);
    let gpu = wait_for("gamma's MIG instance", Duration::from_secs(30), || {
        let m = agent.metrics();
        let s = m
            .select("tally_tenant_gpu_memory_bytes", &[("tenant", "gamma")])
            .next()?;
        Some(s.labels["gpu"].clone())
    });
    // NVML has no utilization for MIG instances (nor for their parent in
    // MIG mode): a held instance is busy, never guessed idle.
    wait_state(&agent, &gpu, "busy");
    let free: Vec<String> = agent
        .metrics()
        .select("tally_gpu_state", &[("state", "free")])
        .filter(|s| s.value == 1.0 && s.labels["gpu"].starts_with("2/"))
        .map(|s| s.labels["gpu"].clone())
        .collect();
    assert_eq!(
        free.len(),
        3,
        "the other three instances are free: {free:?}"
    );
    node.set_lost(2, true);
    wait_state(&agent, "2", "lost");
    wait_state(&agent, &gpu, "lost");
}
