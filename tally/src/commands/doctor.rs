//! `tally doctor`: check this node point by point and say what to fix.

use std::process::ExitCode;

use tally_agent::doctor;

use super::agent::load_optional;
use crate::cli::DoctorArgs;

pub(crate) fn run(args: DoctorArgs) -> ExitCode {
    let (lib, probes) = match load_optional(args.config.as_ref()) {
        Ok(c) => (args.nvml_lib.unwrap_or(c.agent.nvml_lib), c.probes),
        Err(code) => return code,
    };
    doctor::run_with_probes(&lib, &probes)
}
