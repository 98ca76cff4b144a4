//! `tally doctor`: check this node point by point and say what to fix.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tally_agent::doctor;

use super::agent::load_optional;

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Config file whose NVML library to check.
    #[arg(long, short = 'c')]
    pub(crate) config: Option<PathBuf>,
    /// NVML library to check [default: the system libnvidia-ml.so.1].
    #[arg(long)]
    pub(crate) nvml_lib: Option<PathBuf>,
}

pub(crate) fn run(args: DoctorArgs) -> ExitCode {
    let (lib, probes) = match load_optional(args.config.as_ref()) {
        Ok(c) => (args.nvml_lib.unwrap_or(c.agent.nvml_lib), c.probes),
        Err(code) => return code,
    };
    doctor::run_with_probes(&lib, &probes)
}
