//! Benchmark 9: a fleet of simulated agents against the aggregator on
//! PostgreSQL — real wire format, one token per agent, the agent's spool
//! and resend rules, one SIGKILL and restart mid-run, the ledger checked
//! against what was sent — then the ingest ceiling of each backend, and of
//! two PostgreSQL replicas.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use tally_contract::wire::{GpuGauge, GpuUsage, IoUsage, Report, SCHEMA_VERSION};
use tokio::{runtime::Runtime, sync::Semaphore};

use super::{
    Check, Ctx, Section, Verdict,
    ledger::{Aggregator, Backend, Db, start_aggregator, write_config},
    util::{self, Stats},
};

pub(super) const TITLE: &str = "9. Fleet load";

/// Every simulated agent's `[report] interval` (the agent's default).
const INTERVAL: Duration = Duration::from_secs(10);
/// GPUs per node, each held by one tenant: docs/scaling.md's sizing.
const GPUS: usize = 8;
const TENANTS: usize = 200;
/// The per-token limit docs/aggregator.md suggests for agents.
const AUTH: &str = "rate_limit = \"10/s\"\nburst = 200";
/// The ceiling is the offered rate at which p99 passes this.
const CEILING_P99_S: f64 = 1.0;
/// The aggregator's ledger pool, as in benchmark 6.
const CONNECTIONS: u32 = 16;
/// Requests in flight at once in a ceiling step (file descriptors).
const MAX_IN_FLIGHT: usize = 1024;

/// How big the fleet run is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scale {
    pub agents: usize,
    pub minutes: f64,
}

fn node_name(node: usize) -> String {
    format!("fleet-{node:05}")
}

/// One token per simulated agent.
fn tokens(agents: usize) -> Vec<String> {
    (0..agents)
        .map(|a| format!("fleet-agent-{a:05}-{}-token", std::process::id()))
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node's report for one interval: a tenant on each of its 8 GPUs, I/O
/// for half of them, a gauge per GPU. The held time varies per report so
/// that a lost or doubled report shows in the sums.
fn report(node: usize, boot: &str, seq: u64, start_ms: u64) -> Report {
    let name = node_name(node);
    let model = if node.is_multiple_of(4) {
        "NVIDIA A100-SXM4-80GB"
    } else {
        "NVIDIA H100 80GB HBM3"
    };
    let tenant = |g: usize| format!("tenant-{:03}", (node * GPUS + g) % TENANTS);
    let gpu_usage = (0..GPUS)
        .map(|g| {
            let allocated_us = 9_000_000 + (seq * 7919 + g as u64 * 104_729) % 1_000_000;
            GpuUsage {
                tenant: tenant(g),
                gpu: g.to_string(),
                uuid: format!("GPU-{name}-{g}"),
                model: model.into(),
                mig_profile: None,
                slice_fraction: 1.0,
                allocated_us,
                sm_us: Some(allocated_us / 2),
                memory_byte_seconds: 40 << 30,
                energy_mj: 3_500_000,
                workload: None,
            }
        })
        .collect();
    let io_usage = (0..GPUS)
        .step_by(2)
        .map(|g| IoUsage {
            tenant: tenant(g),
            network_ingress_bytes: 1 << 20,
            network_egress_bytes: 1 << 19,
            network_ingress_packets: 800,
            network_egress_packets: 400,
            network_dropped_packets: 0,
            pcie_h2d_bytes: 8 << 20,
            pcie_d2h_bytes: 4 << 20,
        })
        .collect();
    let gpus = (0..GPUS)
        .map(|g| GpuGauge {
            gpu: g.to_string(),
            uuid: format!("GPU-{name}-{g}"),
            model: model.into(),
            health: "ok".into(),
            utilization_ratio: Some(0.5),
            memory_used_bytes: 40 << 30,
            memory_total_bytes: 80 << 30,
            processes: 1,
            state: "busy".into(),
            tenants: vec![tenant(g)],
            ..Default::default()
        })
        .collect();
    Report {
        version: SCHEMA_VERSION,
        node: name,
        boot_id: boot.into(),
        seq,
        interval_start_ms: start_ms,
        interval_end_ms: start_ms + INTERVAL.as_millis() as u64,
        gpu_usage,
        io_usage,
        gpus,
        audit: Vec::new(),
        report_interval_ms: Some(INTERVAL.as_millis() as u64),
        tenant_quotas: Vec::new(),
        cluster: None,
    }
}

fn allocated_us(r: &Report) -> u64 {
    r.gpu_usage.iter().map(|u| u.allocated_us).sum()
}

/// What one simulated agent did.
#[derive(Default)]
struct AgentLog {
    node: usize,
    created: u64,
    /// GPU microseconds held, summed over the reports it made.
    allocated_us: u64,
    delivered: u64,
    /// Request → 2xx of each delivery, ms.
    latency_ms: Vec<f64>,
    /// Made → stored of each report that needed more than one try, s.
    delayed_s: Vec<f64>,
    /// Tries that failed (refused connection, 5xx, 429, timeout).
    failures: u64,
    /// Answers that drop a report for good (400, 409, 413, 422).
    refused: Vec<String>,
    /// Reports still in the spool when the run gave up.
    unsent: usize,
}

/// One report waiting in a simulated agent's spool.
struct Spooled {
    body: Vec<u8>,
    made: Instant,
    tries: u32,
}

/// Reports stored per second since the start of the run.
struct Timeline {
    start: Instant,
    per_second: Vec<AtomicU64>,
}

impl Timeline {
    fn new(secs: usize) -> Timeline {
        Timeline {
            start: Instant::now(),
            per_second: (0..secs).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn stored(&self) {
        let s = self.start.elapsed().as_secs() as usize;
        if let Some(c) = self.per_second.get(s) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One simulated agent, as `agent/src/report/sender.rs` behaves: a report
/// per interval into the spool, the spool sent oldest first until a try
/// fails, the rest left for the next interval (or after `Retry-After`).
#[allow(clippy::too_many_arguments)]
async fn agent(
    node: usize,
    urls: Arc<[String]>,
    token: String,
    boot: Arc<str>,
    first: Instant,
    stop_making: Instant,
    give_up: Instant,
    timeline: Arc<Timeline>,
) -> anyhow::Result<AgentLog> {
    // Each agent its own client, so its own keep-alive connection.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build()?;
    let mut log = AgentLog {
        node,
        ..Default::default()
    };
    let mut spool: VecDeque<Spooled> = VecDeque::new();
    let mut not_before: Option<Instant> = None;
    let mut tick = tokio::time::interval_at(first.into(), INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start_ms = unix_ms() + first.saturating_duration_since(Instant::now()).as_millis() as u64
        - INTERVAL.as_millis() as u64;
    let mut turn = node;
    let mut due = first;
    loop {
        tick.tick().await;
        let now = Instant::now();
        // The agent cuts a report every interval whatever its sender is
        // doing: a try that hung past a tick still yields one report per
        // interval, made late.
        while due <= now && due < stop_making {
            let seq = log.created;
            let r = report(
                node,
                &boot,
                seq,
                start_ms + seq * INTERVAL.as_millis() as u64,
            );
            log.allocated_us += allocated_us(&r);
            log.created += 1;
            spool.push_back(Spooled {
                body: serde_json::to_vec(&r)?,
                made: due,
                tries: 0,
            });
            due += INTERVAL;
        }
        if now >= stop_making && (spool.is_empty() || now >= give_up) {
            break;
        }
        if not_before.is_some_and(|t| now < t) {
            continue;
        }
        not_before = None;
        while let Some(front) = spool.front_mut() {
            // Round-robin over the replicas, as a load balancer would.
            let url = &urls[turn % urls.len()];
            turn += 1;
            let t = Instant::now();
            let answer = client
                .post(url)
                .bearer_auth(&token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(front.body.clone())
                .send()
                .await;
            front.tries += 1;
            match answer {
                Ok(r) if r.status().is_success() => {
                    log.latency_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    if front.tries > 1 {
                        log.delayed_s.push(front.made.elapsed().as_secs_f64());
                    }
                    log.delivered += 1;
                    timeline.stored();
                    spool.pop_front();
                }
                Ok(r) if matches!(r.status().as_u16(), 400 | 409 | 413 | 422) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    log.refused.push(format!("{status}: {}", text.trim()));
                    spool.pop_front();
                }
                Ok(r) => {
                    log.failures += 1;
                    let wait = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
                    not_before = wait.map(|s| Instant::now() + Duration::from_secs(s));
                    break;
                }
                Err(_) => {
                    log.failures += 1;
                    break;
                }
            }
        }
    }
    log.unsent = spool.len();
    Ok(log)
}

/// CPU seconds of a process, with those of its reaped children, plus
/// those of its live children: PostgreSQL's postmaster and its backends,
/// including the backends of a killed aggregator.
fn tree_cpu(pid: u32, tck: f64) -> f64 {
    let fields = |pid: &str| -> Option<(u32, f64, f64)> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        Some((f.get(1)?.parse().ok()?, n(11) + n(12), n(13) + n(14)))
    };
    let mut total = fields(&pid.to_string()).map_or(0.0, |(_, own, reaped)| own + reaped);
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((ppid, own, _)) = fields(name)
            && ppid == pid
        {
            total += own;
        }
    }
    total / tck
}

/// The fleet run's findings.
struct FleetRun {
    logs: Vec<AgentLog>,
    secs: f64,
    kill_at_s: f64,
    down_s: f64,
    per_second: Vec<u64>,
    aggregator_cpu_s: f64,
    postgres_cpu_s: f64,
    loadgen_cpu_s: f64,
}

fn fleet_run(
    ctx: &Ctx,
    rt: &Runtime,
    dir: &Path,
    db: &Db,
    scale: Scale,
) -> anyhow::Result<FleetRun> {
    let tokens = tokens(scale.agents);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let config = write_config(dir, db, CONNECTIONS, &refs, AUTH)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], tally_e2e::free_port()));
    let log = dir.join("aggregator.log");
    let mut agg = start_aggregator(ctx, &config, addr, &log)?;
    let urls: Arc<[String]> = vec![format!("http://{addr}/api/v1/reports")].into();
    let boot: Arc<str> = format!("fleet-{}", std::process::id()).into();
    let run = Duration::from_secs_f64(scale.minutes * 60.0);
    let t0 = Instant::now();
    let stop_making = t0 + run;
    // Spool backlogs left at the end get a few intervals to drain.
    let give_up = stop_making + 6 * INTERVAL;
    let timeline = Arc::new(Timeline::new(run.as_secs() as usize + 120));
    let pg_pid = db.postmaster_pid().context("PostgreSQL's postmaster.pid")?;
    let (pg0, gen0) = (
        tree_cpu(pg_pid, ctx.tck),
        util::cpu_seconds(std::process::id(), ctx.tck)?,
    );
    let mut agg_cpu = 0.0;
    let handles: Vec<_> = (0..scale.agents)
        .map(|a| {
            // Agents start spread over one interval, as real ones do.
            let first = t0 + INTERVAL.mul_f64(a as f64 / scale.agents as f64);
            rt.spawn(agent(
                a,
                urls.clone(),
                tokens[a].clone(),
                boot.clone(),
                first,
                stop_making,
                give_up,
                timeline.clone(),
            ))
        })
        .collect();
    // SIGKILL at a random point of the middle of the run, then a restart
    // on the same database and address.
    let kill_at = run.mul_f64(0.3 + fastrand::f64() * 0.4);
    std::thread::sleep(kill_at.saturating_sub(t0.elapsed()));
    agg_cpu += util::cpu_seconds(agg.proc.pid(), ctx.tck)?;
    let killed = Instant::now();
    agg.proc.child.kill().context("SIGKILL the aggregator")?;
    agg.proc.child.wait()?;
    drop(agg);
    agg = start_aggregator(ctx, &config, addr, &log)?;
    let down_s = killed.elapsed().as_secs_f64();
    eprintln!(
        "bench: fleet: aggregator SIGKILLed at {:.0} s, serving again after {down_s:.1} s",
        kill_at.as_secs_f64()
    );
    let mut logs = Vec::new();
    for h in handles {
        logs.push(rt.block_on(h)??);
    }
    let secs = t0.elapsed().as_secs_f64();
    agg_cpu += util::cpu_seconds(agg.proc.pid(), ctx.tck)?;
    let postgres_cpu_s = tree_cpu(pg_pid, ctx.tck) - pg0;
    let loadgen_cpu_s = util::cpu_seconds(std::process::id(), ctx.tck)? - gen0;
    drop(agg);
    Ok(FleetRun {
        logs,
        secs,
        kill_at_s: kill_at.as_secs_f64(),
        down_s,
        per_second: timeline
            .per_second
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
        aggregator_cpu_s: agg_cpu,
        postgres_cpu_s,
        loadgen_cpu_s,
    })
}

/// `node → [numbers]` from `node|n|n…` lines of psql.
fn by_node(out: &str) -> BTreeMap<String, Vec<i64>> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            let node = f.next()?.to_owned();
            Some((node, f.filter_map(|v| v.parse().ok()).collect()))
        })
        .collect()
}

/// Checks the ledger against what the agents made: every report of every
/// node exactly once (seq 0..n, each once) and the GPU time of its raw
/// rows and of its hourly rollups equal to what was sent. Returns the
/// problems found, at most a few per kind.
fn check_ledger(db: &Db, logs: &[AgentLog]) -> anyhow::Result<Vec<String>> {
    let reports = by_node(&db.sql(
        "SELECT node, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM reports GROUP BY node;",
    )?);
    let raw = by_node(
        &db.sql("SELECT node, CAST(SUM(allocated_us) AS BIGINT) FROM gpu_usage GROUP BY node;")?,
    );
    let hourly = by_node(&db.sql(
        "SELECT node, CAST(SUM(allocated_us) AS BIGINT) FROM gpu_usage_hourly GROUP BY node;",
    )?);
    let mut problems = Vec::new();
    for l in logs {
        let name = node_name(l.node);
        let n = l.created as i64;
        let want = if n == 0 {
            None
        } else {
            Some(vec![n, n, 0, n - 1])
        };
        let got = reports.get(&name).cloned();
        if got != want {
            problems.push(format!(
                "{name}: reports (count, distinct, min, max seq) {got:?}, made {n}"
            ));
        }
        for (what, table) in [("raw rows", &raw), ("hourly rollup", &hourly)] {
            let got = table
                .get(&name)
                .and_then(|v| v.first().copied())
                .unwrap_or(0);
            if got != l.allocated_us as i64 {
                problems.push(format!(
                    "{name}: {what} hold {got} GPU µs, the agent sent {}",
                    l.allocated_us
                ));
            }
        }
    }
    let extra = reports.len().saturating_sub(logs.len());
    if extra > 0 {
        problems.push(format!("{extra} nodes in the ledger that no agent was"));
    }
    Ok(problems)
}

/// Rows and bytes (table, indexes, TOAST, every partition) of the ledger's
/// tables on PostgreSQL. (`pg_partition_tree` has no rows for a table
/// that is not partitioned.)
fn table_sizes(db: &Db) -> anyhow::Result<Vec<(&'static str, u64, u64)>> {
    let mut out = Vec::new();
    for t in [
        "reports",
        "gpu_usage",
        "io_usage",
        "gpu_usage_hourly",
        "io_usage_hourly",
    ] {
        let v = db.sql(&format!(
            "SELECT (SELECT COUNT(*) FROM {t}), \
             (SELECT COALESCE(SUM(pg_total_relation_size(relid)), pg_total_relation_size('{t}')) \
             FROM pg_partition_tree('{t}'));"
        ))?;
        let mut f = v.trim().split('|').map(|x| x.parse::<u64>().unwrap_or(0));
        out.push((t, f.next().unwrap_or(0), f.next().unwrap_or(0)));
    }
    Ok(out)
}

/// One step of a ceiling run: an offered rate held for a while.
struct Step {
    offered: f64,
    ok: u64,
    failed: u64,
    secs: f64,
    /// Scheduled send → 2xx (or failure), s: queueing in the generator
    /// counts, so an overloaded aggregator cannot hide it.
    latency: Stats,
    loadgen_cpu: f64,
}

impl Step {
    fn passes(&self) -> bool {
        self.failed == 0
            && self.latency.p99 <= CEILING_P99_S
            && self.ok as f64 >= 0.95 * self.offered * self.secs
    }
}

/// A ceiling run on `backend` with `replicas` aggregators behind a
/// round-robin generator: open-loop steps of `rates`, each for `step`,
/// until one fails; then the ledger is counted.
fn ceiling(
    ctx: &Ctx,
    rt: &Runtime,
    backend: Backend,
    replicas: usize,
    rates: &[f64],
    step: Duration,
) -> anyhow::Result<(Vec<Step>, String)> {
    let dir = util::scratch(&format!("fleet-ceiling-{}-{replicas}", backend.name()))?;
    let db = match backend {
        Backend::Sqlite => Db::sqlite(&dir),
        Backend::Postgres => Db::postgres()?,
    };
    let nodes = 1000;
    let tokens = tokens(nodes);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let config = write_config(&dir, &db, CONNECTIONS, &refs, AUTH)?;
    let mut aggs: Vec<Aggregator> = Vec::new();
    for r in 0..replicas {
        let addr = SocketAddr::from(([127, 0, 0, 1], tally_e2e::free_port()));
        aggs.push(start_aggregator(
            ctx,
            &config,
            addr,
            &dir.join(format!("aggregator-{r}.log")),
        )?);
    }
    let urls: Arc<[String]> = aggs
        .iter()
        .map(|a| format!("http://{}/api/v1/reports", a.addr))
        .collect();
    let tokens: Arc<[String]> = tokens.into();
    let boot: Arc<str> = format!("ceiling-{}", std::process::id()).into();
    let seqs: Arc<[AtomicU64]> = (0..nodes).map(|_| AtomicU64::new(0)).collect();
    // Intervals a day back: a node sends faster than real time here.
    let base_ms = unix_ms() - 86_400_000;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()?;
    let mut steps = Vec::new();
    for &rate in rates {
        eprintln!(
            "bench: ceiling on {} × {replicas}: {rate:.0} reports/s",
            backend.name()
        );
        let gen0 = util::cpu_seconds(std::process::id(), ctx.tck)?;
        let total = (rate * step.as_secs_f64()) as u64;
        let results: Vec<(f64, bool)> = rt.block_on(async {
            let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let start = tokio::time::Instant::now();
            let mut handles = Vec::with_capacity(total as usize);
            for k in 0..total {
                let at = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(at).await;
                let node = k as usize % nodes;
                let seq = seqs[node].fetch_add(1, Ordering::Relaxed);
                let (client, gate, boot) = (client.clone(), gate.clone(), boot.clone());
                let url = urls[k as usize % urls.len()].clone();
                let token = tokens[node].clone();
                handles.push(tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let r = report(node, &boot, seq, base_ms + seq * 10_000);
                    let ok = match serde_json::to_vec(&r) {
                        Ok(body) => client
                            .post(url)
                            .bearer_auth(token)
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body)
                            .send()
                            .await
                            .is_ok_and(|a| a.status().is_success()),
                        Err(_) => false,
                    };
                    (at.elapsed().as_secs_f64(), ok)
                }));
            }
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(h.await.unwrap_or((f64::INFINITY, false)));
            }
            out
        });
        let secs = step.as_secs_f64();
        let ok = results.iter().filter(|r| r.1).count() as u64;
        let latencies: Vec<f64> = results.iter().map(|r| r.0).collect();
        let s = Step {
            offered: rate,

            ok,
            failed: total - ok,
            secs,
            latency: Stats::of(&latencies),
            loadgen_cpu: (util::cpu_seconds(std::process::id(), ctx.tck)? - gen0) / secs * 100.0,
        };
        let pass = s.passes();
        steps.push(s);
        if !pass {
            break;
        }
    }
    let ok: u64 = steps.iter().map(|s| s.ok).sum();
    let stored = db.count("reports")?;
    drop(aggs);
    let ledger = if stored == ok {
        format!("{stored} reports in the ledger, one per 2xx answer: complete")
    } else {
        format!(
            "{stored} reports in the ledger for {ok} 2xx answers (the difference: requests \
             that timed out after the aggregator had stored them)"
        )
    };
    Ok((steps, ledger))
}

/// Runs the fleet and the ceilings; each part that fails says so in the
/// section and the others still run.
pub(super) fn run(ctx: &Ctx, scale: Scale) -> anyhow::Result<Section> {
    if scale.agents == 0 || scale.minutes <= 0.0 {
        bail!(
            "the fleet needs at least one agent and a positive duration (got {} agents, {} \
             minutes)",
            scale.agents,
            scale.minutes
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut s = Section {
        title: TITLE.into(),
        ..Default::default()
    };
    let sample = serde_json::to_vec(&report(1, "b", 0, 0))?.len();
    let offered = scale.agents as f64 / INTERVAL.as_secs_f64();
    let _ = writeln!(
        s.body,
        "**Set-up.** The release aggregator on a throwaway PostgreSQL (defaults: fsync and \
         `synchronous_commit` on; `max_connections = {CONNECTIONS}` in the aggregator), \
         `[auth] rate_limit = \"10/s\"`, `burst = 200` (docs/aggregator.md's advice for \
         agents). The load generator is `cargo xtask bench` itself: {} simulated agents, \
         one tokio task each with its own node name, token (one line each of the agents' \
         token file) and keep-alive connection, starting spread over one interval. Each \
         makes one report per {} s (the agent's default) with `tally-contract`'s wire types: \
         8 GPUs each held by one of {TENANTS} tenants, I/O for 4 of them, 8 GPU gauges \
         ({sample} bytes of JSON); it spools it and sends its spool oldest first until a try \
         fails, then waits for the next interval (or `Retry-After`), as \
         `agent/src/report/sender.rs` does — so a report refused or unanswered while the \
         aggregator is down is sent again until it is stored. Offered load: {offered:.0} \
         reports/s for {} min. The aggregator is SIGKILLed once at a random point between \
         30 % and 70 % of the run and restarted on the same database and address. After the \
         run (and the spools' drain) the ledger is read with SQL: per node, every seq from 0 \
         to the last once, and the GPU time in the raw rows and in the hourly rollups equal \
         to what the agent sent. Latency is request → 2xx of each delivery; the generator \
         shares the 2 cores with the aggregator and PostgreSQL (its CPU is shown).\n",
        scale.agents,
        INTERVAL.as_secs(),
        scale.minutes
    );
    let load_before = crate::exec::loadavg();
    let fleet = (|| -> anyhow::Result<()> {
        let dir = util::scratch("fleet")?;
        let db = Db::postgres()?;
        let f = fleet_run(ctx, &rt, &dir, &db, scale)?;
        let problems = check_ledger(&db, &f.logs)?;
        let sizes = table_sizes(&db)?;
        fleet_figures(&mut s, &f, &problems, &sizes, scale, &load_before);
        Ok(())
    })();
    if let Err(e) = fleet {
        let f = super::failed("9. fleet run", &e);
        s.body.push_str(&f.body);
        s.checks.extend(f.checks);
    }
    let (rates, step): (&[f64], _) = if ctx.quick {
        (&[50.0, 100.0, 200.0], Duration::from_secs(3))
    } else {
        (
            // Steps of √2: the ceiling is known to within 41 %.
            &[
                100.0, 141.0, 200.0, 283.0, 400.0, 566.0, 800.0, 1131.0, 1600.0, 2263.0, 3200.0,
                4525.0, 6400.0,
            ],
            Duration::from_secs(10),
        )
    };
    let _ = writeln!(
        s.body,
        "\n**Ingest ceiling.** The same reports from 1,000 nodes (one token each), sent open \
         loop at a fixed rate for {} s per step (rates {}; at most {MAX_IN_FLIGHT} requests \
         in flight), latency from each report's scheduled send to its 2xx, so a backlog in the \
         generator counts; the steps stop at the first where p99 passes {CEILING_P99_S} s, a \
         request fails or fewer than 95 % of the offered reports are stored. Each backend \
         fresh; two replicas share one PostgreSQL, the generator alternates between them.\n\n\
         | backend | offered reports/s | stored reports/s | p50 ms | p99 ms | max ms | failed \
         | load generator CPU % |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        step.as_secs(),
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut ceilings = Vec::new();
    for (backend, replicas, target) in [
        (Backend::Sqlite, 1, "≥ 2,000 reports/s"),
        (Backend::Postgres, 1, "≥ 1,000 reports/s"),
        (Backend::Postgres, 2, "more than one replica"),
    ] {
        let label = if replicas == 1 {
            backend.name().to_owned()
        } else {
            format!("{} × {replicas} replicas", backend.name())
        };
        let what = format!("9. ingest ceiling ({label})");
        match ceiling(ctx, &rt, backend, replicas, rates, step) {
            Ok((steps, ledger)) => {
                for st in &steps {
                    let _ = writeln!(
                        s.body,
                        "| {label} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.0} |",
                        st.offered,
                        st.ok as f64 / st.secs,
                        st.latency.median * 1000.0,
                        st.latency.p99 * 1000.0,
                        st.latency.max * 1000.0,
                        st.failed,
                        st.loadgen_cpu
                    );
                }
                let best = steps
                    .iter()
                    .filter(|s| s.passes())
                    .map(|s| s.offered)
                    .fold(0.0, f64::max);
                let past = steps.iter().find(|s| !s.passes());
                let measured = match past {
                    Some(p) => format!(
                        "p99 ≤ 1 s up to {best:.0} reports/s; at {:.0}: p99 {:.2} s, {} failed; {ledger}",
                        p.offered, p.latency.p99, p.failed
                    ),
                    None => format!(
                        "p99 ≤ 1 s at every step, up to {best:.0} reports/s (the generator's \
                         highest); {ledger}"
                    ),
                };
                ceilings.push(best);
                let pass = match (backend, replicas) {
                    (Backend::Sqlite, _) => best >= 2000.0,
                    (Backend::Postgres, 1) => best >= 1000.0,
                    _ => ceilings.get(1).is_some_and(|&one| best > one),
                };
                s.checks
                    .push(Check::new(what, target, measured, Verdict::of(pass)));
            }
            Err(e) => {
                ceilings.push(0.0);
                let f = super::failed(&what, &e);
                let _ = writeln!(s.body, "| {label} | failed: {} |", f.checks[0].measured);
                s.checks.extend(f.checks);
            }
        }
    }
    s.body.push('\n');
    Ok(s)
}

/// The fleet run's table, notes and checks.
fn fleet_figures(
    s: &mut Section,
    f: &FleetRun,
    problems: &[String],
    sizes: &[(&str, u64, u64)],
    scale: Scale,
    load_before: &str,
) {
    let offered = scale.agents as f64 / INTERVAL.as_secs_f64();
    let made: u64 = f.logs.iter().map(|l| l.created).sum();
    let delivered: u64 = f.logs.iter().map(|l| l.delivered).sum();
    let failures: u64 = f.logs.iter().map(|l| l.failures).sum();
    let refused: Vec<&String> = f.logs.iter().flat_map(|l| &l.refused).collect();
    let unsent: usize = f.logs.iter().map(|l| l.unsent).sum();
    let sent_us: u64 = f.logs.iter().map(|l| l.allocated_us).sum();
    let lat: Vec<f64> = f.logs.iter().flat_map(|l| l.latency_ms.clone()).collect();
    let delayed: Vec<f64> = f.logs.iter().flat_map(|l| l.delayed_s.clone()).collect();
    let lat = Stats::of(&lat);
    let delayed_st = Stats::of(&delayed);
    // Whole 10-s windows from the first full interval to the end of making.
    let making_s = scale.minutes * 60.0;
    let end = (making_s as usize).min(f.per_second.len());
    let windows: Vec<f64> = f
        .per_second
        .get(10..end)
        .unwrap_or_default()
        .chunks_exact(10)
        .map(|w| w.iter().sum::<u64>() as f64 / 10.0)
        .collect();
    let win = Stats::of(&windows);
    // Windows far below the offered rate: outages (the SIGKILL's, or any
    // other), by their start in seconds from the start of the run.
    let low: Vec<String> = windows
        .iter()
        .enumerate()
        .filter(|(_, w)| **w < 0.5 * offered)
        .map(|(i, _)| format!("{}", 10 + i * 10))
        .collect();
    let kill_window = windows
        .get((f.kill_at_s as usize).saturating_sub(10) / 10)
        .copied()
        .unwrap_or(0.0);
    let per_core_agg = delivered as f64 / f.aggregator_cpu_s.max(1e-9);
    let per_core_all = delivered as f64 / (f.aggregator_cpu_s + f.postgres_cpu_s).max(1e-9);
    let _ = writeln!(
        s.body,
        "\n**Fleet run** ({} agents, {} min; load average {load_before} before, {} after):\n\n\
         | measure | value |\n| --- | --- |\n\
         | reports made / stored (2xx) | {made} / {delivered} |\n\
         | reports/s, whole run (stored ÷ {:.0} s) | {:.1} |\n\
         | reports/s per 10-s window: median (min–max) | {} |\n\
         | window holding the SIGKILL | {kill_window:.1} reports/s |\n\
         | windows below half the offered rate (start, s) | {} |\n\
         | ingest latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
         | aggregator down (SIGKILL at {:.0} s → `/readyz` 200) | {:.1} s |\n\
         | failed tries, resent later | {failures} |\n\
         | reports stored only on a later try: count, made → stored median / max | {} , {:.1} / {:.1} s |\n\
         | refused for good / left unsent | {} / {unsent} |\n\
         | aggregator CPU | {:.0} s ({:.1} % of one core) |\n\
         | PostgreSQL CPU (postmaster and backends) | {:.0} s ({:.1} % of one core) |\n\
         | load generator CPU | {:.0} s ({:.1} % of one core) |\n\
         | reports per CPU second: aggregator alone / with PostgreSQL | {per_core_agg:.0} / {per_core_all:.0} |\n",
        scale.agents,
        scale.minutes,
        crate::exec::loadavg(),
        f.secs,
        delivered as f64 / f.secs,
        win.show(1),
        if low.is_empty() {
            "none".to_owned()
        } else {
            low.join(", ")
        },
        lat.median,
        lat.p99,
        lat.max,
        f.kill_at_s,
        f.down_s,
        delayed.len(),
        delayed_st.median,
        delayed_st.max,
        refused.len(),
        f.aggregator_cpu_s,
        f.aggregator_cpu_s / f.secs * 100.0,
        f.postgres_cpu_s,
        f.postgres_cpu_s / f.secs * 100.0,
        f.loadgen_cpu_s,
        f.loadgen_cpu_s / f.secs * 100.0,
    );
    if let Some(r) = refused.first() {
        let _ = writeln!(s.body, "First refusal: `{r}`\n");
    }
    // Per node and day, from the rows the run wrote over its making time.
    let node_days = scale.agents as f64 * making_s / 86_400.0;
    let _ = writeln!(
        s.body,
        "Ledger after the run (PostgreSQL, rows and bytes of table, indexes and partitions; \
         per node and day scaled from {making_s:.0} s of {} nodes; the hourly rollups grow \
         per hour, not per report: a node writes 24 × (8 + 4) rollup rows a day whatever \
         the run's length):\n\n\
         | table | rows | bytes | bytes per row | rows per node and day | bytes per node and day |\n\
         | --- | --- | --- | --- | --- | --- |",
        scale.agents
    );
    for (t, rows, bytes) in sizes {
        let per_row = *bytes as f64 / (*rows).max(1) as f64;
        let (rpd, bpd) = if t.ends_with("_hourly") {
            let r = 24.0 * if *t == "gpu_usage_hourly" { 8.0 } else { 4.0 };
            (r, r * per_row)
        } else {
            (*rows as f64 / node_days, *bytes as f64 / node_days)
        };
        let _ = writeln!(
            s.body,
            "| `{t}` | {rows} | {bytes} | {per_row:.0} | {rpd:.0} | {:.1} MB |",
            bpd / 1e6
        );
    }
    let verdict = if problems.is_empty() {
        format!(
            "every report exactly once ({delivered} of {made}); GPU time {:.0} s in raw rows and \
             rollups, as sent",
            sent_us as f64 / 1e6
        )
    } else {
        format!(
            "{} problems, first: {}",
            problems.len(),
            problems
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    let _ = writeln!(s.body, "\nLedger check: {verdict}.");
    s.checks.push(Check::new(
        format!(
            "9. fleet, {} agents × 1 report/{} s, {} min, PostgreSQL, one SIGKILL",
            scale.agents,
            INTERVAL.as_secs(),
            scale.minutes
        ),
        format!("the offered {offered:.0} reports/s sustained, p99 ≤ 1 s"),
        format!(
            "{:.1} reports/s (10-s windows {}), p50 {:.1} ms, p99 {:.1} ms; down {:.1} s",
            delivered as f64 / f.secs,
            win.show(1),
            lat.median,
            lat.p99,
            f.down_s
        ),
        Verdict::of(win.median >= 0.95 * offered && lat.p99 <= CEILING_P99_S * 1000.0),
    ));
    s.checks.push(Check::new(
        "9. fleet ledger after the SIGKILL",
        "every report exactly once, GPU seconds equal to what was sent",
        verdict,
        Verdict::of(problems.is_empty() && unsent == 0 && refused.is_empty()),
    ));
}
