//! `tally report`: a chargeback from an aggregator, as a table, JSON,
//! CSV or FOCUS.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tally_aggregator::chargeback::Chargeback;
use tally_contract::{config::EX_USAGE, token::read_token};

use crate::runtime;

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// Base URL of the aggregator (`http://tally-aggregator:9478`).
    #[arg(long, env = "TALLY_AGGREGATOR")]
    pub(crate) aggregator: String,
    /// Start of the period: RFC 3339 (`2026-11-01T00:00:00Z`) or Unix seconds.
    #[arg(long)]
    pub(crate) from: String,
    /// End of the period (exclusive), same forms.
    #[arg(long)]
    pub(crate) to: String,
    /// `tenant`, `tenant,gpu_model` or `tenant,node`.
    #[arg(long, default_value = "tenant")]
    pub(crate) group_by: String,
    /// `table`, `json`, `csv` or `focus` (FinOps FOCUS CSV).
    #[arg(long, default_value = "table")]
    pub(crate) format: String,
    /// `allocated` (time held) or `used` (SM-weighted time).
    #[arg(long, default_value = "allocated")]
    pub(crate) basis: String,
    /// Only this tenant's lines.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// File holding a reader token (admin or tenant).
    #[arg(long, env = "TALLY_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
}

/// `tally report`.
pub(crate) fn run(args: ReportArgs) -> ExitCode {
    if !matches!(args.format.as_str(), "table" | "json" | "csv" | "focus") {
        eprintln!("--format must be table, json, csv or focus");
        return ExitCode::from(EX_USAGE);
    }
    let token = match &args.token_file {
        None => None,
        Some(f) => match read_token(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("--token-file: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
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
    let Some(result) = runtime::block_on(async {
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
    }) else {
        return ExitCode::FAILURE;
    };
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
