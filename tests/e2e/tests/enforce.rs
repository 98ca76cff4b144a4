//! Local quota enforcement, end to end (issue 4): the real `tally agent` on
//! the NVML simulator, real processes started with `tally run` in real
//! tenant cgroups beneath our own (v2 for attribution and BPF, v1 for limits
//! on this hybrid host), a real `cgroup/dev` program, real signals, and the
//! audit log checked with `tally audit verify`. Issue 17: the same device
//! and network quotas on cgroups that only a tenant rule attributes.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use tally_e2e::{
    Agent, Metrics, SimNode,
    enforce_support::{ByteSampler, TenantEnv, alive, nvidia_nodes, remove_tree, v2_frozen},
    require_root, skip, tally_bin, wait_for,
};

const UUID0: &str = "GPU-e2e00000-0000-4000-8000-000000000000";
const UUID1: &str = "GPU-e2e00000-0000-4000-8000-000000000001";

fn scenario() -> String {
    format!(
        r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
uuid = "{UUID0}"
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
uuid = "{UUID1}"
power_idle_w = 70
power_max_w = 700
"#
    )
}

const FAST: &[&str] = &["--sample-interval", "200ms"];
const LONG: Duration = Duration::from_secs(60);

fn action_count(agent: &Agent, tenant: &str, resource: &str, action: &str) -> f64 {
    agent.metrics().sum(
        "tally_enforcement_actions_total",
        &[
            ("tenant", tenant),
            ("resource", resource),
            ("action", action),
        ],
    )
}

/// An agent enforcing some quotas on the simulator: the tenant tree its
/// jobs run in, the simulator, the agent, and the config file `tally run`
/// reads. Bound as `let (env, node, agent, cfg)`, they drop in reverse:
/// the agent before the simulator and the tree.
type Enforcing = (TenantEnv, SimNode, Agent, PathBuf);

fn enforcing(quotas: &str) -> Enforcing {
    enforcing_with(quotas, FAST)
}

/// [`enforcing`] with other agent arguments.
fn enforcing_with(quotas: &str, args: &[&str]) -> Enforcing {
    let env = TenantEnv::new();
    let config = env.config(quotas);
    launch(env, &config, quotas, args)
}

/// Starts the agent on `agent_config` (which holds `quotas`).
fn launch(env: TenantEnv, agent_config: &str, quotas: &str, args: &[&str]) -> Enforcing {
    let node = SimNode::new(&scenario());
    let agent = Agent::start(&node, agent_config, args);
    let cfg = env.write_config(quotas);
    (env, node, agent, cfg)
}

/// A 1 GiB `gpu_memory` quota of `tenant`, acted on with `action` after
/// 1 s of grace.
fn gpu_memory_quota(tenant: &str, action: &str) -> String {
    format!(
        "[tenant.quota.{tenant}]\ngpu_memory = '1GiB'\ngpu_memory_action = '{action}'\n\
         grace = '1s'\n"
    )
}

/// A quota gauge (`tally_tenant_quota_limit` or `_usage`) of one tenant's
/// resource.
fn quota_gauge(m: &Metrics, name: &str, tenant: &str, resource: &str) -> Option<f64> {
    m.value(name, &[("tenant", tenant), ("resource", resource)])
}

/// Enforcement actions of one kind taken on a tenant, every resource.
fn actions_taken(m: &Metrics, tenant: &str, action: &str) -> f64 {
    m.sum(
        "tally_enforcement_actions_total",
        &[("tenant", tenant), ("action", action)],
    )
}

/// Runs `tally <command...> <path>`.
fn tally_on(command: &[&str], path: &Path) -> Output {
    Command::new(tally_bin())
        .args(command)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run tally {command:?}: {e}"))
}

fn verify_audit(path: &Path) {
    let out = tally_on(&["audit", "verify"], path);
    assert!(
        out.status.success(),
        "audit log does not verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// Item 2: the agent writes cpu/memory/pids limits on `tally/<tenant>`, and
/// `tally run` starts a command in `tally/<tenant>/<job>` on every
/// hierarchy, where the limits hold.
#[test]
fn tenant_cgroups_carry_limits_and_jobs() {
    if !require_root() {
        return;
    }
    let quotas = "[tenant.quota.lim]\ncpu_cores = 0.5\nmemory = '64MiB'\npids = 8\n";
    let (env, _node, agent, cfg) = enforcing(quotas);

    // Limits, where this host keeps each controller.
    let limit_file =
        |controller: &str, v1: &str, v2: &str| match env.v1_dir(controller, "lim", None) {
            Some(d)
                if env
                    .layout
                    .backend(controller)
                    .is_some_and(|b| matches!(b, tally_agent::enforce::cgroup::Backend::V1(_))) =>
            {
                d.join(v1)
            }
            _ => env.v2_dir("lim", None).join(v2),
        };
    let mem = limit_file("memory", "memory.limit_in_bytes", "memory.max");
    let pids = limit_file("pids", "pids.max", "pids.max");
    let cpu = limit_file("cpu", "cpu.cfs_quota_us", "cpu.max");
    wait_for("the agent's limits", LONG, || {
        (fs::read_to_string(&mem).ok()?.trim() == (64u64 << 20).to_string()).then_some(())
    });
    assert_eq!(read(&pids), "8");
    let cpu_text = read(&cpu);
    assert!(
        cpu_text == "50000" || cpu_text == "50000 100000",
        "cpu limit {cpu_text}"
    );
    for resource in ["cpu_cores", "memory", "pids"] {
        let applied = env.audited("lim", "limit_applied");
        assert!(
            applied.iter().any(|r| r["resource"] == resource),
            "no limit_applied for {resource}: {applied:?}"
        );
    }

    // A job: on every hierarchy it sits in <parent>/tally/lim/j1.
    let job = env.run(&cfg, "lim", "j1", "sleep", &["300"]);
    let text = read(Path::new(&format!("/proc/{}/cgroup", job.pid())));
    for h in env.layout.job_hierarchies() {
        let want = env.path_in(h, "lim", Some("j1"));
        let line = text
            .lines()
            .find(|l| {
                let mut parts = l.splitn(3, ':');
                let _ = parts.next();
                let ctrls = parts.next().unwrap_or("");
                if h.is_v2() {
                    ctrls.is_empty()
                } else {
                    ctrls
                        .split(',')
                        .any(|c| h.controllers.iter().any(|x| x == c))
                }
            })
            .unwrap_or_else(|| panic!("no line for {:?} in {text}", h.mount));
        assert!(line.ends_with(&want), "{line} is not in {want}");
    }
    // The pids limit holds: a second job's shell cannot start 30 sleeps.
    let forks = env
        .run_command(
            &cfg,
            "lim",
            "j2",
            "/bin/sh",
            &[
                "-c",
                "i=0; while [ $i -lt 30 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done",
            ],
        )
        .stdin(Stdio::null())
        .output()
        .expect("run the forking job");
    let stderr = String::from_utf8_lossy(&forks.stderr);
    assert!(
        stderr.contains("fork"),
        "30 forks under pids = 8: {stderr:?}"
    );
    // The kernel counts the refusal at the job (v1) or the tenant (v2).
    let max_events = |dir: &Path| -> u64 {
        fs::read_to_string(dir.join("pids.events"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let tenant_dir = pids.parent().unwrap();
    assert!(
        max_events(tenant_dir) + max_events(&tenant_dir.join("j2")) > 0,
        "no pids.events max in {}",
        tenant_dir.display()
    );
    let current: u64 = read(&pids.with_file_name("pids.current")).parse().unwrap();
    assert!(current <= 8, "pids.current {current} above the limit 8");
    for h in env.layout.job_hierarchies() {
        remove_tree(&h.dir(&env.path_in(h, "lim", Some("j2"))));
    }

    // The cpu limit holds: a busy loop gets about half a core.
    let _busy = env.run(&cfg, "lim", "j3", "/bin/sh", &["-c", "while :; do :; done"]);
    wait_for("CPU usage of the tenant in /metrics", LONG, || {
        let u = quota_gauge(
            &agent.metrics(),
            "tally_tenant_quota_usage",
            "lim",
            "cpu_cores",
        )?;
        (u > 0.2).then_some(())
    });
    let cpu_seconds = || -> Option<f64> {
        let cg = tally_agent::enforce::cgroup::TenantTree::new(
            env.layout.clone(),
            Some(env.parent.clone()),
        );
        cg.usage("lim").get("cpu_seconds").copied()
    };
    let (t0, c0) = (
        std::time::Instant::now(),
        cpu_seconds().expect("cpu usage readable"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let cores = (cpu_seconds().unwrap() - c0) / t0.elapsed().as_secs_f64();
    assert!(
        cores < 0.65,
        "a busy loop used {cores:.2} cores under cpu_cores = 0.5"
    );

    let m = agent.metrics();
    assert_eq!(
        quota_gauge(&m, "tally_tenant_quota_limit", "lim", "memory"),
        Some((64u64 << 20) as f64)
    );
    assert_eq!(
        quota_gauge(&m, "tally_tenant_quota_limit", "lim", "pids"),
        Some(8.0)
    );
    drop(job);
    verify_audit(&env.audit_log());
}

/// Opens `path` from a process of `tenant` (via `tally run`); returns the
/// shell's error text (empty when the open succeeded).
fn open_as(env: &TenantEnv, cfg: &Path, tenant: &str, path: &Path) -> String {
    let job = tally_e2e::unique("open");
    let out = env
        .run_command(
            cfg,
            tenant,
            &job,
            "/bin/sh",
            &["-c", "exec 3<\"$0\"", &path.display().to_string()],
        )
        .stdin(Stdio::null())
        .output()
        .expect("run tally run");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Item 3: a tenant with `gpus` opens only those devices (real char nodes
/// 195:N made with mknod; no driver, so an allowed open gives ENXIO).
#[test]
fn gpu_devices_outside_the_tenants_list_are_denied() {
    if !require_root() {
        return;
    }
    if tally_agent::cgroupfs::unified_root().is_none() {
        skip("no cgroup v2 hierarchy to attach the cgroup/dev program to");
        return;
    }
    let quotas = format!("[tenant.quota.dev]\ngpus = ['{UUID1}']\n");
    let (env, _node, _agent, cfg) = enforcing(&quotas);
    env.wait_audit("the device allow-list from the snapshot", |r| {
        r["tenant"] == "dev"
            && r["action"] == "devices_allowed"
            && r["detail"]["allowed"] == serde_json::json!(["195:1"])
    });

    let devs = nvidia_nodes();
    const DENIED: &str = "Operation not permitted";
    // No driver behind the nodes: an allowed open gets ENXIO.
    const ALLOWED: &str = "No such device or address";
    for (tenant, device, want, why) in [
        ("dev", "nvidia0", DENIED, "GPU 0 should be denied (EPERM)"),
        (
            "dev",
            "nvidia1",
            ALLOWED,
            "GPU 1 should be allowed (ENXIO without a driver)",
        ),
        ("dev", "nvidiactl", ALLOWED, "nvidiactl is always allowed"),
        // Another tenant, and this test itself (below), are not restricted.
        (
            "free",
            "nvidia0",
            ALLOWED,
            "a tenant without `gpus` opens every GPU",
        ),
    ] {
        let err = open_as(&env, &cfg, tenant, &devs.path().join(device));
        assert!(err.contains(want), "{why}: {err:?}");
    }
    let mine = fs::File::open(devs.path().join("nvidia0")).unwrap_err();
    assert_eq!(mine.raw_os_error(), Some(nix::libc::ENXIO), "{mine}");
    verify_audit(&env.audit_log());
}

/// Item 5: `alert` after grace (metric + audit), and no action on a tenant
/// under its quota.
#[test]
fn gpu_memory_alert_and_no_action_under_quota() {
    if !require_root() {
        return;
    }
    let quotas = &(gpu_memory_quota("loud", "alert") + &gpu_memory_quota("calm", "terminate"));
    let (env, node, agent, cfg) = enforcing(quotas);
    let loud = env.run(&cfg, "loud", "j", "sleep", &["300"]);
    let calm = env.run(&cfg, "calm", "j", "sleep", &["300"]);
    node.register(loud.pid(), 0, None, 2048, 0.5);
    node.register(calm.pid(), 1, None, 512, 0.5);

    wait_for("the alert", LONG, || {
        (action_count(&agent, "loud", "gpu_memory", "alert") == 1.0).then_some(())
    });
    let rec = &env.audited("loud", "alert")[0];
    assert_eq!(rec["resource"], "gpu_memory");
    assert_eq!(rec["detail"]["pids"], serde_json::json!([loud.pid()]));
    assert_eq!(rec["node"], "e2e-node");
    // Many more samples: still one alert, nobody touched.
    agent.wait_samples(10);
    let m = agent.metrics();
    assert_eq!(actions_taken(&m, "loud", "alert"), 1.0);
    assert_eq!(
        m.sum("tally_enforcement_actions_total", &[("tenant", "calm")]),
        0.0
    );
    assert_eq!(
        quota_gauge(&m, "tally_tenant_quota_usage", "calm", "gpu_memory"),
        Some((512u64 << 20) as f64)
    );
    assert_eq!(
        quota_gauge(&m, "tally_tenant_quota_usage", "loud", "gpu_memory"),
        Some((2048u64 << 20) as f64)
    );
    assert!(alive(loud.pid()) && alive(calm.pid()));
    assert!(env.audited("calm", "terminate").is_empty());
    verify_audit(&env.audit_log());
}

/// Item 5: `throttle` freezes the job's cgroup on a duty cycle, and thaws it
/// for good once usage is back under quota.
#[test]
fn gpu_memory_throttle_freezes_on_a_duty_cycle() {
    if !require_root() {
        return;
    }
    let quotas = &gpu_memory_quota("slow", "throttle");
    let (env, node, agent, cfg) = enforcing(quotas);
    let job = env.run(&cfg, "slow", "j", "sleep", &["300"]);
    node.register(job.pid(), 0, None, 2048, 0.9);
    let dir = env.v2_dir("slow", Some("j"));

    wait_for("the job's cgroup to freeze", LONG, || {
        (v2_frozen(&dir) == Some(true)).then_some(())
    });
    wait_for("the duty cycle to thaw it", LONG, || {
        (v2_frozen(&dir) == Some(false)).then_some(())
    });
    wait_for("the duty cycle to freeze it again", LONG, || {
        (v2_frozen(&dir) == Some(true)).then_some(())
    });
    let rec = &env.audited("slow", "throttle")[0];
    let cgroups = rec["detail"]["cgroups"].as_array().unwrap();
    assert!(
        cgroups.iter().any(|c| c == &dir.display().to_string()),
        "{rec}"
    );
    assert_eq!(action_count(&agent, "slow", "gpu_memory", "throttle"), 1.0);

    node.unregister(job.pid());
    env.wait_audit("the throttle to end", |r| {
        r["tenant"] == "slow" && r["action"] == "throttle_end"
    });
    agent.wait_samples(5);
    assert_eq!(v2_frozen(&dir), Some(false), "thawed for good");
    assert!(alive(job.pid()), "throttle never kills");
    verify_audit(&env.audit_log());
}

/// Item 5: `terminate` sends SIGTERM, then SIGKILL after `kill_timeout` to
/// a process that ignores it; a process that exits on SIGTERM is not
/// killed again.
#[test]
fn gpu_memory_terminate_then_kill() {
    if !require_root() {
        return;
    }
    let quotas = &(gpu_memory_quota("greedy", "terminate") + "kill_timeout = '1s'\n");
    let (env, node, agent, cfg) = enforcing(quotas);
    let polite = env.run(&cfg, "greedy", "a", "sleep", &["300"]);
    let stubborn = env.run(
        &cfg,
        "greedy",
        "b",
        "/bin/sh",
        &["-c", "trap '' TERM; while :; do sleep 1; done"],
    );
    let (p1, p2) = (polite.pid(), stubborn.pid());
    node.register(p1, 0, None, 800, 0.5);
    node.register(p2, 1, None, 800, 0.5);

    wait_for("both processes gone", LONG, || {
        (!alive(p1) && !alive(p2)).then_some(())
    });
    let term: Vec<u64> = env
        .audited("greedy", "terminate")
        .iter()
        .map(|r| r["detail"]["pid"].as_u64().unwrap())
        .collect();
    assert!(
        term.contains(&u64::from(p1)) && term.contains(&u64::from(p2)),
        "{term:?}"
    );
    let killed = env.wait_audit("the SIGKILL", |r| {
        r["tenant"] == "greedy" && r["action"] == "kill"
    });
    assert_eq!(killed["detail"]["pid"], p2, "only the stubborn one");
    // Counts reach /metrics with the next sample.
    wait_for("the kill to be counted", LONG, || {
        (action_count(&agent, "greedy", "gpu_memory", "kill") == 1.0).then_some(())
    });
    agent.wait_samples(3);
    assert_eq!(env.audited("greedy", "kill").len(), 1);
    let m = agent.metrics();
    assert_eq!(actions_taken(&m, "greedy", "terminate"), 2.0);
    assert_eq!(actions_taken(&m, "greedy", "kill"), 1.0);
    verify_audit(&env.audit_log());
}

/// The throttled process dies and its cgroup is removed mid-throttle: the
/// agent goes on sampling, and the throttle ends when usage does.
#[test]
fn cgroup_removed_during_throttle() {
    if !require_root() {
        return;
    }
    let quotas = &gpu_memory_quota("gone", "throttle");
    let (env, node, mut agent, cfg) = enforcing(quotas);
    let mut job = env.run(&cfg, "gone", "j", "sleep", &["300"]);
    let pid = job.pid();
    node.register(pid, 0, None, 4096, 0.9);
    let dir = env.v2_dir("gone", Some("j"));
    wait_for("the job's cgroup to freeze", LONG, || {
        (v2_frozen(&dir) == Some(true)).then_some(())
    });
    // Kill it (SIGKILL reaches frozen v2 tasks) and remove its cgroups.
    job.kill();
    for h in env.layout.job_hierarchies() {
        remove_tree(&h.dir(&env.path_in(h, "gone", Some("j"))));
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    agent.wait_samples(10);
    assert!(
        agent.child.0.try_wait().unwrap().is_none(),
        "agent died: {}",
        agent.log_text()
    );
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
    node.unregister(pid);
    env.wait_audit("the throttle to end", |r| {
        r["tenant"] == "gone" && r["action"] == "throttle_end"
    });
    verify_audit(&env.audit_log());
    drop(agent);
}

/// A pid reused between the sample and the action is never signalled: the
/// process holding GPU memory exits, a new process of the same tenant gets
/// its pid (forced with `ns_last_pid`), and `terminate` skips it.
#[test]
fn reused_pid_is_not_terminated() {
    if !require_root() {
        return;
    }
    let ns_last_pid = Path::new("/proc/sys/kernel/ns_last_pid");
    if fs::OpenOptions::new()
        .write(true)
        .open(ns_last_pid)
        .is_err()
    {
        skip("cannot write /proc/sys/kernel/ns_last_pid to force a pid reuse");
        return;
    }
    let quotas = &(gpu_memory_quota("reuse", "terminate") + "kill_timeout = '1s'\n");
    // Slow samples: the reuse happens between two of them.
    let (env, node, agent, cfg) = enforcing_with(quotas, &["--sample-interval", "3s"]);
    let mut first = env.run(&cfg, "reuse", "j", "sleep", &["300"]);
    let pid = first.pid();
    node.register(pid, 0, None, 2048, 0.5);
    // The first sample that sees it starts the grace period...
    wait_for("the agent to see the process", LONG, || {
        let snap = agent.snapshot();
        snap["gpus"]
            .as_array()?
            .iter()
            .flat_map(|g| g["processes"].as_array().cloned().unwrap_or_default())
            .any(|p| p["pid"] == pid && p["tenant"] == "reuse")
            .then_some(())
    });
    // ...and before the next one, the pid belongs to another process.
    first.kill();
    let mut second = None;
    for _ in 0..500 {
        fs::write(ns_last_pid, (pid - 1).to_string()).expect("write ns_last_pid");
        let child = env
            .run_command(&cfg, "reuse", "j", "sleep", &["300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut g = tally_e2e::ChildGuard(child);
        if g.pid() == pid {
            second = Some(g);
            break;
        }
        g.kill();
    }
    let Some(second) = second else {
        skip("could not get the same pid again (a busy machine took it)");
        return;
    };
    env.wait_in_job(pid, "reuse", "j");
    let rec = env.wait_audit("the skipped action", |r| {
        r["tenant"] == "reuse" && r["action"] == "skip" && r["detail"]["pid"] == pid
    });
    let reason = rec["detail"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("reused"), "{rec}");
    agent.wait_samples(2);
    assert!(alive(second.pid()), "the new process was hit");
    assert!(env.audited("reuse", "terminate").is_empty());
    assert!(env.audited("reuse", "kill").is_empty());
    verify_audit(&env.audit_log());
}

/// Item 6: `tally audit verify` names the first line that was changed.
#[test]
fn tampered_audit_log_is_detected() {
    if !require_root() {
        return;
    }
    let quotas = "\
[tenant.quota.aud]
gpu_memory = '1GiB'
grace = '0s'
[tenant.quota.other]
pids = 100
";
    let (env, node, agent, cfg) = enforcing(quotas);
    let job = env.run(&cfg, "aud", "j", "sleep", &["300"]);
    node.register(job.pid(), 0, None, 2048, 0.5);
    env.wait_audit("an alert", |r| r["action"] == "alert");
    drop(agent);
    let log = env.audit_log();
    verify_audit(&log);
    // The agent made its key (0600) and signed every line with it.
    let key = log.with_file_name("audit.key");
    let mode = fs::metadata(&key)
        .expect("the agent's audit key")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let out = Command::new(tally_bin())
        .args(["audit", "verify", "--require-keyed", "--key-file"])
        .arg(&key)
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the agent's log does not verify with its key: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    let tampered_at = lines
        .iter()
        .position(|l| l.contains("\"alert\""))
        .expect("alert line");
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[tampered_at] = edited[tampered_at].replace("\"tenant\":\"aud\"", "\"tenant\":\"x\"");
    assert_ne!(edited[tampered_at], lines[tampered_at]);
    let bad = env.dir.path().join("tampered.log");
    fs::write(&bad, edited.join("\n") + "\n").unwrap();
    let out = tally_on(&["audit", "verify"], &bad);
    assert!(!out.status.success(), "a tampered log verified");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("line {}:", tampered_at + 1)),
        "should name line {}: {err}",
        tampered_at + 1
    );
}

/// The 8 Mbit/s both network tests police at, in bytes/s.
const RATE: f64 = 1_000_000.0;

/// [`enforcing`] with the network probes (their own pin
/// directory, returned to outlive the agent), once `tenant`'s token bucket
/// for `resource` is set. None (skipped) without a cgroup v2 hierarchy.
fn start_policing(
    quotas: &str,
    tenant: &str,
    resource: &str,
) -> Option<(tally_e2e::probes_support::PinDir, Enforcing)> {
    if tally_agent::cgroupfs::unified_root().is_none() {
        skip("no cgroup v2 hierarchy for the cgroup_skb programs");
        return None;
    }
    let pin = tally_e2e::probes_support::PinDir::new();
    let env = TenantEnv::new();
    let config = format!(
        "{}\n[probes]\npin_dir = '{}'\npcie = false\nprocess = false\n",
        env.config(quotas),
        pin.0.display()
    );
    let started = launch(env, &config, quotas, FAST);
    started.0.wait_audit("the token bucket", |r| {
        r["tenant"] == tenant && r["resource"] == resource && r["action"] == "limit_applied"
    });
    Some((pin, started))
}

/// Waits for the policer's drops of `tenant` in `direction` in /metrics.
fn wait_drops(agent: &Agent, tenant: &str, direction: &str) {
    wait_for(
        &format!("the policer's {direction} drops in /metrics"),
        LONG,
        || {
            let m = agent.metrics();
            (m.sum(
                "tally_tenant_network_dropped_packets_total",
                &[("tenant", tenant), ("direction", direction)],
            ) > 0.0)
                .then_some(())
        },
    );
}

/// Item 4: a tenant limited to 8 Mbit/s (1 MB/s) sends at that rate, ±15 %,
/// over loopback TCP, while an unlimited tenant sending at the same time is
/// not held to it; the policer's drops are counted for the limited tenant.
#[test]
fn network_egress_rate_is_policed() {
    use std::time::Instant;

    use tally_e2e::probes_support::{TcpServer, fake_cuda};

    if !require_root() {
        return;
    }
    const SLOW_BYTES: u64 = 6_000_000;
    const FAST_BYTES: u64 = 200_000_000;
    let quotas = "[tenant.quota.netslow]\nnetwork_egress = '8Mbit'\n";
    let Some((_pin, (env, _node, agent, cfg))) =
        start_policing(quotas, "netslow", "network_egress")
    else {
        return;
    };
    let netload = fake_cuda().netload.display().to_string();

    let send = |tenant: &'static str, bytes: u64| {
        let server = TcpServer::start_with(&fake_cuda().netload, bytes, 0);
        let port = server.addr.port().to_string();
        let mut cmd = env.run_command(
            &cfg,
            tenant,
            &tally_e2e::unique("send"),
            &netload,
            &["tcp-client", "127.0.0.1", &port, &bytes.to_string(), "0"],
        );
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        (server, cmd)
    };
    let (slow_server, mut slow_cmd) = send("netslow", SLOW_BYTES);
    let (fast_server, mut fast_cmd) = send("netfast", FAST_BYTES);
    // The limited tenant's egress bytes as the agent samples them, with
    // the sample times: the rate is taken over the steady middle of the
    // transfer (10 %..90 % of its bytes), away from process start-up, the
    // initial burst and the tail.
    let sampler = ByteSampler::start(agent.addr, "netslow", "network_egress_bytes_total");
    let start = Instant::now();
    let mut slow = tally_e2e::ChildGuard(slow_cmd.spawn().expect("spawn slow sender"));
    let fast_thread = std::thread::spawn(move || {
        let t = Instant::now();
        let mut fast = tally_e2e::ChildGuard(fast_cmd.spawn().expect("spawn fast sender"));
        let status = fast.0.wait().expect("wait fast sender");
        fast_server.finish();
        (status, t.elapsed())
    });
    let status = slow.0.wait().expect("wait slow sender");
    assert!(status.success(), "slow sender failed: {status}");
    slow_server.finish();
    let slow_elapsed = start.elapsed();
    agent.wait_samples(2);
    let slow_rate = sampler.steady_rate(SLOW_BYTES);
    let (fast_status, fast_elapsed) = fast_thread.join().expect("fast sender thread");
    assert!(fast_status.success(), "fast sender failed: {fast_status}");

    let end_to_end = SLOW_BYTES as f64 / slow_elapsed.as_secs_f64();
    let fast_rate = FAST_BYTES as f64 / fast_elapsed.as_secs_f64();
    eprintln!(
        "limited tenant: {slow_rate:.0} B/s steady ({end_to_end:.0} B/s end to end), unlimited \
         tenant: {fast_rate:.0} B/s"
    );
    assert!(
        (0.85 * RATE..=1.15 * RATE).contains(&slow_rate),
        "limited tenant sent at {slow_rate:.0} B/s, not 1 MB/s ±15 %"
    );
    assert!(
        end_to_end <= 1.15 * RATE,
        "limited tenant's payload went at {end_to_end:.0} B/s end to end"
    );
    assert!(
        fast_rate > 3.0 * RATE,
        "unlimited tenant sent at only {fast_rate:.0} B/s"
    );
    wait_drops(&agent, "netslow", "egress");
    let m = agent.metrics();
    assert_eq!(
        m.sum(
            "tally_tenant_network_dropped_packets_total",
            &[("tenant", "netfast")]
        ),
        0.0
    );
    assert_eq!(
        quota_gauge(&m, "tally_tenant_quota_limit", "netslow", "network_egress"),
        Some(RATE)
    );
    verify_audit(&env.audit_log());
}

/// Item 5, GPU time: a tenant holding a GPU past `gpu_seconds_per_hour`
/// is acted on (alert here; the actions are shared with GPU memory).
#[test]
fn gpu_time_budget_alerts() {
    if !require_root() {
        return;
    }
    let quotas = "\
[tenant.quota.hours]
gpu_seconds_per_hour = 2
gpu_time_action = 'alert'
grace = '0s'
";
    let (env, node, agent, cfg) = enforcing(quotas);
    let job = env.run(&cfg, "hours", "j", "sleep", &["300"]);
    node.register(job.pid(), 0, None, 100, 0.5);
    wait_for("the GPU-time alert", LONG, || {
        (action_count(&agent, "hours", "gpu_seconds_per_hour", "alert") == 1.0).then_some(())
    });
    let m = agent.metrics();
    let usage = quota_gauge(
        &m,
        "tally_tenant_quota_usage",
        "hours",
        "gpu_seconds_per_hour",
    )
    .expect("GPU-time usage exported");
    assert!(usage > 2.0, "alerted at {usage} GPU seconds");
    let rec = &env.audited("hours", "alert")[0];
    assert_eq!(rec["resource"], "gpu_seconds_per_hour");
    assert!(alive(job.pid()));
    verify_audit(&env.audit_log());
}

/// Item 1: `tally config check` names every bad quota key and exits 64.
#[test]
fn config_check_names_every_bad_quota_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    fs::write(
        &bad,
        "[tenant.quota.acme]\nmemory = '8 gigs'\ngpu_memory_action = 'explode'\nnetwork_egress = \
         '100Mbitz'\ncpu_core = 2\n[tenant.quota.beta]\ngrace = 'soon'\n",
    )
    .unwrap();
    let out = tally_on(&["config", "check"], &bad);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "tenant.quota.acme.memory",
        "tenant.quota.acme.gpu_memory_action",
        "tenant.quota.acme.network_egress",
        "tenant.quota.acme.cpu_core",
        "tenant.quota.beta.grace",
    ] {
        assert!(
            err.contains(&format!("key `{key}`")),
            "{key} not named: {err}"
        );
    }
    assert!(err.contains("5 problems"), "{err}");
    let good = dir.path().join("good.toml");
    fs::write(
        &good,
        format!(
            "[tenant.quota.acme]\ncpu_cores = 2.0\nmemory = '8GiB'\npids = 512\ngpus = ['{UUID0}']\n\
             gpu_memory = '20GiB'\ngpu_memory_action = 'terminate'\nnetwork_egress = '100Mbit'\n\
             network_ingress = '100Mbit'\ngrace = '30s'\n"
        ),
    )
    .unwrap();
    let out = tally_on(&["config", "check"], &good);
    assert!(out.status.success(), "{out:?}");
}

/// Item 4, ingress: a tenant's receiver limited to 8 Mbit/s gets that rate
/// ±15 %, and the drops are counted.
#[test]
fn network_ingress_rate_is_policed() {
    use std::{
        io::{BufRead, BufReader},
        time::Instant,
    };

    use tally_e2e::probes_support::fake_cuda;

    if !require_root() {
        return;
    }
    const BYTES: u64 = 4_000_000;
    let quotas = "[tenant.quota.netin]\nnetwork_ingress = '8Mbit'\n";
    let Some((_pin, (env, _node, agent, cfg))) = start_policing(quotas, "netin", "network_ingress")
    else {
        return;
    };
    let netload = fake_cuda().netload.display().to_string();
    let mut server = tally_e2e::ChildGuard(
        env.run_command(
            &cfg,
            "netin",
            "recv",
            &netload,
            &["tcp-serve", &BYTES.to_string(), "0"],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn receiver"),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("read port");
    let port = line
        .strip_prefix("port ")
        .map(|p| p.trim().to_owned())
        .unwrap_or_else(|| panic!("receiver said {line:?}"));
    let sampler = ByteSampler::start(agent.addr, "netin", "network_ingress_bytes_total");
    let start = Instant::now();
    let client = Command::new(&netload)
        .args(["tcp-client", "127.0.0.1", &port, &BYTES.to_string(), "0"])
        .stdout(Stdio::null())
        .status()
        .expect("run sender");
    assert!(client.success(), "sender failed: {client}");
    let status = server.0.wait().expect("wait receiver");
    assert!(status.success(), "receiver failed: {status}");
    let end_to_end = BYTES as f64 / start.elapsed().as_secs_f64();
    agent.wait_samples(2);
    let rate = sampler.steady_rate(BYTES);
    eprintln!("limited receiver: {rate:.0} B/s steady ({end_to_end:.0} B/s end to end)");
    assert!(
        (0.85 * RATE..=1.15 * RATE).contains(&rate),
        "receiver got {rate:.0} B/s, not 1 MB/s ±15 %"
    );
    wait_drops(&agent, "netin", "ingress");
    verify_audit(&env.audit_log());
}

/// Issue 17: cgroups that only a tenant rule attributes (not Tally's own
/// tree), shaped as the issue's `cgroup = '^/team/(?P<tenant>[^/]+)'`
/// beneath a unique base in our own cgroup. Dropped (removing the cgroups
/// and killing what is in them) after the agent.
struct TeamCgroups {
    /// The rule's regex prefix: `<own cgroup>/<unique base>`.
    prefix: String,
    base: tally_e2e::Cgroup,
}

impl TeamCgroups {
    fn new() -> TeamCgroups {
        let base = tally_e2e::Cgroup::create(&tally_e2e::unique("e2e-quota"));
        TeamCgroups {
            prefix: base.path.trim_end_matches('/').to_owned(),
            base,
        }
    }

    /// `[[tenant.rule]]` attributing `<prefix>/team/<tenant>…` to `<tenant>`.
    fn rule(&self) -> String {
        format!(
            "[[tenant.rule]]\ncgroup = '^{}/team/(?P<tenant>[^/]+)'\n\n",
            regex::escape(&self.prefix)
        )
    }

    /// `<prefix>/team/<rest>`.
    fn create(&self, rest: &str) -> tally_e2e::Cgroup {
        self.base.child(&format!("team/{rest}"))
    }
}

/// Opens `path` from a process in `cgroup`; the shell's error text (empty
/// when the open succeeded).
fn open_in(cgroup: &tally_e2e::Cgroup, path: &Path) -> String {
    let out = cgroup
        .command(
            "/bin/sh",
            &["-c", "exec 3<\"$0\"", &path.display().to_string()],
        )
        .stdin(Stdio::null())
        .output()
        .expect("run the opener");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `cgroup/dev` links process `pid` holds (`attach_type` 6 is
/// `BPF_CGROUP_DEVICE` in the fdinfo of a bpf link).
fn device_links(pid: u32) -> usize {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|f| fs::read_to_string(f.path()).ok())
        .filter(|t| {
            t.lines()
                .any(|l| l.split_whitespace().eq(["link_type:", "cgroup"]))
                && t.lines()
                    .any(|l| l.split_whitespace().eq(["attach_type:", "6"]))
        })
        .count()
}

/// Issue 17, item 1: a tenant matched only by a `cgroup` rule, with
/// `gpus`, gets EPERM on the other GPU's device node in every cgroup the
/// rule gives it (a job and a nested step alike), opens its own GPU, and
/// each denial is counted once for it; a tenant whose first cgroup appears
/// after the agent started is covered too; a rule-matched tenant without
/// `gpus` is not restricted.
#[test]
fn rule_matched_cgroups_get_their_tenants_gpus() {
    if !require_root() {
        return;
    }
    if tally_agent::cgroupfs::unified_root().is_none() {
        skip("no cgroup v2 hierarchy to attach the cgroup/dev program to");
        return;
    }
    let team = TeamCgroups::new();
    let job = team.create("qgpu/job1");
    let step = team.create("qgpu/job2/step0");
    let free = team.create("qfree/job1");
    let quotas = format!(
        "{}[tenant.quota.qgpu]\ngpus = ['{UUID1}']\n[tenant.quota.qlate]\ngpus = ['{UUID1}']\n",
        team.rule()
    );
    let (env, _node, agent, _cfg) = enforcing(&quotas);
    env.wait_audit("the device allow-list from the snapshot", |r| {
        r["tenant"] == "qgpu"
            && r["action"] == "devices_allowed"
            && r["detail"]["allowed"] == serde_json::json!(["195:1"])
    });
    // The walk that attaches to rule-matched cgroups runs every sample.
    agent.wait_samples(2);

    let devs = nvidia_nodes();
    const DENIED: &str = "Operation not permitted";
    const ALLOWED: &str = "No such device or address";
    for (cgroup, device, want, why) in [
        (&job, "nvidia0", DENIED, "GPU 0 should be denied in the job"),
        (
            &step,
            "nvidia0",
            DENIED,
            "GPU 0 should be denied in a nested step",
        ),
        (&job, "nvidia1", ALLOWED, "GPU 1 should be allowed (ENXIO)"),
        (&step, "nvidiactl", ALLOWED, "nvidiactl is always allowed"),
        (
            &free,
            "nvidia0",
            ALLOWED,
            "a tenant without `gpus` opens every GPU",
        ),
    ] {
        let err = open_in(cgroup, &devs.path().join(device));
        assert!(err.contains(want), "{why}: {err:?}");
    }
    // A tenant's first cgroup made after the agent started is attached to
    // within a few walks (its own program: `qlate` has a `gpus` list too).
    let late = team.create("qlate/job");
    wait_for("the late tenant's cgroup denied GPU 0", LONG, || {
        open_in(&late, &devs.path().join("nvidia0"))
            .contains(DENIED)
            .then_some(())
    });
    // Exactly one denial per denied open: one program per cgroup, never a
    // second link where the tenant's own cgroup is also rule-matched.
    let denied = |tenant: &str| {
        agent.metrics().sum(
            "tally_tenant_gpu_device_denied_total",
            &[("tenant", tenant)],
        )
    };
    wait_for("the denials counted", LONG, || {
        (denied("qgpu") >= 2.0 && denied("qlate") >= 1.0).then_some(())
    });
    agent.wait_samples(2);
    assert_eq!((denied("qgpu"), denied("qlate")), (2.0, 1.0));

    // The links go with their cgroups: tally/<tenant> and team/<tenant>
    // for both tenants, then one fewer once team/qlate is removed.
    let pid = agent.child.pid();
    assert_eq!(device_links(pid), 4, "tally/ and team/ of qgpu and qlate");
    drop(late);
    wait_for("the late cgroup's device link detached", LONG, || {
        (device_links(pid) == 3).then_some(())
    });
    verify_audit(&env.audit_log());
}

/// Issue 17, item 1: a tenant's network rate holds across all its cgroups
/// together. A sender in a rule-matched cgroup is held near 8 Mbit/s; then
/// two senders at once, one in another rule-matched cgroup and one in
/// Tally's own tenant cgroup (`tally run`), share the one bucket: together
/// near the rate, not twice it.
#[test]
fn rule_matched_cgroups_share_their_tenants_network_rate() {
    use tally_e2e::probes_support::{TcpServer, fake_cuda};

    if !require_root() {
        return;
    }
    const BYTES: u64 = 6_000_000;
    let team = TeamCgroups::new();
    let pod_a = team.create("qnet/pod-a");
    let pod_b = team.create("qnet/pod-b/ctr");
    let quotas = format!(
        "{}[tenant.quota.qnet]\nnetwork_egress = '8Mbit'\n",
        team.rule()
    );
    let Some((pin, (env, _node, agent, cfg))) = start_policing(&quotas, "qnet", "network_egress")
    else {
        return;
    };
    agent.wait_samples(2);
    let netload = fake_cuda().netload.display().to_string();
    let client = |port: u16, bytes: u64| {
        vec![
            "tcp-client".to_owned(),
            "127.0.0.1".to_owned(),
            port.to_string(),
            bytes.to_string(),
            "0".to_owned(),
        ]
    };
    let run = |mut cmd: Command| {
        let mut child = tally_e2e::ChildGuard(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn sender"),
        );
        std::thread::spawn(move || child.0.wait().expect("wait sender"))
    };

    // One sender, in a rule-matched cgroup.
    let server = TcpServer::start_with(&fake_cuda().netload, BYTES, 0);
    let args = client(server.addr.port(), BYTES);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sampler = ByteSampler::start(agent.addr, "qnet", "network_egress_bytes_total");
    let sender = run(pod_a.command(&netload, &args));
    let status = sender.join().expect("sender thread");
    assert!(status.success(), "sender failed: {status}");
    server.finish();
    agent.wait_samples(2);
    let alone = sampler.steady_rate(BYTES);

    // Two at once: another matched cgroup and Tally's own tenant cgroup.
    let (s1, s2) = (
        TcpServer::start_with(&fake_cuda().netload, BYTES, 0),
        TcpServer::start_with(&fake_cuda().netload, BYTES, 0),
    );
    let (a1, a2) = (client(s1.addr.port(), BYTES), client(s2.addr.port(), BYTES));
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let sampler = ByteSampler::start(agent.addr, "qnet", "network_egress_bytes_total");
    let t1 = run(pod_b.command(&netload, &a1));
    let t2 = run(env.run_command(&cfg, "qnet", &tally_e2e::unique("send"), &netload, &a2));
    for t in [t1, t2] {
        let status = t.join().expect("sender thread");
        assert!(status.success(), "sender failed: {status}");
    }
    s1.finish();
    s2.finish();
    agent.wait_samples(2);
    let together = sampler.steady_rate(2 * BYTES);
    eprintln!("one cgroup: {alone:.0} B/s; two cgroups together: {together:.0} B/s");
    assert!(
        (0.85 * RATE..=1.15 * RATE).contains(&alone),
        "a rule-matched cgroup sent at {alone:.0} B/s, not 1 MB/s ±15 %"
    );
    // Two flows behind one dropping bucket wait out retransmission timers
    // together, below the rate on a loaded machine: the floor only catches
    // a bucket charged twice (~0.5); the ceiling is the contract.
    assert!(
        (0.7 * RATE..=1.15 * RATE).contains(&together),
        "two cgroups of one tenant sent at {together:.0} B/s together, not 0.7-1.15 MB/s \
         (one bucket per tenant)"
    );
    wait_drops(&agent, "qnet", "egress");

    // Churn: the matched cgroup's entry goes with it, and comes back with
    // a new one; only `tally/qnet` and `team/qnet` are ever entries (the
    // pods beneath are covered by their ancestor).
    assert_eq!(pin.policed_cgroups(), 2, "tally/qnet and team/qnet");
    drop((pod_b, pod_a));
    // Walks are spaced on a host with a big tree: wait, do not count samples.
    wait_for("team/qnet's entry to go", LONG, || {
        (pin.policed_cgroups() == 1).then_some(())
    });
    let again = team.create("qnet/pod-c");
    wait_for("the new team/qnet's entry", LONG, || {
        (pin.policed_cgroups() == 2).then_some(())
    });
    drop(again);
    verify_audit(&env.audit_log());
}

/// The policer resolves a socket's tenant once and remembers it until the
/// agent changes the cgroup → tenant entries. A sender policed in
/// `team/qgone/pod` is moved out and both cgroups removed: its socket
/// stays in the (dying) pod cgroup, which belongs to no tenant now, so the
/// rest of its 200 MB goes unpoliced in seconds. A socket that kept the
/// tenant it remembered would need 200 s at 1 MB/s.
#[test]
fn a_socket_is_released_when_its_cgroup_leaves_the_tenant() {
    use tally_e2e::probes_support::{TcpServer, fake_cuda};

    if !require_root() {
        return;
    }
    const BYTES: u64 = 200_000_000;
    let team = TeamCgroups::new();
    let pod = team.create("qgone/pod");
    let elsewhere = team.base.child("elsewhere");
    let quotas = format!(
        "{}[tenant.quota.qgone]\nnetwork_egress = '8Mbit'\n",
        team.rule()
    );
    let Some((pin, (_env, _node, agent, _cfg))) =
        start_policing(&quotas, "qgone", "network_egress")
    else {
        return;
    };
    let server = TcpServer::start_with(&fake_cuda().netload, BYTES, 0);
    let netload = fake_cuda().netload.display().to_string();
    let port = server.addr.port().to_string();
    let bytes = BYTES.to_string();
    let mut sender = pod.spawn(&netload, &["tcp-client", "127.0.0.1", &port, &bytes, "0"]);
    wait_drops(&agent, "qgone", "egress");
    let policed = pin.policed_cgroups();

    fs::write(elsewhere.dir.join("cgroup.procs"), sender.pid().to_string())
        .expect("move the sender out of its pod");
    drop(pod);
    wait_for("team/qgone's entry to go", LONG, || {
        (pin.policed_cgroups() == policed - 1).then_some(())
    });
    let status = wait_for("the released sender to finish", LONG, || {
        sender.0.try_wait().expect("wait the sender")
    });
    assert!(status.success(), "sender failed: {status}");
    server.finish();
}
