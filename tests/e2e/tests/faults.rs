//! Fault injection end to end: the real agent on the simulator while a GPU
//! flaps off the bus, thousands of XIDs arrive, a GPU's NVML calls hang, a
//! pid is reused by another tenant's process, and the wall clock jumps
//! back. For each: the agent keeps serving, the accounting sums still hold
//! (allocated time = observed time per device, energy shares = device
//! energy), nothing is charged to the wrong tenant, and the right state,
//! metric and log line show up. The table of what survives what is in
//! docs/faults.md.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::{Duration, Instant};

use tally_e2e::{
    Agent, Cgroup, Metrics, SimNode,
    faults_support::{Hang, WallClock, rss_kib, spawn_as_pid},
    http_get, require_root, skip, unique, wait_for,
};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

/// Relative tolerance for sums of floating-point shares.
fn close(a: f64, b: f64, what: &str) {
    let tol = 1e-6 * a.abs().max(b.abs()).max(1.0);
    assert!((a - b).abs() <= tol, "{what}: {a} != {b}");
}

fn state_of(m: &Metrics, gpu: &str) -> Option<String> {
    m.select("tally_gpu_state", &[("gpu", gpu)])
        .find(|s| s.value == 1.0)
        .map(|s| s.labels["state"].clone())
}

fn wait_state(agent: &Agent, gpu: &str, want: &str) {
    wait_for(
        &format!("gpu {gpu} to be {want}"),
        Duration::from_secs(60),
        || (state_of(&agent.metrics(), gpu).as_deref() == Some(want)).then_some(()),
    );
}

/// Every physical device's conservation sums between two scrapes: the
/// tenants' allocated seconds add up to the device's observed seconds, and
/// their energy to the device's energy (parent and MIG instances together).
fn assert_conserved(m1: &Metrics, m2: &Metrics) {
    assert_conserved_except(m1, m2, &[]);
}

/// [`assert_conserved`], with the energy sum not checked on the devices in
/// `unreadable`: they could not be read during part of the window, and
/// the energy the hardware counter integrated meanwhile is charged to no
/// tenant (see docs/faults.md, "energy during a gap").
fn assert_conserved_except(m1: &Metrics, m2: &Metrics, unreadable: &[&str]) {
    let delta = |name: &str, labels: &[(&str, &str)]| m2.sum(name, labels) - m1.sum(name, labels);
    let gpus: Vec<String> = m2
        .select("tally_gpu_info", &[])
        .map(|s| s.labels["gpu"].clone())
        .collect();
    for gpu in &gpus {
        close(
            delta("tally_tenant_gpu_allocated_seconds_total", &[("gpu", gpu)]),
            delta("tally_gpu_observed_seconds_total", &[("gpu", gpu)]),
            &format!("allocated vs observed seconds on gpu {gpu}"),
        );
    }
    for gpu in gpus
        .iter()
        .filter(|g| !g.contains('/') && !unreadable.contains(&g.as_str()))
    {
        let device = delta("tally_gpu_energy_joules_total", &[("gpu", gpu)]);
        let prefix = format!("{gpu}/");
        let tenants: f64 = m2
            .select("tally_tenant_gpu_energy_joules_total", &[])
            .filter(|s| s.labels["gpu"] == *gpu || s.labels["gpu"].starts_with(&prefix))
            .map(|s| {
                s.value
                    - m1.select("tally_tenant_gpu_energy_joules_total", &[])
                        .find(|o| o.labels == s.labels)
                        .map_or(0.0, |o| o.value)
            })
            .sum();
        let tol = 1e-6 * device.abs().max(1.0);
        assert!(
            (tenants - device).abs() <= tol,
            "energy on gpu {gpu}: tenants {tenants} J vs device {device} J"
        );
    }
    // Counters never go down.
    for s in &m1.samples {
        if s.name.ends_with("_total")
            && let Some(now) = m2
                .samples
                .iter()
                .find(|o| o.name == s.name && o.labels == s.labels)
        {
            assert!(
                now.value >= s.value,
                "{} {:?} went down: {} -> {}",
                s.name,
                s.labels,
                s.value,
                now.value
            );
        }
    }
}

#[test]
fn a_gpu_flapping_off_the_bus_mid_sample_keeps_every_sum() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let base = unique("e2e-faults");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));
    let a = acme.spawn("sleep", &["600"]);
    let b = beta.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 4096, 0.5);
    node.register(b.pid(), 1, None, 2048, 0.4);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(3);
    let m1 = agent.metrics();

    // Toggle GPU 1 every 70 ms against a 200 ms cycle: samples see it lost
    // before, during and after their reads of it (some calls of one read
    // succeed, later ones fail), and come back between.
    let started = Instant::now();
    let mut lost = false;
    let mut flips = 0;
    while started.elapsed() < Duration::from_secs(4) {
        lost = !lost;
        node.set_lost(1, lost);
        flips += 1;
        std::thread::sleep(Duration::from_millis(70));
        // The agent answers throughout.
        let (status, _) = http_get(agent.addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
    }
    node.set_lost(1, true);
    wait_state(&agent, "1", "lost");
    let while_lost = agent.metrics();
    agent.wait_samples(5);
    let still_lost = agent.metrics();
    // Nothing is charged for time the GPU could not be read.
    close(
        still_lost.sum("tally_tenant_gpu_allocated_seconds_total", &[("gpu", "1")]),
        while_lost.sum("tally_tenant_gpu_allocated_seconds_total", &[("gpu", "1")]),
        "allocated seconds of a lost GPU do not grow",
    );
    // GPU 0 is sampled meanwhile.
    assert!(
        still_lost.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")]
        ) > while_lost.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")]
        ),
        "gpu 0 stopped being accounted while gpu 1 was lost"
    );
    node.set_lost(1, false);
    wait_state(&agent, "1", "busy");
    agent.wait_samples(3);
    let m2 = agent.metrics();
    assert_conserved_except(&m1, &m2, &["1"]);
    // Once back, every sum holds on GPU 1 too.
    agent.wait_samples(5);
    assert_conserved(&m2, &agent.metrics());
    // Beta was charged on GPU 1 only, and less than the wall time of the run.
    let beta_gpu1 = m2.sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "beta"), ("gpu", "1")],
    ) - m1.sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "beta"), ("gpu", "1")],
    );
    let acme_gpu0 = m2.sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    ) - m1.sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    assert!(
        beta_gpu1 < acme_gpu0,
        "beta on the flapping GPU ({beta_gpu1} s) must be charged less than acme on the steady one ({acme_gpu0} s)"
    );
    assert_eq!(
        m2.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "beta"), ("gpu", "0")]
        ),
        0.0
    );
    let log = agent.log_text();
    assert!(
        log.contains("GPU marked unhealthy"),
        "no log line for the lost GPU after {flips} flips:\n{log}"
    );
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

/// XIDs injected in one go. Each is a file the simulator delivers once,
/// through the agent's event thread.
const XID_STORM: u64 = 2000;

#[test]
fn an_xid_storm_is_counted_exactly_and_the_agent_stays_responsive() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let base = unique("e2e-faults");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let a = acme.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 4096, 0.5);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    agent.wait_samples(3);
    let m1 = agent.metrics();
    let rss_before = rss_kib(agent.child.pid());
    for _ in 0..XID_STORM {
        // 31: a non-fatal XID (an MMU fault); it counts, the GPU stays busy.
        node.inject_xid(0, 31);
    }
    let mut scrapes = 0u32;
    wait_for(
        "every XID of the storm counted",
        Duration::from_secs(600),
        || {
            // The agent answers while it drains the storm.
            let m = agent.metrics();
            scrapes += 1;
            let n = m
                .value("tally_gpu_xid_errors_total", &[("gpu", "0"), ("xid", "31")])
                .unwrap_or(0.0);
            assert!(
                n <= XID_STORM as f64,
                "more XIDs counted ({n}) than injected"
            );
            (n == XID_STORM as f64).then_some(())
        },
    );
    assert!(scrapes > 0);
    // The tenant holding the GPU carries each one, exactly.
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "tally_tenant_gpu_xid_errors_total",
            &[("tenant", "acme"), ("gpu", "0"), ("xid", "31")]
        ),
        Some(XID_STORM as f64)
    );
    assert_eq!(state_of(&m, "0").as_deref(), Some("busy"));
    // No XID was left undelivered or delivered twice.
    let pending = std::fs::read_dir(node.state.join("xid"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .count();
    assert_eq!(pending, 0, "XIDs still pending in the simulator");
    agent.wait_samples(3);
    assert_eq!(
        agent
            .metrics()
            .value("tally_gpu_xid_errors_total", &[("gpu", "0"), ("xid", "31")]),
        Some(XID_STORM as f64),
        "counted again later"
    );
    assert_conserved(&m1, &agent.metrics());
    // Memory stays bounded: counters per (GPU, XID code), not per event.
    let rss_after = rss_kib(agent.child.pid());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {XID_STORM} XIDs"
    );
}

#[test]
fn a_hung_gpu_is_marked_lost_and_never_stalls_metrics() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let base = unique("e2e-faults");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));
    let a = acme.spawn("sleep", &["600"]);
    let b = beta.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 4096, 0.5);
    node.register(b.pid(), 1, None, 2048, 0.4);
    let config = format!("[agent]\nnvml_timeout = \"1s\"\n{CONFIG}");
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    wait_state(&agent, "1", "busy");
    let m1 = agent.metrics();

    let hang = Hang::start(&node, 1);
    wait_state(&agent, "1", "lost");
    let error = wait_for("the hung GPU's error", Duration::from_secs(30), || {
        let snap = agent.snapshot();
        snap["gpus"].as_array()?.iter().find(|g| g["gpu"] == "1")?["error"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(
        error.contains("timed out"),
        "error of the hung GPU: {error}"
    );
    // While GPU 1 hangs: samples go on, /metrics and /readyz answer, GPU 0
    // is accounted, GPU 1 accrues nothing.
    let during = agent.metrics();
    for _ in 0..5 {
        agent.wait_samples(2);
        let (status, _) = http_get(agent.addr, "/readyz").expect("GET /readyz");
        assert_eq!(status, 200);
    }
    let later = agent.metrics();
    assert!(
        later.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")]
        ) > during.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")]
        ),
        "gpu 0 stopped being accounted while gpu 1 hung"
    );
    close(
        later.sum("tally_tenant_gpu_allocated_seconds_total", &[("gpu", "1")]),
        during.sum("tally_tenant_gpu_allocated_seconds_total", &[("gpu", "1")]),
        "a hung GPU accrues no allocated time",
    );
    assert!(
        agent.log_text().contains("timed out"),
        "no log line says the GPU timed out"
    );

    hang.release();
    wait_state(&agent, "1", "busy");
    agent.wait_samples(3);
    let back = agent.metrics();
    assert_conserved_except(&m1, &back, &["1"]);
    agent.wait_samples(5);
    assert_conserved(&back, &agent.metrics());
}

#[test]
fn a_reused_pid_is_charged_to_its_new_tenant_only() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let base = unique("e2e-faults");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));
    let mut old = acme.spawn("sleep", &["600"]);
    let pid = old.pid();
    // The registration stays on disk across the reuse: to the driver (and
    // the simulator) it is just "pid N uses GPU 0".
    node.register(pid, 0, None, 4096, 0.5);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "200ms"]);
    wait_for("acme accrues on gpu 0", Duration::from_secs(30), || {
        (agent.metrics().sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "acme"), ("gpu", "0")],
        ) > 0.0)
            .then_some(())
    });
    // The old process exits between two samples; a process of another
    // tenant, started later, gets the same pid.
    old.kill();
    let Some(new) = spawn_as_pid(&beta, pid, "sleep", &["600"]) else {
        skip("could not get the same pid again (ns_last_pid raced with other forks)");
        return;
    };
    assert_eq!(new.pid(), pid);
    wait_for(
        "beta accrues on the reused pid",
        Duration::from_secs(30),
        || {
            (agent.metrics().sum(
                "tally_tenant_gpu_allocated_seconds_total",
                &[("tenant", "beta"), ("gpu", "0")],
            ) > 0.0)
                .then_some(())
        },
    );
    // From now on acme is charged nothing: every interval is beta's.
    agent.wait_samples(2);
    let m1 = agent.metrics();
    agent.wait_samples(10);
    let m2 = agent.metrics();
    let delta = |tenant: &str| {
        m2.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", tenant), ("gpu", "0")],
        ) - m1.sum(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", tenant), ("gpu", "0")],
        )
    };
    assert_eq!(
        delta("acme"),
        0.0,
        "the old tenant is charged for the new process"
    );
    close(
        delta("beta"),
        m2.sum("tally_gpu_observed_seconds_total", &[("gpu", "0")])
            - m1.sum("tally_gpu_observed_seconds_total", &[("gpu", "0")]),
        "the new tenant holds the GPU for the whole interval",
    );
    assert_eq!(
        m2.value(
            "tally_tenant_gpu_memory_bytes",
            &[("tenant", "acme"), ("gpu", "0")]
        )
        .unwrap_or(0.0),
        0.0,
        "the old tenant still holds memory"
    );
    assert_conserved(&m1, &m2);
    drop(new);
}

#[test]
fn a_wall_clock_jump_backwards_changes_no_interval() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let clock = WallClock::build(node.dir.path());
    let base = unique("e2e-faults");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let a = acme.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 4096, 0.5);
    // The agent (and the simulated driver inside it) see the shifted clock.
    let config = node.dir.path().join("clock-agent.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let addr = format!("127.0.0.1:{}", tally_e2e::free_port())
        .parse()
        .unwrap();
    let agent = start_with_env(&node, &config, addr, &clock);
    agent.wait_samples(3);
    let m1 = agent.metrics();
    let t1 = m1
        .value("tally_last_sample_timestamp_seconds", &[])
        .unwrap();
    let mono = Instant::now();

    clock.set_offset(-3600);
    let jumped = wait_for(
        "the agent's clock to jump back",
        Duration::from_secs(30),
        || {
            let t = agent
                .metrics()
                .value("tally_last_sample_timestamp_seconds", &[])?;
            (t < t1 - 3000.0).then_some(t)
        },
    );
    assert!(jumped < t1);
    agent.wait_samples(10);
    let m2 = agent.metrics();
    let elapsed = mono.elapsed().as_secs_f64();
    assert_conserved(&m1, &m2);
    // Intervals run on the monotonic clock: observed time is the real time
    // that passed, never negative, never the hour the wall clock lost.
    let observed = m2.sum("tally_gpu_observed_seconds_total", &[("gpu", "0")])
        - m1.sum("tally_gpu_observed_seconds_total", &[("gpu", "0")]);
    assert!(
        observed > 0.0 && observed <= elapsed + 1.0,
        "observed {observed} s over {elapsed} s of monotonic time"
    );
    // SM seconds go on at the registered rate although the driver's sample
    // time stamps (wall clock) are now an hour behind the last one seen.
    let sm = m2.sum(
        "tally_tenant_gpu_sm_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    ) - m1.sum(
        "tally_tenant_gpu_sm_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    close(sm, 0.5 * observed, "acme's SM seconds after the jump");
    assert!(!agent.log_text().contains("panicked"));
}

/// [`Agent::start_with`] with the wall-clock shim preloaded.
fn start_with_env(
    node: &SimNode,
    config: &std::path::Path,
    addr: std::net::SocketAddr,
    clock: &WallClock,
) -> Agent {
    let log = node.dir.path().join(unique("agent") + ".log");
    let mut cmd = std::process::Command::new(tally_e2e::tally_bin());
    cmd.arg("agent")
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--nvml-lib")
        .arg(tally_e2e::sim_lib())
        .args(["--sample-interval", "200ms"])
        .envs(node.env())
        .envs(clock.env())
        .env("TALLY_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("agent log"));
    let child = tally_e2e::ChildGuard(cmd.spawn().expect("spawn tally agent"));
    let agent = Agent {
        child,
        addr,
        config: config.to_path_buf(),
        log,
    };
    agent.wait_ready();
    agent
}

// ------------------------------------------------ the spool under faults

mod spool {
    use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

    use tally_e2e::{
        Agent, ChildGuard, SimNode,
        aggregator_support::{
            Aggregator, LedgerReader, add_counters as add, agent_config, assert_ledger_exact,
            reported_counters as reported, spooled, sqlite, subdir,
        },
        require_root, wait_for,
    };

    const LONG: Duration = Duration::from_secs(90);
    const RULES: &str = "[[tenant.rule]]\nuser = true\n";

    #[test]
    fn an_agent_killed_during_spool_replay_loses_and_doubles_nothing() {
        if !require_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backend = sqlite(dir.path());
        let tokens = dir.path().join("agg");
        let mut agg = Aggregator::start(&tokens, &backend, "");
        let ledger = LedgerReader::new(&backend);
        let node = SimNode::standard();
        let state = subdir(dir.path(), "state");
        let p = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
        node.register(p.pid(), 0, None, 4096, 0.5);
        let config = agent_config(&agg.url(), "replay", &state, &tokens, RULES);
        let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
        let (addr, config_path) = (agent.addr, agent.config.clone());
        wait_for("first reports", LONG, || {
            (ledger.reports("replay").0 >= 2).then_some(())
        });
        agg.stop();
        wait_for("a long spool", LONG, || {
            (spooled(&state) >= 25).then_some(())
        });
        // The aggregator comes back and the agent starts replaying: SIGKILL
        // it in the middle of the replay.
        let before = spooled(&state);
        agg.restart();
        wait_for("the replay to start", LONG, || {
            (spooled(&state) < before).then_some(())
        });
        let mut agent = agent;
        agent.child.kill();
        let mut expected = BTreeMap::new();
        add(&mut expected, reported(&state));
        assert!(spooled(&state) > 0, "the replay finished before the kill");
        // A new process finishes the replay and goes on reporting.
        let agent = Agent::start_with(&node, &config_path, addr, &["--sample-interval", "200ms"]);
        wait_for("the spool to drain", LONG, || {
            (spooled(&state) == 0).then_some(())
        });
        agent.wait_samples(5);
        assert!(agent.stop().success());
        add(&mut expected, reported(&state));
        assert_eq!(spooled(&state), 0, "final report delivered");
        assert_ledger_exact(&ledger, &agg, "replay", &state, &expected);
        drop(p);
    }

    /// A tmpfs of a given size, unmounted on drop.
    struct SmallDisk(std::path::PathBuf);

    impl SmallDisk {
        fn mount(at: &Path, size: &str) -> SmallDisk {
            std::fs::create_dir_all(at).unwrap();
            let out = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tally-e2e-spool",
                ])
                .arg(at)
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            SmallDisk(at.to_path_buf())
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    #[test]
    fn a_full_disk_under_the_spool_loses_nothing_once_space_returns() {
        if !require_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backend = sqlite(dir.path());
        let tokens = dir.path().join("agg");
        let mut agg = Aggregator::start(&tokens, &backend, "");
        let ledger = LedgerReader::new(&backend);
        let node = SimNode::standard();
        let disk = SmallDisk::mount(&dir.path().join("disk"), "96k");
        let state = disk.0.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let p = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
        node.register(p.pid(), 0, None, 4096, 0.5);
        let config = agent_config(&agg.url(), "diskfull", &state, &tokens, RULES);
        let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
        wait_for("first reports", LONG, || {
            (ledger.reports("diskfull").0 >= 2).then_some(())
        });
        agg.stop();
        // Fill the rest of the disk, so the spool hits ENOSPC.
        let filler = disk.0.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k", "count=1000"])
            .arg(format!("of={}", filler.display()))
            .output();
        // The agent keeps sampling and serving while its writes fail.
        let samples = agent.snapshot()["samples"].as_u64().unwrap();
        wait_for("the agent to notice the full disk", LONG, || {
            let log = agent.log_text();
            (log.contains("No space left") || log.contains("ENOSPC") || log.contains("os error 28"))
                .then_some(())
        });
        agent.wait_samples(10);
        assert!(agent.snapshot()["samples"].as_u64().unwrap() >= samples + 10);
        let (status, _) = tally_e2e::http_get(agent.addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        // Space comes back, then the aggregator: everything is delivered.
        std::fs::remove_file(&filler).unwrap();
        agg.restart();
        wait_for("the spool to drain", LONG, || {
            (spooled(&state) == 0).then_some(())
        });
        agent.wait_samples(5);
        assert!(agent.stop().success());
        let mut expected = BTreeMap::new();
        add(&mut expected, reported(&state));
        assert_ledger_exact(&ledger, &agg, "diskfull", &state, &expected);
        drop(p);
    }
}
