//! The command line: `tally agent`, `tally config check`, `tally doctor`, …

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::commands;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Who used which GPU, and how much.")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the node agent: sample GPUs, attribute to tenants, serve /metrics.
    Agent(commands::agent::AgentArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// Check this node: NVML, BTF, cgroups, bpffs, privileges.
    Doctor(commands::doctor::DoctorArgs),
    /// Run the aggregator: report ingest, usage ledger, chargeback, audit store.
    Aggregator(commands::aggregator::AggregatorArgs),
    /// Print a chargeback report from an aggregator (a table by default).
    Report(commands::report::ReportArgs),
    /// Run a command in a tenant's cgroup (`tally/<tenant>/<job>`).
    Run(commands::run::RunArgs),
    /// Work with the enforcement audit log.
    #[command(subcommand)]
    Audit(commands::audit::AuditCommand),
    /// Live view of a node's (or the cluster's) GPUs and tenants; `q` quits.
    Top(commands::top::TopArgs),
}

/// Entry point of the binary.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Agent(args) => commands::agent::run(args),
        Command::Config(commands::config::ConfigCommand::Check { file, aggregator }) => {
            commands::config::check(&file, aggregator)
        }
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Aggregator(args) => commands::aggregator::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Audit(commands::audit::AuditCommand::Verify { file }) => {
            commands::audit::verify(&file)
        }
        Command::Top(args) => commands::top::run(args),
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
