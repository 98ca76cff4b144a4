//! Workloads and clusters end to end: real `tally agent`s on the NVML
//! simulator reporting to a real `tally aggregator` (SQLite).
//!
//! - one tenant runs two workloads of different lengths (a `cgroup` rule's
//!   `workload` group names them): `group_by=tenant,workload` gives each
//!   the seconds it held its GPU (±2 s), in JSON, CSV and FOCUS, and the
//!   workload lines sum to the tenant's line to the cent;
//! - two agents with different `[report] cluster` names give separate
//!   lines with `group_by=cluster,tenant`, and `cluster=` keeps one.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use tally_e2e::{
    Agent, Cgroup, SimNode,
    aggregator_support::{ADMIN_TOKEN, Aggregator, agent_config, sqlite, subdir},
    now_ms, require_root, unique,
};

/// The chargeback's lines of `query` (admin).
fn lines(agg: &Aggregator, query: &str) -> Vec<serde_json::Value> {
    agg.chargeback(query)["lines"].as_array().unwrap().clone()
}

/// A period around everything these tests report.
fn period() -> String {
    format!("from=0&to={}", now_ms() / 1000 + 3600)
}

#[test]
fn each_workload_is_charged_its_own_time_and_they_sum_to_the_tenant() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let base = unique("e2e-workloads");
    let rules =
        format!("[[tenant.rule]]\ncgroup = '/{base}/(?P<tenant>[^/]+)/(?P<workload>[^/]+)$'\n");
    let node = SimNode::standard();
    let short_cg = Cgroup::create(&format!("{base}/acme/short"));
    let long_cg = Cgroup::create(&format!("{base}/acme/long"));
    let state = subdir(dir.path(), "state");
    let tokens = dir.path().join("agg");
    let agent = Agent::start(
        &node,
        &agent_config(&agg.url(), "n1", &state, &tokens, &rules),
        &["--sample-interval", "200ms"],
    );
    agent.wait_samples(2);

    // Each workload on an H100 of its own: it holds the whole GPU for as
    // long as it is registered.
    let mut short = short_cg.spawn("sleep", &["600"]);
    let mut long = long_cg.spawn("sleep", &["600"]);
    let started = Instant::now();
    node.register(short.pid(), 0, None, 4096, 0.4);
    node.register(long.pid(), 1, None, 8192, 0.6);
    sleep(Duration::from_secs(3));
    node.unregister(short.pid());
    let short_held = started.elapsed().as_secs_f64();
    sleep(Duration::from_secs(5));
    node.unregister(long.pid());
    let long_held = started.elapsed().as_secs_f64();
    short.kill();
    long.kill();
    agent.wait_samples(3);
    // Stopping delivers the last interval: every query sees one ledger.
    assert!(agent.stop().success());

    let q = format!("{}&group_by=tenant,workload", period());
    let by_workload = lines(&agg, &q);
    let acme: Vec<&serde_json::Value> = by_workload
        .iter()
        .filter(|l| l["tenant"] == "acme")
        .collect();
    let held = |workload: &str| -> f64 {
        let l = acme
            .iter()
            .find(|l| l["workload"] == workload)
            .unwrap_or_else(|| panic!("no line for workload {workload}: {by_workload:?}"));
        // Whole GPUs: a GPU-hour is an hour held.
        l["gpu_hours"].as_f64().unwrap() * 3600.0
    };
    for (workload, expected) in [("short", short_held), ("long", long_held)] {
        let got = held(workload);
        assert!(
            (got - expected).abs() <= 2.0,
            "workload {workload} held its GPU {got:.2} s, the test {expected:.2} s"
        );
    }
    assert!(held("long") > held("short") + 3.0, "{by_workload:?}");

    let by_tenant = lines(&agg, &format!("{}&group_by=tenant", period()));
    let tenant = by_tenant
        .iter()
        .find(|l| l["tenant"] == "acme")
        .expect("acme's line");
    let parts: i64 = acme.iter().map(|l| l["cost_minor"].as_i64().unwrap()).sum();
    assert!(parts > 0);
    assert_eq!(
        parts,
        tenant["cost_minor"].as_i64().unwrap(),
        "acme's workload lines {acme:?} sum to its line {tenant}"
    );

    // Every format takes the grouping, with the workload in it.
    for format in ["csv", "focus"] {
        let (status, body) = agg.get(
            &format!("/api/v1/chargeback?{q}&format={format}"),
            Some(ADMIN_TOKEN),
        );
        assert_eq!(status, 200, "format={format}: {body}");
        assert!(body.contains("long"), "format={format}: {body}");
    }
    let (status, csv) = agg.get(
        &format!("/api/v1/chargeback?{q}&format=csv"),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200);
    assert!(csv.starts_with("tenant,workload,"), "{csv}");
    let (status, body) = agg.get(
        &format!("/api/v1/chargeback?{}&group_by=tenant,job", period()),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("tenant,workload"), "{body}");
}

#[test]
fn two_clusters_give_separate_lines() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let base = unique("e2e-clusters");
    let tokens = dir.path().join("agg");
    let mut agents = Vec::new();
    let mut procs = Vec::new();
    let mut nodes = Vec::new();
    for (name, cluster) in [("n1", "prod-eu"), ("n2", "prod-us")] {
        let node = SimNode::standard();
        let cg = Cgroup::create(&format!("{base}/{name}/acme"));
        let p = cg.spawn("sleep", &["600"]);
        node.register(p.pid(), 0, None, 4096, 0.5);
        // `cluster` lands in the `[report]` section agent_config opens.
        let rest = format!(
            "cluster = \"{cluster}\"\n\n[[tenant.rule]]\n\
             cgroup = '/{base}/{name}/(?P<tenant>[^/]+)$'\n"
        );
        let state = subdir(dir.path(), &format!("state-{name}"));
        agents.push(Agent::start(
            &node,
            &agent_config(&agg.url(), name, &state, &tokens, &rest),
            &["--sample-interval", "200ms"],
        ));
        procs.push((p, cg));
        nodes.push(node);
    }
    for a in &agents {
        a.wait_samples(10);
    }
    for a in agents {
        assert!(a.stop().success());
    }
    drop(procs);

    let by_cluster = lines(&agg, &format!("{}&group_by=cluster,tenant", period()));
    let acme: Vec<(&str, f64)> = by_cluster
        .iter()
        .filter(|l| l["tenant"] == "acme")
        .map(|l| {
            (
                l["cluster"].as_str().unwrap(),
                l["gpu_hours"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        acme.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ["prod-eu", "prod-us"],
        "{by_cluster:?}"
    );
    assert!(acme.iter().all(|(_, h)| *h > 0.0), "{acme:?}");

    let eu = lines(
        &agg,
        &format!("{}&group_by=cluster,tenant&cluster=prod-eu", period()),
    );
    assert!(!eu.is_empty());
    assert!(eu.iter().all(|l| l["cluster"] == "prod-eu"), "{eu:?}");
    let same = |l: &serde_json::Value| (l["gpu_hours"].as_f64().unwrap() - acme[0].1).abs() < 1e-12;
    let eu_acme = eu.iter().find(|l| l["tenant"] == "acme").unwrap();
    assert!(same(eu_acme), "{eu_acme} vs {acme:?}");
    // Filtered without the grouping: only prod-eu's usage, per tenant.
    let eu_only = lines(&agg, &format!("{}&cluster=prod-eu", period()));
    let line = eu_only.iter().find(|l| l["tenant"] == "acme").unwrap();
    assert!(same(line), "{line} vs {acme:?}");
    assert!(line.get("cluster").is_none(), "{line}");

    // FOCUS names the cluster as the row's region.
    let (status, focus) = agg.get(
        &format!(
            "/api/v1/chargeback?{}&group_by=cluster,tenant&format=focus",
            period()
        ),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{focus}");
    let mut r = csv::Reader::from_reader(focus.as_bytes());
    let header = r.headers().unwrap().clone();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name} in {header:?}"))
    };
    let (region, sub) = (col("RegionId"), col("SubAccountId"));
    let regions: std::collections::BTreeSet<String> = r
        .records()
        .map(Result::unwrap)
        .filter(|rec| &rec[sub] == "acme")
        .map(|rec| rec[region].to_owned())
        .collect();
    assert_eq!(
        regions.into_iter().collect::<Vec<_>>(),
        ["prod-eu", "prod-us"]
    );
    let (status, body) = agg.get(
        &format!("/api/v1/chargeback?{}&cluster=", period()),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 400, "an empty cluster is refused: {body}");
}
