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
    Agent, Cgroup, ChildGuard, Launch, Metrics, SimNode,
    conservation::{assert_shares, close},
    faults_support::{Hang, WallClock, rss_kib, spawn_as_pid},
    http_get, require_root, skip, unique, wait_for,
};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

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
    assert_shares(Some(m1), m2, unreadable);
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

/// Between two scrapes while GPU 1 cannot be read (it `was`: lost, hung):
/// nothing is charged for GPU 1's time, and GPU 0 is sampled meanwhile.
fn assert_only_gpu0_accrues(before: &Metrics, after: &Metrics, was: &str) {
    const ALLOCATED: &str = "tally_tenant_gpu_allocated_seconds_total";
    close(
        after.sum(ALLOCATED, &[("gpu", "1")]),
        before.sum(ALLOCATED, &[("gpu", "1")]),
        &format!("allocated seconds of gpu 1 grew while it {was}"),
    );
    assert!(
        after.increase(before, ALLOCATED, &[("tenant", "acme"), ("gpu", "0")]) > 0.0,
        "gpu 0 stopped being accounted while gpu 1 {was}"
    );
}

/// Where CONFIG's rule finds `tenant`'s job, beneath `base`.
fn job_path(base: &str, tenant: &str) -> String {
    format!("{base}/tally/{tenant}/job")
}

/// A job of `tenant` holding `memory_mib` and `sm` of GPU `gpu`; killed
/// (and its cgroup removed) on drop.
struct BusyJob {
    _process: ChildGuard,
    _cgroup: Cgroup,
}

fn busy_job(
    node: &SimNode,
    base: &str,
    tenant: &str,
    gpu: u32,
    memory_mib: u64,
    sm: f64,
) -> BusyJob {
    let cgroup = Cgroup::create(&job_path(base, tenant));
    let process = cgroup.spawn("sleep", &["600"]);
    node.register(process.pid(), gpu, None, memory_mib, sm);
    BusyJob {
        _process: process,
        _cgroup: cgroup,
    }
}

/// acme's job holding GPU 0 (4 GiB, 50 % SM) and beta's holding GPU 1
/// (2 GiB, 40 %).
fn acme_and_beta(node: &SimNode) -> [BusyJob; 2] {
    let base = unique("e2e-faults");
    [
        busy_job(node, &base, "acme", 0, 4096, 0.5),
        busy_job(node, &base, "beta", 1, 2048, 0.4),
    ]
}

#[test]
fn a_gpu_flapping_off_the_bus_mid_sample_keeps_every_sum() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let _jobs = acme_and_beta(&node);
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
    assert_only_gpu0_accrues(&while_lost, &still_lost, "was lost");
    node.set_lost(1, false);
    wait_state(&agent, "1", "busy");
    agent.wait_samples(3);
    let m2 = agent.metrics();
    assert_conserved_except(&m1, &m2, &["1"]);
    // Once back, every sum holds on GPU 1 too.
    agent.wait_samples(5);
    assert_conserved(&m2, &agent.metrics());
    // Beta was charged on GPU 1 only, and less than the wall time of the run.
    let beta_gpu1 = m2.increase(
        &m1,
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", "beta"), ("gpu", "1")],
    );
    let acme_gpu0 = m2.increase(
        &m1,
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
    let _acme = busy_job(&node, &base, "acme", 0, 4096, 0.5);
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
    let _jobs = acme_and_beta(&node);
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
    let still = agent.metrics();
    assert_only_gpu0_accrues(&during, &still, "hung");
    // Its energy series stays at its last value: gone, it would come back
    // looking like a counter reset.
    let energy = |m: &Metrics| m.value("tally_gpu_energy_joules_total", &[("gpu", "1")]);
    let last = energy(&m1).expect("GPU 1's energy before the hang");
    for m in [&during, &still] {
        assert!(
            energy(m).is_some_and(|e| e >= last),
            "GPU 1's energy series while it hangs: {:?} (before: {last})",
            energy(m)
        );
    }
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
    let acme = Cgroup::create(&job_path(&base, "acme"));
    let beta = Cgroup::create(&job_path(&base, "beta"));
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
        m2.increase(
            &m1,
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
        m2.increase(&m1, "tally_gpu_observed_seconds_total", &[("gpu", "0")]),
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
    let _acme = busy_job(&node, &base, "acme", 0, 4096, 0.5);
    // The agent (and the simulated driver inside it) see the shifted clock.
    let config = node.dir.path().join("clock-agent.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let addr = format!("127.0.0.1:{}", tally_e2e::free_port())
        .parse()
        .unwrap();
    let how = Launch {
        env: clock.env().to_vec(),
        ..Launch::default()
    };
    let agent = Agent::launch(&how, &node, &config, addr, &["--sample-interval", "200ms"]);
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
    let observed = m2.increase(&m1, "tally_gpu_observed_seconds_total", &[("gpu", "0")]);
    assert!(
        observed > 0.0 && observed <= elapsed + 1.0,
        "observed {observed} s over {elapsed} s of monotonic time"
    );
    // SM seconds go on at the registered rate although the driver's sample
    // time stamps (wall clock) are now an hour behind the last one seen.
    let sm = m2.increase(
        &m1,
        "tally_tenant_gpu_sm_seconds_total",
        &[("tenant", "acme"), ("gpu", "0")],
    );
    close(sm, 0.5 * observed, "acme's SM seconds after the jump");
    assert!(!agent.log_text().contains("panicked"));
}

// ------------------------------------------------ the spool under faults

mod spool {
    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
        process::Command,
        time::Duration,
    };

    use tally_e2e::{
        Agent, ChildGuard, SimNode,
        aggregator_support::{
            Aggregator, LedgerReader, add_counters, agent_config, assert_ledger_exact,
            reported_counters, spooled, sqlite, subdir,
        },
        require_root, wait_for,
    };

    const LONG: Duration = Duration::from_secs(90);
    const RULES: &str = "[[tenant.rule]]\nuser = true\n";

    /// An aggregator on a fresh SQLite ledger in `dir`: its tokens
    /// directory, the aggregator, and a reader of the ledger.
    fn sqlite_ledger(dir: &Path) -> (PathBuf, Aggregator, LedgerReader) {
        let backend = sqlite(dir);
        let tokens = dir.join("agg");
        let agg = Aggregator::start(&tokens, &backend, "");
        let ledger = LedgerReader::new(&backend);
        (tokens, agg, ledger)
    }

    /// A process holding GPU 0, and an agent (node `name`, report state in
    /// `state`) reporting it to `agg`, once its first reports are in.
    fn start_reporting(
        node: &SimNode,
        agg: &Aggregator,
        ledger: &LedgerReader,
        tokens: &Path,
        name: &str,
        state: &Path,
    ) -> (ChildGuard, Agent) {
        let p = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
        node.register(p.pid(), 0, None, 4096, 0.5);
        let config = agent_config(&agg.url(), name, state, tokens, RULES);
        let agent = Agent::start(node, &config, &["--sample-interval", "200ms"]);
        wait_for("first reports", LONG, || {
            (ledger.reports(name).0 >= 2).then_some(())
        });
        (p, agent)
    }

    #[test]
    fn an_agent_killed_during_spool_replay_loses_and_doubles_nothing() {
        if !require_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (tokens, mut agg, ledger) = sqlite_ledger(dir.path());
        let node = SimNode::standard();
        let state = subdir(dir.path(), "state");
        let (p, agent) = start_reporting(&node, &agg, &ledger, &tokens, "replay", &state);
        let (addr, config_path) = (agent.addr, agent.config.clone());
        agg.stop();
        wait_for("a long spool", LONG, || {
            (spooled(&state) >= 25).then_some(())
        });
        // The aggregator comes back and the agent starts replaying: SIGKILL
        // it in the middle of the replay. A replay of 25 reports takes a
        // few milliseconds, so the agent runs in 2 ms slices between
        // freezes and is killed frozen, in the slice its first report
        // left the spool: the kill lands mid-replay by construction, not
        // by the luck of a poll.
        agent.freeze(true);
        let before = spooled(&state);
        agg.restart();
        wait_for("the replay to start", LONG, || {
            agent.freeze(false);
            std::thread::sleep(Duration::from_millis(2));
            agent.freeze(true);
            (spooled(&state) < before).then_some(())
        });
        let mut agent = agent;
        agent.child.kill();
        let mut expected = BTreeMap::new();
        add_counters(&mut expected, reported_counters(&state));
        assert!(spooled(&state) > 0, "the replay finished before the kill");
        // A new process finishes the replay and goes on reporting.
        let agent = Agent::start_with(&node, &config_path, addr, &["--sample-interval", "200ms"]);
        wait_for("the spool to drain", LONG, || {
            (spooled(&state) == 0).then_some(())
        });
        agent.wait_samples(5);
        assert!(agent.stop().success());
        add_counters(&mut expected, reported_counters(&state));
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
        let (tokens, mut agg, ledger) = sqlite_ledger(dir.path());
        let node = SimNode::standard();
        let disk = SmallDisk::mount(&dir.path().join("disk"), "96k");
        let state = disk.0.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let (p, agent) = start_reporting(&node, &agg, &ledger, &tokens, "diskfull", &state);
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
        add_counters(&mut expected, reported_counters(&state));
        assert_ledger_exact(&ledger, &agg, "diskfull", &state, &expected);
        drop(p);
    }
}
