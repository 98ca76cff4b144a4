//! The command line: `tally agent`, `tally config check`, `tally doctor`, …

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
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
    Agent(AgentArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check this node: NVML, BTF, cgroups, bpffs, privileges.
    Doctor(DoctorArgs),
    /// Run the aggregator: report ingest, usage ledger, chargeback, audit store.
    Aggregator(commands::aggregator::AggregatorArgs),
    /// Print a chargeback report from an aggregator (a table by default).
    Report(commands::report::ReportArgs),
    /// Run a command in a tenant's cgroup (`tally/<tenant>/<job>`).
    Run(RunArgs),
    /// Work with the enforcement audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Tenant whose cgroup the command runs in.
    #[arg(long)]
    pub(crate) tenant: String,
    /// Job name: the cgroup below the tenant's [default: job-<pid>].
    #[arg(long)]
    pub(crate) job: Option<String>,
    /// Config file: `[tenant] cgroup_parent` and the tenant's quota.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub(crate) command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain of an audit log; name the first broken line.
    Verify {
        /// The audit log (`<state_dir>/audit.log`).
        file: PathBuf,
    },
}

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

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Config file whose NVML library to check.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// NVML library to check [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub(crate) nvml_lib: Option<PathBuf>,
}

/// Entry point of the binary.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Agent(args) => commands::agent::run(args),
        Command::Config(ConfigCommand::Check { file, aggregator }) => {
            commands::config::check(&file, aggregator)
        }
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Aggregator(args) => commands::aggregator::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Audit(AuditCommand::Verify { file }) => commands::audit::verify(&file),
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
