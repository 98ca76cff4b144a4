//! Agent → aggregator over TLS, with a CA generated in the test: reports
//! arrive when the agent trusts the CA, never when it does not, and the
//! aggregator refuses plain HTTP. `tally report` reaches it with
//! `--ca-file`, and checks its own flags before it sends anything; so does
//! `tally top --aggregator`.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tally_e2e::{
    Agent, ChildGuard, SimNode, aggregator_support as agg, free_port, http_get, tally_bin, wait_for,
};

/// Writes a CA and a server certificate for `localhost`/127.0.0.1 it
/// signed; returns (ca.pem, server.pem, server.key).
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tally test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(Vec::<String>::new()).expect("server params");
    server
        .distinguished_name
        .push(DnType::CommonName, "tally aggregator");
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().expect("dns name")),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    let cert = server
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");

    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    fs::write(&paths.0, ca_cert.pem()).unwrap();
    fs::write(&paths.1, cert.pem()).unwrap();
    fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn counter(agent: &Agent, name: &str) -> f64 {
    agent.metrics().sum(name, &[])
}

/// A TLS aggregator on SQLite with its files in `dir`, listening once
/// this returns; (process, address, CA that signed its certificate, ledger).
fn tls_aggregator(dir: &Path) -> (ChildGuard, SocketAddr, PathBuf, agg::Backend) {
    let (ca, cert, key) = make_pki(dir);
    let backend = agg::sqlite(dir);
    let config = agg::write_config(
        dir,
        &backend,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join("aggregator.log");
    let aggregator = ChildGuard(
        Command::new(tally_bin())
            .args(["aggregator", "--config"])
            .arg(&config)
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the aggregator"),
    );
    wait_for("the aggregator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    });
    (aggregator, addr, ca, backend)
}

#[test]
fn reports_travel_over_tls_only_to_agents_that_trust_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_aggregator, addr, ca, backend) = tls_aggregator(dir.path());
    // Plain HTTP gets no answer from a TLS port.
    assert!(
        !matches!(http_get(addr, "/healthz"), Ok((200, _))),
        "plain HTTP must not be served"
    );
    // HTTPS is, to a client that trusts the test CA.
    let https = tally_e2e::Client::with_ca(&format!("https://localhost:{}", addr.port()), &ca)
        .expect("a client trusting the test CA");
    let health = https.get("/healthz").expect("GET /healthz over TLS");
    assert_eq!(health.status, 200, "{}", health.text());

    let url = format!("https://localhost:{}", addr.port());
    let node = SimNode::standard();
    let trusted_state = dir.path().join("trusted");
    let trusted = Agent::start(
        &node,
        &agg::agent_config(
            &url,
            "node-tls",
            &trusted_state,
            dir.path(),
            &format!("ca_file = \"{}\"", ca.display()),
        ),
        &["--sample-interval", "200ms"],
    );
    let untrusted_state = dir.path().join("untrusted");
    let untrusted = Agent::start(
        &node,
        &agg::agent_config(&url, "node-plain", &untrusted_state, dir.path(), ""),
        &["--sample-interval", "200ms"],
    );

    wait_for("reports over TLS", Duration::from_secs(60), || {
        (counter(&trusted, "tally_report_sent_reports_total") >= 3.0).then_some(())
    });
    wait_for(
        "the untrusting agent to fail",
        Duration::from_secs(60),
        || (counter(&untrusted, "tally_report_send_failures_total") >= 2.0).then_some(()),
    );
    assert_eq!(counter(&untrusted, "tally_report_sent_reports_total"), 0.0);

    let ledger = agg::LedgerReader::new(&backend);
    let (stored, _, _) = ledger.reports("node-tls");
    assert!(stored >= 3, "the ledger holds the TLS reports: {stored}");
    assert_eq!(
        ledger.reports("node-plain").0,
        0,
        "nothing from the untrusting agent"
    );
}

#[test]
fn tls_config_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let backend = agg::sqlite(dir.path());
    let config = agg::write_config(dir.path(), &backend, "tls_cert = \"/nonexistent/cert.pem\"");
    let out = Command::new(tally_bin())
        .args(["config", "check", "--aggregator"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aggregator.tls_key"), "{err}");
}

/// `tally top --aggregator` (piped: one frame) reaches an https
/// aggregator with a private CA through `--ca-file`, and only then.
#[test]
fn tally_top_trusts_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_aggregator, addr, ca, _) = tls_aggregator(dir.path());
    let url = format!("https://localhost:{}", addr.port());
    let top = |extra: &[&str]| {
        Command::new(tally_bin())
            .args([
                "top",
                "--aggregator",
                &url,
                "--interval",
                "100ms",
                "--token-file",
            ])
            .arg(dir.path().join("admin.token"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run tally top")
    };

    let out = top(&["--ca-file", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&url),
        "one frame naming the aggregator: {out:?}"
    );
    let out = top(&[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no trust without the CA: {out:?}"
    );
    let out = top(&["--ca-file", "/nonexistent/ca.pem"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));

    let out = Command::new(tally_bin())
        .args(["top", "--ca-file", ca.to_str().unwrap()])
        .output()
        .expect("run tally top");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--aggregator"),
        "--ca-file needs --aggregator: {out:?}"
    );
}

/// `tally report` with `args` against `url`, as the admin of `dir`.
fn report(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(tally_bin())
        .args(["report", "--aggregator", url, "--token-file"])
        .arg(dir.join("admin.token"))
        .args(args)
        .env_remove("TALLY_CA_FILE")
        .output()
        .expect("run tally report")
}

#[test]
fn tally_report_trusts_a_private_ca_and_checks_its_flags_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_aggregator, addr, ca, _) = tls_aggregator(dir.path());
    let url = format!("https://localhost:{}", addr.port());
    let ca_arg = ca.to_str().unwrap();

    let out = report(
        dir.path(),
        &url,
        &["--last", "30d", "--format", "json", "--ca-file", ca_arg],
    );
    assert!(out.status.success(), "{out:?}");
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("chargeback JSON");
    assert!(c["lines"].is_array(), "{c}");
    let out = report(
        dir.path(),
        &url,
        &["--month", "2026-11", "--ca-file", ca_arg],
    );
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("2026-11-01T00:00:00Z .. 2026-12-01T00:00:00Z"),
        "{table}"
    );

    let out = report(dir.path(), &url, &["--last", "30d"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no trust without the CA: {out:?}"
    );
    let out = report(
        dir.path(),
        &url,
        &["--last", "30d", "--ca-file", "/nonexistent/ca.pem"],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));

    // A typo fails with the choices, before anything is sent: the
    // listener never sees a connection.
    let quiet = TcpListener::bind("127.0.0.1:0").unwrap();
    quiet.set_nonblocking(true).unwrap();
    let quiet_url = format!("http://{}", quiet.local_addr().unwrap());
    for typo in [
        &["--format", "jsno"][..],
        &["--group-by", "tenant,gpu"],
        &["--basis", "use"],
        &["--month", "2026-13"],
    ] {
        let args: Vec<&str> = ["--last", "1d"].iter().chain(typo).copied().collect();
        let args = if typo[0] == "--month" {
            typo
        } else {
            &args[..]
        };
        let out = report(dir.path(), &quiet_url, args);
        assert_eq!(out.status.code(), Some(64), "{typo:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(typo[1]), "{typo:?} names the bad value: {err}");
        if typo[0] != "--month" {
            assert!(
                err.contains("possible values"),
                "{typo:?} lists the choices: {err}"
            );
        }
    }
    assert!(
        quiet.accept().is_err(),
        "tally report connected although its flags were wrong"
    );

    // An aggregator that never answers: --timeout gives up.
    let out = report(dir.path(), &quiet_url, &["--last", "1d", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no answer within 1s"), "{err}");
}
