//! `tally completions SHELL`: shell completion script from the clap
//! definitions, on stdout.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub(crate) shell: Shell,
}

/// The shells Tally ships completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `cli` is the whole command line (`Cli::command()`).
pub(crate) fn run(args: CompletionsArgs, mut cli: clap::Command) -> ExitCode {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cli, "tally", &mut std::io::stdout());
    ExitCode::SUCCESS
}
