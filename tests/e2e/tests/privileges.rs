//! Least privilege end to end: the agent, started as root, keeps only the
//! capabilities docs/security.md lists — in every thread, bounding set
//! included, with no_new_privs — and its GPU metrics still flow; the
//! aggregator runs as `nobody`.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Duration,
};

use tally_agent::privileges::{beyond_kept, kept_mask};
use tally_e2e::{
    Agent, Cgroup, ChildGuard, SimNode,
    faults_support::status_field,
    free_port, http_get,
    other_user::{SharedDir, as_user},
    require_root, skip, tally_bin, unique, wait_for,
};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

fn mask_of(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[test]
fn the_agent_keeps_only_the_documented_capabilities_in_every_thread() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let cg = Cgroup::create(&format!("{}/tally/acme/job", unique("e2e-privileges")));
    let p = cg.spawn("sleep", &["600"]);
    node.register(p.pid(), 0, None, 4096, 0.5);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    let pid = agent.child.pid();
    // Root starts with more than the kept set: the drop is observable.
    let own = fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        !beyond_kept(mask_of(&own, "CapEff")).is_empty(),
        "the test runs without extra capabilities; nothing to observe"
    );
    let keep = kept_mask();
    let tasks: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect();
    assert!(tasks.len() > 1, "the agent runs several threads");
    for tid in &tasks {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue; // the thread ended meanwhile
        };
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let m = mask_of(&status, field);
            assert_eq!(
                beyond_kept(m),
                Default::default(),
                "thread {tid} {field} {m:016x} holds more than the kept set {keep:016x}"
            );
        }
        assert_eq!(
            mask_of(&status, "CapBnd"),
            keep,
            "thread {tid} bounding set"
        );
        assert_eq!(
            mask_of(&status, "CapEff"),
            keep,
            "thread {tid} effective set"
        );
        assert_eq!(
            mask_of(&status, "CapInh"),
            0,
            "thread {tid} inheritable set"
        );
        assert_eq!(
            status_field(*tid, "NoNewPrivs").as_deref(),
            Some("1"),
            "thread {tid} no_new_privs"
        );
    }
    assert!(
        agent.log_text().contains("dropped every other capability"),
        "no log line about the drop:\n{}",
        agent.log_text()
    );
    // GPU metrics still flow after the drop: the tenant accrues.
    let before = agent.metrics().sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    agent.wait_samples(5);
    let after = agent.metrics().sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    assert!(after > before, "acme stopped accruing after the drop");
    // Threads made after the drop (one per new GPU read, etc.) inherit it.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(mask_of(&status, "CapEff"), keep);
}

#[test]
fn the_aggregator_runs_as_nobody() {
    if !require_root() {
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        skip("no `nobody` user on this machine");
        return;
    };
    // Binary, config and tokens where nobody can reach them (the checkout
    // may be private): a directory it can search, files it owns.
    let shared = SharedDir::new();
    let root = shared.path();
    let data = root.join("data");
    fs::create_dir(&data).unwrap();
    nix::unistd::chown(&data, Some(nobody.uid), Some(nobody.gid)).unwrap();
    for (name, token) in [
        ("agents", "agent-token-0123456789abcdef"),
        ("admin", "admin-token-0123456789abcdef"),
    ] {
        let f = root.join(name);
        fs::write(&f, format!("{token}\n")).unwrap();
        nix::unistd::chown(&f, Some(nobody.uid), Some(nobody.gid)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o400)).unwrap();
    }
    let config = root.join("aggregator.toml");
    fs::write(
        &config,
        format!(
            "[ledger]\nurl = \"sqlite://{}/ledger.db\"\n\n[[auth.token]]\ntoken_file = \"{}/agents\"\nrole = \"agent\"\n\n[[auth.token]]\ntoken_file = \"{}/admin\"\nrole = \"admin\"\n",
            data.display(),
            root.display(),
            root.display()
        ),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = root.join("aggregator.log");
    let tally = shared.copy(&tally_bin());
    let child = ChildGuard(
        as_user(nobody.uid, nobody.gid, &tally)
            .args(["aggregator", "--config"])
            .arg(&config)
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("setpriv (util-linux)"),
    );
    let ready = wait_for("the aggregator as nobody", Duration::from_secs(60), || {
        if child.has_exited() {
            panic!(
                "the aggregator exited:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        http_get(addr, "/readyz").ok().filter(|(s, _)| *s == 200)
    });
    assert_eq!(ready.0, 200);
    let (status, _) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    // It really is nobody, with no capabilities at all.
    let pid = child.pid();
    let uid = status_field(pid, "Uid").unwrap();
    assert!(
        uid.split_whitespace().all(|u| u == nobody.uid.to_string()),
        "aggregator uids {uid}"
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(mask_of(&status, "CapEff"), 0);
    assert!(
        data.join("ledger.db").exists(),
        "the ledger was created by nobody"
    );
    drop(child);
}

/// Under a service manager that already bounds the capabilities and leaves
/// out CAP_SETPCAP (deploy/systemd/tally-agent.service), the agent cannot
/// shrink its bounding set but still lowers every other set in every
/// thread and sets no_new_privs.
#[test]
fn without_setpcap_the_agent_still_lowers_every_thread() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let config = node.dir.path().join("agent.toml");
    fs::write(&config, CONFIG).unwrap();
    node.pin_here(&config);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = node.dir.path().join("agent-nosetpcap.log");
    let child = ChildGuard(
        Command::new("setpriv")
            .args(["--bounding-set", "-setpcap", "--"])
            .arg(tally_bin())
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &addr.to_string()])
            .arg("--nvml-lib")
            .arg(tally_e2e::sim_lib())
            .args(["--sample-interval", "200ms"])
            .envs(node.env())
            .env("TALLY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("setpriv (util-linux)"),
    );
    let agent = Agent {
        child,
        addr,
        config,
        log,
        netns: None,
    };
    agent.wait_ready();
    let pid = agent.child.pid();
    let keep = kept_mask();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        assert_eq!(mask_of(&status, "CapEff"), keep, "{:?} effective", t.path());
        assert_eq!(mask_of(&status, "CapPrm"), keep, "{:?} permitted", t.path());
        assert_eq!(
            mask_of(&status, "CapBnd") & (1 << tally_agent::privileges::CAP_SETPCAP),
            0,
            "the bounding set is the one given"
        );
        assert!(
            status.contains("NoNewPrivs:\t1"),
            "{:?} no_new_privs",
            t.path()
        );
    }
    assert!(agent.log_text().contains("dropped every other capability"));
    agent.wait_samples(3);
}
