//! The command line: `tally agent`, `tally config check`, `tally doctor`, …

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{
    agent::{self, Settings},
    config::{Config, EX_USAGE},
    doctor, signal,
};

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Who used which GPU, and how much.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: sample GPUs, attribute to tenants, serve /metrics.
    Agent(AgentArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check this node: NVML, BTF, cgroups, bpffs, privileges.
    Doctor(DoctorArgs),
    /// Run the aggregator: report ingest, usage ledger, chargeback, audit store.
    Aggregator(crate::aggregator::cli::AggregatorArgs),
    /// Print a chargeback report from an aggregator (a table by default).
    Report(crate::aggregator::cli::ReportArgs),
    /// Run a command in a tenant's cgroup (`tally/<tenant>/<job>`).
    Run(RunArgs),
    /// Work with the enforcement audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Tenant whose cgroup the command runs in.
    #[arg(long)]
    pub tenant: String,
    /// Job name: the cgroup below the tenant's [default: job-<pid>].
    #[arg(long)]
    pub job: Option<String>,
    /// Config file: `[tenant] cgroup_parent` and the tenant's quota.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log; name the first broken line.
    Verify {
        /// The audit log (`<state_dir>/audit.log`).
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (TOML). Without it, defaults apply.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address for /metrics and the JSON API [default: 0.0.0.0:9477].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Time between samples, e.g. `1s`, `500ms` [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sample_interval: Option<Duration>,
    /// NVML library to open [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
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
pub struct DoctorArgs {
    /// Config file whose NVML library to check.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// NVML library to check [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Agent(args) => run_agent(args),
        Command::Config(ConfigCommand::Check { file, aggregator })
            if aggregator || crate::aggregator::config::looks_like_aggregator(&file) =>
        {
            crate::aggregator::cli::check(&file)
        }
        Command::Aggregator(args) => crate::aggregator::cli::run_aggregator(args),
        Command::Report(args) => crate::aggregator::cli::run_report(args),
        Command::Config(ConfigCommand::Check { file, .. }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprintln!("{problems}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Doctor(args) => {
            let (lib, probes) = match load_optional(args.config.as_ref()) {
                Ok(c) => (args.nvml_lib.unwrap_or(c.agent.nvml_lib), c.probes),
                Err(code) => return code,
            };
            doctor::run_with_probes(&lib, &probes)
        }
        Command::Run(args) => match load_optional(args.config.as_ref()) {
            Ok(config) => {
                crate::enforce::run::run(&config, &args.tenant, args.job.as_deref(), &args.command)
            }
            Err(code) => code,
        },
        Command::Audit(AuditCommand::Verify { file }) => crate::enforce::run::verify(&file),
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

/// The config file if given, else the defaults; exit code 64 when bad.
fn load_optional(file: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match file {
        None => Ok(Config::default()),
        Some(file) => Config::load(file).map_err(|problems| {
            eprintln!("{problems}");
            ExitCode::from(EX_USAGE)
        }),
    }
}

fn run_agent(args: AgentArgs) -> ExitCode {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tally-rt")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = signal::shutdown_token()?;
        agent::run(settings, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
