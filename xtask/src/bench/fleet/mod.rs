//! Benchmark 9: a fleet of simulated agents against the aggregator on
//! PostgreSQL — real wire format, one token per agent, the agent's spool
//! and resend rules, one SIGKILL and restart mid-run, the ledger checked
//! against what was sent — then the ingest ceiling of each backend, and of
//! two PostgreSQL replicas.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
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
use tokio::runtime::Runtime;

use super::{
    Ctx, Section,
    ledger::{Db, start_aggregator, write_config},
    util,
};

mod ceiling;
mod figures;

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
                idle_us: 0,
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
    let mut agg = start_aggregator(&ctx.tally, &config, addr, &log)?;
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
        util::tree_cpu(pg_pid),
        util::cpu_seconds(std::process::id())?,
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
    agg_cpu += util::cpu_seconds(agg.proc.pid())?;
    let killed = Instant::now();
    agg.proc.child.kill().context("SIGKILL the aggregator")?;
    agg.proc.child.wait()?;
    drop(agg);
    agg = start_aggregator(&ctx.tally, &config, addr, &log)?;
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
    agg_cpu += util::cpu_seconds(agg.proc.pid())?;
    let postgres_cpu_s = util::tree_cpu(pg_pid) - pg0;
    let loadgen_cpu_s = util::cpu_seconds(std::process::id())? - gen0;
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
        figures::fleet_figures(&mut s, &f, &problems, &sizes, scale, &load_before);
        Ok(())
    })();
    if let Err(e) = fleet {
        let f = super::failed("9. fleet run", &e);
        s.body.push_str(&f.body);
        s.checks.extend(f.checks);
    }
    ceiling::section(ctx, &rt, &mut s);
    s.body.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_reports_are_valid_and_vary() {
        let a = report(3, "boot", 7, 1_790_812_800_000);
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(
            (a.gpu_usage.len(), a.io_usage.len(), a.gpus.len()),
            (8, 4, 8)
        );
        // A lost or doubled report must show in the GPU sums.
        let b = report(3, "boot", 8, 1_790_812_810_000);
        assert_ne!(allocated_us(&a), allocated_us(&b));
        assert!(allocated_us(&a) <= 8 * 10_000_000);
    }

    #[test]
    fn psql_rows_by_node() {
        let m = by_node("fleet-00001|3|3|0|2\nfleet-00002|5\n");
        assert_eq!(m["fleet-00001"], vec![3, 3, 0, 2]);
        assert_eq!(m["fleet-00002"], vec![5]);
    }
}
