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
    exec::{cargo, exec, target_dir, workspace_root},
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Skip fmt and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only run tests whose name contains this (passed to cargo test).
    pub filter: Option<String>,
}

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    // The build's packages: installed by the bootstrap (`cargo xtask`).
    deps::ensure(deps::TEST)?;
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
    // The ledger tests run on PostgreSQL as well as SQLite.
    match crate::postgres::ensure() {
        Ok(url) => {
            cmd.env("TALLY_TEST_POSTGRES_URL", url);
        }
        Err(e) => eprintln!(
            "xtask: no test PostgreSQL ({e:#}); the PostgreSQL ledger tests will say skipped"
        ),
    }
    let mut counts = run_counting(&mut cmd)?;

    // Ops checks: alert rules, manifests, boards and alerts proven against
    // a real Prometheus and Alertmanager (tests/ops/README.md).
    if o.filter.is_none() {
        let mut ops = Command::new("bash");
        ops.arg(workspace_root().join("tests/ops/run.sh"))
            .arg("--no-build")
            .env("TALLY_SKIP_LOG", &skip_log)
            .current_dir(workspace_root());
        let ops_counts = run_counting(&mut ops)?;
        counts.passed += ops_counts.passed;
        counts.failed += ops_counts.failed;
        counts.success &= ops_counts.success;
    }

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
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            counts.passed += number_before(rest, " passed");
            counts.failed += number_before(rest, " failed");
        } else if is_plain_summary(line) {
            // The ops runner's closing line: "N passed, N failed, N skipped".
            // Its skips are in the skip log; count them as passed here, like
            // cargo does, so they are subtracted once below.
            counts.passed += number_before(line, " passed") + number_before(line, " skipped");
            counts.failed += number_before(line, " failed");
        }
    }
    counts.success = child.wait()?.success();
    Ok(counts)
}

/// `N passed, N failed[, N skipped]` alone on a line.
fn is_plain_summary(line: &str) -> bool {
    let parts: Vec<&str> = line.split(", ").collect();
    (2..=3).contains(&parts.len())
        && parts[0].ends_with(" passed")
        && parts[1].ends_with(" failed")
        && parts.iter().all(|p| {
            p.split(' ')
                .next()
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
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
        assert!(is_plain_summary("201 passed, 0 failed, 10 skipped"));
        assert!(is_plain_summary("3 passed, 1 failed"));
        assert!(!is_plain_summary("tally: 3 passed, 1 failed"));
        assert_eq!(
            number_before("201 passed, 0 failed, 10 skipped", " skipped"),
            10
        );
    }
}
