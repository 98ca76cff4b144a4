//! `tally run`: a command in a tenant's cgroup (`tally/<tenant>/<job>`).

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use super::agent::load_optional;

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

pub(crate) fn run(args: RunArgs) -> ExitCode {
    match load_optional(args.config.as_ref()) {
        Ok(config) => tally_agent::enforce::run::run(
            &config.enforce_settings(&tally_agent::run::Settings::node_name(&config)),
            &args.tenant,
            args.job.as_deref(),
            &args.command,
        ),
        Err(code) => code,
    }
}
