//! `tally audit verify`: check an audit log's hash chain.

use std::{path::Path, path::PathBuf, process::ExitCode};

use clap::Subcommand;
use tally_contract::audit;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain of an audit log; name the first broken line.
    Verify {
        /// The audit log (`<state_dir>/audit.log`).
        file: PathBuf,
    },
}

/// `sysexits.h`: the input file does not exist or cannot be read.
const EX_NOINPUT: u8 = 66;

/// Exit 0 when the chain is intact, 1 naming the first broken line, 66
/// when the file cannot be read.
pub(crate) fn verify(file: &Path) -> ExitCode {
    match audit::verify(file) {
        Ok(Ok(n)) => {
            println!("{}: ok, {n} records, chain intact", file.display());
            ExitCode::SUCCESS
        }
        Ok(Err(broken)) => {
            eprintln!("{}: {broken}", file.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_NOINPUT)
        }
    }
}
