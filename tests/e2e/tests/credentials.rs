//! Credentials that change without a restart, against the real
//! aggregator: a token added to a token file is accepted after SIGHUP and a
//! removed one refused; a file edited without a signal is picked up by
//! itself; a bad file keeps the old tokens; a runaway token gets 429 with
//! `Retry-After` while another token is still served, and an agent given
//! one waits as told; and a running agent keeps reporting through a token
//! rotation.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{fs, path::Path, time::Duration};

use nix::{sys::signal, unistd::Pid};
use tally_e2e::{
    Agent, SimNode,
    aggregator_support::{
        ACME_TOKEN, ADMIN_TOKEN, AGENT_TOKEN, Aggregator, LedgerReader, agent_config,
        agent_config_with, sqlite, subdir,
    },
    wait_for,
};

const LONG: Duration = Duration::from_secs(30);

/// A token as long as [`ADMIN_TOKEN`], so that a rewrite keeps the file's
/// size.
const ROTATED_ADMIN: &str = "admin-rotat-0123456789abcdef";

fn hangup(agg: &Aggregator) {
    let pid = agg.child.as_ref().expect("aggregator running").pid();
    signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGHUP).expect("SIGHUP");
}

/// Status of an admin-only read with `token`.
fn read_status(agg: &Aggregator, token: &str) -> u16 {
    agg.get("/api/v1/reports", Some(token)).0
}

/// Rewrites `file` with `text` of the same size and puts its modification
/// time back, so that only a signal can make the aggregator see it.
fn rewrite_unseen(file: &Path, text: &str) {
    let before = fs::metadata(file).unwrap();
    assert_eq!(before.len(), text.len() as u64, "same size");
    fs::write(file, text).unwrap();
    fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
}

#[test]
fn tokens_are_reread_on_sighup_and_on_change_and_a_bad_file_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let admin_file = agg.dir.join("admin.token");
    assert_eq!(read_status(&agg, ADMIN_TOKEN), 200);
    assert_eq!(read_status(&agg, ROTATED_ADMIN), 401);

    // Rotated in the file, unseen by the change poll: SIGHUP takes it.
    rewrite_unseen(&admin_file, &format!("{ROTATED_ADMIN}\n"));
    hangup(&agg);
    wait_for("the rotated token after SIGHUP", LONG, || {
        (read_status(&agg, ROTATED_ADMIN) == 200).then_some(())
    });
    assert_eq!(
        read_status(&agg, ADMIN_TOKEN),
        401,
        "the token removed from the file is refused"
    );
    assert!(agg.log_text().contains("SIGHUP"), "{}", agg.log_text());

    // A bad file (a token too short) is refused whole: every old token
    // still works, and the log says why.
    fs::write(&admin_file, "short\n").unwrap();
    hangup(&agg);
    wait_for("the reload error in the log", LONG, || {
        agg.log_text().contains("NOT reloaded").then_some(())
    });
    assert_eq!(read_status(&agg, ROTATED_ADMIN), 200, "old tokens kept");
    assert_eq!(agg.get("/api/v1/cluster", Some(ACME_TOKEN)).0, 200);
    let metrics = agg.get("/metrics", None).1;
    assert!(
        metrics.contains("tally_aggregator_credential_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );

    // Edited without a signal: the change is seen by itself.
    fs::write(&admin_file, format!("# rotated back\n{ADMIN_TOKEN}\n")).unwrap();
    wait_for("the token file change to be picked up", LONG, || {
        (read_status(&agg, ADMIN_TOKEN) == 200).then_some(())
    });
    assert_eq!(read_status(&agg, ROTATED_ADMIN), 401);
    assert!(!agg.log_text().contains(ADMIN_TOKEN), "a token was logged");
    assert!(
        !agg.log_text().contains(ROTATED_ADMIN),
        "a token was logged"
    );
}

#[test]
fn a_runaway_token_gets_429_while_another_is_served() {
    let dir = tempfile::tempdir().unwrap();
    // Three requests at once, then one a minute: the fourth in a row is
    // over, whatever the machine's speed.
    let agg = Aggregator::start(
        &dir.path().join("agg"),
        &sqlite(dir.path()),
        "[auth]\nrate_limit = \"1/m\"\nburst = 3\n",
    );
    for _ in 0..3 {
        assert_eq!(read_status(&agg, ADMIN_TOKEN), 200);
    }
    let r = agg
        .client(Some(ADMIN_TOKEN))
        .get("/api/v1/reports")
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    let retry_after: u64 = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .unwrap_or_else(|| panic!("no Retry-After: {}", r.head))
        .trim()
        .parse()
        .expect("Retry-After in whole seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(r.text().contains("rate_limit"), "a reason: {}", r.text());

    // The other tokens have their own allowance.
    assert_eq!(agg.get("/api/v1/cluster", Some(ACME_TOKEN)).0, 200);
    let (status, body) = agg.post(b"{}", Some(AGENT_TOKEN));
    assert_ne!(status, 429, "{body}");
    // Unauthenticated public routes are not limited.
    assert_eq!(agg.get("/healthz", None).0, 200);
}

#[test]
fn an_agent_over_its_rate_waits_as_retry_after_says() {
    let dir = tempfile::tempdir().unwrap();
    // Two reports at once, then one a minute: the third is told to wait
    // most of a minute.
    let agg = Aggregator::start(
        &dir.path().join("agg"),
        &sqlite(dir.path()),
        "[auth]\nrate_limit = \"1/m\"\nburst = 2\n",
    );
    let node = SimNode::standard();
    let state = subdir(dir.path(), "state");
    let config = agent_config_with(
        &agg.url(),
        "eager",
        &state,
        &agg.dir,
        "200ms",
        "2s",
        "[[tenant.rule]]\nuser = true\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    let limited = || {
        agg.metrics()
            .value(
                "tally_aggregator_reports_total",
                &[("result", "rate_limited")],
            )
            .unwrap_or(0.0)
    };
    wait_for("a report over the token's rate", LONG, || {
        (limited() >= 1.0).then_some(())
    });
    // Retrying every 200 ms interval would bring ~25 more refusals in 5 s.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(limited(), 1.0, "the agent retried before Retry-After");
    let spooled = agent
        .metrics()
        .value("tally_report_spool_reports", &[])
        .unwrap_or(0.0);
    assert!(spooled >= 10.0, "reports wait in the spool: {spooled}");
    let log = agent.log_text();
    assert!(
        log.contains("Retry-After"),
        "the agent says why it waits:\n{log}"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_running_agent_reports_through_a_token_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let backend = sqlite(dir.path());
    let agg = Aggregator::start(&dir.path().join("agg"), &backend, "");
    let ledger = LedgerReader::new(&backend);
    let node = SimNode::standard();
    let state = subdir(dir.path(), "state");
    // The agent and the aggregator share the agent token file, as a
    // secret mounted on both would be.
    let config = agent_config(
        &agg.url(),
        "rot",
        &state,
        &agg.dir,
        "[[tenant.rule]]\nuser = true\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    let before = wait_for("reports with the first token", LONG, || {
        let (n, _, _) = ledger.reports("rot");
        (n >= 2).then_some(n)
    });

    let rotated = "agent-rotated-0123456789abcdef";
    fs::write(agg.dir.join("agent.token"), format!("{rotated}\n")).unwrap();
    hangup(&agg);
    wait_for("the old agent token refused", LONG, || {
        (agg.post(b"{}", Some(AGENT_TOKEN)).0 == 401).then_some(())
    });
    let after = ledger.reports("rot").0;
    wait_for("reports with the rotated token", LONG, || {
        (ledger.reports("rot").0 >= after + 3).then_some(())
    });
    assert!(after >= before);
    assert!(agent.stop().success());
    let log = agg.log_text();
    assert!(
        !log.contains(rotated) && !log.contains(AGENT_TOKEN),
        "a token was logged"
    );
}
