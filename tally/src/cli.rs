//! The command line: `tally agent`, `tally config check`, `tally doctor`, …

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tally_contract::config::EX_USAGE;
use tracing_subscriber::EnvFilter;

use crate::commands;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Who used which GPU, and how much.")]
pub(crate) struct Cli {
    /// Log lines on stderr as `text`, or as one JSON object per line for
    /// log collectors (agent and aggregator).
    #[arg(long, global = true, value_enum, env = "TALLY_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
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
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions(commands::completions::CompletionsArgs),
    /// Write man pages for tally and each command into a directory.
    Man(commands::man::ManArgs),
}

/// Entry point of the binary.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A bad command line is a usage error like a bad config file:
            // EX_USAGE (64), not clap's 2. --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::Agent(args) => commands::agent::run(args),
        Command::Config(commands::config::ConfigCommand::Check { file, aggregator }) => {
            commands::config::check(&file, aggregator)
        }
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Aggregator(args) => commands::aggregator::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Audit(commands::audit::AuditCommand::Verify {
            file,
            key_file,
            require_keyed,
        }) => commands::audit::verify(&file, key_file.as_deref(), require_keyed),
        Command::Top(args) => commands::top::run(args),
        Command::Completions(args) => commands::completions::run(args, Cli::command()),
        Command::Man(args) => commands::man::run(args, Cli::command()),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // A failed log write must never stop the service: tracing-subscriber's
    // internal-error report uses `eprintln!`, which panics once stderr is a
    // closed pipe, killing whichever thread logged (the sampler, or the
    // signal task before it cancels shutdown: the agent then ignored SIGTERM).
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => fmt.json().with_current_span(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent_and_takes_the_new_flags() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["tally", "agent", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["tally", "--log-format", "xml", "agent"]).is_err());
        assert!(Cli::try_parse_from(["tally", "completions", "fish"]).is_ok());
        assert!(Cli::try_parse_from(["tally", "completions", "tcsh"]).is_err());
        assert!(Cli::try_parse_from(["tally", "doctor", "--output", "yaml"]).is_err());
    }
}
