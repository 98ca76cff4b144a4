//! One agent per state directory, end to end: a second agent started on
//! the first one's `[agent] state_dir` (a DaemonSet rolling update with
//! `maxSurge`, a second agent started by hand) waits for the directory's
//! lock, saying so, serving `/healthz` but not `/readyz`, and neither
//! samples nor reports; when the first is stopped it takes over, and the
//! ledger holds every report exactly once and exactly the GPU time cut.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use tally_e2e::{
    Agent, ChildGuard, SimNode,
    aggregator_support::{
        Aggregator, LedgerReader, add_counters, agent_config, assert_ledger_exact,
        reported_counters, spooled, sqlite, subdir,
    },
    free_port, http_get, wait_for,
};

const LONG: Duration = Duration::from_secs(60);
/// Tenant by process owner: no cgroups needed, so this runs unprivileged.
const RULES: &str = "[[tenant.rule]]\nuser = true\n";

#[test]
fn a_second_agent_on_one_state_dir_waits_then_takes_over_exactly() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let tokens = dir.path().join("agg");
    let agg = Aggregator::start(&tokens, &backend, "");
    let ledger = LedgerReader::new(&backend);
    let node = SimNode::standard();
    let state = subdir(dir.path(), "state");
    let workload = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    node.register(workload.pid(), 0, None, 4096, 0.5);
    let args = ["--sample-interval", "200ms"];

    let first = Agent::start(
        &node,
        &agent_config(&agg.url(), "surge", &state, &tokens, RULES),
        &args,
    );
    wait_for("first reports", LONG, || {
        (ledger.reports("surge").0 >= 2).then_some(())
    });

    // The surge: the same config, so the same state directory.
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let second = Agent::spawn_with(&node, &first.config, addr, &args);
    let holder = format!("pid {}", first.child.pid());
    wait_for("the second agent to say it waits", LONG, || {
        second
            .log_text()
            .contains("waiting for the state directory lock")
            .then_some(())
    });
    assert!(
        second.log_text().contains(&holder),
        "the log names the holder; log:\n{}",
        second.log_text()
    );
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(addr, "/readyz").unwrap();
    assert_eq!(status, 503, "/readyz while waiting: {body}");
    assert!(
        body.contains("waiting for the state directory lock") && body.contains(&holder),
        "/readyz gives the reason: {body}"
    );

    // The first keeps reporting; the second neither samples nor reports.
    let reports = ledger.reports("surge").0;
    wait_for("the first agent to go on reporting", LONG, || {
        (ledger.reports("surge").0 >= reports + 3).then_some(())
    });
    assert_eq!(second.snapshot()["samples"].as_u64(), Some(0));
    assert_eq!(http_get(addr, "/readyz").unwrap().0, 503);

    // The first is stopped (SIGTERM): it delivers its last interval, and
    // the second takes the directory over and reports from there on.
    // The second is held still meanwhile: it takes the lock over the
    // moment the first exits and rewrites the report state, and the
    // first's final counters are read from that state. (On a loaded
    // machine the second won that race once: the first's counters were
    // lost from `expected`, the second's counted twice.)
    second.freeze(true);
    assert!(first.stop().success());
    let mut expected = BTreeMap::new();
    add_counters(&mut expected, reported_counters(&state));
    second.freeze(false);
    // (On a loaded machine its final report may still be spooled: the
    // second delivers it, and the ledger check below counts it either way.)
    let handed_over = ledger.reports("surge").0;
    second.wait_ready();
    assert!(
        second
            .log_text()
            .contains("took the state directory lock over"),
        "log:\n{}",
        second.log_text()
    );
    wait_for("the second agent to report", LONG, || {
        (ledger.reports("surge").0 >= handed_over + 3).then_some(())
    });
    assert!(second.stop().success());
    add_counters(&mut expected, reported_counters(&state));
    assert_eq!(
        spooled(&state),
        0,
        "the second agent's final report delivered"
    );

    assert_ledger_exact(&ledger, &agg, "surge", &state, &expected);
    // Each (tenant, device) counter is time on one device: none can hold
    // more than the test ran (a doubled interval would).
    let elapsed = started.elapsed().as_micros();
    assert!(
        expected.keys().any(|k| !k.starts_with("_idle")),
        "the workload's GPU time was reported: {expected:?}"
    );
    for (key, us) in &expected {
        assert!(
            *us as u128 <= elapsed,
            "{key}: {us} us charged in {elapsed} us"
        );
    }
    drop(workload);
}
