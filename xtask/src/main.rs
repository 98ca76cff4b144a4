//! `cargo xtask …`: everything beyond `cargo build/test`, each command
//! doing its own set-up on a fresh machine.

use clap::{Parser, Subcommand};
use xtask_bootstrap as deps;

mod bench;
mod demo;
mod dist;
mod exec;
mod fuzz;
#[cfg(test)]
mod layout;
mod postgres;
mod soak;
mod test;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every test (unit, end-to-end, root ones, ops checks) and the lints.
    Test(test::Options),
    /// Show the whole system live: a simulated node with tenants in real cgroups, the agent, an aggregator.
    Demo(demo::Options),
    /// Measure footprint, probe cost, scrape, ingest and chargeback; write BENCHMARKS.md.
    Bench(bench::Options),
    /// Run every fuzz target for N seconds; print executions and crashes.
    Fuzz(fuzz::Options),
    /// Churn processes and cgroups at 50/s for N minutes under the release agent; check for leaks.
    Soak(soak::Options),
    /// Build target/dist/: a stripped tally, the GPU check and its helpers, to copy to a GPU machine.
    Dist(dist::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Test(o) => test::run(o),
        Command::Demo(o) => demo::run(o),
        Command::Bench(o) => bench::run(o),
        Command::Fuzz(o) => fuzz::run(o),
        Command::Dist(o) => dist::run(o),
        Command::Soak(o) => soak::run(o),
    }
}
