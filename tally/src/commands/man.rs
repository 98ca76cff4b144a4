//! `tally man --out DIR`: man pages from the clap definitions, one for
//! `tally` and one per command (`tally-agent.1`, `tally-config-check.1`, …).

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Directory to write the `.1` pages into (made if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// `cli` is the whole command line (`Cli::command()`), passed in so that
/// this module need not import the one that dispatches to it.
pub(crate) fn run(args: ManArgs, cli: clap::Command) -> ExitCode {
    match write_all(cli, &args.out) {
        Ok(pages) => {
            for p in pages {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page; the paths written.
pub(crate) fn write_all(mut cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    cmd.build();
    let mut out = Vec::new();
    page(&cmd, "tally", dir, &mut out)?;
    Ok(out)
}

fn page(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    if cmd.is_hide_set() || cmd.get_name() == "help" {
        return Ok(());
    }
    let named = cmd.clone().display_name(name.to_owned());
    let mut buf = Vec::new();
    clap_mangen::Man::new(named).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, buf)?;
    out.push(path);
    for sub in cmd.get_subcommands() {
        page(sub, &format!("{name}-{}", sub.get_name()), dir, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_a_page() {
        let tmp = tempfile::tempdir().unwrap();
        let pages = write_all(
            <crate::cli::Cli as clap::CommandFactory>::command(),
            tmp.path(),
        )
        .unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "tally.1",
            "tally-agent.1",
            "tally-config-check.1",
            "tally-top.1",
            "tally-doctor.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        let agent = fs::read_to_string(tmp.path().join("tally-agent.1")).unwrap();
        assert!(agent.contains("sample\\-interval"), "{agent}");
    }
}
