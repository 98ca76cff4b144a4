//! `cargo xtask test`: lints, every test (root ones included), ops checks.
//!
//! Counts come from cargo's own `test result:` lines; tests that skipped
//! themselves (no root, no kernel feature) are listed in a skip log and
//! reported as skipped, never as passed.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    deps,
    exec::{cargo, exec, target_dir},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip fmt and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only run tests whose name contains this (passed to cargo test).
    pub filter: Option<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    deps::ensure(deps::BUILD)?;
    if !o.no_lint {
        exec(cargo().args(["fmt", "--all", "--", "--check"]))
            .context("formatting: run `cargo fmt --all`")?;
        exec(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // End-to-end tests run the built binaries and the simulator library.
    exec(cargo().args(["build", "--workspace", "--bins", "--lib"]))?;

    let skip_log = target_dir().join("xtask-skipped.log");
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]);
    if let Some(f) = &o.filter {
        cmd.arg(f);
    }
    cmd.env("TALLY_SKIP_LOG", &skip_log);
    let counts = run_counting(&mut cmd)?;

    let skipped: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    for s in &skipped {
        println!("skipped: {s}");
    }
    let passed = counts.passed.saturating_sub(skipped.len() as u64);
    println!(
        "tally: {passed} passed, {} failed, {} skipped",
        counts.failed,
        skipped.len()
    );
    if counts.failed > 0 || !counts.success {
        bail!("tests failed");
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs cargo test, echoing its output and adding up its result lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<Counts> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let mut counts = Counts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            counts.passed += number_before(rest, " passed");
            counts.failed += number_before(rest, " failed");
        }
    }
    counts.success = child.wait()?.success();
    Ok(counts)
}

fn number_before(text: &str, word: &str) -> u64 {
    text.find(word)
        .and_then(|end| text[..end].rsplit([' ', '.']).next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_counted() {
        let line = "ok. 19 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(number_before(line, " passed"), 19);
        assert_eq!(number_before(line, " failed"), 2);
        assert_eq!(number_before("FAILED. 0 passed; 1 failed;", " failed"), 1);
    }
}
