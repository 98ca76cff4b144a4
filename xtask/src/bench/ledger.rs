//! Benchmarks 6 and 7: the aggregator's ingest under many concurrent
//! simulated agents, and a month's chargeback over a generated fleet-sized
//! ledger — each on SQLite and on a throwaway PostgreSQL.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tally_e2e::Client;

use super::{
    Check, Ctx, Section, Verdict, failed,
    util::{self, Proc, Stats},
};

pub(super) const AGENT_TOKEN: &str = "bench-agent-token-0123456789";
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// 2026-11-01T00:00:00Z: the generated month starts here. November has
/// 30 days, so the full run's 30 days are one calendar month, as a cost
/// analyst asks for it (October's first 30 days held no whole month, and
/// the read by node took them day by day).
const MONTH_START_S: i64 = 1_793_491_200;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub(super) fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// A ledger database and how to run SQL on it from the shell.
pub(super) struct Db {
    pub backend: Backend,
    pub url: String,
    sqlite_file: Option<PathBuf>,
    pg: Option<Postgres>,
}

impl Db {
    pub(super) fn sqlite(dir: &Path) -> Db {
        let file = dir.join("ledger.db");
        Db {
            backend: Backend::Sqlite,
            url: format!("sqlite://{}", file.display()),
            sqlite_file: Some(file),
            pg: None,
        }
    }

    pub(super) fn postgres() -> anyhow::Result<Db> {
        let pg = Postgres::start()?;
        Ok(Db {
            backend: Backend::Postgres,
            url: format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port),
            sqlite_file: None,
            pg: Some(pg),
        })
    }

    /// Runs `sql` with the backend's shell client; returns its stdout.
    pub(super) fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = match (&self.sqlite_file, &self.pg) {
            (Some(f), _) => Command::new("sqlite3")
                .arg(f)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().expect("piped").write_all(sql.as_bytes())?;
                    c.wait_with_output()
                })?,
            (_, Some(pg)) => Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &pg.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-qtA", "-c", sql])
                .output()?,
            _ => bail!("no database"),
        };
        if !out.status.success() {
            bail!(
                "{} SQL failed: {}",
                self.backend.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The PostgreSQL server's postmaster, to read its CPU time.
    pub(super) fn postmaster_pid(&self) -> Option<u32> {
        let pg = self.pg.as_ref()?;
        fs::read_to_string(pg.dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub(super) fn count(&self, table: &str) -> anyhow::Result<u64> {
        let out = self.sql(&format!("SELECT COUNT(*) FROM {table};"))?;
        out.lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("COUNT(*) of {table}: {out:?}"))
    }
}

/// A throwaway PostgreSQL cluster (initdb into a temporary directory,
/// trust auth on 127.0.0.1, a free port), stopped and removed on drop.
struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    fn start() -> anyhow::Result<Postgres> {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (apt-get install postgresql)")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql")?;
        let dir = PathBuf::from(format!("/tmp/tally-bench-pg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        let port = tally_e2e::free_port();
        let pg_bin = bin.clone();
        let as_pg = move |program: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin.join(program));
            c
        };
        let data = dir.join("data");
        let out = as_pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pg = Postgres { dir, bin, port };
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            pg.dir.display()
        );
        let out = as_pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-w", "-l"])
            .arg(pg.dir.join("server.log"))
            .arg("start")
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(pg)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `tally aggregator`.
pub(super) struct Aggregator {
    pub proc: Proc,
    pub addr: SocketAddr,
}

fn aggregator(ctx: &Ctx, dir: &Path, db: &Db, connections: u32) -> anyhow::Result<Aggregator> {
    let config = write_config(dir, db, connections, &[AGENT_TOKEN], "")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], tally_e2e::free_port()));
    start_aggregator(
        &ctx.tally,
        &config,
        addr,
        &dir.join(format!("aggregator-{}.log", db.backend.name())),
    )
}

/// Writes `dir/aggregator.toml` for `db`: the benchmarks' prices, the
/// admin token, `agent_tokens` (one per line of one token file) and
/// `auth`, further keys of the `[auth]` table (e.g. a rate limit).
pub(super) fn write_config(
    dir: &Path,
    db: &Db,
    connections: u32,
    agent_tokens: &[&str],
    auth: &str,
) -> anyhow::Result<PathBuf> {
    fs::write(dir.join("agent.token"), agent_tokens.join("\n") + "\n")?;
    fs::write(dir.join("admin.token"), ADMIN_TOKEN)?;
    let config = format!(
        r#"
[ledger]
url = "{url}"
max_connections = {connections}
# The generated month is older than the default 35 days: keep its raw rows.
raw_retention = "3650d"

[prices]
gpu_hour = {{ "NVIDIA H100 80GB HBM3" = 2.50, "NVIDIA A100-SXM4-80GB" = 1.20, default = 1.0 }}
energy_kwh = 0.12
network_gib = 0.01

[auth]
{auth}

[[auth.token]]
role = "agent"
token_file = "{dir}/agent.token"

[[auth.token]]
role = "admin"
token_file = "{dir}/admin.token"
"#,
        url = db.url,
        dir = dir.display()
    );
    let file = dir.join("aggregator.toml");
    fs::write(&file, config)?;
    Ok(file)
}

/// Starts `tally` (the release build, or a script that runs it) as the
/// aggregator with `config` on `addr`, its log to `log`; returns once
/// `/readyz` answers 200.
pub(super) fn start_aggregator(
    tally: &Path,
    config: &Path,
    addr: SocketAddr,
    log: &Path,
) -> anyhow::Result<Aggregator> {
    let mut proc = Proc::spawn(
        "tally aggregator",
        Command::new(tally)
            .arg("aggregator")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(fs::OpenOptions::new().create(true).append(true).open(log)?),
    )?;
    let started = Instant::now();
    loop {
        proc.check_alive()?;
        if matches!(Client::new(addr).get("/readyz"), Ok(r) if r.status == 200) {
            return Ok(Aggregator { proc, addr });
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("aggregator not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this build has the aggregator role.
pub(super) fn has_aggregator(ctx: &Ctx) -> bool {
    Command::new(&ctx.tally)
        .args(["aggregator", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub(super) fn run(ctx: &Ctx, ingest: bool, chargeback: bool) -> Vec<Section> {
    let mut out = Vec::new();
    if !has_aggregator(ctx) {
        let why = "`tally aggregator` is not in this build (the aggregator role has not landed \
                   in tally/src/commands/report.rs)";
        for (on, title) in [
            (ingest, "6. Aggregator ingest"),
            (chargeback, "7. Chargeback query"),
        ] {
            if on {
                out.push(Section {
                    title: title.into(),
                    body: format!("Skipped: {why}.\n"),
                    checks: vec![Check::new(title, "", why, Verdict::Skipped)],
                });
            }
        }
        return out;
    }
    if ingest {
        eprintln!("bench: 6. aggregator ingest");
        let mut s = Section {
            title: "6. Aggregator ingest".into(),
            ..Default::default()
        };
        let _ = writeln!(
            s.body,
            "**Set-up.** The release aggregator on a fresh ledger; a closed-loop load generator \
             (threads of `cargo xtask bench`, one keep-alive HTTP/1.1 connection each) where \
             every thread is one simulated agent posting its reports back to back: each report \
             has 50 tenant rows of GPU usage, 50 of I/O and 8 GPU gauges (~{} KiB of JSON), \
             with a bearer token. The load generator shares the 2 cores with the aggregator \
             and the database (its CPU is shown), and the machine is a VM: the share of its \
             CPU time the hypervisor gave elsewhere during each level is shown too (a level \
             that lost a quarter of it is not a measure of the code). PostgreSQL runs in \
             processes of its own: their CPU and the write-ahead log written per stored \
             report are shown too (a fresh cluster, so each new 16 MiB WAL file is created \
             and zero-filled as it is reached; a server that has run a while reuses them). \
             After all levels the ledger is counted: every stored report and every one of its \
             rows must be there.\n",
            ReportTemplate::new("n", "b").body(0, 0, 0).len() / 1024
        );
        for backend in [Backend::Sqlite, Backend::Postgres] {
            match ingest_bench(ctx, backend) {
                Ok((body, checks)) => {
                    s.body.push_str(&body);
                    s.checks.extend(checks);
                }
                Err(e) => {
                    let f = failed(&format!("6. ingest on {}", backend.name()), &e);
                    s.body.push_str(&f.body);
                    s.checks.extend(f.checks);
                }
            }
        }
        let counted = super::ingest_instructions::section(ctx);
        s.body.push_str(&counted.body);
        s.checks.extend(counted.checks);
        if s.checks.iter().any(|c| c.verdict == Verdict::Miss) {
            s.body.push_str(INGEST_BOTTLENECK);
        }
        out.push(s);
    }
    if chargeback {
        eprintln!("bench: 7. chargeback");
        let mut s = Section {
            title: "7. Chargeback query".into(),
            ..Default::default()
        };
        let (days, nodes, tenants) = if ctx.quick {
            (3, 100, 200)
        } else {
            (30, 1000, 200)
        };
        let _ = writeln!(
            s.body,
            "**Set-up.** A generated ledger of {days} days × {nodes} nodes × {tenants} tenants: \
             one report per node and day, each with a GPU-usage row and an I/O row per tenant \
             ({} rows in each table), bulk-inserted with SQL straight into the aggregator's own \
             schema (created by the aggregator's migrations on start-up; for the load, the two \
             usage indexes are dropped and re-created after) and rolled up into \
             the per-node hourly tables as ingest does, then the aggregator restarted on it \
             (it folds the node-less and the per-node daily and monthly rollups on start; the timings wait for that). (A real \
             ledger with 10 s reports holds 8,640 reports per node and day, and 24 hourly \
             rollup rows per tenant and node where this one holds one; the per-node daily \
             rollup read by tenant and node holds one row per tenant, node and day either way, \
             and the node-less rollup read by tenant one row per tenant, model and hour.) Query: \
             `GET /api/v1/chargeback?from=…&to=…&group_by=tenant` (then `tenant,gpu_model` and \
             `tenant,node`) over the whole month, admin token, timed end to end; one warm-up, \
             then timed runs. The SQL the handler runs is also timed alone in the database's own \
             shell to split database from aggregator time.\n",
            days * nodes * tenants
        );
        for backend in [Backend::Sqlite, Backend::Postgres] {
            match chargeback_bench(ctx, backend, days, nodes, tenants) {
                Ok((body, checks)) => {
                    s.body.push_str(&body);
                    s.checks.extend(checks);
                }
                Err(e) => {
                    let f = failed(&format!("7. chargeback on {}", backend.name()), &e);
                    s.body.push_str(&f.body);
                    s.checks.extend(f.checks);
                }
            }
        }
        if s.checks.iter().any(|c| c.verdict == Verdict::Miss) {
            s.body.push_str(CHARGEBACK_BOTTLENECK);
        }
        out.push(s);
    }
    out
}

// ---------------------------------------------------------------- 6. ingest

/// What the profiles above show when ingest misses its target.
const INGEST_BOTTLENECK: &str = "
**Bottleneck (ingest).** `aggregator/src/ledger/ingest.rs` writes a report in a few \
statements (its claim; its node's row; then its raw rows, its node's hourly rollups, gauges and \
boot row as one statement on PostgreSQL, each column of rows one array; the totals are folded \
off the ingest path) and no row is shared between nodes, so PostgreSQL backends no longer queue \
on each other's row locks (compare `Lock:transactionid` 96 % before). What is left is the \
database's own work per row, ~210 rows and upserts per report: on PostgreSQL its CPU and WAL \
per report are in the table, on SQLite one writer thread (`tally-ledger`, its own rusqlite \
connection, statements kept prepared) whose profile is SQLite's own B-tree and page work. The \
notes above give what was tried and what moved.

**What would move it:** fewer rows per report. A report's raw rows stored as one row \
(arrays or a compact blob per report, unpacked by the partial-hour reads) and the I/O hourly \
rollup folded into the GPU one would take ~210 row writes to ~60. Measured as a ceiling (the \
notes above: those writes left out altogether), that about doubles both rates; the load \
generator shares this machine's 2 cores. Not `synchronous_commit = off`: an agent drops a \
report from its spool once it is acknowledged.
";

/// One simulated agent's reports (50 tenants' GPU and I/O rows, 8 GPU
/// gauges): the JSON around the fields that change from one report to
/// the next is built once. The load generator shares the aggregator's 2
/// cores, so what it spends per report is taken from the rate measured.
pub(super) struct ReportTemplate {
    /// Up to the `seq` value.
    head: String,
    /// From the rows on.
    tail: String,
}

impl ReportTemplate {
    pub(super) fn new(node: &str, boot: &str) -> Self {
        let mut gpu = Vec::with_capacity(50);
        let mut io = Vec::with_capacity(50);
        for t in 0..50 {
            let g = t % 8;
            gpu.push(format!(
                r#"{{"tenant":"tenant-{t:02}","gpu":"{g}","uuid":"GPU-{node}-{g}","model":"NVIDIA H100 80GB HBM3","slice_fraction":1.0,"allocated_us":1000000,"sm_us":500000,"memory_byte_seconds":4294967296,"energy_mj":250000}}"#
            ));
            io.push(format!(
                r#"{{"tenant":"tenant-{t:02}","network_ingress_bytes":1048576,"network_egress_bytes":524288,"network_ingress_packets":800,"network_egress_packets":400,"network_dropped_packets":0,"pcie_h2d_bytes":8388608,"pcie_d2h_bytes":4194304}}"#
            ));
        }
        let gauges: Vec<String> = (0..8)
            .map(|g| {
                format!(
                    r#"{{"gpu":"{g}","uuid":"GPU-{node}-{g}","model":"NVIDIA H100 80GB HBM3","mig_mode":false,"health":"ok","utilization_ratio":0.5,"memory_used_bytes":1073741824,"memory_total_bytes":85520809984,"processes":6}}"#
                )
            })
            .collect();
        Self {
            head: format!(r#"{{"version":1,"node":"{node}","boot_id":"{boot}","seq":"#),
            tail: format!(
                r#","gpu_usage":[{}],"io_usage":[{}],"gpus":[{}]}}"#,
                gpu.join(","),
                io.join(","),
                gauges.join(",")
            ),
        }
    }

    /// The report `seq`, covering `start_ms..end_ms`.
    pub(super) fn body(&self, seq: u64, start_ms: u64, end_ms: u64) -> String {
        let mut b = String::with_capacity(self.head.len() + self.tail.len() + 80);
        b.push_str(&self.head);
        let _ = write!(
            b,
            r#"{seq},"interval_start_ms":{start_ms},"interval_end_ms":{end_ms}"#
        );
        b.push_str(&self.tail);
        b
    }
}

struct Level {
    agents: usize,
    stored: u64,
    errors: u64,
    secs: f64,
    latencies_ms: Vec<f64>,
    aggregator_cpu: f64,
    loadgen_cpu: f64,
    /// Percent of the machine's CPU time the hypervisor took meanwhile.
    stolen: f64,
    /// Profile of the aggregator during this level, when asked.
    profile: Option<String>,
    /// Aggregator CPU by thread group over the level, seconds.
    threads: Vec<(String, f64)>,
    /// PostgreSQL's CPU (postmaster, backends, background processes) in
    /// percent of one core, and the WAL it wrote per stored report.
    database: Option<(f64, f64)>,
}

/// Runs `agents` closed-loop agents for `secs` seconds.
fn level(
    agg: &Aggregator,
    agents: usize,
    secs: u64,
    tag: &str,
    profile_dir: Option<&Path>,
) -> anyhow::Result<Level> {
    let barrier = Arc::new(Barrier::new(agents + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let boot = format!("bench-{}-{tag}", std::process::id());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut threads = Vec::new();
    for a in 0..agents {
        let (barrier, deadline, boot) = (barrier.clone(), deadline.clone(), boot.clone());
        let addr = agg.addr;
        let tag = tag.to_owned();
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<(u64, u64, Vec<f64>)> {
                let node = format!("ingest-{tag}-{a:03}");
                let reports = ReportTemplate::new(&node, &boot);
                // One keep-alive connection per simulated agent.
                let conn = Client::new(addr).bearer(AGENT_TOKEN);
                let mut lat = Vec::new();
                let (mut stored, mut errors) = (0u64, 0u64);
                barrier.wait();
                let end = *deadline.wait();
                let mut seq = 0u64;
                // Reports cover 10 s each, ending before now.
                let start0 = now_ms - 400_000_000;
                while Instant::now() < end {
                    let s = start0 + seq * 10_000;
                    let body = reports.body(seq, s, s + 10_000);
                    let t = Instant::now();
                    match conn.post_json("/api/v1/reports", body.as_bytes()) {
                        Ok(r) if r.status == 200 => stored += 1,
                        _ => errors += 1,
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    seq += 1;
                }
                Ok((stored, errors, lat))
            },
        ));
    }
    let self_pid = std::process::id();
    let (c0, l0) = (
        util::cpu_seconds(agg.proc.pid())?,
        util::cpu_seconds(self_pid)?,
    );
    let threads0 = util::thread_cpu(agg.proc.pid());
    let cpu0 = util::CpuTime::now();
    let t0 = Instant::now();
    let _ = deadline.set(t0 + Duration::from_secs(secs));
    barrier.wait();
    let profiler = profile_dir.map(|dir| {
        let (pid, dir) = (agg.proc.pid(), dir.to_path_buf());
        std::thread::spawn(move || super::agent::profile(pid, secs.saturating_sub(2).max(1), &dir))
    });
    let mut out = Level {
        agents,
        stored: 0,
        errors: 0,
        secs: 0.0,
        latencies_ms: Vec::new(),
        aggregator_cpu: 0.0,
        loadgen_cpu: 0.0,
        stolen: 0.0,
        profile: None,
        threads: Vec::new(),
        database: None,
    };
    for t in threads {
        let (s, e, l) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        out.stored += s;
        out.errors += e;
        out.latencies_ms.extend(l);
    }
    out.secs = t0.elapsed().as_secs_f64();
    out.threads = util::thread_delta(&threads0, &util::thread_cpu(agg.proc.pid()));
    out.profile = profiler.and_then(|p| p.join().ok());
    out.aggregator_cpu = (util::cpu_seconds(agg.proc.pid())? - c0) / out.secs * 100.0;
    out.loadgen_cpu = (util::cpu_seconds(self_pid)? - l0) / out.secs * 100.0;
    out.stolen = util::CpuTime::now().stolen_since(&cpu0);
    Ok(out)
}

/// PostgreSQL's CPU seconds so far and where its WAL stands (bytes):
/// `None` on SQLite, whose database work is the aggregator's own.
fn database_use(db: &Db) -> Option<(f64, f64)> {
    let cpu = util::tree_cpu(db.postmaster_pid()?);
    let wal = db
        .sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0');")
        .ok()?
        .parse()
        .ok()?;
    Some((cpu, wal))
}

/// What PostgreSQL's client backends wait on, sampled every 100 ms until
/// `done`, over one connection kept open: a `psql` per sample started a
/// process and a backend ten times a second, CPU taken from the level it
/// measured. Empty if the database cannot be reached.
fn sample_waits(url: &str, done: &AtomicBool) -> BTreeMap<String, u64> {
    use sqlx::Connection as _;
    let mut waits = BTreeMap::new();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return waits;
    };
    rt.block_on(async {
        let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
            return;
        };
        while !done.load(Ordering::Relaxed) {
            let sampled: Result<Vec<(String,)>, _> = sqlx::query_as(
                "SELECT COALESCE(wait_event_type, 'CPU') || ':' || \
                 COALESCE(wait_event, 'running') FROM pg_stat_activity \
                 WHERE state = 'active' AND backend_type = 'client backend' \
                 AND pid <> pg_backend_pid()",
            )
            .fetch_all(&mut conn)
            .await;
            for (w,) in sampled.into_iter().flatten() {
                *waits.entry(w).or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    waits
}

fn ingest_bench(ctx: &Ctx, backend: Backend) -> anyhow::Result<(String, Vec<Check>)> {
    let dir = util::scratch(&format!("ingest-{}", backend.name()))?;
    let db = match backend {
        Backend::Sqlite => Db::sqlite(&dir),
        Backend::Postgres => Db::postgres()?,
    };
    let agg = aggregator(ctx, &dir, &db, 16)?;
    let (levels, secs): (&[usize], u64) = if ctx.quick {
        (&[1, 8], 2)
    } else {
        (&[1, 4, 16, 64], 8)
    };
    let mut results = Vec::new();
    let mut pg_waits = BTreeMap::new();
    for &n in levels {
        eprintln!("bench: ingest on {}: {n} agents", backend.name());
        // The busiest level is profiled.
        let last = n == *levels.last().unwrap_or(&0);
        let prof = last.then_some(dir.as_path());
        let done = AtomicBool::new(false);
        let (l, waits) = std::thread::scope(|scope| {
            // What PostgreSQL's backends wait on while the busiest level runs.
            let sampler = (last && backend == Backend::Postgres)
                .then(|| scope.spawn(|| sample_waits(&db.url, &done)));
            let before = database_use(&db);
            let mut l = level(&agg, n, secs, &format!("{}-{n}", backend.name()), prof);
            if let (Ok(l), Some((cpu0, wal0)), Some((cpu1, wal1))) =
                (&mut l, before, database_use(&db))
            {
                l.database = Some((
                    (cpu1 - cpu0) / l.secs * 100.0,
                    (wal1 - wal0) / l.stored.max(1) as f64,
                ));
            }
            done.store(true, Ordering::Relaxed);
            (l, sampler.and_then(|s| s.join().ok()))
        });
        results.push(l?);
        if let Some(w) = waits {
            pg_waits = w;
        }
    }
    // Completeness: every stored report and its rows are in the ledger.
    let stored: u64 = results.iter().map(|l| l.stored).sum();
    let (reports, gpu_rows, io_rows) = (
        db.count("reports")?,
        db.count("gpu_usage")?,
        db.count("io_usage")?,
    );
    let complete = reports == stored && gpu_rows == stored * 50 && io_rows == stored * 50;
    drop(agg);

    let mut b = String::new();
    let _ = writeln!(
        b,
        "\n**{}** (aggregator `max_connections = 16`{}):\n",
        backend.name(),
        match backend {
            Backend::Sqlite => {
                ", WAL; a report is answered once the log holding it is flushed to disk, as \
                 the ledger does it"
            }
            Backend::Postgres => ", PostgreSQL defaults: fsync on, synchronous_commit on",
        }
    );
    let database = backend == Backend::Postgres;
    let _ = writeln!(
        b,
        "| agents | reports/s | p50 ms | p99 ms | max ms | errors | aggregator CPU % | load generator CPU % \
         | CPU stolen % |{}",
        if database {
            " PostgreSQL CPU % | WAL KiB per report |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        b,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |{}",
        if database { " --- | --- |" } else { "" }
    );
    let mut best = (0.0f64, 0usize, 0.0f64);
    for l in &results {
        let st = Stats::of(&l.latencies_ms);
        let rate = l.stored as f64 / l.secs;
        if rate > best.0 {
            best = (rate, l.agents, st.p99);
        }
        let _ = writeln!(
            b,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {:.0} |{}",
            l.agents,
            rate,
            st.median,
            st.p99,
            st.max,
            l.errors,
            l.aggregator_cpu,
            l.loadgen_cpu,
            l.stolen,
            match (database, l.database) {
                (false, _) => String::new(),
                (true, Some((cpu, wal))) => format!(" {cpu:.0} | {:.1} |", wal / 1024.0),
                (true, None) => " — | — |".into(),
            }
        );
    }
    // Saturation: the fewest agents that reach 95 % of the best rate.
    let saturation = results
        .iter()
        .find(|l| l.stored as f64 / l.secs >= 0.95 * best.0)
        .map(|l| l.agents)
        .unwrap_or(best.1);
    let _ = writeln!(
        b,
        "\nSaturation: {saturation} concurrent agents reach ≥ 95 % of the best rate ({:.0} \
         reports/s); more only add latency. Ledger after the run: {reports} reports (stored \
         {stored}), {gpu_rows} GPU rows, {io_rows} I/O rows — {}.",
        best.0,
        if complete {
            "complete"
        } else {
            "**INCOMPLETE**"
        }
    );
    if let Some(l) = results.last() {
        let threads: Vec<String> = l
            .threads
            .iter()
            .filter(|t| t.1 > 0.0)
            .map(|(g, v)| format!("`{g}` {:.0} %", v / l.secs * 100.0))
            .collect();
        let _ = writeln!(
            b,
            "\nAggregator CPU by thread at {} agents (% of one core): {}.\n",
            l.agents,
            threads.join(", ")
        );
        if !pg_waits.is_empty() {
            let total: u64 = pg_waits.values().sum();
            let mut w: Vec<(&String, &u64)> = pg_waits.iter().collect();
            w.sort_by(|a, b| b.1.cmp(a.1));
            let shown: Vec<String> = w
                .iter()
                .take(6)
                .map(|(k, v)| format!("`{k}` {:.0} %", **v as f64 / total as f64 * 100.0))
                .collect();
            let _ = writeln!(
                b,
                "What the active PostgreSQL backends were doing at {} agents (`pg_stat_activity`, \
                 sampled every 100 ms): {}.\n",
                l.agents,
                shown.join(", ")
            );
        }
        if let Some(p) = &l.profile {
            let _ = writeln!(
                b,
                "Profile of the aggregator at {} agents:\n\n{p}",
                l.agents
            );
        }
    }
    let target = match backend {
        Backend::Sqlite => 2000.0,
        Backend::Postgres => 1000.0,
    };
    let checks = vec![
        Check::new(
            format!("6. ingest on {}", backend.name()),
            format!("≥ {target:.0} reports/s"),
            format!(
                "{:.0} reports/s at {} agents, p99 {:.1} ms; saturates at {saturation} agents",
                best.0, best.1, best.2
            ),
            Verdict::of(best.0 >= target),
        ),
        Check::new(
            format!("6. ledger complete after ingest ({})", backend.name()),
            "every stored report and row present",
            format!("{reports}/{stored} reports, {gpu_rows} + {io_rows} rows"),
            Verdict::of(complete),
        ),
    ];
    Ok((b, checks))
}

// ----------------------------------------------------------- 7. chargeback

/// What the timings above show when the chargeback query misses.
const CHARGEBACK_BOTTLENECK: &str = "
**Bottleneck (chargeback).** By tenant and by tenant and GPU model, \
`Ledger::gpu_groups_by_tenant` (`aggregator/src/ledger/chargeback.rs`) reads the node-less \
hourly rollup, plus the per-node rollup for hours not folded yet and for keys where \
`basis=used` clamps; the plan above shows whether the database keeps to those small sets \
(`SEARCH`, not `SCAN gpu_usage_hourly`). By tenant and node, `Ledger::gpu_groups` reads the \
per-node monthly rollup for whole folded calendar months, the daily rollup for other whole \
days (one month bucket at a time, in the order it groups by) and the hourly rollup for the \
other hours: here one row per tenant and node, 200,000 groups for the month, priced in the \
aggregator.
";

fn generate_sql(backend: Backend, days: u64, nodes: u64, tenants: u64) -> String {
    let day_ms = 86_400_000i64;
    let base = MONTH_START_S * 1000;
    // Per tenant and day: a quarter of the tenants on A100s, the rest on
    // H100s; 0.4 GPU-days each.
    let (series, begin, end) = match backend {
        Backend::Sqlite => (
            format!(
                "WITH RECURSIVE d(day) AS (SELECT 0 UNION ALL SELECT day + 1 FROM d WHERE day < {}), \
                 n(node) AS (SELECT 0 UNION ALL SELECT node + 1 FROM n WHERE node < {}) ",
                days - 1,
                nodes - 1
            ),
            "PRAGMA synchronous = OFF; BEGIN; DROP INDEX gpu_usage_end; DROP INDEX io_usage_end;",
            "CREATE INDEX gpu_usage_end ON gpu_usage (interval_end_ms, tenant); \
             CREATE INDEX io_usage_end ON io_usage (interval_end_ms, tenant); COMMIT; ANALYZE;",
        ),
        Backend::Postgres => (
            format!(
                "WITH d(day) AS (SELECT generate_series(0, {})), n(node) AS (SELECT generate_series(0, {})) ",
                days - 1,
                nodes - 1
            ),
            "BEGIN; DROP INDEX gpu_usage_end; DROP INDEX io_usage_end;",
            "CREATE INDEX gpu_usage_end ON gpu_usage (interval_end_ms, tenant); \
             CREATE INDEX io_usage_end ON io_usage (interval_end_ms, tenant); COMMIT; ANALYZE;",
        ),
    };
    let tseries = match backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE t(tenant) AS (SELECT 0 UNION ALL SELECT tenant + 1 FROM t WHERE tenant < {}) ",
            tenants - 1
        ),
        Backend::Postgres => format!(
            "WITH t(tenant) AS (SELECT generate_series(0, {})) ",
            tenants - 1
        ),
    };
    format!(
        "{begin}
{series} INSERT INTO reports (id, node, boot_id, seq, interval_start_ms, interval_end_ms, received_ms, digest)
  SELECT day * {nodes} + node + 1, 'node-' || node, 'generated', day, {base} + CAST(day AS BIGINT) * {day_ms}, {base} + CAST(day + 1 AS BIGINT) * {day_ms}, {base} + CAST(day + 1 AS BIGINT) * {day_ms}, 'generated' FROM d, n;
{tseries} INSERT INTO gpu_usage (report_id, node, interval_end_ms, tenant, gpu, uuid, model, mig_profile, slice_fraction, allocated_us, sm_us, memory_byte_seconds, energy_mj)
  SELECT r.id, r.node, r.interval_end_ms, 'tenant-' || t.tenant, CAST(t.tenant % 8 AS TEXT), 'GPU-' || r.node || '-' || (t.tenant % 8),
         CASE WHEN t.tenant % 4 = 0 THEN 'NVIDIA A100-SXM4-80GB' ELSE 'NVIDIA H100 80GB HBM3' END, NULL, 1.0,
         34560000000, 17280000000, 3710851743744000, 8640000000
  FROM reports r, t;
{tseries} INSERT INTO io_usage (report_id, node, interval_end_ms, tenant, network_ingress_bytes, network_egress_bytes, network_ingress_packets, network_egress_packets, network_dropped_packets, pcie_h2d_bytes, pcie_d2h_bytes)
  SELECT r.id, r.node, r.interval_end_ms, 'tenant-' || t.tenant, 10737418240, 5368709120, 8000000, 4000000, 0, 21474836480, 10737418240
  FROM reports r, t;
INSERT INTO gpu_usage_hourly (hour_ms, tenant, node, model, slice_fraction, allocated_us, used_us, energy_mj, memory_byte_seconds)
  SELECT (interval_end_ms / 3600000) * 3600000, tenant, node, model, slice_fraction, CAST(SUM(allocated_us) AS BIGINT), CAST(SUM(COALESCE(sm_us, allocated_us)) AS BIGINT), CAST(SUM(energy_mj) AS BIGINT), SUM(CAST(memory_byte_seconds AS DOUBLE PRECISION))
  FROM gpu_usage GROUP BY (interval_end_ms / 3600000) * 3600000, tenant, node, model, slice_fraction;
INSERT INTO io_usage_hourly (hour_ms, tenant, node, network_ingress_bytes, network_egress_bytes, pcie_h2d_bytes, pcie_d2h_bytes)
  SELECT (interval_end_ms / 3600000) * 3600000, tenant, node, CAST(SUM(network_ingress_bytes) AS BIGINT), CAST(SUM(network_egress_bytes) AS BIGINT), CAST(SUM(pcie_h2d_bytes) AS BIGINT), CAST(SUM(pcie_d2h_bytes) AS BIGINT)
  FROM io_usage GROUP BY (interval_end_ms / 3600000) * 3600000, tenant, node;
UPDATE rollup_watermark SET received_ms = 0;
{end}
"
    )
}

fn chargeback_bench(
    ctx: &Ctx,
    backend: Backend,
    days: u64,
    nodes: u64,
    tenants: u64,
) -> anyhow::Result<(String, Vec<Check>)> {
    let dir = util::scratch(&format!("chargeback-{}", backend.name()))?;
    let db = match backend {
        Backend::Sqlite => Db::sqlite(&dir),
        Backend::Postgres => Db::postgres()?,
    };
    // The aggregator creates the schema; the rows go in while it is down.
    drop(aggregator(ctx, &dir, &db, 8)?);
    let t = Instant::now();
    db.sql(&generate_sql(backend, days, nodes, tenants))?;
    let generated_s = t.elapsed().as_secs_f64();
    let rows = db.count("gpu_usage")?;
    eprintln!(
        "bench: generated {rows} rows on {} in {generated_s:.0} s",
        backend.name()
    );
    let agg = aggregator(ctx, &dir, &db, 8)?;
    // The aggregator folds the node-less rollups in the background on
    // start; chargeback is exact meanwhile, only slower. Wait for it.
    let t = Instant::now();
    loop {
        let w = db.sql("SELECT received_ms FROM rollup_watermark WHERE name = 'tenant_hourly';")?;
        if w.lines().last().and_then(|l| l.trim().parse::<i64>().ok()) > Some(0) {
            break;
        }
        if t.elapsed() > Duration::from_secs(1200) {
            bail!("the aggregator did not fold the rollups within 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let fold_s = t.elapsed().as_secs_f64();
    let folded = db.count("gpu_usage_hourly_tenant")?;
    let from = MONTH_START_S;
    let to = MONTH_START_S + days as i64 * 86_400;
    let time_it = |group_by: &str, runs: usize| -> anyhow::Result<(Stats, usize)> {
        let path = format!("/api/v1/chargeback?from={from}&to={to}&group_by={group_by}");
        let mut times = Vec::new();
        let mut lines = 0;
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        for i in 0..=runs {
            // Timed with the std-only client: the test kit's unoptimised
            // one took longer to read a month by node than the aggregator
            // took to answer it.
            let r = util::timed_get(agg.addr, &path, &[("Authorization", &bearer)])?;
            let secs = r.ms / 1000.0;
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            lines = v["lines"].as_array().map(Vec::len).unwrap_or(0);
            if i > 0 {
                times.push(secs);
            }
        }
        Ok((Stats::of(&times), lines))
    };
    let runs = if ctx.quick { 2 } else { 5 };
    let (st, lines) = time_it("tenant", runs)?;
    let (by_model, model_lines) = time_it("tenant,gpu_model", runs)?;
    let (by_node, node_lines) = time_it("tenant,node", if ctx.quick { 1 } else { 2 })?;
    drop(agg);
    // The handler's GPU query for `group_by=tenant`, alone in the
    // database: as `Ledger::gpu_groups_by_tenant` asks it (the
    // node-less rollup for whole hours, per node where not folded yet or
    // where a clamp applies, raw rows for partial hours: none here).
    let from_ms = from * 1000;
    let to_ms = to * 1000;
    let sums = "allocated_us, used_us, energy_mj, memory_byte_seconds, idle_us";
    let raw = "SELECT tenant, node, cluster, workload, model, slice_fraction, allocated_us, \
               COALESCE(sm_us, allocated_us) AS used_us, energy_mj, \
               CAST(memory_byte_seconds AS DOUBLE PRECISION) AS memory_byte_seconds, idle_us \
               FROM gpu_usage";
    let cols = "tenant, cluster, workload, model, slice_fraction";
    let rest = "cluster, workload, model, slice_fraction";
    let on = |t: &str| {
        cols.split(", ")
            .map(|c| format!("{t}.{c} = o.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let gpu_sql = format!(
        "WITH dirty AS (SELECT DISTINCT (interval_end_ms / 3600000) * 3600000 AS hour_ms \
         FROM reports WHERE received_ms >= (SELECT received_ms FROM rollup_watermark \
         WHERE name = 'tenant_hourly') AND +interval_end_ms >= {from_ms} AND +interval_end_ms < {to_ms}), \
         pieces AS (SELECT tenant, node, {rest}, {sums} \
         FROM dirty d CROSS JOIN gpu_usage_hourly h WHERE h.hour_ms = d.hour_ms \
         UNION ALL {raw} WHERE interval_end_ms >= {from_ms} AND interval_end_ms < {from_ms} \
         UNION ALL {raw} WHERE interval_end_ms >= {to_ms} AND interval_end_ms < {to_ms}), \
         folded AS (SELECT {cols}, {sums}, over_rows \
         FROM gpu_usage_hourly_tenant WHERE hour_ms >= {from_ms} AND hour_ms < {to_ms} \
         AND hour_ms NOT IN (SELECT hour_ms FROM dirty)), \
         over AS (SELECT {cols} FROM folded WHERE over_rows > 0 \
         UNION SELECT {cols} FROM pieces WHERE used_us > allocated_us) \
         SELECT tenant, node, {rest}, CAST(SUM(allocated_us) AS BIGINT), \
         CAST(SUM(used_us) AS BIGINT), CAST(SUM(energy_mj) AS BIGINT), \
         CAST(SUM(memory_byte_seconds) AS DOUBLE PRECISION), CAST(SUM(idle_us) AS BIGINT) \
         FROM (SELECT f.tenant, '' AS node, f.cluster, f.workload, f.model, f.slice_fraction, \
         f.allocated_us, f.used_us, f.energy_mj, f.memory_byte_seconds, f.idle_us \
         FROM folded f LEFT JOIN over o ON {on_f} WHERE o.tenant IS NULL \
         UNION ALL SELECT p.tenant, CASE WHEN o.tenant IS NULL THEN '' ELSE p.node END, \
         p.cluster, p.workload, p.model, p.slice_fraction, p.allocated_us, p.used_us, \
         p.energy_mj, p.memory_byte_seconds, p.idle_us FROM pieces p LEFT JOIN over o ON {on_p} \
         UNION ALL SELECT h.tenant, h.node, h.cluster, h.workload, h.model, h.slice_fraction, \
         h.allocated_us, h.used_us, h.energy_mj, h.memory_byte_seconds, h.idle_us \
         FROM over o CROSS JOIN gpu_usage_hourly h WHERE {on_h} \
         AND h.hour_ms >= {from_ms} AND h.hour_ms < {to_ms} \
         AND h.hour_ms NOT IN (SELECT hour_ms FROM dirty) AND EXISTS (SELECT 1 FROM over)) u \
         GROUP BY tenant, node, {rest} ORDER BY tenant, node, {rest}",
        on_f = on("f"),
        on_p = on("p"),
        on_h = on("h"),
    );
    // As the aggregator's connections run it (ledger/mod.rs).
    let session = match backend {
        Backend::Sqlite => "",
        Backend::Postgres => "SET jit = off; ",
    };
    let t = Instant::now();
    let groups = db.sql(&format!("{session}{gpu_sql};"))?.lines().count();
    let sql_s = t.elapsed().as_secs_f64();
    // The whole plan: its first lines are only the CTEs'.
    let plan = match backend {
        Backend::Sqlite => db.sql(&format!("EXPLAIN QUERY PLAN {gpu_sql};"))?,
        Backend::Postgres => db.sql(&format!("{session}EXPLAIN {gpu_sql};"))?,
    };
    let mut b = String::new();
    let _ = writeln!(
        b,
        "\n**{}:** {rows} GPU rows generated in {generated_s:.0} s; the aggregator's first \
         fold into the node-less rollup took {fold_s:.0} s ({folded} rows). Chargeback for the \
         month by tenant: **{:.2} s** median (min–max {:.2}–{:.2} s, {} runs), {lines} lines; \
         by tenant and GPU model: **{:.2} s** ({:.2}–{:.2} s), {model_lines} lines; by tenant \
         and node (the per-node rollups): **{:.2} s** ({:.2}–{:.2} s, {} runs), {node_lines} \
         lines. The GPU query by tenant alone in the `{}` shell: {sql_s:.2} s, {groups} groups \
         handed to the aggregator to price. Plan:\n\n```\n{plan}\n```\n",
        backend.name(),
        st.median,
        st.min,
        st.max,
        st.n,
        by_model.median,
        by_model.min,
        by_model.max,
        by_node.median,
        by_node.min,
        by_node.max,
        by_node.n,
        match backend {
            Backend::Sqlite => "sqlite3",
            Backend::Postgres => "psql",
        }
    );
    let name = |what: &str| {
        format!(
            "7. chargeback{what}, {days} d × {nodes} nodes × {tenants} tenants ({})",
            backend.name()
        )
    };
    let checks = vec![
        Check::new(
            name(""),
            "≤ 1 s",
            format!(
                "{:.2} s ({:.2}–{:.2}); SQL alone {sql_s:.2} s",
                st.median, st.min, st.max
            ),
            Verdict::of(st.median <= 1.0),
        ),
        Check::new(
            name(" by tenant,gpu_model"),
            "≤ 1 s",
            format!(
                "{:.2} s ({:.2}–{:.2})",
                by_model.median, by_model.min, by_model.max
            ),
            Verdict::of(by_model.median <= 1.0),
        ),
        Check::new(
            name(" by tenant,node"),
            "≤ 3 s",
            format!(
                "{:.2} s ({:.2}–{:.2})",
                by_node.median, by_node.min, by_node.max
            ),
            Verdict::of(by_node.median <= 3.0),
        ),
    ];
    Ok((b, checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report from the template is one the aggregator takes: the wire
    /// format's own type reads it back, fields and rows as generated.
    #[test]
    fn a_templated_report_is_a_valid_report() {
        let body = ReportTemplate::new("node-7", "boot-1").body(42, 1_000, 11_000);
        let r: tally_contract::wire::Report = serde_json::from_str(&body).unwrap();
        assert_eq!((r.node.as_str(), r.boot_id.as_str()), ("node-7", "boot-1"));
        assert_eq!(
            (r.seq, r.interval_start_ms, r.interval_end_ms),
            (42, 1_000, 11_000)
        );
        assert_eq!(
            (r.gpu_usage.len(), r.io_usage.len(), r.gpus.len()),
            (50, 50, 8)
        );
        assert_eq!(r.validate(), Ok(()));
    }

    /// The bottleneck text is Markdown written with `\` line continuations,
    /// which also swallow a blank line after them: each paragraph must
    /// still begin on a line of its own, after a blank one.
    #[test]
    fn the_ingest_bottleneck_keeps_its_paragraphs() {
        for paragraph in ["**Bottleneck (ingest).**", "**What would move it:**"] {
            assert!(
                INGEST_BOTTLENECK.contains(&format!("\n\n{paragraph}"))
                    || INGEST_BOTTLENECK.starts_with(&format!("\n{paragraph}")),
                "{paragraph} runs into the text before it"
            );
        }
        assert!(
            !INGEST_BOTTLENECK.lines().any(|l| l.ends_with(' ')),
            "a line ends in a space"
        );
    }
}
