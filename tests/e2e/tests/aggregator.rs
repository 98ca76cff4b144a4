//! The aggregator end to end: real `tally agent`s on the NVML simulator
//! reporting to a real `tally aggregator` on SQLite and on PostgreSQL
//! (`TALLY_TEST_POSTGRES_URL`, set by `cargo xtask test`; skipped without).
//!
//! - bad input gets the right 4xx with a reason and leaves the ledger
//!   unchanged; a repeated report is acknowledged and stored once;
//! - two agents on two simulated nodes: the chargeback matches, to the
//!   cent, the price table applied to the agents' own counters;
//! - aggregator stopped, SIGKILLed while agents send, an agent restarted
//!   during an outage: the ledger ends with every report exactly once and
//!   exactly the usage the agents counted.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use tally_contract::wire::{
    AuditRecord, GENESIS_SHA256, GpuGauge, GpuUsage, Report, SCHEMA_VERSION, TenantQuota,
};
use tally_e2e::{
    Agent, Cgroup, ChildGuard, SimNode,
    aggregator_support::{
        ACME_TOKEN, ADMIN_TOKEN, AGENT_TOKEN, Aggregator, Backend, ENERGY_KWH_PRICE, LedgerReader,
        NETWORK_GIB_PRICE, add_counters, agent_config, gpu_hour_price, postgres, report_state,
        reported_counters, spooled, sqlite, subdir,
    },
    now_ms, require_root, skip, tally_bin, unique, wait_for,
};

const LONG: Duration = Duration::from_secs(60);

/// [`wait_for`], but a timeout shows the aggregator's log.
fn wait_logged<T>(agg: &Aggregator, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < LONG,
            "timed out waiting for {what}; aggregator log:\n{}",
            agg.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pg_or_skip() -> Option<Backend> {
    let b = postgres();
    if b.is_none() {
        skip("TALLY_TEST_POSTGRES_URL not set (cargo xtask test starts a PostgreSQL)");
    }
    b
}

// ------------------------------------------------------------ bad input

fn report(node: &str, seq: u64) -> Report {
    Report {
        version: SCHEMA_VERSION,
        node: node.into(),
        boot_id: "boot-1".into(),
        seq,
        interval_start_ms: 1_700_000_000_000,
        interval_end_ms: 1_700_000_010_000,
        gpu_usage: vec![GpuUsage {
            tenant: "acme".into(),
            gpu: "0".into(),
            uuid: "GPU-0".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            mig_profile: None,
            slice_fraction: 1.0,
            allocated_us: 10_000_000,
            sm_us: Some(5_000_000),
            memory_byte_seconds: 10 << 30,
            energy_mj: 3_000_000,
            workload: None,
            idle_us: 0,
        }],
        io_usage: vec![],
        // Absent values (NULLs in the ledger) on purpose: PostgreSQL must
        // take them too.
        gpus: vec![GpuGauge {
            gpu: "0".into(),
            uuid: "GPU-0".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            health: "ok".into(),
            ..Default::default()
        }],
        audit: vec![],
        report_interval_ms: Some(10_000),
        tenant_quotas: vec![TenantQuota {
            tenant: "acme".into(),
            resource: "gpu_memory".into(),
            limit: 1e9,
            usage: None,
        }],
        cluster: None,
    }
}

fn expect(agg: &Aggregator, what: &str, got: (u16, String), status: u16, reason: &str) {
    assert_eq!(
        got.0, status,
        "{what}: expected {status}, got {}: {}",
        got.0, got.1
    );
    assert!(
        got.1.contains(reason),
        "{what}: the answer should say `{reason}`: {}",
        got.1
    );
    let _ = agg;
}

/// What is sent, with which token, and the status and reason expected.
type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, u16, &'a str);

fn bad_input_is_refused(backend: Backend, dir: &Path) {
    let agg = Aggregator::start(dir, &backend, "max_body = \"64KiB\"");
    let ledger = LedgerReader::new(&backend);
    let body = |r: &Report| serde_json::to_vec(r).unwrap();

    let first = report("n1", 1);
    expect(
        &agg,
        "a valid report",
        agg.post(&body(&first), Some(AGENT_TOKEN)),
        200,
        "stored",
    );
    let before = ledger.fingerprint();
    expect(
        &agg,
        "the same report again",
        agg.post(&body(&first), Some(AGENT_TOKEN)),
        208,
        "duplicate",
    );
    assert_eq!(ledger.fingerprint(), before, "a duplicate is stored once");

    let mut v2 = serde_json::to_value(report("n1", 2)).unwrap();
    v2["version"] = 2.into();
    let mut negative = serde_json::to_value(report("n1", 3)).unwrap();
    negative["gpu_usage"][0]["energy_mj"] = (-5).into();
    let mut impossible = report("n1", 4);
    impossible.gpu_usage[0].allocated_us = 3_600_000_000;
    let mut bad_fraction = report("n1", 5);
    bad_fraction.gpu_usage[0].slice_fraction = 7.0;
    let mut conflict = report("n1", 1);
    conflict.gpu_usage[0].energy_mj = 1;
    let mut oversized = report("n1", 6);
    oversized.gpu_usage[0].tenant = "x".repeat(200);
    oversized.gpu_usage = vec![oversized.gpu_usage[0].clone(); 400];
    let cases: Vec<Case<'_>> = vec![
        (
            "malformed JSON",
            b"{\"version\": 1, \"node\": ".to_vec(),
            Some(AGENT_TOKEN),
            400,
            "malformed JSON",
        ),
        (
            "wrong schema version",
            serde_json::to_vec(&v2).unwrap(),
            Some(AGENT_TOKEN),
            422,
            "schema version 2",
        ),
        (
            "negative value",
            serde_json::to_vec(&negative).unwrap(),
            Some(AGENT_TOKEN),
            422,
            "invalid value",
        ),
        (
            "more GPU time than the interval",
            body(&impossible),
            Some(AGENT_TOKEN),
            422,
            "exceeds the interval",
        ),
        (
            "slice fraction above 1",
            body(&bad_fraction),
            Some(AGENT_TOKEN),
            422,
            "slice_fraction",
        ),
        (
            "a different report under a stored seq",
            body(&conflict),
            Some(AGENT_TOKEN),
            409,
            "different report",
        ),
        (
            "oversized body",
            body(&oversized),
            Some(AGENT_TOKEN),
            413,
            "larger than",
        ),
        (
            "no token",
            body(&report("n1", 7)),
            None,
            401,
            "bearer token",
        ),
        (
            "unknown token",
            body(&report("n1", 7)),
            Some("not-a-token-at-all-0123"),
            401,
            "bearer token",
        ),
        (
            "a tenant token",
            body(&report("n1", 7)),
            Some(ACME_TOKEN),
            403,
            "may not write",
        ),
    ];
    for (what, b, token, status, reason) in cases {
        expect(&agg, what, agg.post(&b, token), status, reason);
        assert_eq!(ledger.fingerprint(), before, "{what}: the ledger changed");
    }

    // Readers: scope and role.
    let q = "/api/v1/chargeback?from=0&to=9999999999&group_by=tenant";
    assert_eq!(agg.get(q, None).0, 401);
    assert_eq!(
        agg.get(q, Some(AGENT_TOKEN)).0,
        403,
        "agent tokens only write"
    );
    assert_eq!(
        agg.get(&format!("{q}&tenant=globex"), Some(ACME_TOKEN)).0,
        403
    );
    let (status, text) = agg.get(q, Some(ACME_TOKEN));
    assert_eq!(status, 200, "{text}");
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lines = c["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{c}");
    assert_eq!(lines[0]["tenant"], "acme");
    // 10 s of an H100 at 9000/h = 25.00; 3 kJ (0.000833 kWh) at 1000/kWh = 0.83.
    assert_eq!(lines[0]["cost"], "25.83", "{c}");
    let (status, text) = agg.get("/api/v1/chargeback?to=5", Some(ADMIN_TOKEN));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("`from` is required"), "{text}");

    let m = agg.metrics();
    assert_eq!(
        m.value("tally_aggregator_reports_total", &[("result", "stored")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("tally_aggregator_reports_total", &[("result", "duplicate")]),
        Some(1.0)
    );
    assert!(m.sum("tally_aggregator_ingest_duration_seconds_count", &[]) >= 12.0);
    wait_for("cluster totals on /metrics", LONG, || {
        let m = agg.metrics();
        (m.value(
            "tally_cluster_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme")],
        ) == Some(10.0))
        .then_some(())
    });
}

#[test]
fn bad_input_is_refused_and_the_ledger_unchanged_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    bad_input_is_refused(sqlite(dir.path()), dir.path());
}

#[test]
fn bad_input_is_refused_and_the_ledger_unchanged_postgres() {
    let Some(backend) = pg_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    bad_input_is_refused(backend, dir.path());
}

#[test]
fn config_check_knows_the_aggregator_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = tally_e2e::aggregator_support::write_config(dir.path(), &sqlite(dir.path()), "");
    let out = Command::new(tally_bin())
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("aggregator config"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[ledger]\nurl = \"mysql://x\"\n[prices]\ncurrency = \"usd\"\n[[auth.token]]\nrole = \"boss\"\n",
    )
    .unwrap();
    let out = Command::new(tally_bin())
        .args(["config", "check", "--aggregator"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["ledger.url", "prices.currency", "auth.token[0].role"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

// ------------------------------------------------ two agents, to the cent

/// Cost in cents of one tenant on one node, from its snapshot counters.
fn expected_cents(snap: &serde_json::Value, tenant: &str) -> i64 {
    let gpus = snap["gpus"].as_array().unwrap();
    let model_of = |uuid: &str| -> (String, f64) {
        let g = gpus
            .iter()
            .find(|g| g["uuid"] == uuid)
            .expect("device in snapshot");
        let slice = g["slice_fraction"].as_f64().unwrap_or(1.0);
        let model = match g["parent_uuid"].as_str() {
            Some(p) => gpus.iter().find(|x| x["uuid"] == p).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_owned(),
            None => g["model"].as_str().unwrap().to_owned(),
        };
        (model, slice)
    };
    let mut weighted_us: BTreeMap<String, f64> = BTreeMap::new();
    let mut energy_mj = 0i64;
    for row in snap["tenant_gpu"].as_array().unwrap() {
        if row["tenant"] != tenant {
            continue;
        }
        let (model, slice) = model_of(row["uuid"].as_str().unwrap());
        let us = (row["allocated_seconds_total"].as_f64().unwrap() * 1e6).round() as i64;
        *weighted_us.entry(model).or_default() += us as f64 * slice;
        energy_mj += (row["energy_joules_total"].as_f64().unwrap() * 1e3).round() as i64;
    }
    let cents = |amount: f64| (amount * 100.0).round() as i64;
    let gpu: i64 = weighted_us
        .iter()
        .map(|(model, us)| cents(us / 3.6e9 * gpu_hour_price(model)))
        .sum();
    let energy = cents(energy_mj as f64 / 3.6e9 * ENERGY_KWH_PRICE);
    let mut net_bytes = 0i64;
    for row in snap["tenant_io"].as_array().into_iter().flatten() {
        if row["tenant"] == tenant {
            net_bytes += row["network_ingress_bytes_total"].as_i64().unwrap_or(0)
                + row["network_egress_bytes_total"].as_i64().unwrap_or(0);
        }
    }
    let net = cents(net_bytes as f64 / 1_073_741_824.0 * NETWORK_GIB_PRICE);
    gpu + energy + net
}

fn tenant_rows(snap: &serde_json::Value, tenants: &[&str]) -> Vec<serde_json::Value> {
    snap["tenant_gpu"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| tenants.iter().any(|t| r["tenant"] == *t))
        .cloned()
        .collect()
}

fn two_agents_to_the_cent(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let ledger = LedgerReader::new(&backend);
    let base = unique("e2e-agg");
    let rules = format!("[[tenant.rule]]\ncgroup = '/{base}/n[12]/(?P<tenant>[^/]+)$'\n");

    let node1 = SimNode::standard();
    let node2 = SimNode::standard();
    let acme1 = Cgroup::create(&format!("{base}/n1/acme"));
    let beta1 = Cgroup::create(&format!("{base}/n1/beta"));
    let acme2 = Cgroup::create(&format!("{base}/n2/acme"));
    let beta2 = Cgroup::create(&format!("{base}/n2/beta"));
    let mut procs: Vec<(ChildGuard, &SimNode)> = Vec::new();
    // n1: acme and beta share H100 0. n2: acme holds the A100's 3g.20gb
    // MIG instance (3/7 of the GPU), beta H100 1.
    for (cg, node, gpu, mig, mib, sm) in [
        (&acme1, &node1, 0, None, 8192, 0.5),
        (&beta1, &node1, 0, None, 4096, 0.2),
        (&acme2, &node2, 2, Some(0), 10240, 0.9),
        (&beta2, &node2, 1, None, 20480, 0.7),
    ] {
        let p = cg.spawn("sleep", &["600"]);
        node.register(p.pid(), gpu, mig, mib, sm);
        procs.push((p, node));
    }
    let state1 = subdir(dir.path(), "state-n1");
    let state2 = subdir(dir.path(), "state-n2");
    let tokens = dir.path().join("agg");
    let a1 = Agent::start(
        &node1,
        &agent_config(&agg.url(), "n1", &state1, &tokens, &rules),
        &["--sample-interval", "200ms"],
    );
    let a2 = Agent::start(
        &node2,
        &agent_config(&agg.url(), "n2", &state2, &tokens, &rules),
        &["--sample-interval", "200ms"],
    );
    a1.wait_samples(10);
    a2.wait_samples(10);
    // The workloads end: from now on acme's and beta's counters are frozen.
    for (mut p, node) in procs {
        node.unregister(p.pid());
        p.kill();
    }
    for a in [&a1, &a2] {
        wait_for("workloads gone from the snapshot", LONG, || {
            let s = a.snapshot();
            s["gpus"]
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["processes"].as_array().is_none_or(|p| p.is_empty()))
                .then_some(())
        });
        a.wait_samples(3);
    }
    let s1 = [a1.snapshot(), a2.snapshot()];
    a1.wait_samples(3);
    a2.wait_samples(3);
    let s2 = [a1.snapshot(), a2.snapshot()];
    for (a, b) in s1.iter().zip(&s2) {
        assert_eq!(
            tenant_rows(a, &["acme", "beta"]),
            tenant_rows(b, &["acme", "beta"]),
            "counters of ended workloads must not move"
        );
    }
    // Wait for reports cut after the counters froze.
    for (node, snap) in [("n1", &s2[0]), ("n2", &s2[1])] {
        let after = snap["taken_at_ms"].as_i64().unwrap() + 1000;
        wait_logged(&agg, "a report cut after the freeze", || {
            (ledger.int(&format!(
                "SELECT COALESCE(MAX(interval_end_ms), 0) FROM reports WHERE node = '{node}'"
            )) > after)
                .then_some(())
        });
    }

    // Agents report their spool and deliveries on /metrics.
    let m = a1.metrics();
    assert!(m.value("tally_report_sent_reports_total", &[]).unwrap() >= 3.0);
    wait_for("an empty spool on /metrics", LONG, || {
        (a2.metrics().value("tally_report_spool_reports", &[]) == Some(0.0)).then_some(())
    });
    // Stop the agents (their last interval is delivered) so that every
    // query below sees the same ledger.
    assert!(a1.stop().success());
    assert!(a2.stop().success());

    let to = now_ms() / 1000 + 3600;
    let c = agg.chargeback(&format!("from=0&to={to}&group_by=tenant,node"));
    let lines = c["lines"].as_array().unwrap();
    let line = |tenant: &str, node: &str| -> i64 {
        lines
            .iter()
            .find(|l| l["tenant"] == tenant && l["node"] == node)
            .unwrap_or_else(|| panic!("no line for {tenant} on {node}: {c}"))["cost_minor"]
            .as_i64()
            .unwrap()
    };
    for (node, snap) in [("n1", &s2[0]), ("n2", &s2[1])] {
        for tenant in ["acme", "beta"] {
            let want = expected_cents(snap, tenant);
            assert!(want > 0, "{tenant} on {node} used something");
            assert_eq!(line(tenant, node), want, "{tenant} on {node}: {c}");
        }
    }
    assert!(
        lines.iter().any(|l| l["tenant"] == "_idle"),
        "idle is a line: {c}"
    );
    let sum: i64 = lines
        .iter()
        .map(|l| l["cost_minor"].as_i64().unwrap())
        .sum();
    assert_eq!(
        c["total_minor"].as_i64().unwrap(),
        sum,
        "lines add up to the total"
    );

    // Grouped otherwise, and as CSV/FOCUS, the same money.
    let by_tenant = agg.chargeback(&format!("from=0&to={to}&group_by=tenant"));
    let acme_total = by_tenant["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["tenant"] == "acme")
        .unwrap()["cost_minor"]
        .as_i64()
        .unwrap();
    // One rounding per model and SKU: n1's H100 and n2's A100 stay apart.
    let acme_cents = expected_cents(&s2[0], "acme") + expected_cents(&s2[1], "acme");
    assert!(
        (acme_total - acme_cents).abs() <= 2,
        "acme over both nodes: {acme_total} vs {acme_cents}"
    );
    let (status, focus) = agg.get(
        &format!("/api/v1/chargeback?from=0&to={to}&group_by=tenant,node&format=focus"),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200);
    let billed: f64 = focus
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        (billed * 100.0).round() as i64,
        sum,
        "FOCUS BilledCost adds up"
    );
    assert!(focus.starts_with("BilledCost,EffectiveCost"), "{focus}");

    // The command line prints the same.
    let token_file = dir.path().join("agg/admin.token");
    let out = Command::new(tally_bin())
        .args(["report", "--aggregator", &agg.url(), "--from", "0", "--to"])
        .arg(to.to_string())
        .args(["--group-by", "tenant,node", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("TOTAL"), "{table}");
    assert!(
        table.contains(c["total"].as_str().unwrap()),
        "the table shows the total {}: {table}",
        c["total"]
    );

    drop((acme1, beta1, acme2, beta2));
}

#[test]
fn two_agents_chargeback_to_the_cent_sqlite() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    two_agents_to_the_cent(sqlite(dir.path()));
}

#[test]
fn two_agents_chargeback_to_the_cent_postgres() {
    if !require_root() {
        return;
    }
    let Some(backend) = pg_or_skip() else { return };
    two_agents_to_the_cent(backend);
}

// --------------------------------------------- outages lose nothing

fn outages_lose_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let ledger = LedgerReader::new(&backend);
    let tokens = dir.path().join("agg");
    // Tenant by process owner: no cgroups needed, so this runs unprivileged.
    let rules = "[[tenant.rule]]\nuser = true\n";
    let nodes = [SimNode::standard(), SimNode::standard()];
    let names = ["n1", "n2"];
    let states = [
        subdir(dir.path(), "state-n1"),
        subdir(dir.path(), "state-n2"),
    ];
    let mut workloads = Vec::new();
    for node in &nodes {
        let p = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
        node.register(p.pid(), 0, None, 4096, 0.5);
        workloads.push(p);
    }
    let start = |i: usize| {
        Agent::start(
            &nodes[i],
            &agent_config(&agg.url(), names[i], &states[i], &tokens, rules),
            &["--sample-interval", "200ms"],
        )
    };
    let mut agents = vec![start(0), start(1)];
    let stored = |node: &str| ledger.reports(node).0;
    for n in names {
        wait_logged(&agg, "first reports", || (stored(n) >= 3).then_some(()));
    }

    // 1. The aggregator is down for a while: the agents spool.
    agg.stop();
    wait_for("reports piling up in the spool", LONG, || {
        (spooled(&states[0]) >= 3 && spooled(&states[1]) >= 3).then_some(())
    });
    let m = agents[1].metrics();
    assert!(m.value("tally_report_spool_reports", &[]).unwrap() >= 1.0);
    assert!(m.value("tally_report_send_failures_total", &[]).unwrap() >= 1.0);

    // 2. An agent restarts during the outage: the new process continues
    // the sequence and its spool survives.
    let mut expected = [BTreeMap::new(), BTreeMap::new()];
    let first = agents.remove(0);
    let (addr, config) = (first.addr, first.config.clone());
    assert!(first.stop().success());
    add_counters(&mut expected[0], reported_counters(&states[0]));
    let spooled_before = spooled(&states[0]);
    assert!(spooled_before >= 3);
    agents.insert(
        0,
        Agent::start_with(&nodes[0], &config, addr, &["--sample-interval", "200ms"]),
    );

    // 3. Back again: the spools drain, oldest first.
    agg.restart();
    for s in &states {
        wait_for("spool drained", LONG, || (spooled(s) == 0).then_some(()));
    }

    // 4. SIGKILL while the agents keep sending, a few times.
    for i in 0..4u64 {
        std::thread::sleep(Duration::from_millis(150 + 70 * i));
        agg.kill();
        std::thread::sleep(Duration::from_millis(400));
        agg.restart();
    }
    for s in &states {
        wait_for("spool drained after the kills", LONG, || {
            (spooled(s) == 0).then_some(())
        });
    }

    // 5. The agents stop; their last partial interval is delivered.
    for (i, a) in agents.into_iter().enumerate() {
        assert!(a.stop().success());
        add_counters(&mut expected[i], reported_counters(&states[i]));
        assert_eq!(
            spooled(&states[i]),
            0,
            "{}: final report delivered",
            names[i]
        );
    }

    for (i, node) in names.iter().enumerate() {
        let state = report_state(&states[i]);
        let first_seq = state["first_seq"].as_i64().unwrap();
        let last_seq = state["next_seq"].as_i64().unwrap() - 1;
        let (count, min, max) = ledger.reports(node);
        assert_eq!(
            (count, min, max),
            (last_seq - first_seq + 1, first_seq, last_seq),
            "{node}: every report exactly once; log:\n{}",
            agg.log_text()
        );
        assert_eq!(
            agg.report_summary(node),
            (count, min, max),
            "{node}: GET /api/v1/reports counts what is stored"
        );
        assert_eq!(
            ledger.allocated_us(node),
            expected[i],
            "{node}: the ledger holds exactly the GPU time the agents counted"
        );
    }
    assert!(
        !agg.log_text().contains("different report"),
        "no seq was reused"
    );
    drop(workloads);
}

#[test]
fn outages_restarts_and_sigkill_lose_nothing_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    outages_lose_nothing(sqlite(dir.path()));
}

#[test]
fn outages_restarts_and_sigkill_lose_nothing_postgres() {
    let Some(backend) = pg_or_skip() else { return };
    outages_lose_nothing(backend);
}

// ------------------------------------------------------- the spool bound

/// A spool at its bound holds new intervals in the counters instead of
/// dropping reports, says so loudly, and loses nothing once the
/// aggregator is back.
#[test]
fn a_full_spool_is_loud_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let mut agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let ledger = LedgerReader::new(&backend);
    agg.stop();
    let node = SimNode::standard();
    let work = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    node.register(work.pid(), 0, None, 4096, 0.5);
    let state = subdir(dir.path(), "state");
    let config = agent_config(
        &agg.url(),
        "n1",
        &state,
        &dir.path().join("agg"),
        "spool_max_reports = 3\n[[tenant.rule]]\nuser = true\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    wait_for("the spool to fill up", LONG, || {
        let m = agent.metrics();
        (m.value("tally_report_spool_full_intervals_total", &[])
            .unwrap_or(0.0)
            >= 3.0)
            .then_some(())
    });
    assert_eq!(spooled(&state), 3, "the bound holds");
    let m = agent.metrics();
    assert_eq!(m.value("tally_report_spool_reports", &[]), Some(3.0));
    assert!(
        agent.log_text().contains("REPORT SPOOL FULL"),
        "{}",
        agent.log_text()
    );

    agg.restart();
    wait_for("spool drained", LONG, || {
        (spooled(&state) == 0).then_some(())
    });
    agent.wait_samples(3);
    assert!(agent.stop().success());
    assert_eq!(spooled(&state), 0);
    let st = report_state(&state);
    let (first, next) = (
        st["first_seq"].as_i64().unwrap(),
        st["next_seq"].as_i64().unwrap(),
    );
    assert_eq!(ledger.reports("n1"), (next - first, first, next - 1));
    assert_eq!(
        ledger.allocated_us("n1"),
        reported_counters(&state),
        "the intervals held while the spool was full reached the ledger"
    );
    drop(work);
}

// ------------------------------------------------------- the audit store

#[test]
fn audit_records_reach_the_central_store_and_breaks_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let node = SimNode::standard();
    let state = subdir(dir.path(), "state");
    let log_path = state.join("audit.log");
    let mut log = tally_contract::audit::AuditLog::open(&log_path, "n1").unwrap();
    log.append(
        "acme",
        "gpu_memory",
        "alert",
        serde_json::json!({"usage": 9}),
    )
    .unwrap();
    log.append(
        "beta",
        "gpu_memory",
        "throttle",
        serde_json::json!({"pids": [1]}),
    )
    .unwrap();
    let config = agent_config(
        &agg.url(),
        "n1",
        &state,
        &dir.path().join("agg"),
        "[[tenant.rule]]\nuser = true\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    let audit = |token: &str, query: &str| -> (u16, serde_json::Value) {
        let (status, body) = agg.get(&format!("/api/v1/audit?{query}"), Some(token));
        (status, serde_json::from_str(&body).unwrap_or_default())
    };
    let records = wait_logged(&agg, "two audit records", || {
        let (_, v) = audit(ADMIN_TOKEN, "");
        let r = v["records"].as_array()?.clone();
        (r.len() == 2).then_some(r)
    });
    assert!(records.iter().all(|r| r["chain_ok"] == true), "{records:?}");
    assert_eq!(records[0]["tenant"], "acme");
    assert_eq!(records[1]["record"]["detail"]["pids"][0], 1);

    // Tenant readers see their own records only.
    let (status, v) = audit(ACME_TOKEN, "");
    assert_eq!(status, 200);
    assert_eq!(v["records"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(audit(ACME_TOKEN, "tenant=beta").0, 403);
    assert_eq!(audit(AGENT_TOKEN, "").0, 403);

    // A changed record (its hash no longer matches), then a record that
    // does not follow it: both are flagged, neither is hidden.
    let mut forged: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    forged["action"] = "alert".into();
    forged["seq"] = 3.into();
    forged["prev_sha256"] = forged["sha256"].clone();
    forged["sha256"] = "f".repeat(64).into();
    let mut line = forged.to_string();
    line.push('\n');
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
        .unwrap();
    log.append("acme", "gpu_memory", "terminate", serde_json::json!({}))
        .unwrap();
    let v = wait_logged(&agg, "four audit records", || {
        let (_, v) = audit(ADMIN_TOKEN, "");
        (v["records"].as_array()?.len() == 4).then_some(v)
    });
    assert_eq!(v["chain_breaks"], 2, "{v}");
    let problems: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["problem"].as_str())
        .collect();
    assert!(problems[0].contains("content changed"), "{problems:?}");
    assert!(problems[1].contains("chain break"), "{problems:?}");
    wait_for("chain breaks on /metrics", LONG, || {
        let m = agg.metrics();
        (m.value(
            "tally_aggregator_audit_chain_breaks_total",
            &[("node", "n1")],
        ) == Some(2.0))
        .then_some(())
    });
    drop(agent);
}

/// Tenant names are checked for control characters only: one with a quote
/// and a backslash (as a cgroup named after a systemd unit has) reaches the
/// agent's and the aggregator's `/metrics` escaped, and openmetrics-parser
/// reads both scrapes back to the same name.
#[test]
fn a_tenant_named_with_quotes_and_backslashes_reaches_both_scrapes() {
    if !require_root() {
        return;
    }
    const TENANT: &str = r#"svc\x2dblue "q""#;
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let node = SimNode::standard();
    let cgroup = Cgroup::create(&format!("{}/tally/{TENANT}/job1", unique("e2e-quoted")));
    let process = cgroup.spawn("sleep", &["600"]);
    node.register(process.pid(), 0, None, 4096, 0.5);
    let config = agent_config(
        &agg.url(),
        "n1",
        &subdir(dir.path(), "state"),
        &dir.path().join("agg"),
        "[[tenant.rule]]\ncgroup = '/tally/(?P<tenant>[^/]+)/'\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    // `metrics()` panics on a scrape the parser cannot read.
    wait_for(
        "the tenant's GPU time on the agent's /metrics",
        LONG,
        || {
            agent
                .metrics()
                .value(
                    "tally_tenant_gpu_allocated_seconds_total",
                    &[("tenant", TENANT), ("gpu", "0")],
                )
                .filter(|&v| v > 0.0)
        },
    );
    wait_logged(
        &agg,
        "the tenant's GPU time on the aggregator's /metrics",
        || {
            agg.metrics()
                .value(
                    "tally_cluster_tenant_gpu_allocated_seconds_total",
                    &[("tenant", TENANT)],
                )
                .filter(|&v| v > 0.0)
        },
    );
    drop(agent);
}

// --------------------------------------------- replicas on one PostgreSQL

/// Two aggregators on one PostgreSQL get the same reports at the same time
/// (an agent retrying against another replica): each is stored once.
#[test]
fn replicas_on_one_postgres_store_each_report_once() {
    let Some(backend) = pg_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Aggregator::start(&dir.path().join("a"), &backend, "");
    let b = Aggregator::start(&dir.path().join("b"), &backend, "");
    let ledger = LedgerReader::new(&backend);
    for seq in 1..=20u64 {
        let body = serde_json::to_vec(&report("n1", seq)).unwrap();
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.post(&body, Some(AGENT_TOKEN)).0);
            let tb = s.spawn(|| b.post(&body, Some(AGENT_TOKEN)).0);
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let mut got = [ra, rb];
        got.sort();
        assert_eq!(
            got,
            [200, 208],
            "seq {seq}: one stores, the other acknowledges"
        );
    }
    assert_eq!(ledger.reports("n1"), (20, 1, 20));
    for replica in [&a, &b] {
        assert_eq!(replica.report_summary("n1"), (20, 1, 20));
    }
    assert_eq!(
        ledger.int("SELECT CAST(SUM(allocated_us) AS BIGINT) FROM gpu_usage"),
        20 * 10_000_000
    );
}

/// A report at or below the claims that raw retention removed of its
/// (node, boot) is answered 409, counted as `expired`, and changes
/// nothing; `GET /api/v1/reports` still counts the removed claims; the
/// boot's next report is stored.
#[test]
fn a_report_below_removed_claims_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let agg = Aggregator::start(dir.path(), &backend, "");
    let ledger = LedgerReader::new(&backend);
    let post = |r: &Report| agg.post(&serde_json::to_vec(r).unwrap(), Some(AGENT_TOKEN));
    for seq in 1..=4 {
        assert_eq!(post(&report("n1", seq)).0, 200);
    }
    // What a retention pass does to seqs 1-3 of boot-1.
    ledger.rows("DELETE FROM reports WHERE node = 'n1' AND seq <= 3");
    ledger.rows(
        "INSERT INTO claims_removed (node, boot_id, reports, first_seq, last_seq, \
         last_interval_end_ms) VALUES ('n1', 'boot-1', 3, 1, 3, 1700000010000)",
    );
    let (status, body) = post(&report("n1", 2));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("removed by raw retention"), "{body}");
    assert_eq!(ledger.reports("n1"), (1, 4, 4));
    assert_eq!(post(&report("n1", 4)).0, 208);
    assert_eq!(post(&report("n1", 5)).0, 200);
    assert_eq!(agg.report_summary("n1"), (5, 1, 5));
    let m = agg.metrics();
    assert_eq!(
        m.value("tally_aggregator_reports_total", &[("result", "expired")]),
        Some(1.0)
    );
}

/// `[ledger] audit_retention`: the maintenance pass removes audit records
/// older than it, by their own time, and keeps the rest as stored.
#[test]
fn audit_records_past_audit_retention_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let mut agg = Aggregator::start(dir.path(), &backend, "");
    const HOUR_MS: u64 = 3_600_000;
    let record = |time_ms: u64, prev: &str, sha: &str| AuditRecord {
        time_ms: Some(time_ms),
        tenant: Some("acme".into()),
        action: Some("alert".into()),
        prev_sha256: prev.into(),
        sha256: sha.repeat(64),
        rest: Default::default(),
    };
    let (old, new) = (now_ms() - 5 * HOUR_MS, now_ms());
    let mut r = report("n1", 1);
    r.audit = vec![record(old, GENESIS_SHA256, "a")];
    assert_eq!(
        agg.post(&serde_json::to_vec(&r).unwrap(), Some(AGENT_TOKEN))
            .0,
        200
    );
    let mut r = report("n1", 2);
    r.audit = vec![record(new, &"a".repeat(64), "b")];
    assert_eq!(
        agg.post(&serde_json::to_vec(&r).unwrap(), Some(AGENT_TOKEN))
            .0,
        200
    );
    let records = |agg: &Aggregator| {
        let (status, body) = agg.get("/api/v1/audit", Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["records"].as_array().unwrap().clone()
    };
    let before = records(&agg);
    assert_eq!(before.len(), 2, "{before:?}");

    agg.restart_with(
        "raw_retention = \"36500d\"",
        "raw_retention = \"2h\"\naudit_retention = \"2h\"",
    );
    // The maintenance pass at start removes the old record.
    let after = wait_logged(&agg, "the old audit record removed", || {
        let r = records(&agg);
        (r.len() == 1).then_some(r)
    });
    assert_eq!(after[..], before[1..]);
    // What the passes did, on /metrics once the pass has ended: the one
    // record removed, no pass failed. The restart began the counts afresh;
    // every kind is there from the start, at 0.
    let removed = |m: &tally_e2e::Metrics, kind| {
        m.value(
            "tally_aggregator_ledger_rows_removed_total",
            &[("kind", kind)],
        )
    };
    let m = tally_e2e::wait_for("the pass counted", Duration::from_secs(30), || {
        let m = agg.metrics();
        removed(&m, "audit").is_some_and(|n| n > 0.0).then_some(m)
    });
    assert_eq!(removed(&m, "audit"), Some(1.0));
    for kind in ["raw", "claims", "rollup"] {
        assert!(removed(&m, kind).is_some(), "no {kind} count");
    }
    let passes = |result| {
        m.value(
            "tally_aggregator_ledger_maintenance_passes_total",
            &[("result", result)],
        )
    };
    assert!(passes("ok").is_some_and(|n| n >= 1.0), "{:?}", passes("ok"));
    assert_eq!(passes("error"), Some(0.0));
}

/// A chargeback reaching past `[ledger] raw_retention` is read from the
/// hourly rollups, its edges rounded down to whole hours, and says so in
/// `rounded`; within retention it is read as asked, without `rounded`.
#[test]
fn past_raw_retention_chargeback_is_read_by_the_hour() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let mut agg = Aggregator::start(dir.path(), &backend, "");
    let ledger = LedgerReader::new(&backend);
    const HOUR_MS: u64 = 3_600_000;
    const MIN_MS: u64 = 60_000;
    // An hour five hours back: past the 2 h retention set below.
    let h = (now_ms() - 5 * HOUR_MS) / HOUR_MS * HOUR_MS;
    // 600 s held in its first 10 minutes, 1,200 s from then to :50.
    for (seq, start, end, held_s) in [(1, 0, 10, 600), (2, 10, 50, 1_200)] {
        let mut r = report("n1", seq);
        r.interval_start_ms = h + start * MIN_MS;
        r.interval_end_ms = h + end * MIN_MS;
        r.gpu_usage[0].allocated_us = held_s * 1_000_000;
        let (status, body) = agg.post(&serde_json::to_vec(&r).unwrap(), Some(AGENT_TOKEN));
        assert_eq!(status, 200, "{body}");
    }
    let secs = |ms: u64| ms / 1_000;
    // From :30 of that hour: only the second report ends inside.
    let query = format!(
        "from={}&to={}&group_by=tenant",
        secs(h + 30 * MIN_MS),
        secs(h + 2 * HOUR_MS)
    );
    let hours = |c: &serde_json::Value| c["lines"][0]["gpu_hours"].as_f64().unwrap();
    let asked = agg.chargeback(&query);
    assert!(asked.get("rounded").is_none(), "{asked}");
    assert!((hours(&asked) - 1_200.0 / 3_600.0).abs() < 1e-9, "{asked}");

    agg.restart_with("raw_retention = \"36500d\"", "raw_retention = \"2h\"");
    // The maintenance pass at start removes the raw rows.
    wait_logged(&agg, "raw rows past retention removed", || {
        (ledger.int("SELECT COUNT(*) FROM gpu_usage") == 0).then_some(())
    });
    let rounded = agg.chargeback(&query);
    let r = &rounded["rounded"];
    assert_eq!(r["granularity"], "hour", "{rounded}");
    // `from` (…:30:00Z) down to its hour; `to` is on the hour already.
    let from = asked["from"].as_str().unwrap();
    assert!(from.ends_with(":30:00Z"), "{asked}");
    assert_eq!(r["from"], from.replace(":30:00Z", ":00:00Z"), "{rounded}");
    assert_eq!(r["to"], asked["to"], "{rounded}");
    assert!(r["raw_retention_cutoff"].is_string(), "{rounded}");
    // The whole hour from its rollup: both reports, 1,800 s.
    assert!(
        (hours(&rounded) - 1_800.0 / 3_600.0).abs() < 1e-9,
        "{rounded}"
    );
}
