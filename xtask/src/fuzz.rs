//! `cargo xtask fuzz --seconds N`: runs every cargo-fuzz target of
//! `tests/fuzz` for N seconds and prints, per target, how many inputs it
//! executed and whether it crashed.
//!
//! The repository's corpus (`tests/fuzz/corpus/<target>/`, small, seeded
//! with real examples) is read but not written: new inputs go to a scratch
//! corpus under `tests/fuzz/target/`, which `--update-corpus` merges back
//! (libFuzzer's `-merge=1`, what `cargo fuzz cmin` does). A crash leaves its
//! input in `tests/fuzz/artifacts/<target>/`; turn it into a unit test next
//! to the code that crashed, fix it, and add it to the corpus.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::exec::{exec, workspace_root};

/// Every fuzz target (the `[[bin]]`s of `tests/fuzz/Cargo.toml`).
pub(crate) const TARGETS: &[&str] = &[
    "agent_config",
    "aggregator_config",
    "aggregator_query",
    "sim_scenario",
    "sim_state",
    "proc_cgroup",
    "pod_cgroup",
    "report",
    "scheduler_extender",
];

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only these targets (repeatable); default: all.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// Merge what the run found into the repository's corpus, keeping only
    /// inputs that add coverage.
    #[arg(long)]
    update_corpus: bool,
}

/// What one target did.
struct Outcome {
    target: String,
    executions: u64,
    crash: Option<PathBuf>,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("tests/fuzz")
}

/// `cargo +nightly fuzz …` from the workspace root, with the fuzz crate
/// where the workspace keeps it. No sanitizer: the code under test is safe
/// Rust, and without ASan the targets build and run several times faster;
/// overflow checks and debug assertions stay on.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz", subcommand, "--fuzz-dir"])
        .arg(fuzz_dir())
        .args(["--sanitizer", "none"])
        // The stable toolchain `cargo xtask` runs under must not leak in.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

/// Installs cargo-fuzz from crates.io when missing; checks for nightly.
fn ensure_tools() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !nightly {
        bail!("fuzzing needs a nightly toolchain: run `rustup toolchain install nightly`");
    }
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have_fuzz {
        eprintln!("xtask: installing cargo-fuzz");
        exec(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// `stat::number_of_executed_units: N` of libFuzzer's final statistics.
fn executions(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// The artifact libFuzzer wrote for a crash, from its log.
fn artifact(log: &str) -> Option<PathBuf> {
    log.lines()
        .filter_map(|l| l.split_once("Test unit written to "))
        .map(|(_, p)| PathBuf::from(p.trim()))
        .next_back()
}

/// The built fuzz binary of `target`.
fn binary(target: &str) -> PathBuf {
    fuzz_dir()
        .join("target/x86_64-unknown-linux-gnu/release")
        .join(target)
}

/// Where crashing inputs of `target` are written (as `cargo fuzz run` does).
fn artifacts(target: &str) -> PathBuf {
    fuzz_dir().join("artifacts").join(target)
}

fn run_target(target: &str, seconds: u64, scratch: &Path) -> anyhow::Result<Outcome> {
    fs::create_dir_all(artifacts(target))?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let work = scratch.join(target);
    fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    fs::create_dir_all(&seeds).with_context(|| format!("mkdir {}", seeds.display()))?;
    let log_path = scratch.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    // The binary `cargo fuzz build` made, run directly: `cargo fuzz run`
    // would rebuild first whenever the tree changed since the build.
    let status = Command::new(binary(target))
        // New inputs land in the first directory: the scratch one.
        .arg(&work)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
        .arg(format!("-artifact_prefix={}/", artifacts(target).display()))
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let crash = if status.success() {
        None
    } else {
        match artifact(&text) {
            Some(a) => Some(a),
            None => bail!(
                "fuzz target {target} failed without a crash artifact ({status}); see {}",
                log_path.display()
            ),
        }
    };
    Ok(Outcome {
        target: target.to_owned(),
        executions: executions(&text),
        crash,
    })
}

/// Merges the scratch corpus of `target` into the repository's.
fn merge_corpus(target: &str, scratch: &Path) -> anyhow::Result<()> {
    let seeds = fuzz_dir().join("corpus").join(target);
    exec(
        Command::new(binary(target))
            .arg(&seeds)
            .arg(scratch.join(target))
            .arg("-merge=1")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    ensure_tools()?;
    let targets: Vec<String> = if o.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        for t in &o.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t}; known: {}", TARGETS.join(", "));
            }
        }
        o.targets.clone()
    };
    eprintln!("xtask: building {} fuzz targets (nightly)", targets.len());
    exec(&mut cargo_fuzz("build"))?;
    let scratch = fuzz_dir().join("target/xtask-fuzz");
    let mut outcomes = Vec::new();
    for t in &targets {
        eprintln!("xtask: fuzzing {t} for {} s", o.seconds);
        let outcome = run_target(t, o.seconds, &scratch)?;
        if o.update_corpus && outcome.crash.is_none() {
            merge_corpus(t, &scratch)?;
        }
        outcomes.push(outcome);
    }
    println!(
        "\n{:<20} {:>14} {:>8}  seconds",
        "target", "executions", "crashes"
    );
    for out in &outcomes {
        println!(
            "{:<20} {:>14} {:>8}  {}",
            out.target,
            out.executions,
            u8::from(out.crash.is_some()),
            o.seconds
        );
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if crashed.is_empty() {
        return Ok(());
    }
    for c in &crashed {
        if let Some(a) = &c.crash {
            eprintln!(
                "crash in {}: {} (reproduce: {} {})",
                c.target,
                a.display(),
                binary(&c.target).display(),
                a.display()
            );
        }
    }
    bail!("{} fuzz target(s) crashed", crashed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_log_is_read() {
        let log =
            "#2 INITED\nstat::number_of_executed_units: 12345\nstat::average_exec_per_sec: 3\n";
        assert_eq!(executions(log), 12345);
        let crash = "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='/x/'; Test unit written to /x/crash-abc\n";
        assert_eq!(artifact(crash), Some(PathBuf::from("/x/crash-abc")));
        assert_eq!(artifact(log), None);
    }

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate() {
        let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} is not in tests/fuzz/Cargo.toml"
            );
        }
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "a fuzz target is missing from TARGETS");
    }
}
