//! `tally agent`: sample, attribute, enforce, serve `/metrics` and report,
//! until SIGINT/SIGTERM.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use tally_agent::{
    config::Config,
    run::{Agent, Settings},
};
use tally_contract::config::EX_USAGE;

use crate::{notify, runtime, serve, signal};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Config file (TOML). Without it, defaults apply.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// Address for /metrics and the JSON API [default: 0.0.0.0:9477].
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Time between samples, e.g. `1s`, `500ms` [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) sample_interval: Option<Duration>,
    /// NVML library to open [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub(crate) nvml_lib: Option<PathBuf>,
}

/// The config file if given, else the defaults; exit code 64 when bad.
pub(crate) fn load_optional(file: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match file {
        None => Ok(Config::default()),
        Some(file) => Config::load(file).map_err(|problems| {
            eprintln!("{problems}");
            ExitCode::from(EX_USAGE)
        }),
    }
}

pub(crate) fn run(args: AgentArgs) -> ExitCode {
    tally_agent::allocator::tune();
    let config = match load_optional(args.config.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let settings = Settings {
        listen: args.listen.unwrap_or(config.agent.listen),
        sample_interval: args.sample_interval.unwrap_or(config.agent.sample_interval),
        nvml_lib: args
            .nvml_lib
            .unwrap_or_else(|| config.agent.nvml_lib.clone()),
        node: Settings::node_name(&config),
        config,
    };
    if settings.sample_interval < Duration::from_millis(100) {
        eprintln!("--sample-interval must be at least 100ms");
        return ExitCode::from(EX_USAGE);
    }
    let result = runtime::block_on(async {
        let shutdown = signal::shutdown_token()?;
        let listener = serve::bind(settings.listen).await?;
        let agent = Agent::start(settings, shutdown.clone())?;
        let notified = tokio::spawn(notify::agent(agent.latest(), shutdown.clone()));
        serve::serve(listener, None, agent.route(), shutdown).await;
        agent.stopped().await;
        // Its `STOPPING=1`, sent once shutdown began, goes out before the
        // runtime is dropped: on a busy machine the task may not have run yet.
        let _ = notified.await;
        anyhow::Ok(())
    });
    match result {
        None => ExitCode::FAILURE,
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("tally agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
