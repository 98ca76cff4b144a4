//! The aggregator: report ingest, the usage ledger (SQLite or
//! PostgreSQL), chargeback, the cluster view, the scheduler extender, the
//! central audit store and `/metrics`. It shares only the contract
//! (`tally_contract`: the report's wire types, the audit record) with the
//! agent, and links neither NVML nor eBPF nor the cgroup code.
//!
//! Data flows one way: [`server`] routes a request to [`ledger`] (every
//! SQL read and write), and to the pure views over what it read
//! ([`chargeback`], [`cluster`], [`scheduler`]); no module imports one
//! that imports it back.
#![forbid(unsafe_code)]
// Workspace-wide later (the lead); here first, so `pub` means another
// crate uses it.
#![warn(unreachable_pub)]

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hyper::{Request, Response, body::Incoming};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod audit_keys;
mod auth;
mod budgets;
pub mod chargeback;
pub mod cluster;
pub mod config;
mod http;
mod ledger;
mod metrics;
pub mod scheduler;
pub mod server;
mod time;

pub use config::AggregatorConfig;

/// A running aggregator: the ledger open, `/metrics` refreshing; the
/// binary serves [`Aggregator::route`] until shutdown.
pub struct Aggregator {
    app: Arc<server::App>,
    tls: Option<TlsAcceptor>,
    refresher: JoinHandle<()>,
    /// Looks for changed credential files.
    change_poll: JoinHandle<()>,
    /// Folds rollups and applies retention ([`maintain_ledger`]).
    maintainer: JoinHandle<()>,
}

impl Aggregator {
    /// Opens the ledger (running its migrations) and starts refreshing the
    /// totals `/metrics` shows, until `shutdown` is cancelled.
    pub async fn start(
        config: &AggregatorConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Aggregator> {
        let ledger = ledger::Ledger::open(&config.ledger.url, config.ledger.max_connections)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the ledger: {e}"))?;
        info!(backend = ?ledger.backend(), "ledger open, schema up to date");
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => {
                info!(cert = %cert.display(), "serving HTTPS only");
                Some(http::tls_acceptor(cert, key).map_err(|e| anyhow::anyhow!(e))?)
            }
            _ => None,
        };
        let mut metrics = metrics::Metrics::new();
        metrics.register_prices(&config.prices);
        let app = Arc::new(server::App {
            ledger,
            tokens: auth::Tokens::new(config.tokens.clone(), config.rate_limit),
            audit_keys: RwLock::new(Arc::new(config.node_keys.clone())),
            credentials_seen: Mutex::default(),
            prices: Arc::new(config.prices.clone()),
            max_body: config.server.max_body_bytes(),
            metrics,
            scheduler: config.scheduler.clone(),
            budgets: config.budgets.clone(),
            raw_retention: config.ledger.raw_retention,
            chargeback_turn: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        info!(
            tokens = app.tokens.len(),
            rate_limit = ?config.rate_limit,
            node_keys = config.node_keys.len(),
            "aggregator serving /api/v1/reports, /api/v1/chargeback, /api/v1/audit, /api/v1/cluster, /scheduler/*, /metrics"
        );
        let refresher = tokio::spawn(refresh_metrics(
            app.clone(),
            config.server.metrics_refresh,
            shutdown.clone(),
        ));
        *app.credentials_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = fingerprint(&app);
        let maintainer = tokio::spawn(maintain_ledger(
            app.clone(),
            config.ledger.clone(),
            shutdown.clone(),
        ));
        let change_poll = tokio::spawn(reload_on_change(app.clone(), RELOAD_POLL, shutdown));
        Ok(Aggregator {
            app,
            tls,
            refresher,
            change_poll,
            maintainer,
        })
    }

    /// The TLS acceptor when `[aggregator] tls_cert`/`tls_key` are set.
    pub fn tls(&self) -> Option<TlsAcceptor> {
        self.tls.clone()
    }

    /// The request handler, to serve on the aggregator's listener.
    pub fn route(
        &self,
    ) -> impl Fn(
        Request<Incoming>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response<http::Body>> + Send>>
    + Send
    + Sync
    + 'static {
        let app = self.app.clone();
        move |req| Box::pin(server::route(req, app.clone()))
    }

    /// Reading the token files and the nodes' audit keys again (SIGHUP, or
    /// a file changed): takes all of them, or, when any is bad, logs why and
    /// keeps every old one, so a bad edit never locks everyone out.
    /// Returns a function that reloads, for the binary's SIGHUP handler.
    pub fn reloader(&self) -> impl Fn() + Send + Sync + 'static {
        let app = self.app.clone();
        move || reload(&app)
    }

    /// Waits for the background work to end (after shutdown).
    pub async fn stopped(self) {
        let _ = self.refresher.await;
        let _ = self.change_poll.await;
        let _ = self.maintainer.await;
        info!("aggregator stopped");
    }
}

/// How often the credential files are looked at for changes.
const RELOAD_POLL: Duration = Duration::from_secs(2);

fn reload(app: &server::App) {
    reload_when(app, true);
}

/// Reloads if a credential file differs from what the last reload saw.
fn reload_if_changed(app: &server::App) {
    reload_when(app, false);
}

/// Takes the `credentials_seen` lock and the files' fingerprint, and
/// reloads `always`, or when the fingerprint differs from the last seen.
fn reload_when(app: &server::App, always: bool) {
    let mut seen = app
        .credentials_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let now = fingerprint(app);
    if always || *seen != now {
        if !always {
            info!("a credential file changed: reloading");
        }
        reload_seen(app, &mut seen, now);
    }
}

/// The reload itself, under the `credentials_seen` lock; `now` is the
/// files' fingerprint taken before they are read, so a change made while
/// reading is seen by the next poll. It is kept even when the reload
/// fails: a bad file is retried when it changes again, or on SIGHUP.
fn reload_seen(
    app: &server::App,
    seen: &mut server::CredentialFiles,
    now: server::CredentialFiles,
) {
    *seen = now;
    let tokens = config::reread(&app.tokens.specs());
    let keys_dir = app
        .audit_keys
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .dir()
        .map(std::path::Path::to_path_buf);
    let keys = keys_dir
        .as_deref()
        .map(audit_keys::NodeKeys::load)
        .transpose();
    match (tokens, keys) {
        (Ok(tokens), Ok(keys)) => {
            app.tokens.replace(tokens);
            let n_keys = keys.as_ref().map_or(0, audit_keys::NodeKeys::len);
            if let Some(keys) = keys {
                *app.audit_keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
            }
            app.metrics.reload("ok");
            info!(
                tokens = app.tokens.len(),
                node_keys = n_keys,
                "credentials reloaded"
            );
        }
        (tokens, keys) => {
            let problems: Vec<String> = tokens
                .err()
                .into_iter()
                .chain(keys.err().map(|k| {
                    k.into_iter()
                        .map(|e| format!("audit.node_keys: {e}"))
                        .collect()
                }))
                .flatten()
                .collect();
            app.metrics.reload("error");
            error!(
                problems = %problems.join("; "),
                "credentials NOT reloaded: keeping every old token and key"
            );
        }
    }
}

/// What the credential files look like now: their paths, sizes and
/// modification times (a directory's listing included).
fn fingerprint(app: &server::App) -> server::CredentialFiles {
    let mut paths = app.tokens.files();
    let dir = app
        .audit_keys
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .dir()
        .map(std::path::Path::to_path_buf);
    if let Some(dir) = dir {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            paths.extend(rd.flatten().map(|e| e.path()));
        }
        paths.push(dir);
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            (p, meta)
        })
        .collect()
}

/// Reloads the credentials whenever their files change (polled: token
/// files are often replaced by renames, which a poll sees as well).
async fn reload_on_change(app: Arc<server::App>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        reload_if_changed(&app);
    }
}

/// Where every `[[budget]]` stands now: each period in use priced from
/// its start (tenant lines, allocated basis, as `tally report` shows them).
async fn budget_statuses(
    app: &server::App,
) -> Result<Vec<budgets::BudgetStatus>, ledger::LedgerError> {
    let mut periods: Vec<config::Period> = app.budgets.iter().map(|b| b.period).collect();
    periods.sort();
    periods.dedup();
    let now = time::now_ms();
    let mut out = Vec::new();
    for period in periods {
        let (start, end) = period.bounds(now);
        let energy = async {
            match app.prices.energy_tou {
                Some(_) => app
                    .ledger
                    .energy_hours_by_tenant(start, now + 1, None)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (gpu, io, energy) = tokio::try_join!(
            app.ledger.gpu_groups_by_tenant(start, now + 1, None),
            app.ledger.io_groups_by_tenant(start, now + 1, None),
            energy
        )?;
        let spent = chargeback::compute(
            &app.prices,
            &gpu,
            &io,
            energy.as_deref(),
            budgets::GROUP_BY,
            chargeback::Basis::Allocated,
            time::rfc3339(start),
            time::rfc3339(now),
        );
        out.extend(budgets::statuses(
            &app.budgets,
            period,
            &spent,
            &app.prices.currency,
            (start, end),
            now,
        ));
    }
    Ok(out)
}

/// How often the ledger is maintained: the node-less rollups folded,
/// rows past retention removed. Chargeback is exact between passes
/// (hours not yet folded are read per node); only its speed waits.
const MAINTAIN_EVERY: Duration = Duration::from_secs(60);

/// Maintains the ledger every [`MAINTAIN_EVERY`] until `shutdown`.
async fn maintain_ledger(
    app: Arc<server::App>,
    config: config::LedgerSection,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = time::now_ms();
        let before = |age| time::before(now, age);
        let cutoffs = ledger::Cutoffs {
            raw: before(config.raw_retention),
            rollup: config.rollup_retention.map(before),
            audit: config.audit_retention.map(before),
        };
        let pass = app.ledger.maintain(now, cutoffs);
        // Shutdown does not wait for a long first fold: the next start
        // resumes from the watermark.
        let done = tokio::select! {
            _ = shutdown.cancelled() => return,
            done = pass => done,
        };
        app.metrics.maintained(done.as_ref());
        match done {
            Ok(m) if m != ledger::Maintained::default() => info!(
                folded_hours = m.folded_hours,
                raw_rows_removed = m.raw_rows,
                claims_removed = m.claims,
                rollup_rows_removed = m.rollup_rows,
                audit_records_removed = m.audit_records,
                "ledger maintained"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "ledger maintenance failed; retrying next pass"),
        }
    }
}

/// Re-reads the ledger's totals for `/metrics` every `every`.
async fn refresh_metrics(app: Arc<server::App>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = async {
            Ok::<_, ledger::LedgerError>((
                app.ledger.totals().await?,
                app.ledger.nodes().await?,
                budget_statuses(&app).await?,
            ))
        };
        match read.await {
            Ok((totals, nodes, budgets)) => {
                let mut c = match app.metrics.cached.write() {
                    Ok(c) => c,
                    Err(p) => p.into_inner(),
                };
                c.totals = totals;
                c.nodes = nodes;
                c.budgets = budgets;
                c.ledger_up = true;
                if logged {
                    info!("ledger reachable again");
                }
                logged = false;
            }
            Err(e) => {
                app.metrics.ledger_errors.inc();
                if let Ok(mut c) = app.metrics.cached.write() {
                    c.ledger_up = false;
                }
                if !logged {
                    warn!(error = %e, "cannot read ledger totals for /metrics");
                    logged = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn reloads(agg: &Aggregator) -> Vec<String> {
        agg.app
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("tally_aggregator_credential_reloads_total"))
            .map(str::to_owned)
            .collect()
    }

    /// An aggregator on a SQLite ledger in `dir`, whose one token file
    /// (`dir/tokens`, holding `token`) has `role`.
    async fn started(
        dir: &Path,
        token: &str,
        role: &str,
    ) -> (Aggregator, CancellationToken, std::path::PathBuf) {
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{token}\n")).unwrap();
        let text = format!(
            "[ledger]\nurl = \"sqlite://{}/ledger.db\"\n\
             [[auth.token]]\ntoken_file = \"{}\"\nrole = \"{role}\"\n",
            dir.display(),
            tokens.display()
        );
        let config = AggregatorConfig::parse(&text, Path::new("a.toml")).unwrap();
        let shutdown = CancellationToken::new();
        let agg = Aggregator::start(&config, shutdown.clone()).await.unwrap();
        (agg, shutdown, tokens)
    }

    #[tokio::test]
    async fn a_change_reloaded_on_sighup_is_not_reloaded_again_by_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (agg, shutdown, agents) = started(dir.path(), "agent-token-0123456789", "agent").await;
        // Nothing changed since the start: the poll does nothing.
        reload_if_changed(&agg.app);
        assert!(reloads(&agg).is_empty(), "{:?}", reloads(&agg));

        std::fs::write(&agents, "agent-token-0123456789\nnew-token-0123456789\n").unwrap();
        (agg.reloader())();
        reload_if_changed(&agg.app);
        assert_eq!(
            reloads(&agg),
            ["tally_aggregator_credential_reloads_total{result=\"ok\"} 1"]
        );
        assert_eq!(agg.app.tokens.len(), 2);

        std::fs::write(&agents, "new-token-0123456789\n").unwrap();
        reload_if_changed(&agg.app);
        assert_eq!(
            reloads(&agg),
            ["tally_aggregator_credential_reloads_total{result=\"ok\"} 2"]
        );
        assert_eq!(agg.app.tokens.len(), 1);

        // Both background tasks end on shutdown, and are waited for.
        shutdown.cancel();
        agg.stopped().await;
    }

    /// A chargeback waits for the one before it to be built
    /// (`App::chargeback_turn`), and is answered once that is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chargeback_waits_for_its_turn() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let dir = tempfile::tempdir().unwrap();
        let (agg, shutdown, _) = started(dir.path(), "admin-token-0123456789", "admin").await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let route = agg.route();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |req| {
                let answer = route(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
                .unwrap();
        });

        // Another chargeback is being built.
        let turn = agg.app.chargeback_turn.acquire().await.unwrap();
        let mut asked = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(
                    b"GET /api/v1/chargeback?from=0&to=3600 HTTP/1.1\r\nHost: t\r\n\
                      Authorization: Bearer admin-token-0123456789\r\n\
                      Connection: close\r\n\r\n",
                )
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let waited = tokio::time::timeout(std::time::Duration::from_millis(500), &mut asked).await;
        assert!(
            waited.is_err(),
            "answered during another's turn: {waited:?}"
        );
        drop(turn);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(30), asked)
            .await
            .expect("answered once the turn was free")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"lines\""), "{answer}");

        shutdown.cancel();
        agg.stopped().await;
    }
}
