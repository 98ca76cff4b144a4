//! The spine end to end: the real `tally agent` on the NVML simulator,
//! real processes of three tenants in real cgroup v2 directories, and the
//! numbers on `/metrics` checked against what the test registered.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{process::Command, time::Duration};

use tally_e2e::{
    Agent, Cgroup, Metrics, SimNode,
    conservation::{Scrape, assert_conserved, close},
    require_root, sim_lib, tally_bin, unique, wait_for,
};

const GIB: f64 = (1u64 << 30) as f64;

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

struct Tenants {
    _acme: Cgroup,
    _beta: Cgroup,
    _gamma: Cgroup,
    procs: Vec<tally_e2e::ChildGuard>,
}

/// acme and beta share GPU 0 (8 GiB / 4 GiB, SM 0.5 / 0.2); gamma holds
/// MIG instance 0 of GPU 2 and beta MIG instance 2; GPU 1 is free.
fn start_tenants(node: &SimNode) -> Tenants {
    let base = unique("e2e-spine");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job1"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job1"));
    let gamma = Cgroup::create(&format!("{base}/tally/gamma/job1"));
    let a = acme.spawn("sleep", &["600"]);
    let b = beta.spawn("sleep", &["600"]);
    let b2 = beta.spawn("sleep", &["600"]);
    let g = gamma.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 8192, 0.5);
    node.register(b.pid(), 0, None, 4096, 0.2);
    node.register(g.pid(), 2, Some(0), 10240, 0.9);
    node.register(b2.pid(), 2, Some(2), 2048, 0.3);
    Tenants {
        _acme: acme,
        _beta: beta,
        _gamma: gamma,
        procs: vec![a, b, b2, g],
    }
}

fn agent(node: &SimNode) -> Agent {
    Agent::start(node, CONFIG, &["--sample-interval", "200ms"])
}

/// The GPU memory `tenant` holds on `gpu`, in bytes.
fn gpu_memory(m: &Metrics, tenant: &str, gpu: &str) -> Option<f64> {
    m.value(
        "tally_tenant_gpu_memory_bytes",
        &[("tenant", tenant), ("gpu", gpu)],
    )
}

#[test]
fn tenants_in_cgroups_show_up_with_conserved_time_and_energy() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let tenants = start_tenants(&node);
    let agent = agent(&node);
    // Let every process be seen and a few intervals be accounted.
    agent.wait_samples(5);

    let m = agent.metrics();
    // Memory per tenant is what was registered.
    assert_eq!(gpu_memory(&m, "acme", "0"), Some(8.0 * GIB));
    assert_eq!(gpu_memory(&m, "beta", "0"), Some(4.0 * GIB));
    assert_eq!(
        m.value("tally_gpu_memory_used_bytes", &[("gpu", "0")]),
        Some(12.0 * GIB)
    );
    // Device utilization is the sum of its processes' SM.
    close(
        m.value("tally_gpu_utilization_ratio", &[("gpu", "0")])
            .unwrap(),
        0.7,
        "gpu 0 utilization",
    );
    // The MIG instances are their own devices with their own tenants.
    let mig: Vec<_> = m
        .select("tally_gpu_info", &[("mig_mode", "true")])
        .filter(|s| s.labels["gpu"].starts_with("2/"))
        .map(|s| (s.labels["gpu"].clone(), s.labels["mig_profile"].clone()))
        .collect();
    assert_eq!(mig.len(), 4, "four MIG instances on GPU 2: {mig:?}");
    assert!(mig.iter().any(|(_, p)| p == "3g.20gb"), "{mig:?}");
    let gamma_gpu = m
        .select("tally_tenant_gpu_memory_bytes", &[("tenant", "gamma")])
        .next()
        .expect("gamma holds a MIG instance")
        .labels["gpu"]
        .clone();
    assert!(gamma_gpu.starts_with("2/"), "gamma on {gamma_gpu}");
    assert_eq!(
        m.value("tally_tenant_gpu_memory_bytes", &[("tenant", "gamma")]),
        Some(10.0 * GIB)
    );
    // NVML has no per-process SM on MIG: no SM series there, not a guess.
    assert_eq!(
        m.select("tally_tenant_gpu_sm_seconds_total", &[("tenant", "gamma")])
            .count(),
        0
    );
    // GPU 1 is held by nobody.
    assert_eq!(
        m.value("tally_gpu_state", &[("gpu", "1"), ("state", "free")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("tally_gpu_state", &[("gpu", "0"), ("state", "busy")]),
        Some(1.0)
    );

    // Conservation over an interval: two scrapes, the deltas must add up.
    let before = Scrape::of(&agent);
    agent.wait_samples(10);
    let after = Scrape::of(&agent);
    let checked = assert_conserved(&before, &after);
    assert!(checked.len() >= 7, "every device checked: {checked:?}");
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.metrics.increase(&before.metrics, name, labels);
    // GPU 0 split by memory: acme 2/3, beta 1/3 of the time.
    let acme = delta(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    let beta = delta(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "beta"), ("gpu", "0")],
    );
    close(acme, 2.0 * beta, "acme holds twice beta's memory on gpu 0");
    // SM seconds: the registered utilization times the interval.
    let obs0 = delta("tally_gpu_observed_seconds_total", &[("gpu", "0")]);
    close(
        delta(
            "tally_tenant_gpu_sm_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        ),
        0.5 * obs0,
        "acme SM seconds",
    );
    // GPU 1: all of it is idle.
    close(
        delta(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "_idle"), ("gpu", "1")],
        ),
        delta("tally_gpu_observed_seconds_total", &[("gpu", "1")]),
        "idle GPU 1",
    );
    // acme works harder than beta on the same GPU: it gets more energy.
    let e = |t: &str| {
        delta(
            "tally_tenant_gpu_energy_joules_total",
            &[("tenant", t), ("gpu", "0")],
        )
    };
    assert!(
        e("acme") > e("beta"),
        "acme {} vs beta {}",
        e("acme"),
        e("beta")
    );
    drop(tenants);
}

#[test]
fn a_process_that_exits_is_forgotten_and_its_memory_released() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let mut tenants = start_tenants(&node);
    let agent = agent(&node);
    agent.wait_samples(2);
    assert_eq!(gpu_memory(&agent.metrics(), "acme", "0"), Some(8.0 * GIB));
    tenants.procs[0].kill();
    wait_for(
        "acme's memory to be released",
        Duration::from_secs(30),
        || {
            let v = gpu_memory(&agent.metrics(), "acme", "0");
            (v == Some(0.0)).then_some(())
        },
    );
    // Its accumulated time stays: counters never go back.
    let m = agent.metrics();
    assert!(
        m.value(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")]
        )
        .unwrap()
            > 0.0
    );
}

#[test]
fn a_lost_gpu_is_marked_and_the_others_keep_sampling() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let _tenants = start_tenants(&node);
    let agent = agent(&node);
    agent.wait_samples(2);
    let before_gap = agent.metrics();
    node.set_lost(1, true);
    wait_for("gpu 1 to be lost", Duration::from_secs(30), || {
        let m = agent.metrics();
        (m.value("tally_gpu_state", &[("gpu", "1"), ("state", "lost")]) == Some(1.0)).then_some(())
    });
    let before = agent.metrics();
    agent.wait_samples(3);
    let after = agent.metrics();
    let held = |m: &Metrics| {
        m.value(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        )
        .unwrap()
    };
    assert!(held(&after) > held(&before), "GPU 0 is still accounted");
    // The lost GPU keeps its identity and gets no accounted time meanwhile.
    let obs = |m: &Metrics| {
        m.value("tally_gpu_observed_seconds_total", &[("gpu", "1")])
            .unwrap()
    };
    assert_eq!(obs(&after), obs(&before));
    assert!(after.value("tally_gpu_info", &[("gpu", "1")]).is_some());
    // Logged once, with the reason, not every sample.
    let log = agent.log_text();
    assert_eq!(log.matches("GPU marked unhealthy").count(), 1, "{log}");
    assert!(
        log.contains("fell off the bus"),
        "the reason is logged: {log}"
    );
    node.set_lost(1, false);
    wait_for("gpu 1 to come back", Duration::from_secs(30), || {
        let m = agent.metrics();
        (m.value("tally_gpu_state", &[("gpu", "1"), ("state", "free")]) == Some(1.0)).then_some(())
    });
    // Energy drawn while the GPU was lost is not dropped: the counter's
    // whole delta across the gap is on tenants, `_unattributed` included.
    agent.wait_samples(2);
    let after_gap = agent.metrics();
    let energy = |m: &Metrics, name: &str| m.sum(name, &[("gpu", "1")]);
    let device = energy(&after_gap, "tally_gpu_energy_joules_total")
        - energy(&before_gap, "tally_gpu_energy_joules_total");
    let tenants = energy(&after_gap, "tally_tenant_gpu_energy_joules_total")
        - energy(&before_gap, "tally_tenant_gpu_energy_joules_total");
    close(tenants, device, "energy across the gap");
    assert!(
        after_gap
            .value(
                "tally_tenant_gpu_energy_joules_total",
                &[("tenant", "_unattributed"), ("gpu", "1")]
            )
            .is_some_and(|e| e > 0.0),
        "the gap's energy is unattributed"
    );
}

#[test]
fn xid_events_are_counted_per_code() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let agent = agent(&node);
    agent.wait_samples(1);
    node.inject_xid(0, 79);
    node.inject_xid(0, 79);
    node.inject_xid(1, 48);
    wait_for("XID counts", Duration::from_secs(30), || {
        let m = agent.metrics();
        let a = m.value("tally_gpu_xid_errors_total", &[("gpu", "0"), ("xid", "79")]);
        let b = m.value("tally_gpu_xid_errors_total", &[("gpu", "1"), ("xid", "48")]);
        (a == Some(2.0) && b == Some(1.0)).then_some(())
    });
    // Delivered once: later samples do not count them again.
    agent.wait_samples(3);
    let m = agent.metrics();
    assert_eq!(
        m.value("tally_gpu_xid_errors_total", &[("gpu", "0"), ("xid", "79")]),
        Some(2.0)
    );
}

#[test]
fn metrics_are_gzipped_only_when_the_scraper_asks() {
    // Needs no root: the simulated GPUs' series are enough.
    let node = SimNode::standard();
    let agent = agent(&node);
    agent.wait_samples(2);
    let client = tally_e2e::Client::new(agent.addr);
    let get = |accept: Option<&str>| {
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("Accept-Encoding", a)).into_iter().collect();
        let r = client.request("GET", "/metrics", &headers, b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.head.contains("vary: Accept-Encoding"), "{}", r.head);
        r
    };
    let families = |text: &str| -> Vec<String> {
        let mut names: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect();
        names.sort();
        names
    };

    let plain = get(None);
    assert!(!plain.head.contains("content-encoding"), "{}", plain.head);
    let text = plain.text();
    assert!(text.ends_with("# EOF\n"));
    Metrics::parse(&text);

    let gz = get(Some("deflate, gzip;q=0.8"));
    assert!(gz.head.contains("content-encoding: gzip"), "{}", gz.head);
    let mut unzipped = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&gz.body[..]),
        &mut unzipped,
    )
    .expect("a gzip body");
    assert!(gz.body.len() < unzipped.len() / 2, "gzip shrinks the text");
    Metrics::parse(&unzipped);
    assert_eq!(families(&unzipped), families(&text));

    // Refused by q=0, or not offered: the plain text.
    for accept in ["gzip;q=0", "br, identity"] {
        let r = get(Some(accept));
        assert!(!r.head.contains("content-encoding"), "{accept}: {}", r.head);
        assert!(r.text().ends_with("# EOF\n"), "{accept}");
    }
}

#[test]
fn without_nvml_the_agent_still_serves_its_health() {
    // Needs no root: no cgroups, no probes are the point.
    let node = SimNode::standard();
    let addr = format!("127.0.0.1:{}", tally_e2e::free_port());
    let config = node.dir.path().join("a.toml");
    std::fs::write(&config, CONFIG).unwrap();
    node.pin_here(&config);
    let log = node.dir.path().join("a.log");
    let child = Command::new(tally_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .args([
            "--listen",
            &addr,
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = tally_e2e::ChildGuard(child);
    let addr = addr.parse().unwrap();
    wait_for("readyz", Duration::from_secs(30), || {
        matches!(tally_e2e::http_get(addr, "/readyz"), Ok((200, _))).then_some(())
    });
    let (status, body) = tally_e2e::http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let m = Metrics::parse(&body);
    assert_eq!(m.sum("tally_nvml_up", &[]), 0.0);
    assert!(m.value("tally_build_info", &[]).is_some());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("/nonexistent/libnvidia-ml.so.1"), "{text}");
    assert!(text.contains("--nvml-lib"), "{text}");
    assert_eq!(
        text.matches("cannot open NVML").count(),
        1,
        "logged once: {text}"
    );
}

#[test]
fn a_bad_scenario_is_reported_and_the_agent_stays_up() {
    let node =
        SimNode::new("[[gpu]]\nmodel = \"X\"\nmemory_mib = 0\npower_idle_w = 1\npower_max_w = 2\n");
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    let m = agent.metrics();
    assert_eq!(m.sum("tally_nvml_up", &[]), 0.0);
    let log = agent.log_text();
    assert!(
        log.contains("scenario.toml"),
        "the simulator names the file: {log}"
    );
}

#[test]
fn bad_state_files_are_skipped_and_good_ones_counted() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let tenants = start_tenants(&node);
    std::fs::write(node.state.join("procs/12345.toml"), "gpu = \"zero\"\n").unwrap();
    std::fs::write(node.state.join("procs/not-a-pid.toml"), "gpu = 0\n").unwrap();
    let agent = agent(&node);
    agent.wait_samples(2);
    let m = agent.metrics();
    assert_eq!(gpu_memory(&m, "acme", "0"), Some(8.0 * GIB));
    drop(tenants);
}

#[test]
fn config_check_reports_every_problem_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nsample_interval = \"soon\"\n[[tenant.rule]]\ncgroup = '('\n[[tenant.rule]]\nusr = true\n",
    )
    .unwrap();
    let out = Command::new(tally_bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml: 3 problems"), "{err}");
    assert!(err.contains("agent"), "{err}");
    assert!(err.contains("tenant.rule[0].cgroup"), "{err}");
    assert!(
        err.contains("tenant.rule[1]") && err.contains("usr"),
        "{err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, CONFIG).unwrap();
    let out = Command::new(tally_bin())
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn doctor_names_what_is_missing() {
    let out = Command::new(tally_bin())
        .args(["doctor", "--nvml-lib", "/nonexistent/libnvidia-ml.so.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("[FAIL] nvml"), "{text}");
    assert!(text.contains("cgroups"), "{text}");
    // Every check says its verdict, then one summary line counts them.
    for check in [
        "kubelet",
        "delegation",
        "state-dir",
        "log-dirs",
        "aggregator",
    ] {
        assert!(text.contains(&format!("] {check} ")), "{check}: {text}");
    }
    let last = text.lines().last().unwrap_or_default();
    let counts: Vec<usize> = last
        .split(", ")
        .filter_map(|p| p.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 3, "summary `N ok, N warn, N fail`: {last}");
    assert_eq!(
        counts.iter().sum::<usize>(),
        text.lines().count() - 1,
        "{text}"
    );
    let out = Command::new(tally_bin())
        .args([
            "doctor",
            "--output",
            "json",
            "--nvml-lib",
            "/nonexistent/lib.so",
        ])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert!(!out.status.success());
    assert_eq!(doc["checks"][0]["name"], "nvml", "{doc}");
    assert_eq!(doc["checks"][0]["status"], "fail", "{doc}");
    assert!(doc["summary"]["fail"].as_u64() >= Some(1), "{doc}");
    let out = Command::new(tally_bin())
        .args(["doctor", "--nvml-lib"])
        .arg(sim_lib())
        .env("TALLY_SIM_SCENARIO", &SimNode::standard().scenario)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 GPU(s)"), "{text}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let node = SimNode::standard();
    let agent = Agent::start(&node, CONFIG, &["--log-format", "json"]);
    agent.wait_samples(1);
    let log = agent.log_text();
    assert!(!log.trim().is_empty(), "the agent logged nothing");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

/// A test's agent pins its maps beneath its node, not in the machine's
/// `/sys/fs/bpf/tally` (an agent of the machine may hold that one), and
/// the node takes them away with it.
#[test]
fn a_test_agent_pins_on_its_node_and_the_node_removes_them() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let pins = node.pin_dir.clone();
    let agent = Agent::start(&node, CONFIG, &[]);
    agent.wait_samples(1);
    assert!(
        pins.join("tally_net").exists(),
        "no maps in {}",
        pins.display()
    );
    drop(agent);
    drop(node);
    assert!(!pins.exists(), "{} left behind", pins.display());
}
