//! `tally run`: a command in a tenant's cgroup (`tally/<tenant>/<job>`).

use std::process::ExitCode;

use super::agent::load_optional;
use crate::cli::RunArgs;

pub(crate) fn run(args: RunArgs) -> ExitCode {
    match load_optional(args.config.as_ref()) {
        Ok(config) => tally_agent::enforce::run::run(
            &config.enforce_settings(""),
            &args.tenant,
            args.job.as_deref(),
            &args.command,
        ),
        Err(code) => code,
    }
}
