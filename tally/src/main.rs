//! The `tally` binary: the node agent, the aggregator and the CLI, one
//! module per command ([`commands`]) over the `tally-agent` and
//! `tally-aggregator` libraries. The async runtime is built in one place
//! ([`runtime`]), and both servers are served by [`serve`].

mod cli;
mod commands;
mod notify;
mod runtime;
mod serve;
mod signal;

fn main() -> std::process::ExitCode {
    cli::main()
}
