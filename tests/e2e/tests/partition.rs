//! Hosts with addresses of their own, cut off and brought back: the
//! aggregator and two agents each run in a network namespace of their own,
//! joined by veth pairs (`tally_e2e::netns`), and report over those links.
//!
//! - An agent's link goes down for several report intervals while it goes
//!   on sampling, then comes back; the other agent reports throughout.
//! - The aggregator's PostgreSQL (a private server in the aggregator's
//!   namespace, `tally_e2e::pg_server`) is stopped and started while both
//!   report; the aggregator says so on `/readyz` and `/metrics` and
//!   reconnects by itself.
//! - An agent's wall clock is an hour ahead: the aggregator measures the
//!   skew, says so (metric and log line naming the node) and files the
//!   usage by its own clock.
//!
//! Each ends with every report of both agents in the ledger exactly once,
//! and the GPU time there exactly what the agents cut. Root only (network
//! namespaces); skipped with the reason without root or `ip netns`.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tally_e2e::{
    Agent, ChildGuard, Launch, SimNode,
    aggregator_support::{
        Aggregator, Backend, LedgerReader, agent_config_with, assert_ledger_exact,
        reported_counters, spooled, sqlite, subdir,
    },
    faults_support::WallClock,
    is_root,
    netns::{Link, Netns},
    now_ms,
    pg_server::PgServer,
    skip, wait_for,
};

const LONG: Duration = Duration::from_secs(90);
/// Tenant by process owner: the partition is the subject, not cgroups.
const RULES: &str = "[[tenant.rule]]\nuser = true\n";
/// The aggregator's port on its host.
const PORT: u16 = 9478;
/// Where each agent serves, on its own host's loopback.
const AGENT_ADDR: &str = "127.0.0.1:9100";
const NODES: [&str; 2] = ["n1", "n2"];
/// `[report] timeout` while the ledger database is down: longer than the
/// aggregator's wait for a connection (5 s), as the default 10 s is.
const SLOW_DB_TIMEOUT: &str = "8s";

/// Three hosts: the aggregator's and two nodes', each node linked to the
/// aggregator's host (`10.<i>.0.1` there, `10.<i>.0.2` on the node).
struct Net {
    agg: Netns,
    nodes: Vec<Netns>,
    links: Vec<Link>,
}

fn net_or_skip() -> Option<Net> {
    if !is_root() {
        skip("needs root (network namespaces); CI runs as root");
        return None;
    }
    let build = || -> Result<Net, String> {
        let agg = Netns::add("agg")?;
        let nodes = vec![Netns::add("n1")?, Netns::add("n2")?];
        let links = vec![
            Link::join(&agg, &nodes[0], 1)?,
            Link::join(&agg, &nodes[1], 2)?,
        ];
        Ok(Net { agg, nodes, links })
    };
    match build() {
        Ok(net) => Some(net),
        Err(e) => {
            skip(&format!("cannot make network namespaces here: {e}"));
            None
        }
    }
}

/// One node: a simulated GPU host with a workload holding a GPU, and its
/// agent reporting over its link.
struct Node {
    name: &'static str,
    state: PathBuf,
    agent: Option<Agent>,
    _workload: ChildGuard,
    _sim: SimNode,
}

impl Node {
    /// Node `i` of `net`; `timeout` is its `[report] timeout`, `env` more
    /// environment for its agent.
    fn start(
        net: &Net,
        i: usize,
        dir: &Path,
        tokens: &Path,
        timeout: &str,
        env: &[(&'static str, PathBuf)],
    ) -> Node {
        let name = NODES[i];
        let sim = SimNode::standard();
        let workload = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
        sim.register(workload.pid(), 0, None, 4096, 0.5);
        let state = subdir(dir, &format!("state-{name}"));
        let url = format!("http://{}:{PORT}", net.links[i].a_addr);
        let config = dir.join(format!("agent-{name}.toml"));
        let toml = agent_config_with(&url, name, &state, tokens, "300ms", timeout, RULES);
        std::fs::write(&config, toml).unwrap();
        let how = Launch {
            netns: Some(net.nodes[i].name.clone()),
            env: env.to_vec(),
            ..Launch::default()
        };
        let addr: SocketAddr = AGENT_ADDR.parse().unwrap();
        let agent = Agent::launch(&how, &sim, &config, addr, &["--sample-interval", "200ms"]);
        Node {
            name,
            state,
            agent: Some(agent),
            _workload: workload,
            _sim: sim,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    fn samples(&self) -> u64 {
        self.agent().snapshot()["samples"].as_u64().unwrap_or(0)
    }

    /// Stops the agent (its last report delivered) and checks the ledger
    /// holds every report exactly once and exactly the GPU time it cut,
    /// no less than its own `/metrics` counted before it stopped.
    fn finish(&mut self, agg: &Aggregator, ledger: &LedgerReader, started: Instant) {
        let agent = self.agent.take().expect("agent running");
        let sampled_s = agent
            .metrics()
            .sum("tally_tenant_gpu_allocated_seconds_total", &[]);
        let log = agent.log.clone();
        assert!(agent.stop().success(), "{} exits cleanly", self.name);
        assert_eq!(
            spooled(&self.state),
            0,
            "{}: every report delivered; agent log:\n{}",
            self.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        let expected: BTreeMap<String, i64> = reported_counters(&self.state);
        assert_ledger_exact(ledger, agg, self.name, &self.state, &expected);
        let ledger_us: i64 = expected.values().sum();
        assert!(
            ledger_us as f64 >= sampled_s * 1e6 - expected.len() as f64,
            "{}: the ledger ({ledger_us} us) holds what the agent sampled ({sampled_s} s)",
            self.name
        );
        assert!(
            expected.keys().any(|k| !k.starts_with("_idle")),
            "{}: the workload's GPU time was reported: {expected:?}",
            self.name
        );
        // Each counter is time on one device: none can exceed the test's
        // duration (a doubled interval would).
        let elapsed = started.elapsed().as_micros();
        for (key, us) in &expected {
            assert!(*us as u128 <= elapsed, "{key}: {us} us in {elapsed} us");
        }
    }
}

fn wait_reports(ledger: &LedgerReader, node: &str, at_least: i64) {
    wait_for(
        &format!("{node} to have {at_least} reports stored"),
        LONG,
        || (ledger.reports(node).0 >= at_least).then_some(()),
    );
}

#[test]
fn a_node_cut_off_for_several_intervals_loses_and_doubles_nothing() {
    let Some(net) = net_or_skip() else { return };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let tokens = dir.path().join("agg");
    let agg = Aggregator::start_in(&tokens, &backend, None, &net.agg.name, PORT);
    let ledger = LedgerReader::new(&backend);
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::start(&net, i, dir.path(), &tokens, "2s", &[]))
        .collect();
    for n in &nodes {
        wait_reports(&ledger, n.name, 2);
    }

    net.links[0].down();
    // The first failed delivery marks the cut: nothing of n1's lands after it.
    wait_for("n1 to fail a delivery", LONG, || {
        (nodes[0]
            .agent()
            .metrics()
            .sum("tally_report_send_failures_total", &[])
            >= 1.0)
            .then_some(())
    });
    let cut_at = ledger.reports("n1").0;
    let n2_at = ledger.reports("n2").0;
    let samples_at = nodes[0].samples();
    wait_for("n1 to spool several intervals", LONG, || {
        (spooled(&nodes[0].state) >= 4).then_some(())
    });
    wait_reports(&ledger, "n2", n2_at + 3);
    assert!(
        nodes[0].samples() > samples_at,
        "n1 goes on sampling while cut off"
    );
    assert_eq!(
        ledger.reports("n1").0,
        cut_at,
        "no report of n1 crossed a link that is down"
    );

    net.links[0].up();
    wait_for("n1 to deliver its spool", LONG, || {
        (spooled(&nodes[0].state) == 0 && ledger.reports("n1").0 >= cut_at + 4).then_some(())
    });
    for n in &mut nodes {
        n.finish(&agg, &ledger, started);
    }
}

#[test]
fn the_ledger_database_restarting_loses_nothing_and_is_reported() {
    let Some(net) = net_or_skip() else { return };
    let pg = match PgServer::start_in(&net.agg) {
        Ok(pg) => pg,
        Err(e) => return skip(&format!("no private PostgreSQL: {e}")),
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Postgres(pg.socket_url());
    let tokens = dir.path().join("agg");
    let agg = Aggregator::start_in(&tokens, &backend, Some(&pg.url()), &net.agg.name, PORT);
    let ledger = LedgerReader::new(&backend);
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::start(&net, i, dir.path(), &tokens, SLOW_DB_TIMEOUT, &[]))
        .collect();
    for n in &nodes {
        wait_reports(&ledger, n.name, 2);
    }
    let ledger_up = |agg: &Aggregator| {
        agg.metrics()
            .value("tally_aggregator_ledger_up", &[("ledger", "main")])
    };
    assert_eq!(ledger_up(&agg), Some(1.0));

    pg.stop();
    let body = wait_for("/readyz to answer 503", LONG, || {
        match agg.get_in("/readyz") {
            Ok((503, body)) => Some(body),
            _ => None,
        }
    });
    assert!(
        body.contains("not ready") && body.contains("ledger"),
        "/readyz gives the reason: {body}"
    );
    wait_for("tally_aggregator_ledger_up to read 0", LONG, || {
        (ledger_up(&agg) == Some(0.0)).then_some(())
    });
    // The agents keep what they cannot deliver, and were told why: the
    // aggregator answered 503 rather than holding them until they gave up.
    for n in &nodes {
        wait_for(&format!("{} to spool reports", n.name), LONG, || {
            (spooled(&n.state) >= 3).then_some(())
        });
        let log = n.agent().log_text();
        assert!(
            log.contains("503") && log.contains("ledger unavailable"),
            "{}: the aggregator answered with its reason; agent log:\n{log}",
            n.name
        );
    }

    pg.start();
    wait_for("/readyz to answer 200 again", LONG, || {
        matches!(agg.get_in("/readyz"), Ok((200, _))).then_some(())
    });
    wait_for("tally_aggregator_ledger_up to read 1 again", LONG, || {
        (ledger_up(&agg) == Some(1.0)).then_some(())
    });
    assert!(
        agg.log_text().contains("ledger reachable again"),
        "the aggregator says it reconnected; log:\n{}",
        agg.log_text()
    );
    for n in &nodes {
        wait_for(&format!("{} to deliver its spool", n.name), LONG, || {
            (spooled(&n.state) == 0).then_some(())
        });
    }
    for n in &mut nodes {
        n.finish(&agg, &ledger, started);
    }
    drop(agg);
    drop(pg);
}

#[test]
fn a_node_clock_an_hour_ahead_is_reported_and_filed_by_the_aggregator_clock() {
    let Some(net) = net_or_skip() else { return };
    let started = Instant::now();
    let started_ms = now_ms() as i64;
    let dir = tempfile::tempdir().unwrap();
    let clock = WallClock::build(dir.path());
    clock.set_offset(3600);
    let backend = sqlite(dir.path());
    let tokens = dir.path().join("agg");
    let agg = Aggregator::start_in(&tokens, &backend, None, &net.agg.name, PORT);
    let ledger = LedgerReader::new(&backend);
    let mut nodes = vec![
        Node::start(&net, 0, dir.path(), &tokens, "2s", &clock.env()),
        Node::start(&net, 1, dir.path(), &tokens, "2s", &[]),
    ];
    for n in &nodes {
        wait_reports(&ledger, n.name, 3);
    }

    let skew = |node: &str| {
        agg.metrics().value(
            "tally_aggregator_node_clock_skew_seconds",
            &[("node", node)],
        )
    };
    let n1 = wait_for("n1's clock skew on /metrics", LONG, || skew("n1"));
    assert!((n1 - 3600.0).abs() < 5.0, "n1 is an hour ahead: {n1} s");
    let n2 = wait_for("n2's clock skew on /metrics", LONG, || skew("n2"));
    assert!(n2.abs() < 5.0, "n2 is in step: {n2} s");
    let log = agg.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("node clock is skewed") && l.contains("n1")),
        "a log line names the skewed node; log:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("node clock is skewed") && l.contains("n2")),
        "n2 is not called skewed; log:\n{log}"
    );

    for n in &mut nodes {
        n.finish(&agg, &ledger, started);
    }
    // Filed by the aggregator's clock: within the test, not an hour on.
    let ended_ms = now_ms() as i64;
    for table in ["reports", "gpu_usage"] {
        let (first, last) = {
            let r = &ledger.rows(&format!(
                "SELECT MIN(interval_end_ms), MAX(interval_end_ms) FROM {table} WHERE node = 'n1'"
            ))[0];
            (r[0].parse::<i64>().unwrap(), r[1].parse::<i64>().unwrap())
        };
        assert!(
            first >= started_ms - 10_000 && last <= ended_ms + 10_000,
            "{table}: n1's intervals end within the test ({started_ms}..{ended_ms}), \
             not an hour on: {first}..{last}"
        );
    }
}
