//! Fixtures of the aggregator tests: a running `tally aggregator` on a
//! SQLite file or a fresh PostgreSQL database, its tokens, and direct
//! reads of the ledger (independent of the aggregator's own API).

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{ChildGuard, Client, Metrics, free_port, netns, tally_bin, unique};

pub const AGENT_TOKEN: &str = "agent-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
pub const ACME_TOKEN: &str = "acme-token-0123456789abcdef";

/// The price table of every aggregator test.
pub const PRICES: &str = r#"
[prices]
currency = "USD"
# Expensive on purpose: a test runs for seconds, and seconds must be
# worth many cents for "to the cent" to mean something.
gpu_hour = { "NVIDIA H100 80GB HBM3" = 9000.0, "NVIDIA A100-SXM4-40GB" = 3600.0, default = 1800.0 }
network_gib = 100.0
energy_kwh = 1000.0
"#;

/// Price of a kWh and of a GiB of network traffic in [`PRICES`].
pub const ENERGY_KWH_PRICE: f64 = 1000.0;
pub const NETWORK_GIB_PRICE: f64 = 100.0;

/// GPU-hour price of `model` in [`PRICES`].
pub fn gpu_hour_price(model: &str) -> f64 {
    match model {
        "NVIDIA H100 80GB HBM3" => 9000.0,
        "NVIDIA A100-SXM4-40GB" => 3600.0,
        _ => 1800.0,
    }
}

/// Where the ledger lives.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    pub fn url(&self) -> String {
        match self {
            Backend::Sqlite(p) => format!("sqlite://{}", p.display()),
            Backend::Postgres(u) => u.clone(),
        }
    }
}

/// A SQLite ledger file in `dir`.
pub fn sqlite(dir: &Path) -> Backend {
    Backend::Sqlite(dir.join("ledger.db"))
}

/// A fresh database on the test PostgreSQL (`TALLY_TEST_POSTGRES_URL`,
/// set by `cargo xtask test`), or `None` when there is none.
pub fn postgres() -> Option<Backend> {
    let server = std::env::var("TALLY_TEST_POSTGRES_URL").ok()?;
    if server.is_empty() {
        return None;
    }
    let name = unique("tally_e2e").replace('-', "_");
    let rt = runtime();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("connect {server}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    });
    let (base, _) = server
        .rsplit_once('/')
        .expect("TALLY_TEST_POSTGRES_URL ends with /<database>");
    Some(Backend::Postgres(format!("{base}/{name}")))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Reads of the ledger straight from the database.
pub struct LedgerReader {
    backend: Backend,
}

impl LedgerReader {
    pub fn new(backend: &Backend) -> Self {
        Self {
            backend: backend.clone(),
        }
    }

    /// Runs a query whose columns are all integers or text, as strings.
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        use sqlx::Row;
        let rt = runtime();
        rt.block_on(async {
            macro_rules! fetch {
                ($conn:expr) => {{
                    let rows = sqlx::query(sql)
                        .fetch_all(&mut $conn)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                    rows.iter()
                        .map(|r| {
                            (0..r.columns().len())
                                .map(|i| {
                                    r.try_get::<i64, _>(i)
                                        .map(|v| v.to_string())
                                        .or_else(|_| r.try_get::<String, _>(i))
                                        .unwrap_or_else(|_| "NULL".into())
                                })
                                .collect()
                        })
                        .collect()
                }};
            }
            use sqlx::Connection;
            match &self.backend {
                Backend::Sqlite(p) => {
                    let mut c =
                        sqlx::SqliteConnection::connect(&format!("sqlite://{}", p.display()))
                            .await
                            .expect("open sqlite ledger");
                    fetch!(c)
                }
                Backend::Postgres(u) => {
                    let mut c = sqlx::PgConnection::connect(u)
                        .await
                        .expect("connect postgres ledger");
                    fetch!(c)
                }
            }
        })
    }

    /// One integer.
    pub fn int(&self, sql: &str) -> i64 {
        self.rows(sql)[0][0].parse().unwrap_or(0)
    }

    /// Stored reports per node: `(count, min seq, max seq)`.
    pub fn reports(&self, node: &str) -> (i64, i64, i64) {
        let r = &self.rows(&format!(
            "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM reports \
             WHERE node = '{node}'"
        ))[0];
        (
            r[0].parse().unwrap(),
            r[1].parse().unwrap(),
            r[2].parse().unwrap(),
        )
    }

    /// Σ allocated µs per (tenant, uuid) of a node (non-zero ones).
    pub fn allocated_us(&self, node: &str) -> std::collections::BTreeMap<String, i64> {
        self.rows(&format!(
            "SELECT tenant || '\t' || uuid, CAST(SUM(allocated_us) AS BIGINT) FROM gpu_usage \
             WHERE node = '{node}' GROUP BY tenant, uuid"
        ))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .filter(|(_, v)| *v > 0)
        .collect()
    }

    /// Rows of every usage table (a fingerprint of the whole ledger).
    pub fn fingerprint(&self) -> Vec<i64> {
        [
            "reports",
            "gpu_usage",
            "io_usage",
            "audit",
            "gpu_state",
            "gpu_usage_hourly",
        ]
        .iter()
        .map(|t| self.int(&format!("SELECT COUNT(*) FROM {t}")))
        .chain([
            self.int("SELECT CAST(COALESCE(SUM(allocated_us), 0) AS BIGINT) FROM gpu_usage"),
            self.int("SELECT CAST(COALESCE(SUM(reports), 0) AS BIGINT) FROM boot_reports"),
        ])
        .collect()
    }
}

/// A running `tally aggregator`, killed on drop.
pub struct Aggregator {
    pub child: Option<ChildGuard>,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub backend: Backend,
    /// The `tally` binary it runs (this build's, or a release one).
    tally: PathBuf,
    log_n: u32,
    /// The network namespace it runs in (`None`: this machine's).
    netns: Option<String>,
    /// What `--listen` gets (`addr`, or all of its namespace's addresses).
    listen: SocketAddr,
}

/// Writes the three tokens and a config for `backend` into `dir`;
/// `extra` is appended (e.g. `[aggregator] max_body`).
pub fn write_config(dir: &Path, backend: &Backend, extra: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("aggregator dir");
    for (name, token) in [
        ("agent.token", AGENT_TOKEN),
        ("admin.token", ADMIN_TOKEN),
        ("acme.token", ACME_TOKEN),
    ] {
        fs::write(dir.join(name), format!("{token}\n")).expect("token file");
    }
    let config = dir.join("aggregator.toml");
    fs::write(
        &config,
        format!(
            r#"
[aggregator]
metrics_refresh = "200ms"
{extra}

[ledger]
url = "{url}"
max_connections = 4
# Tests post reports with fixed times years back: keep their raw rows
# (retention itself is tested in the aggregator's ledger::retention).
raw_retention = "36500d"
{PRICES}
[[auth.token]]
token_file = "{dir}/agent.token"
role = "agent"

[[auth.token]]
token_file = "{dir}/admin.token"
role = "admin"

[[auth.token]]
token_file = "{dir}/acme.token"
role = "tenant"
tenant = "acme"
"#,
            url = backend.url(),
            dir = dir.display()
        ),
    )
    .expect("aggregator config");
    config
}

impl Aggregator {
    /// Starts an aggregator on `backend` with its files in `dir`.
    pub fn start(dir: &Path, backend: &Backend, extra: &str) -> Aggregator {
        Aggregator::start_bin(&tally_bin(), dir, backend, extra)
    }

    /// [`Aggregator::start`] with a given `tally` binary (`cargo xtask
    /// soak` runs the release build).
    pub fn start_bin(tally: &Path, dir: &Path, backend: &Backend, extra: &str) -> Aggregator {
        let config = write_config(dir, backend, extra);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut a = Aggregator {
            child: None,
            addr,
            config,
            dir: dir.to_path_buf(),
            backend: backend.clone(),
            tally: tally.to_path_buf(),
            log_n: 0,
            netns: None,
            listen: addr,
        };
        a.restart();
        a
    }

    /// [`Aggregator::start`] inside the network namespace `netns`,
    /// listening on every address there, port `port` (`addr` is its
    /// loopback, reached with [`Aggregator::get_in`]); `ledger_url`, when
    /// given, is a PostgreSQL `backend` as the aggregator reaches it there.
    pub fn start_in(
        dir: &Path,
        backend: &Backend,
        ledger_url: Option<&str>,
        netns: &str,
        port: u16,
    ) -> Aggregator {
        let seen = ledger_url.map_or_else(|| backend.clone(), |u| Backend::Postgres(u.into()));
        let config = write_config(dir, &seen, "");
        let mut a = Aggregator {
            child: None,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            config,
            dir: dir.to_path_buf(),
            backend: backend.clone(),
            tally: tally_bin(),
            log_n: 0,
            netns: Some(netns.to_owned()),
            listen: format!("0.0.0.0:{port}").parse().unwrap(),
        };
        a.restart();
        a
    }

    /// `GET path` without a token, from inside the aggregator's namespace.
    pub fn get_in(&self, path: &str) -> std::io::Result<(u16, String)> {
        netns::http_get(self.netns.as_deref(), self.addr, path)
    }

    /// The aggregator's `/metrics`, read from inside its namespace.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get_in("/metrics").expect("aggregator /metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        Metrics::parse(&body)
    }

    /// The base URL agents report to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The log of the running (or last) process.
    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("aggregator-{}.log", self.log_n))
    }

    /// Every log of this aggregator so far.
    pub fn log_text(&self) -> String {
        (0..=self.log_n)
            .map(|n| {
                fs::read_to_string(self.dir.join(format!("aggregator-{n}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// (Re)starts the process on the same address and ledger; waits for /readyz.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "aggregator already running");
        self.log_n += 1;
        let mut cmd = netns::command(self.netns.as_deref(), &self.tally);
        let child = cmd
            .arg("aggregator")
            .arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(self.listen.to_string())
            .env("TALLY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.log()).expect("aggregator log"))
            .spawn()
            .expect("spawn tally aggregator");
        self.child = Some(ChildGuard(child));
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.get_in("/readyz") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.0.try_wait()) {
                panic!("aggregator exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "aggregator not ready after 60s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops, replaces `from` (which its config must hold) with `to` in
    /// its config file, and starts again.
    pub fn restart_with(&mut self, from: &str, to: &str) {
        self.stop();
        let config = fs::read_to_string(&self.config).expect("aggregator config");
        assert!(config.contains(from), "{from} in:\n{config}");
        fs::write(&self.config, config.replace(from, to)).expect("aggregator config");
        self.restart();
    }

    /// SIGTERM, and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.0.wait();
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// A client of this aggregator, with `token` when given.
    pub fn client(&self, token: Option<&str>) -> Client {
        let c = Client::new(self.addr);
        match token {
            Some(t) => c.bearer(t),
            None => c,
        }
    }

    /// POSTs a report body with `token` (none: no Authorization header).
    pub fn post(&self, body: &[u8], token: Option<&str>) -> (u16, String) {
        let r = self
            .client(token)
            .post_json("/api/v1/reports", body)
            .expect("POST /api/v1/reports");
        (r.status, r.text())
    }

    /// GET with a bearer token.
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let r = self.client(token).get(path).expect("GET");
        (r.status, r.text())
    }

    /// `GET /api/v1/reports` for `node`, which has one boot: (reports,
    /// first seq, last seq), zeros if it has none.
    pub fn report_summary(&self, node: &str) -> (i64, i64, i64) {
        let (status, body) = self.get("/api/v1/reports", Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "GET /api/v1/reports answered {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let boots: Vec<_> = v["reports"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["node"] == node)
            .collect();
        assert!(boots.len() <= 1, "{node} has several boots: {body}");
        boots.first().map_or((0, 0, 0), |b| {
            let n = |k: &str| b[k].as_i64().unwrap();
            (n("reports"), n("first_seq"), n("last_seq"))
        })
    }

    /// The chargeback JSON (admin).
    pub fn chargeback(&self, query: &str) -> serde_json::Value {
        let (status, body) = self.get(&format!("/api/v1/chargeback?{query}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "chargeback answered {status}: {body}");
        serde_json::from_str(&body).expect("chargeback JSON")
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `[report]` and `[agent]` sections of an agent reporting to `url`
/// every 300 ms with a 2 s timeout.
pub fn agent_config(
    url: &str,
    node: &str,
    state_dir: &Path,
    token_dir: &Path,
    rules: &str,
) -> String {
    agent_config_with(url, node, state_dir, token_dir, "300ms", "2s", rules)
}

/// [`agent_config`] with the report `interval` and `timeout` given;
/// `rules` (any further sections) is appended.
pub fn agent_config_with(
    url: &str,
    node: &str,
    state_dir: &Path,
    token_dir: &Path,
    interval: &str,
    timeout: &str,
    rules: &str,
) -> String {
    format!(
        r#"
[agent]
state_dir = "{state}"

[report]
aggregator = "{url}"
token_file = "{tokens}/agent.token"
node = "{node}"
interval = "{interval}"
timeout = "{timeout}"
{rules}
"#,
        state = state_dir.display(),
        tokens = token_dir.display()
    )
}

/// The agent's persisted report state (`<state_dir>/report-state.json`).
pub fn report_state(state_dir: &Path) -> serde_json::Value {
    let text = fs::read_to_string(state_dir.join("report-state.json")).expect("report state");
    serde_json::from_str(&text).expect("report state JSON")
}

/// `gpu_base` of an agent's report state: the GPU time (µs allocated, per
/// counter key) it has cut into reports so far; zeros left out.
pub fn reported_counters(state_dir: &Path) -> BTreeMap<String, i64> {
    report_state(state_dir)["gpu_base"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["allocated_us"].as_i64().unwrap()))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Adds `from`'s counters into `into`, key by key.
pub fn add_counters(into: &mut BTreeMap<String, i64>, from: BTreeMap<String, i64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Reports waiting in an agent's spool.
pub fn spooled(state_dir: &Path) -> usize {
    fs::read_dir(state_dir.join("spool"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// Unique directory name under `parent`.
pub fn subdir(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(unique(name));
    fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Every report of `node` is in the ledger exactly once and the GPU time
/// there is `expected`, what the agent processes cut.
pub fn assert_ledger_exact(
    ledger: &LedgerReader,
    agg: &Aggregator,
    node: &str,
    state: &Path,
    expected: &BTreeMap<String, i64>,
) {
    let s = report_state(state);
    let first_seq = s["first_seq"].as_i64().unwrap();
    let last_seq = s["next_seq"].as_i64().unwrap() - 1;
    assert_eq!(
        ledger.reports(node),
        (last_seq - first_seq + 1, first_seq, last_seq),
        "{node}: every report exactly once; log:\n{}",
        agg.log_text()
    );
    assert_eq!(
        &ledger.allocated_us(node),
        expected,
        "{node}: the ledger holds exactly the GPU time the agent cut"
    );
    assert!(
        !agg.log_text().contains("different report"),
        "no seq reused"
    );
}

/// `(method, path)` of every route the aggregator's router matches, read
/// from `aggregator/src/server.rs` so that a new endpoint cannot be missed.
pub fn router_routes() -> std::collections::BTreeSet<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../aggregator/src/server.rs");
    let text = fs::read_to_string(&src).expect("read the aggregator's router");
    let mut out = std::collections::BTreeSet::new();
    for part in text.split("(Method::").skip(1) {
        let Some((method, rest)) = part.split_once(", \"") else {
            continue;
        };
        let Some((path, _)) = rest.split_once('"') else {
            continue;
        };
        if method.chars().all(|c| c.is_ascii_uppercase()) {
            out.insert((method.to_owned(), path.to_owned()));
        }
    }
    assert!(out.len() >= 5, "no routes found in {}", src.display());
    out
}
