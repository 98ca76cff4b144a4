//! `cargo xtask demo`: the whole system on one screen — a simulated GPU
//! node whose tenants run as real processes in real cgroups (`tally run`),
//! the real agent with its eBPF probes, quotas and GPU states, reporting
//! to a real `tally aggregator` on SQLite, whose chargeback and scheduler
//! extender are asked live.

mod script;
mod view;

use std::{
    fs,
    io::IsTerminal,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tally_e2e::{
    Agent, Client, SimNode,
    aggregator_support::{ADMIN_TOKEN, Aggregator, LedgerReader, sqlite},
    enforce_support::TenantEnv,
    probes_support::{PinDir, fake_cuda, udp_sink},
};

use crate::exec::{cargo, exec, is_root, target_dir};
use script::{JOBS, NODE, OTHER_NODE, SCENARIO};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Where the agent listens.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub listen: SocketAddr,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Use the binaries already built (for a test that runs the demo
    /// while cargo holds the build lock).
    #[arg(long)]
    pub no_build: bool,
}

/// Plain mode prints the whole screen this often; events as they come.
const PLAIN_FRAME_EVERY: u64 = 10;

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo puts its tenants in real cgroups, which needs root: run `sudo cargo xtask demo`"
        );
    }
    // The first line comes before anything slow (the build).
    let tty = std::io::stdout().is_terminal();
    println!("starting the simulated node… (building the binaries)");
    if !o.no_build {
        exec(cargo().args(["build", "--workspace", "--bins", "--lib"]))?;
    }
    println!("building the fake CUDA driver and the traffic helper (cc)…");
    let cuda = fake_cuda();
    let demo_dir = target_dir().join("demo");
    let _ = fs::remove_dir_all(&demo_dir);
    let mut node = SimNode::in_dir(&demo_dir, SCENARIO);
    // Kept after the demo: the ledger, the logs and the audit log.
    node.dir.disable_cleanup(true);
    let run_dir = node.dir.path().to_path_buf();

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("cannot install the Ctrl-C handler")?;
    }

    println!("starting the aggregator on a SQLite ledger…");
    let agg_dir = run_dir.join("aggregator");
    let backend = sqlite(&agg_dir);
    let agg = Aggregator::start(&agg_dir, &backend, "");
    println!("  aggregator on {} (ledger {})", agg.url(), backend.url());

    // Tenant cgroups on every hierarchy beneath ours; removed on drop.
    let tenants = TenantEnv::named("tally-demo");
    let pin = PinDir::new();
    let tree = tenants
        .layout
        .unified
        .as_ref()
        .map(|h| format!("{}/{}", h.own.trim_end_matches('/'), tenants.parent))
        .unwrap_or_default();
    let config = run_dir.join("tally.toml");
    let state_dir = run_dir.join("agent-state");
    fs::write(
        &config,
        script::agent_config(
            &state_dir,
            (&tree, &tenants.parent),
            &agg.url(),
            &agg_dir.join("agent.token"),
            &pin.0,
            &cuda.lib,
        ),
    )?;

    println!(
        "starting {} jobs of 3 tenants with `tally run` (real cgroups)…",
        JOBS.len()
    );
    let (sink, _sink_socket) = udp_sink();
    let mut jobs = Vec::new();
    for job in JOBS {
        let gpu = tenants.run(&config, job.tenant, job.name, "sleep", &["infinity"]);
        let io_loop = job.io_loop(&cuda.caller, &cuda.lib, &cuda.netload, sink.port());
        let io = tenants.run(&config, job.tenant, job.name, "/bin/sh", &["-c", &io_loop]);
        node.register(gpu.pid(), job.gpu, job.mig, job.memory_mib, job.sm);
        jobs.push((gpu, io));
    }

    println!(
        "starting the agent on {} (eBPF probes, quotas; waiting for its first sample)…",
        o.listen
    );
    let agent = Agent::start_with(&node, &config, o.listen, &[]);
    let client = Client::new(o.listen);
    let admin = agg.client(Some(ADMIN_TOKEN));
    let from = unix_now().saturating_sub(60);

    let started = Instant::now();
    let mut frame = Frame::default();
    let mut seen = Vec::new();
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed)
        && o.seconds
            .is_none_or(|limit| started.elapsed() < Duration::from_secs(limit))
    {
        let elapsed = started.elapsed();
        for (n, (job, (gpu, _))) in JOBS.iter().zip(&jobs).enumerate() {
            node.register(
                gpu.pid(),
                job.gpu,
                job.mig,
                job.memory_mib,
                job.sm_at(elapsed, n),
            );
        }
        if agent.child.has_exited() {
            bail!("tally agent exited; its log is {}", agent.log.display());
        }
        if let Ok(snap) = client.get_json("/api/v1/snapshot") {
            let next = Frame {
                chargeback: chargeback(&admin, from).or(frame.chargeback.take()),
                scores: prioritize(&agg.client(None)).unwrap_or_else(|| frame.scores.clone()),
                at: Some(Instant::now()),
                snap: Some(snap),
            };
            for e in view::events(
                frame.snap.as_ref(),
                next.snap.as_ref().expect("just set"),
                &frame.scores,
                &next.scores,
            ) {
                let line = format!("[{:>3} s] {e}", elapsed.as_secs());
                if !tty {
                    println!("{line}");
                }
                seen.push(line);
            }
            if tty {
                // Redrawn in place on a terminal; piped, plain lines.
                print!("\x1b[2J\x1b[H");
            }
            if tty || tick.is_multiple_of(PLAIN_FRAME_EVERY) {
                println!(
                    "{}",
                    screen(&next, &frame, &agent, &agg, tenants_root(&tenants))
                );
                if tty {
                    for line in seen.iter().rev().take(6).rev() {
                        println!("{line}");
                    }
                    println!("Ctrl-C to stop.");
                }
            }
            frame = next;
        }
        tick += 1;
        std::thread::sleep(Duration::from_secs(1));
    }

    println!("stopping the agent (it sends its last report)…");
    let agent_log = agent.log.clone();
    let agent_addr = agent.addr;
    let _ = agent.stop();
    drop(jobs);
    drop(tenants);
    let last = chargeback(&admin, from).or(frame.chargeback);
    let reports = LedgerReader::new(&backend).reports(NODE).0;
    // A report the aggregator refused is usage lost: say so.
    let dropped = fs::read_to_string(&agent_log)
        .unwrap_or_default()
        .matches("REPORT DROPPED")
        .count();
    let paths = Paths {
        ledger: match &backend {
            tally_e2e::aggregator_support::Backend::Sqlite(p) => p.clone(),
            tally_e2e::aggregator_support::Backend::Postgres(_) => PathBuf::new(),
        },
        agent_log,
        agg_log: agg.log(),
        audit: state_dir.join("audit.log"),
        agent_config: config,
        agg_config: agg.config.clone(),
        admin_token: agg_dir.join("admin.token"),
    };
    println!(
        "{}",
        summary(
            started.elapsed(),
            (reports, dropped),
            last.as_ref(),
            &seen,
            &paths,
            (from, unix_now() + 60),
            (agent_addr, agg.addr),
        )
    );
    Ok(())
}

/// What one refresh fetched.
#[derive(Default)]
struct Frame {
    snap: Option<Value>,
    chargeback: Option<Value>,
    scores: Vec<(String, i64)>,
    at: Option<Instant>,
}

/// The `<parent>` of the tenant tree, for the header.
fn tenants_root(t: &TenantEnv) -> String {
    let h = t.layout.unified.as_ref();
    h.map(|h| t.path_in(h, "<tenant>", Some("<job>")))
        .unwrap_or_default()
}

/// The whole screen: header, GPUs, tenants, chargeback, ranking.
fn screen(now: &Frame, before: &Frame, agent: &Agent, agg: &Aggregator, tree: String) -> String {
    let snap = now.snap.as_ref().expect("a frame has a snapshot");
    let dt = match (now.at, before.at) {
        (Some(a), Some(b)) => a.duration_since(b).as_secs_f64(),
        _ => 0.0,
    };
    let mut out = format!(
        "Tally demo — node {NODE} (simulated GPUs), tenants in real cgroups {tree}\n\
         agent http://{}  (log {})\naggregator {} on SQLite  (log {})\n\nGPUs\n",
        agent.addr,
        agent.log.display(),
        agg.url(),
        agg.log().display(),
    );
    out.push_str(&view::gpus(snap));
    out.push_str("\nTenants (rates over the last refresh)\n");
    out.push_str(&view::tenants(snap, before.snap.as_ref(), dt));
    match &now.chargeback {
        Some(cb) => {
            out.push_str("\nChargeback so far (aggregator /api/v1/chargeback)\n");
            out.push_str(&view::chargeback(cb));
        }
        None => out.push_str("\nChargeback: waiting for the first report…\n"),
    }
    out.push('\n');
    out.push_str(&view::ranking(&now.scores));
    out
}

/// The chargeback of the run so far (admin token).
fn chargeback(admin: &Client, from: u64) -> Option<Value> {
    let to = unix_now() + 60;
    let cb = admin
        .get_json(&format!("/api/v1/chargeback?from={from}&to={to}"))
        .ok()?;
    cb["lines"].is_array().then_some(cb)
}

/// Asks the scheduler extender, as kube-scheduler would (no token,
/// `nodeCacheCapable`), to score the demo node and a node it does not know
/// for a pod that wants one GPU.
fn prioritize(anonymous: &Client) -> Option<Vec<(String, i64)>> {
    let args = json!({
        "Pod": {
            "metadata": {"name": "train-demo", "namespace": "ml"},
            "spec": {"containers": [{"name": "main", "image": "trainer:1",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
        },
        "Nodes": null,
        "NodeNames": [NODE, OTHER_NODE],
    });
    let r = anonymous
        .post_json("/scheduler/prioritize", args.to_string().as_bytes())
        .ok()?;
    if r.status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&r.text()).ok()?;
    Some(view::scores(&v))
}

/// Where the run left its files.
struct Paths {
    ledger: PathBuf,
    agent_log: PathBuf,
    agg_log: PathBuf,
    audit: PathBuf,
    agent_config: PathBuf,
    agg_config: PathBuf,
    admin_token: PathBuf,
}

/// What the run did and where to look further.
fn summary(
    ran: Duration,
    (reports, dropped): (i64, usize),
    chargeback: Option<&Value>,
    seen: &[String],
    p: &Paths,
    (from, to): (u64, u64),
    (agent, agg): (SocketAddr, SocketAddr),
) -> String {
    let mut out = format!(
        "\nTally demo summary: ran {:.0} s; the aggregator stored {reports} reports of {NODE}.\n",
        ran.as_secs_f64()
    );
    if dropped > 0 {
        out.push_str(&format!(
            "warning: the aggregator refused {dropped} reports for good (see the agent log)\n"
        ));
    }
    match chargeback {
        Some(cb) => {
            out.push_str("\nChargeback of the run\n");
            out.push_str(&view::chargeback(cb));
        }
        None => out.push_str("\nChargeback of the run: no report reached the aggregator.\n"),
    }
    if !seen.is_empty() {
        out.push_str("\nWhat happened\n");
        for line in seen {
            out.push_str(&format!("{line}\n"));
        }
    }
    let show = |p: &Path| p.display().to_string();
    out.push_str(&format!(
        "\nledger:     {}\nagent log:  {}\naggregator log: {}\naudit log:  {}\n\
         configs:    {} (agent), {} (aggregator)\n",
        show(&p.ledger),
        show(&p.agent_log),
        show(&p.agg_log),
        show(&p.audit),
        show(&p.agent_config),
        show(&p.agg_config),
    ));
    let token = show(&p.admin_token);
    out.push_str(&format!(
        "\nLook further: the ledger is kept; start an aggregator on it\n  \
         tally aggregator --config {agg_config} --listen {agg} &\n  \
         tally report --aggregator http://{agg} --token-file {token} --from {from} --to {to}\n  \
         curl -s -H \"Authorization: Bearer $(cat {token})\" 'http://{agg}/api/v1/chargeback?from={from}&to={to}'\n  \
         curl -s http://{agg}/metrics\n\
         and while a demo runs:\n  \
         curl -s http://{agent}/metrics\n  \
         tally top --agent http://{agent}\n  \
         tally top --aggregator http://{agg} --token-file {token}\n",
        agg_config = show(&p.agg_config),
    ));
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
