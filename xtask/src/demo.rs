//! `cargo xtask demo`: a simulated GPU node with three tenants as real
//! processes in real cgroups, the real agent, and a live table.

use std::{
    collections::BTreeMap,
    fs,
    io::IsTerminal,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tally_e2e::{Agent, Cgroup, ChildGuard, Client, SimNode, unique};

use crate::{
    deps,
    exec::{cargo, exec, is_root, target_dir},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Where the agent listens.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub listen: SocketAddr,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
}

const SCENARIO: &str = r#"# The demo node: two H100s, an L4, and an A100 in MIG mode.
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA L4"
memory_mib = 23034
power_idle_w = 16
power_max_w = 72

[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40960
power_idle_w = 50
power_max_w = 400
mig = ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]
"#;

const CONFIG: &str = r#"# Tenants are the second component under a `tally/` cgroup.
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'

[[tenant.rule]]
user = true
"#;

/// One demo workload: tenant, job, GPU, MIG instance, memory MiB, base SM.
type Job = (&'static str, &'static str, u32, Option<u32>, u64, f64);

const JOBS: &[Job] = &[
    ("acme", "train-llm", 0, None, 61_440, 0.85),
    ("acme", "eval", 3, Some(0), 12_288, 0.40),
    ("beta", "notebook", 0, None, 8_192, 0.10),
    ("beta", "finetune", 1, None, 40_960, 0.70),
    ("gamma", "inference", 3, Some(2), 3_072, 0.30),
];

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo puts its tenants in real cgroups, which needs root: run `sudo cargo xtask demo`"
        );
    }
    // The first line comes before anything slow (packages, the build).
    let tty = std::io::stdout().is_terminal();
    println!("starting the simulated node… (checking packages, building the binaries)");
    deps::ensure(deps::BUILD)?;
    exec(cargo().args(["build", "--workspace", "--bins", "--lib"]))?;
    let dir = target_dir().join("demo");
    let _ = fs::remove_dir_all(&dir);
    let mut node = SimNode::in_dir(&dir, SCENARIO);
    // Kept after the demo: the agent's log is worth reading.
    node.dir.disable_cleanup(true);
    let config = node.dir.path().join("tally.toml");
    fs::write(&config, CONFIG)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("cannot install the Ctrl-C handler")?;
    }

    println!("starting {} tenant jobs in real cgroups…", JOBS.len());
    let root = Cgroup::create(&unique("tally-demo"));
    let mut workloads = Vec::new();
    for (tenant, job, gpu, mig, mem, sm) in JOBS {
        let cgroup = root.child(&format!("tally/{tenant}/{job}"));
        let child = cgroup.spawn("sleep", &["infinity"]);
        workloads.push(Workload {
            pid: child.pid(),
            _child: child,
            _cgroup: cgroup,
            gpu: *gpu,
            mig: *mig,
            memory_mib: *mem,
            base_sm: *sm,
        });
    }

    println!(
        "starting the agent on {} (waiting for its first sample)…",
        o.listen
    );
    let agent = Agent::start_with(&node, &config, o.listen, &[]);
    let client = Client::new(o.listen);

    let started = Instant::now();
    let mut tick = 0u64;
    let mut previous: Option<Value> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(limit) = o.seconds
            && started.elapsed() >= Duration::from_secs(limit)
        {
            break;
        }
        // Workloads breathe: SM utilization moves so the numbers do.
        for (i, w) in workloads.iter().enumerate() {
            let phase = (tick as f64 / 5.0 + i as f64).sin();
            let sm = (w.base_sm + 0.15 * phase).clamp(0.0, 1.0);
            node.register(
                w.pid,
                w.gpu,
                w.mig,
                w.memory_mib,
                (sm * 1000.0).round() / 1000.0,
            );
        }
        if agent.child.has_exited() {
            bail!("tally agent exited; its log is {}", agent.log.display());
        }
        if let Ok(snap) = client.get_json("/api/v1/snapshot") {
            // On a terminal the table redraws in place; piped, plain lines.
            if tty {
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "Tally demo — simulated node, {} tenants in real cgroups under {}",
                3, root.path
            );
            println!(
                "metrics: http://{}/metrics   snapshot: http://{}/api/v1/snapshot   agent log: {}",
                o.listen,
                o.listen,
                agent.log.display()
            );
            println!("{}", render(&snap, previous.as_ref()));
            println!("Ctrl-C to stop.");
            previous = Some(snap);
        }
        tick += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("stopping…");
    drop(workloads);
    let log = agent.log.clone();
    drop(agent);
    println!(
        "{}",
        summary(&o, previous.as_ref(), &log, started.elapsed())
    );
    Ok(())
}

/// What the run did and where to look further.
fn summary(o: &Options, last: Option<&Value>, log: &std::path::Path, ran: Duration) -> String {
    let mut out = format!("\nTally demo: ran {:.0} s.\n", ran.as_secs_f64());
    let mut per_tenant: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for r in last
        .and_then(|s| s["tenant_gpu"].as_array())
        .into_iter()
        .flatten()
    {
        let e = per_tenant
            .entry(r["tenant"].as_str().unwrap_or("?").to_owned())
            .or_default();
        e.0 += r["allocated_seconds_total"].as_f64().unwrap_or(0.0);
        e.1 += r["energy_joules_total"].as_f64().unwrap_or(0.0);
    }
    out.push_str(&format!(
        "\n{:<14} {:>12} {:>12}\n",
        "TENANT", "GPU s", "ENERGY kJ"
    ));
    for (t, (s, j)) in &per_tenant {
        out.push_str(&format!("{t:<14} {s:>12.1} {:>12.2}\n", j / 1000.0));
    }
    out.push_str(&format!(
        "\nagent log: {}\nlook further (while an agent runs):\n  \
         curl -s http://{}/metrics\n  \
         tally top --agent http://{}\n  \
         tally report --aggregator URL --from … --to …   (with an aggregator)\n",
        log.display(),
        o.listen,
        o.listen
    ));
    out
}

/// A demo job: its process (killed on drop) and what it registers.
struct Workload {
    pid: u32,
    _child: ChildGuard,
    _cgroup: Cgroup,
    gpu: u32,
    mig: Option<u32>,
    memory_mib: u64,
    base_sm: f64,
}

/// The live table: GPUs, then tenants with their rates over the last second.
fn render(snap: &Value, previous: Option<&Value>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n{:<8} {:<24} {:<9} {:>6} {:>9} {:>8} {:>6}\n",
        "GPU", "MODEL", "PROFILE", "UTIL", "MEM GiB", "POWER W", "PROCS"
    ));
    for g in snap["gpus"].as_array().into_iter().flatten() {
        let util = g["utilization_ratio"]
            .as_f64()
            .map(|u| format!("{:.0}%", u * 100.0))
            .unwrap_or_else(|| "-".into());
        let power = g["power_watts"]
            .as_f64()
            .map(|p| format!("{p:.0}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<8} {:<24} {:<9} {:>6} {:>4.1}/{:<4.0} {:>8} {:>6}\n",
            g["gpu"].as_str().unwrap_or("?"),
            truncate(g["model"].as_str().unwrap_or(""), 24),
            g["mig_profile"].as_str().unwrap_or("-"),
            util,
            g["memory_used_bytes"].as_f64().unwrap_or(0.0) / GIB,
            g["memory_total_bytes"].as_f64().unwrap_or(0.0) / GIB,
            power,
            g["processes"].as_array().map(Vec::len).unwrap_or(0),
        ));
    }

    let before: BTreeMap<(String, String), (f64, f64)> = previous
        .and_then(|p| p["tenant_gpu"].as_array())
        .into_iter()
        .flatten()
        .map(|r| {
            (
                (
                    r["tenant"].as_str().unwrap_or("").to_owned(),
                    r["gpu"].as_str().unwrap_or("").to_owned(),
                ),
                (
                    r["sm_seconds_total"].as_f64().unwrap_or(0.0),
                    r["energy_joules_total"].as_f64().unwrap_or(0.0),
                ),
            )
        })
        .collect();
    out.push_str(&format!(
        "\n{:<14} {:<8} {:>10} {:>9} {:>8} {:>9} {:>11}\n",
        "TENANT", "GPU", "ALLOC s", "SM s", "SM/s", "MEM GiB", "POWER W"
    ));
    for r in snap["tenant_gpu"].as_array().into_iter().flatten() {
        let tenant = r["tenant"].as_str().unwrap_or("");
        let gpu = r["gpu"].as_str().unwrap_or("");
        let sm = r["sm_seconds_total"].as_f64();
        let energy = r["energy_joules_total"].as_f64().unwrap_or(0.0);
        let (sm0, e0) = before
            .get(&(tenant.to_owned(), gpu.to_owned()))
            .copied()
            .unwrap_or((sm.unwrap_or(0.0), energy));
        out.push_str(&format!(
            "{:<14} {:<8} {:>10.1} {:>9} {:>8} {:>9.1} {:>11.1}\n",
            tenant,
            gpu,
            r["allocated_seconds_total"].as_f64().unwrap_or(0.0),
            sm.map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "n/a".into()),
            sm.map(|s| format!("{:.2}", s - sm0))
                .unwrap_or_else(|| "n/a".into()),
            r["memory_bytes"].as_f64().unwrap_or(0.0) / GIB,
            energy - e0,
        ));
    }
    out
}

const GIB: f64 = (1u64 << 30) as f64;

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
