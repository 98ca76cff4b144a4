//! `tally audit verify`: check an audit log's hash chain, and with the
//! node's key each line's HMAC.

use std::{path::Path, path::PathBuf, process::ExitCode};

use clap::Subcommand;
use tally_contract::audit::{self, AuditKey};

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain of an audit log; name the first broken line.
    Verify {
        /// The audit log (`<state_dir>/audit.log`).
        file: PathBuf,
        /// The node's audit key (`<state_dir>/audit.key`, or the
        /// aggregator's `<node>.key`): also check each line's HMAC, which
        /// finds an edit whose plain chain was recomputed.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Fail on lines without an HMAC (written before the node had a
        /// key, or stripped of it); needs --key-file.
        #[arg(long, requires = "key_file")]
        require_keyed: bool,
    },
}

/// `sysexits.h`: the input file does not exist or cannot be read.
const EX_NOINPUT: u8 = 66;

/// Exit 0 when the chain is intact, 1 naming the first broken line, 66
/// when the log or the key cannot be read.
pub(crate) fn verify(file: &Path, key_file: Option<&Path>, require_keyed: bool) -> ExitCode {
    let key = match key_file.map(AuditKey::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_NOINPUT);
        }
    };
    match audit::verify_keyed(file, key.as_ref()) {
        Ok(Ok(v)) if require_keyed && v.unkeyed > 0 => {
            eprintln!(
                "{}: {} of {} records carry no HMAC (lines 1-{}: written before the node had a \
                 key, or rewritten without it)",
                file.display(),
                v.unkeyed,
                v.records,
                v.unkeyed
            );
            ExitCode::FAILURE
        }
        Ok(Ok(v)) => {
            let mut how = String::new();
            if key.is_some() {
                how.push_str(", every keyed record's HMAC matches the key");
            }
            if v.unkeyed > 0 {
                how.push_str(&format!(
                    "; {} unkeyed (lines 1-{}: written before the node had a key, protected by \
                     the plain chain only)",
                    v.unkeyed, v.unkeyed
                ));
            }
            if v.unchecked > 0 {
                how.push_str(&format!(
                    "; {} keyed records' HMAC not checked (give --key-file)",
                    v.unchecked
                ));
            }
            println!(
                "{}: ok, {} records, chain intact{how}",
                file.display(),
                v.records
            );
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
