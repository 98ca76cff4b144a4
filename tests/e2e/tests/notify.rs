//! `tally agent` speaks the service manager's notification protocol: a
//! fake `NOTIFY_SOCKET` (a unix datagram socket this test reads) gets
//! `READY=1` only once `/readyz` answers 200, then watchdog pings while the
//! sampler runs, then `STOPPING=1` on SIGTERM.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use tally_e2e::{ChildGuard, SimNode, free_port, http_get, sim_lib, tally_bin, wait_for};

/// `tally agent` with a fake `NOTIFY_SOCKET` (and `WATCHDOG_USEC` when
/// given); the socket has a 60 s read timeout.
fn spawn_notified(
    node: &SimNode,
    watchdog_usec: Option<&str>,
) -> (ChildGuard, UnixDatagram, SocketAddr, std::path::PathBuf) {
    let socket_path = node.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the fake NOTIFY_SOCKET");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = node.dir.path().join("agent.toml");
    fs::write(&config, "").unwrap();
    node.pin_here(&config);
    let log = node.dir.path().join("agent.log");
    let mut cmd = Command::new(tally_bin());
    cmd.args(["agent", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string(), "--sample-interval", "200ms"])
        .arg("--nvml-lib")
        .arg(sim_lib())
        .envs(node.env())
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec);
    }
    let agent = ChildGuard(cmd.spawn().expect("spawn tally agent"));
    (agent, socket, addr, log)
}

/// One notification, or a panic with the agent's log.
fn next_notification(socket: &UnixDatagram, log: &std::path::Path) -> String {
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no notification ({e}); log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        )
    });
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_after_the_first_sample_then_watchdog_pings() {
    let node = SimNode::standard();
    let (mut agent, socket, addr, log) = spawn_notified(&node, Some("600000"));
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let recv = || next_notification(&socket, &log);

    let first = recv();
    assert_eq!(first, "READY=1", "the first notification is readiness");
    let (status, body) = http_get(addr, "/readyz").expect("GET /readyz");
    assert_eq!(status, 200, "READY=1 came before /readyz was 200: {body}");

    let pings = (0..3).map(|_| recv()).collect::<Vec<_>>();
    assert!(
        pings.iter().all(|p| p == "WATCHDOG=1"),
        "watchdog pings while sampling: {pings:?}"
    );

    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut last = String::new();
    while last != "STOPPING=1" {
        last = recv();
    }
    let status = agent.0.wait().unwrap();
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        log_text()
    );
}

/// Without a watchdog (no `WATCHDOG_USEC`) the agent still says
/// `STOPPING=1` on SIGTERM. Before the fix it stopped notifying after
/// `READY=1`.
#[test]
fn stopping_without_a_watchdog() {
    let node = SimNode::standard();
    let (mut agent, socket, _addr, log) = spawn_notified(&node, None);
    assert_eq!(
        next_notification(&socket, &log),
        "READY=1",
        "the first notification is readiness"
    );

    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(
        next_notification(&socket, &log),
        "STOPPING=1",
        "no watchdog pings without WATCHDOG_USEC, then STOPPING=1 on SIGTERM"
    );
    let status = agent.0.wait().unwrap();
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

/// A log collector that goes away (here: the read end of the agent's stderr
/// pipe is closed at once) must stop neither sampling nor a clean shutdown.
/// Before the fix, the first failed log write panicked the thread that
/// logged: the sampler stopped, and SIGTERM was ignored.
#[test]
fn a_closed_log_pipe_stops_neither_sampling_nor_shutdown() {
    let node = SimNode::standard();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = node.dir.path().join("agent.toml");
    fs::write(&config, "").unwrap();
    node.pin_here(&config);
    let mut agent = ChildGuard(
        Command::new(tally_bin())
            .args(["--log-format", "json", "agent", "--config"])
            .arg(&config)
            .args(["--listen", &addr.to_string(), "--sample-interval", "200ms"])
            .arg("--nvml-lib")
            .arg(sim_lib())
            .envs(node.env())
            // Debug: every cycle writes to the closed pipe.
            .env("TALLY_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tally agent"),
    );
    drop(agent.0.stderr.take());
    let samples = || -> Option<u64> {
        let (status, body) = http_get(addr, "/api/v1/snapshot").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200).then(|| v["samples"].as_u64().unwrap_or(0))
    };
    let first = wait_for("the agent's first samples", Duration::from_secs(60), || {
        samples().filter(|&n| n >= 1)
    });
    wait_for(
        "sampling to go on with nowhere to log",
        Duration::from_secs(60),
        || samples().filter(|&n| n >= first + 5),
    );

    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for(
        "the agent to exit on SIGTERM",
        Duration::from_secs(30),
        || agent.0.try_wait().unwrap(),
    );
}
