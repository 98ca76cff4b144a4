//! Benchmark 8: what one simulated NVML call costs — the test double the
//! agent runs against in benchmarks 1–2 — at 512 and 8,192 registered
//! processes, timed by `tests/nvml-sim/examples/sim_calls.rs` in a process
//! of its own (the simulator reads its inputs from the environment).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use tally_e2e::{ChildGuard, SimNode};

use super::{Check, Ctx, Section, Verdict, util};
use crate::exec::{cargo, exec, target_dir};

pub(super) const TITLE: &str = "8. Simulator cost per call";

/// Another build of `libnvml_sim.so` (e.g. main's) to time in the same run,
/// alternating with this one.
const BASELINE_ENV: &str = "TALLY_BENCH_SIM_BASELINE";

/// The calls `sim_calls` times, as it names them.
const CALLS: [&str; 3] = [
    "running_compute_processes",
    "total_energy_consumption",
    "utilization_rates",
];

/// One call's timing: mean ns per call (wall, CPU of the calling thread)
/// and how many calls were timed.
#[derive(Debug, Clone)]
struct Timing {
    wall_ns: f64,
    cpu_ns: f64,
    calls: u64,
}

/// A `Timing` per entry of `CALLS`, in order.
type Timings = Vec<Timing>;

pub(super) fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    // `--lib` too: only a root target's cdylib is copied up to
    // target/release/, where `ctx.sim_lib` points.
    exec(cargo().args([
        "build",
        "--release",
        "-p",
        "nvml-sim",
        "--lib",
        "--example",
        "sim_calls",
    ]))?;
    let example = target_dir().join("release/examples/sim_calls");
    let scales: &[usize] = if ctx.quick { &[64, 512] } else { &[512, 8192] };
    let seconds = if ctx.quick { 0.2 } else { 2.0 };
    let baseline = std::env::var_os(BASELINE_ENV).map(PathBuf::from);
    if let Some(b) = &baseline
        && !b.exists()
    {
        bail!("{BASELINE_ENV}={} does not exist", b.display());
    }
    let mut libs = vec![("this build", ctx.sim_lib.clone())];
    libs.extend(baseline.clone().map(|b| ("baseline", b)));

    let mut results: Vec<(usize, Vec<Timings>)> = Vec::new();
    for &n in scales {
        let dir = util::scratch(&format!("sim-{n}"))?;
        let sim = SimNode::in_dir(&dir, tally_e2e::H100);
        let started = Instant::now();
        let mut workloads = Vec::with_capacity(n);
        for i in 0..n {
            let child = Command::new("sleep")
                .arg("infinity")
                .stdin(Stdio::null())
                .spawn()
                .context("start sleep")?;
            let child = ChildGuard(child);
            sim.register(
                child.pid(),
                0,
                None,
                64,
                if i % 2 == 0 { 0.05 } else { 0.0 },
            );
            workloads.push(child);
        }
        eprintln!(
            "bench: {n} registered processes started in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // Alternate the builds twice over; keep each call's best mean.
        let mut best: Vec<Timings> = vec![Vec::new(); libs.len()];
        for _round in 0..2 {
            for (i, (_, lib)) in libs.iter().enumerate() {
                let t = measure(&example, lib, &sim, seconds, n)?;
                best[i] = merge_best(std::mem::take(&mut best[i]), t);
            }
        }
        results.push((n, best));
    }
    Ok(section(&libs, baseline.as_deref(), &results, seconds))
}

/// One run of `sim_calls` against `lib`; checks it listed all `n`.
fn measure(
    example: &Path,
    lib: &Path,
    sim: &SimNode,
    seconds: f64,
    n: usize,
) -> anyhow::Result<Timings> {
    let out = Command::new(example)
        .arg(lib)
        .arg(seconds.to_string())
        .envs(sim.env())
        .output()
        .with_context(|| format!("run {}", example.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{stdout}{}",
            example.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut timings = Vec::new();
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["listed", listed] if listed != n.to_string() => {
                bail!("{} listed {listed} processes, not {n}", lib.display())
            }
            [call, wall, cpu, calls] if CALLS.contains(&call) => timings.push(Timing {
                wall_ns: wall.parse()?,
                cpu_ns: cpu.parse()?,
                calls: calls.parse()?,
            }),
            _ => {}
        }
    }
    if timings.len() != CALLS.len() {
        bail!("{} printed:\n{stdout}", example.display());
    }
    Ok(timings)
}

fn merge_best(old: Timings, new: Timings) -> Timings {
    if old.is_empty() {
        return new;
    }
    old.into_iter()
        .zip(new)
        .map(|(a, b)| if b.cpu_ns < a.cpu_ns { b } else { a })
        .collect()
}

/// ns as the table shows them.
fn show(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn section(
    libs: &[(&str, PathBuf)],
    baseline: Option<&Path>,
    results: &[(usize, Vec<Timings>)],
    seconds: f64,
) -> Section {
    let mut body = String::new();
    let _ = writeln!(
        body,
        "**Set-up.** One simulated H100 (`tests/nvml-sim`, release build); N `sleep` processes \
         registered on it (`procs/<pid>.toml`), so every call covers all N. \
         `tests/nvml-sim/examples/sim_calls.rs` loads the library through nvml-wrapper 0.13 \
         (as the agent does) and calls each function for {seconds} s; builds alternate, twice, \
         best mean kept. Each cell: CPU time of the calling thread per call \
         (`/proc/thread-self/schedstat`: what the call costs whatever else runs), then wall \
         time per call, and how many calls were timed. `running_compute_processes` is two C \
         calls (`nvmlDeviceGetComputeRunningProcesses_v3` asked for the count, then for the \
         list).\n"
    );
    match baseline {
        Some(b) => {
            let _ = writeln!(
                body,
                "Baseline: `{}` (set by `{BASELINE_ENV}`), timed in the same run.\n",
                b.display()
            );
        }
        None => {
            let _ = writeln!(
                body,
                "No baseline in this run (`{BASELINE_ENV}=/path/to/libnvml_sim.so` adds one).\n"
            );
        }
    }
    let mut header = String::from("| processes | call |");
    let mut rule = String::from("| --- | --- |");
    for (name, _) in libs {
        let _ = write!(header, " {name} |");
        rule.push_str(" --- |");
    }
    if libs.len() == 2 {
        header.push_str(" speed-up |");
        rule.push_str(" --- |");
    }
    let _ = writeln!(body, "{header}\n{rule}");
    let mut checks = Vec::new();
    for (n, per_lib) in results {
        for (c, call) in CALLS.iter().enumerate() {
            let mut row = format!("| {n} | `{call}` |");
            for t in per_lib {
                let t = &t[c];
                let _ = write!(
                    row,
                    " {} CPU, {} wall ({} calls) |",
                    show(t.cpu_ns),
                    show(t.wall_ns),
                    t.calls
                );
            }
            if let [new, old] = &per_lib[..] {
                let _ = write!(row, " ×{:.0} |", old[c].cpu_ns / new[c].cpu_ns);
            }
            let _ = writeln!(body, "{row}");
        }
        let mine = &per_lib[0];
        let measured = CALLS
            .iter()
            .zip(mine)
            .map(|(call, t)| format!("{call} {}", show(t.cpu_ns)))
            .collect::<Vec<_>>()
            .join(", ");
        let measured = match &per_lib[..] {
            [new, old] => format!(
                "{measured} (baseline: {})",
                old.iter()
                    .zip(new)
                    .map(|(o, _)| show(o.cpu_ns))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => measured,
        };
        checks.push(Check::new(
            format!("8. simulated NVML call (CPU), {n} registered processes"),
            "(no target; the test double's own cost)",
            measured,
            Verdict::Info,
        ));
    }
    Section {
        title: TITLE.to_owned(),
        body,
        checks,
    }
}
