//! Waste end to end: a real `tally agent` on the NVML simulator reporting
//! to a real `tally aggregator` (SQLite), with a short `[states]
//! idle_after`.
//!
//! A tenant holds an H100 doing nothing: while it does, the cluster view
//! lists the GPU as reclaimable with its tenant, workload and cost so far;
//! afterwards its chargeback line's `idle_gpu_hours` is the time it held
//! the GPU past the idle threshold (±2 s), priced as a part of its GPU
//! cost in JSON and CSV. A tenant whose GPU works is charged no idle time.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use tally_e2e::{
    Agent, Cgroup, SimNode,
    aggregator_support::{ADMIN_TOKEN, Aggregator, agent_config, gpu_hour_price, sqlite, subdir},
    now_ms, require_root, unique, wait_for,
};

/// `[states] idle_after` of the agent under test: longer than the ±2 s
/// the idle time is checked to, so that counting from when the GPU began
/// doing nothing (not from the threshold) fails the test.
const IDLE_AFTER_S: f64 = 3.0;
/// How long acme holds its GPU doing nothing.
const HELD: Duration = Duration::from_secs(8);

/// A period around everything the test reports.
fn period() -> String {
    format!("from=0&to={}", now_ms() / 1000 + 3600)
}

#[test]
fn idle_held_time_is_counted_priced_and_reclaimable() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let base = unique("e2e-waste");
    let rules = format!(
        "[[tenant.rule]]\ncgroup = '/{base}/(?P<tenant>[^/]+)/(?P<workload>[^/]+)$'\n\n\
         [states]\nidle_after = \"{IDLE_AFTER_S}s\"\n"
    );
    let node = SimNode::standard();
    let idle_cg = Cgroup::create(&format!("{base}/acme/job-1"));
    let busy_cg = Cgroup::create(&format!("{base}/beta/train"));
    let state = subdir(dir.path(), "state");
    let agent = Agent::start(
        &node,
        &agent_config(&agg.url(), "n1", &state, &dir.path().join("agg"), &rules),
        &["--sample-interval", "200ms"],
    );
    agent.wait_samples(2);

    // acme holds H100 0 and does nothing; beta keeps H100 1 busy.
    let mut idle = idle_cg.spawn("sleep", &["600"]);
    let mut busy = busy_cg.spawn("sleep", &["600"]);
    let started = Instant::now();
    node.register(idle.pid(), 0, None, 4096, 0.0);
    node.register(busy.pid(), 1, None, 4096, 0.8);

    // While it is idle, the cluster view says whose it is and what it
    // has cost so far.
    let reclaimable = wait_for(
        "GPU 0 to be reclaimable with some idle time",
        Duration::from_secs(30),
        || {
            let (status, body) = agg.get("/api/v1/cluster", Some(ADMIN_TOKEN));
            assert_eq!(status, 200, "{body}");
            let view: serde_json::Value = serde_json::from_str(&body).unwrap();
            view["reclaimable"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["gpu"] == "0" && r["idle_seconds"].as_f64().unwrap() >= 1.0)
                .cloned()
        },
    );
    assert_eq!(reclaimable["node"], "n1", "{reclaimable}");
    assert_eq!(reclaimable["tenants"][0], "acme", "{reclaimable}");
    assert_eq!(
        reclaimable["workloads"][0]["workload"], "job-1",
        "{reclaimable}"
    );
    assert!(reclaimable["idle_since_ms"].as_i64().unwrap() > 0);
    let cost: f64 = reclaimable["cost_so_far"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cost > 0.0, "{reclaimable}");
    let (_, view) = agg.get("/api/v1/cluster", Some(ADMIN_TOKEN));
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert!(
        view["reclaimable"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["gpu"] != "1"),
        "the busy GPU is not reclaimable: {view}"
    );

    sleep(HELD.saturating_sub(started.elapsed()));
    let m = agent.metrics();
    let counted = m
        .value(
            "tally_tenant_gpu_idle_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        )
        .expect("acme's idle-allocated counter");
    assert!(counted > 0.0, "{counted}");
    node.unregister(idle.pid());
    node.unregister(busy.pid());
    let held = started.elapsed().as_secs_f64();
    idle.kill();
    busy.kill();
    agent.wait_samples(3);
    // Stopping delivers the last interval.
    assert!(agent.stop().success());

    let c = agg.chargeback(&period());
    let line = |tenant: &str| -> serde_json::Value {
        c["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["tenant"] == tenant)
            .unwrap_or_else(|| panic!("no line for {tenant}: {c}"))
            .clone()
    };
    let acme = line("acme");
    let idle_s = acme["idle_gpu_hours"].as_f64().unwrap() * 3600.0;
    let expected = held - IDLE_AFTER_S;
    assert!(
        (idle_s - expected).abs() <= 2.0,
        "acme held GPU 0 idle {idle_s:.2} s past the threshold, the test {expected:.2} s: {acme}"
    );
    // Priced at the H100's GPU-hour price, a part of the GPU cost.
    let minor = |v: &serde_json::Value| -> i64 {
        (v.as_str().unwrap().parse::<f64>().unwrap() * 100.0).round() as i64
    };
    let priced = acme["idle_gpu_hours"].as_f64().unwrap() * gpu_hour_price("NVIDIA H100 80GB HBM3");
    assert!(
        (minor(&acme["idle_cost"]) as f64 - priced * 100.0).abs() <= 1.0,
        "{acme}"
    );
    assert!(
        minor(&acme["idle_cost"]) < minor(&acme["gpu_cost"]),
        "{acme}"
    );
    assert_eq!(line("beta")["idle_cost"], "0.00", "beta's GPU worked");

    let (status, csv) = agg.get(
        &format!("/api/v1/chargeback?{}&format=csv", period()),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{csv}");
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    let header = r.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let acme_row = r
        .records()
        .map(Result::unwrap)
        .find(|rec| &rec[col("tenant")] == "acme")
        .expect("acme's CSV row");
    assert_eq!(
        &acme_row[col("idle_cost")],
        acme["idle_cost"].as_str().unwrap()
    );
}
