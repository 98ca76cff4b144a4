//! `tally aggregator`: the ledger, chargeback and cluster API, served
//! until SIGINT/SIGTERM; SIGHUP rereads the token files and audit keys.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Args;
use tally_aggregator::{Aggregator, AggregatorConfig};
use tally_contract::config::EX_USAGE;

use crate::{notify, runtime, serve, signal};

#[derive(Debug, Args)]
pub(crate) struct AggregatorArgs {
    /// The aggregator's config file (TOML: [aggregator], [ledger], [prices], [[auth.token]]).
    #[arg(long, short = 'c')]
    pub(crate) config: PathBuf,
    /// Address of the API and /metrics [default: [aggregator] listen, 0.0.0.0:9478].
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
}

/// `tally aggregator`.
pub(crate) fn run(args: AggregatorArgs) -> ExitCode {
    let config = match AggregatorConfig::load(&args.config) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let listen = args.listen.unwrap_or(config.server.listen);
    let result = runtime::block_on(async {
        let shutdown = signal::shutdown_token()?;
        let listener = serve::bind(listen).await?;
        let aggregator = Aggregator::start(&config, shutdown.clone()).await?;
        signal::on_hangup(aggregator.reloader(), shutdown.clone())?;
        tracing::info!(%listen, "aggregator listening");
        let notified = tokio::spawn(notify::aggregator(shutdown.clone()));
        serve::serve(listener, aggregator.tls(), aggregator.route(), shutdown).await;
        aggregator.stopped().await;
        // As the agent's: `STOPPING=1` is out before the runtime is dropped.
        let _ = notified.await;
        anyhow::Ok(())
    });
    match result {
        None => ExitCode::FAILURE,
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("tally aggregator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
