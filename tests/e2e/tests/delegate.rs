//! The agent under systemd's `Delegate=yes`: started in a delegated cgroup
//! (emulated by a fresh cgroup beneath the test's own, marked with the
//! `trusted.delegate` attribute as systemd marks the cgroups it delegates),
//! it moves itself into the leaf `agent`, so that the delegated root holds
//! no process and may give controllers to the tenant cgroups made beneath
//! it (cgroup v2's no-internal-process rule). In a cgroup without the mark
//! it stays where it is.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{fs, net::SocketAddr, time::Duration};

use rustix::fs::{XattrFlags, setxattr};
use tally_e2e::{
    Agent, Cgroup, Launch, SimNode, enforce_support::TenantEnv, free_port, require_root, skip,
    unique, wait_for,
};

const QUOTA: &str = "[tenant.quota.deleg]\ncpu_cores = 0.5\nmemory = '64MiB'\npids = 16\n";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// The agent's cgroup v2 path.
fn cgroup_of(agent: &Agent) -> String {
    let text = fs::read_to_string(format!("/proc/{}/cgroup", agent.child.pid())).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned()
}

fn procs(dir: &std::path::Path) -> String {
    fs::read_to_string(dir.join("cgroup.procs")).unwrap()
}

#[test]
fn the_agent_moves_into_a_leaf_of_its_delegated_cgroup_and_limits_tenants_beneath_it() {
    if !require_root() {
        return;
    }
    let unit = Cgroup::create(&unique("e2e-delegated"));
    if let Err(e) = setxattr(&unit.dir, "trusted.delegate", b"1", XattrFlags::empty()) {
        skip(&format!(
            "cannot mark a cgroup delegated (xattr on cgroupfs): {e}"
        ));
        return;
    }
    let env = TenantEnv::new();
    let config = env.write_config(QUOTA);
    let node = SimNode::standard();
    let how = Launch {
        cgroup: Some(unit.dir.clone()),
        ..Launch::default()
    };
    let agent = Agent::launch(&how, &node, &config, addr(), &[]);

    assert_eq!(
        cgroup_of(&agent),
        format!("{}/agent", unit.path),
        "the agent sits in the leaf; log:\n{}",
        agent.log_text()
    );
    assert_eq!(procs(&unit.dir), "", "the delegated root holds no process");
    assert!(
        agent
            .log_text()
            .contains("moved into a leaf of the delegated cgroup"),
        "{}",
        agent.log_text()
    );
    // The tenant tree is made beneath the delegated root, not the leaf.
    let tenant = unit.dir.join(&env.parent).join("tally/deleg");
    wait_for("the tenant cgroup", Duration::from_secs(30), || {
        tenant.is_dir().then_some(())
    });
    assert!(!unit.dir.join("agent/tally").exists());
    // Every limit controller the delegated root is given, it passes on:
    // the kernel refuses that while the root holds a process.
    let offered = fs::read_to_string(unit.dir.join("cgroup.controllers")).unwrap();
    let passed = fs::read_to_string(unit.dir.join("cgroup.subtree_control")).unwrap();
    let limits: Vec<&str> = offered
        .split_whitespace()
        .filter(|c| matches!(*c, "cpu" | "memory" | "pids"))
        .collect();
    for c in &limits {
        assert!(
            passed.split_whitespace().any(|p| p == *c),
            "{c} offered ({offered:?}) but not enabled ({passed:?}); log:\n{}",
            agent.log_text()
        );
        let file = tenant.join(format!("{c}.max"));
        assert!(file.exists(), "{} missing", file.display());
    }
    if limits.is_empty() {
        // Hybrid hosts keep cpu, memory and pids in v1: the limits are
        // written there, and the move is what is checked here.
        eprintln!("note: no limit controller on this v2 hierarchy (hybrid host)");
    }
    drop(agent);

    // Without the mark the agent stays where it was started.
    let plain = Cgroup::create(&unique("e2e-undelegated"));
    let env2 = TenantEnv::new();
    let config = env2.write_config("");
    let how = Launch {
        cgroup: Some(plain.dir.clone()),
        ..Launch::default()
    };
    let agent = Agent::launch(&how, &node, &config, addr(), &[]);
    assert_eq!(cgroup_of(&agent), plain.path);
    assert!(!plain.dir.join("agent").exists());
}
