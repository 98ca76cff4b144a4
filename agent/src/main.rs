//! The `tally` binary: parses the command line and hands off to a role.

fn main() -> std::process::ExitCode {
    tally::cli::main()
}
