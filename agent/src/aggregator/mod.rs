//! The `tally aggregator` role: report ingest, the usage ledger
//! (SQLite or PostgreSQL), chargeback, the central audit store and
//! `/metrics`. It shares only the report's wire types with the agent
//! ([`crate::report::wire`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod auth;
pub mod chargeback;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod ledger;
pub mod metrics;
pub mod scheduler;
pub mod server;

pub use config::AggregatorConfig;

/// Runs the aggregator until `shutdown` is cancelled.
pub async fn run(
    config: AggregatorConfig,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ledger = ledger::Ledger::open(&config.ledger.url, config.ledger.max_connections)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the ledger: {e}"))?;
    info!(backend = ?ledger.backend, "ledger open, schema up to date");
    let listener = crate::http::bind(listen).await?;
    let app = Arc::new(server::App {
        ledger,
        tokens: auth::Tokens::new(&config.tokens),
        prices: config.prices.clone(),
        max_body: config.server.max_body_bytes(),
        metrics: metrics::Metrics::new(),
        scheduler: config.scheduler.clone(),
    });
    info!(%listen, tokens = config.tokens.len(), "aggregator serving /api/v1/reports, /api/v1/chargeback, /api/v1/audit, /api/v1/cluster, /scheduler/*, /metrics");

    let refresher = tokio::spawn(refresh_metrics(
        app.clone(),
        config.server.metrics_refresh,
        shutdown.clone(),
    ));
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => {
            info!(cert = %cert.display(), "serving HTTPS only");
            Some(crate::http::tls_acceptor(cert, key).map_err(|e| anyhow::anyhow!(e))?)
        }
        _ => None,
    };
    let route_app = app.clone();
    crate::http::serve_with(
        listener,
        tls,
        move |req| server::route(req, route_app.clone()),
        shutdown.clone(),
    )
    .await;
    let _ = refresher.await;
    info!("aggregator stopped");
    Ok(())
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
            Ok::<_, ledger::LedgerError>((app.ledger.totals().await?, app.ledger.nodes().await?))
        };
        match read.await {
            Ok((totals, nodes)) => {
                let mut c = match app.metrics.cached.write() {
                    Ok(c) => c,
                    Err(p) => p.into_inner(),
                };
                c.totals = totals;
                c.nodes = nodes;
                c.ledger_up = true;
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
