//! `tally aggregator`, `tally report` and `tally config check` for an
//! aggregator config.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Args;

use super::{AggregatorConfig, chargeback::Chargeback};
use crate::config::EX_USAGE;

#[derive(Debug, Args)]
pub struct AggregatorArgs {
    /// The aggregator's config file (TOML: [aggregator], [ledger], [prices], [[auth.token]]).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Address of the API and /metrics [default: [aggregator] listen, 0.0.0.0:9478].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Base URL of the aggregator (`http://tally-aggregator:9478`).
    #[arg(long, env = "TALLY_AGGREGATOR")]
    pub aggregator: String,
    /// Start of the period: RFC 3339 (`2026-11-01T00:00:00Z`) or Unix seconds.
    #[arg(long)]
    pub from: String,
    /// End of the period (exclusive), same forms.
    #[arg(long)]
    pub to: String,
    /// `tenant`, `tenant,gpu_model` or `tenant,node`.
    #[arg(long, default_value = "tenant")]
    pub group_by: String,
    /// `table`, `json`, `csv` or `focus` (FinOps FOCUS CSV).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// `allocated` (time held) or `used` (SM-weighted time).
    #[arg(long, default_value = "allocated")]
    pub basis: String,
    /// Only this tenant's lines.
    #[arg(long)]
    pub tenant: Option<String>,
    /// File holding a reader token (admin or tenant).
    #[arg(long, env = "TALLY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// `tally config check` of an aggregator config.
pub fn check(file: &std::path::Path) -> ExitCode {
    match AggregatorConfig::load(file) {
        Ok(_) => {
            println!("{}: ok (aggregator config)", file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tally-rt")
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            None
        }
    }
}

/// `tally aggregator`.
pub fn run_aggregator(args: AggregatorArgs) -> ExitCode {
    let config = match AggregatorConfig::load(&args.config) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let listen = args.listen.unwrap_or(config.server.listen);
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = rt.block_on(async {
        let shutdown = crate::signal::shutdown_token()?;
        super::run(config, listen, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally aggregator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tally report`.
pub fn run_report(args: ReportArgs) -> ExitCode {
    if !matches!(args.format.as_str(), "table" | "json" | "csv" | "focus") {
        eprintln!("--format must be table, json, csv or focus");
        return ExitCode::from(EX_USAGE);
    }
    let token = match &args.token_file {
        None => None,
        Some(f) => match crate::report::read_token(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("--token-file: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let wire_format = if args.format == "table" {
        "json"
    } else {
        args.format.as_str()
    };
    let url = format!(
        "{}/api/v1/chargeback",
        args.aggregator.trim_end_matches('/')
    );
    let mut query = vec![
        ("from", args.from.clone()),
        ("to", args.to.clone()),
        ("group_by", args.group_by.clone()),
        ("basis", args.basis.clone()),
        ("format", wire_format.to_owned()),
    ];
    if let Some(t) = &args.tenant {
        query.push(("tenant", t.clone()));
    }
    let result = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut req = client.get(&url).query(&query);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            return Err(format!("{url}: {status}: {reason}"));
        }
        Ok(body)
    });
    match result {
        Ok(body) if args.format == "table" => match serde_json::from_str::<Chargeback>(&body) {
            Ok(c) => {
                print!("{}", c.to_table());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("the aggregator's answer is not a chargeback: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(body) => {
            print!("{body}");
            if !body.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally report: {e}");
            ExitCode::FAILURE
        }
    }
}
