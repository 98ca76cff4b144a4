//! `tally doctor`: check this node point by point and say what to fix,
//! each check printed as it finishes, then `N ok, N warn, N fail`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, ValueEnum};
use tally_agent::{
    doctor::{self, AggregatorAnswer, Format, Report},
    report::{ReportConfig, client_builder},
};
use tally_contract::token::read_token;

use super::agent::load_optional;
use crate::runtime;

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Config file whose NVML library, probes, directories, cgroup parent
    /// and aggregator to check.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// NVML library to check [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub(crate) nvml_lib: Option<PathBuf>,
    /// `text`: one line per check as it finishes; `json`: one document.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

pub(crate) fn run(args: DoctorArgs) -> ExitCode {
    let config = match load_optional(args.config.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let lib = args
        .nvml_lib
        .unwrap_or_else(|| config.agent.nvml_lib.clone());
    let mut report = Report::new(match args.output {
        Output::Text => Format::Text,
        Output::Json => Format::Json,
    });
    report.extend(doctor::checks_lazy(&lib));
    report.extend(doctor::probe_checks(&config.probes));
    report.extend(doctor::config_checks(&config));
    let url = config.report.aggregator.clone().unwrap_or_default();
    report.add(doctor::aggregator_verdict(
        &url,
        &ask_aggregator(&config.report),
    ));
    report.finish()
}

/// Asks the aggregator `/readyz`, and an admin-only read with the agent's
/// token (which an agent token is refused with 403, an unknown one 401).
fn ask_aggregator(cfg: &ReportConfig) -> AggregatorAnswer {
    let Some(url) = cfg.aggregator.as_deref() else {
        return AggregatorAnswer::NotConfigured;
    };
    let token = match cfg.token_file.as_deref().map(read_token).transpose() {
        Ok(t) => t,
        Err(e) => return AggregatorAnswer::BadToken(e),
    };
    let client = match client_builder(
        cfg.timeout.min(Duration::from_secs(5)),
        cfg.ca_file.as_deref(),
    ) {
        Ok(c) => c,
        Err(e) => return AggregatorAnswer::Unreachable(format!("[report] ca_file: {e}")),
    };
    let client = match client.build() {
        Ok(c) => c,
        Err(e) => return AggregatorAnswer::Unreachable(e.to_string()),
    };
    let base = url.trim_end_matches('/');
    let answer = runtime::block_on(async {
        let ready = client.get(format!("{base}/readyz")).send().await?;
        let mut req = client.get(format!("{base}/api/v1/reports"));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let reports = req.send().await?;
        Ok::<_, reqwest::Error>(AggregatorAnswer::Answered {
            ready: ready.status().as_u16(),
            reports: reports.status().as_u16(),
        })
    });
    match answer {
        Some(Ok(a)) => a,
        Some(Err(e)) => AggregatorAnswer::Unreachable(e.to_string()),
        None => AggregatorAnswer::Unreachable("no async runtime".into()),
    }
}
