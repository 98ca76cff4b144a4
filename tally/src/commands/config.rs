//! `tally config check`: validate an agent or aggregator config file.

use std::{path::Path, path::PathBuf, process::ExitCode};

use clap::Subcommand;
use tally_agent::config::Config;
use tally_aggregator::{AggregatorConfig, config::looks_like_aggregator};
use tally_contract::config::EX_USAGE;

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a config file without starting anything; exit 64 if bad.
    Check {
        /// The file to check.
        file: PathBuf,
        /// Check it as an aggregator config (also chosen when the file has
        /// only `[aggregator]`, `[ledger]`, `[prices]` or `[auth]` tables).
        #[arg(long)]
        aggregator: bool,
    },
}

/// Every problem at once, exit 64 when there is one. An aggregator file is
/// recognised by its tables unless `aggregator` says so.
pub(crate) fn check(file: &Path, aggregator: bool) -> ExitCode {
    let (kind, problems) = if aggregator || looks_like_aggregator(file) {
        (" (aggregator config)", AggregatorConfig::load(file).err())
    } else {
        ("", Config::load(file).err())
    };
    match problems {
        None => {
            println!("{}: ok{kind}", file.display());
            ExitCode::SUCCESS
        }
        Some(problems) => {
            eprintln!("{problems}");
            ExitCode::from(EX_USAGE)
        }
    }
}
