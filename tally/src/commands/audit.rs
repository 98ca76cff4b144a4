//! `tally audit verify`: check an audit log's hash chain.

use std::{path::Path, process::ExitCode};

use tally_contract::audit;

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
