//! `cargo xtask bench`: footprint, sample cost, scrape latency, probe cost,
//! aggregator ingest and chargeback, measured on this machine and written
//! to `BENCHMARKS.md`.
//!
//! Every benchmark that has a reference measures it in the same run,
//! alternating A/B where the two cannot run side by side, because these
//! machines are shared and noisy: the ratios hold, the absolute numbers
//! move with the load (recorded in the report's header). A benchmark that
//! fails or cannot run says why in its section; the others still run.
//! Never part of `cargo xtask test`.

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    deps,
    exec::{
        cargo, caught, exec, is_root, loadavg, short_commit, target_dir, utc_now, workspace_root,
    },
};

mod agent;
mod callgrind;
mod fleet;
mod ingest_instructions;
mod ledger;
mod probes;
mod sim;
mod util;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// A short smoke run (small scales, few seconds per measurement); the
    /// numbers are not worth publishing.
    #[arg(long)]
    pub quick: bool,
    /// Run only these benchmarks (repeatable): footprint, sample, scrape,
    /// network, uprobe, ingest, chargeback, sim, fleet.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(NAMES))]
    pub only: Vec<String>,
    /// Where the report goes [default: BENCHMARKS.md at the workspace root,
    /// or target/bench/BENCHMARKS-quick.md with --quick].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Use the release binaries as they are (no `cargo build --release`).
    #[arg(long)]
    pub no_build: bool,
    /// Simulated agents in the fleet run (benchmark 9) [default: 1000, 20
    /// with --quick].
    #[arg(long, value_name = "N")]
    pub fleet_agents: Option<usize>,
    /// Minutes of the fleet run [default: 10, 0.5 with --quick].
    #[arg(long, value_name = "MINUTES")]
    pub fleet_minutes: Option<f64>,
    /// Only count instructions under callgrind (benchmarks 2 and 3's
    /// load-independent rows at ×1, and benchmark 6's SQLite writer per
    /// report) and print them; writes no report. A quick check of a
    /// hot-path change (minutes, not the whole run).
    #[arg(long, conflicts_with_all = ["only", "output"])]
    pub instructions: bool,
}

/// Every benchmark, in run order.
pub(crate) const NAMES: &[&str] = &[
    "footprint",
    "sample",
    "scrape",
    "network",
    "uprobe",
    "ingest",
    "chargeback",
    "sim",
    "fleet",
];

/// How a measurement compares with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Miss,
    /// Measured, no target.
    Info,
    Skipped,
    Failed,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "**MISS**",
            Verdict::Info => "—",
            Verdict::Skipped => "SKIPPED",
            Verdict::Failed => "**FAILED**",
        }
    }

    pub(crate) fn of(pass: bool) -> Verdict {
        if pass { Verdict::Pass } else { Verdict::Miss }
    }
}

/// One line of the summary table.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

impl Check {
    pub(crate) fn new(
        what: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        verdict: Verdict,
    ) -> Check {
        Check {
            what: what.into(),
            target: target.into(),
            measured: measured.into(),
            verdict,
        }
    }
}

/// What one benchmark contributes to the report.
#[derive(Debug, Default)]
pub(crate) struct Section {
    pub title: String,
    /// Markdown: method, tables, notes.
    pub body: String,
    pub checks: Vec<Check>,
}

/// Binaries and settings every benchmark uses.
pub(crate) struct Ctx {
    pub quick: bool,
    pub tally: PathBuf,
    pub sim_lib: PathBuf,
}

impl Ctx {
    /// How the kit starts this run's (release) agent.
    pub(crate) fn launch(&self, ready_within: std::time::Duration) -> tally_e2e::Launch {
        tally_e2e::Launch {
            tally: self.tally.clone(),
            sim_lib: self.sim_lib.clone(),
            log_level: "warn".into(),
            ready_within,
            env: Vec::new(),
            netns: None,
            cgroup: None,
        }
    }
}

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks put processes in real cgroups and load eBPF programs, which needs \
             root: run `sudo cargo xtask bench`"
        );
    }
    for name in &o.only {
        if !NAMES.contains(&name.as_str()) {
            bail!("unknown benchmark `{name}`: one of {}", NAMES.join(", "));
        }
    }
    // Beyond the build's packages, which the bootstrap installed.
    deps::ensure(&[
        "iperf3",
        "prometheus-node-exporter",
        "postgresql",
        "sqlite3",
        "bpftool",
        "linux-perf",
        "valgrind",
    ])?;
    if !o.no_build {
        exec(cargo().args(["build", "--release", "-p", "tally", "-p", "nvml-sim"]))?;
    }
    let release = target_dir().join("release");
    let ctx = Ctx {
        quick: o.quick,
        tally: release.join("tally"),
        sim_lib: release.join("libnvml_sim.so"),
    };
    for p in [&ctx.tally, &ctx.sim_lib] {
        if !p.exists() {
            bail!("{} is not built: run without --no-build", p.display());
        }
    }
    if o.instructions {
        println!("{}", agent::instructions_only(&ctx)?);
        let per = ingest_instructions::sqlite_writer(&ctx)?;
        println!(
            "ingest: {} per report in the SQLite writer",
            callgrind::show(per)
        );
        return Ok(());
    }
    let wanted = |n: &str| o.only.is_empty() || o.only.iter().any(|x| x == n);
    let start = Start::now();
    let mut sections = Vec::new();
    let mut durations = Vec::new();

    // 1–3 share the simulated node's set-up (agent::run does all three).
    let (f, s, sc) = (wanted("footprint"), wanted("sample"), wanted("scrape"));
    if f || s || sc {
        let t = Instant::now();
        let first = sections.len();
        sections.extend(agent::run(&ctx, f, s, sc));
        for s in &mut sections[first..] {
            s.body.insert_str(0, &stamp());
        }
        durations.push(("agent benchmarks", t.elapsed()));
    }
    if wanted("network") {
        let t = Instant::now();
        let first = sections.len();
        sections.push(guard("4. Network probe cost", || probes::network(&ctx)));
        for s in &mut sections[first..] {
            s.body.insert_str(0, &stamp());
        }
        durations.push(("network", t.elapsed()));
    }
    if wanted("uprobe") {
        let t = Instant::now();
        let first = sections.len();
        sections.push(guard("5. uprobe cost", || probes::uprobe(&ctx)));
        for s in &mut sections[first..] {
            s.body.insert_str(0, &stamp());
        }
        durations.push(("uprobe", t.elapsed()));
    }
    let (i, c) = (wanted("ingest"), wanted("chargeback"));
    if i || c {
        let t = Instant::now();
        let first = sections.len();
        sections.extend(ledger::run(&ctx, i, c));
        for s in &mut sections[first..] {
            s.body.insert_str(0, &stamp());
        }
        durations.push(("ledger benchmarks", t.elapsed()));
    }
    if wanted("sim") {
        let t = Instant::now();
        let mut s = guard(sim::TITLE, || sim::run(&ctx));
        s.body.insert_str(0, &stamp());
        sections.push(s);
        durations.push(("sim", t.elapsed()));
    }
    if wanted("fleet") {
        let t = Instant::now();
        let scale = fleet::Scale {
            agents: o.fleet_agents.unwrap_or(if o.quick { 20 } else { 1000 }),
            minutes: o.fleet_minutes.unwrap_or(if o.quick { 0.5 } else { 10.0 }),
        };
        let mut s = guard(fleet::TITLE, || fleet::run(&ctx, scale));
        s.body.insert_str(0, &stamp());
        sections.push(s);
        durations.push(("fleet", t.elapsed()));
    }

    let out = o.output.clone().unwrap_or_else(|| {
        if o.quick {
            target_dir().join("bench/BENCHMARKS-quick.md")
        } else {
            workspace_root().join("BENCHMARKS.md")
        }
    });
    let previous = std::fs::read_to_string(&out).ok();
    let mut report = render(&o, &sections, &start, &durations);
    if let Some(prev) = previous {
        // `--only` refreshes those benchmarks' sections and keeps the
        // others; every run keeps the hand-written notes.
        if !o.only.is_empty() {
            report = merge(&report, &prev);
        }
        report = keep_notes(&report, &prev);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    println!("{report}");
    println!("bench: wrote {}", out.display());
    Ok(())
}

/// The benchmark number a section title or summary row starts with.
fn number(text: &str) -> Option<u32> {
    let t = text.trim_start_matches(['|', ' ']);
    t.split('.').next()?.trim().parse().ok()
}

/// `new` with the summary rows and sections of `old` whose benchmarks
/// `new` did not run, in benchmark order.
fn merge(new: &str, old: &str) -> String {
    let split = |text: &str| -> (String, Vec<String>) {
        let mut parts = text.split("\n## ");
        let head = parts.next().unwrap_or("").to_owned();
        (head, parts.map(|p| format!("## {p}")).collect())
    };
    let (new_head, new_parts) = split(new);
    let (_, old_parts) = split(old);
    let ran: Vec<u32> = new_parts
        .iter()
        .filter_map(|p| number(p.trim_start_matches("## ")))
        .collect();
    let rows = |parts: &[String], keep: &dyn Fn(u32) -> bool| -> Vec<String> {
        parts
            .iter()
            .filter(|p| p.starts_with("## Summary"))
            .flat_map(|p| p.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.starts_with("| ") && number(l).is_some_and(keep))
            .collect()
    };
    let mut summary = rows(&new_parts, &|_| true);
    summary.extend(rows(&old_parts, &|n| !ran.contains(&n)));
    summary.sort_by_key(|l| number(l).unwrap_or(99));
    let mut sections: Vec<String> = new_parts
        .iter()
        .chain(
            old_parts
                .iter()
                .filter(|p| number(p.trim_start_matches("## ")).is_some_and(|n| !ran.contains(&n))),
        )
        .filter(|p| number(p.trim_start_matches("## ")).is_some())
        .map(|p| p.trim_end().to_owned())
        .collect();
    sections.sort_by_key(|p| number(p.trim_start_matches("## ")).unwrap_or(99));
    let mut r = new_head.trim_end().to_owned();
    let _ = write!(
        r,
        "\n- **Merged:** this run measured benchmark(s) {}; the others are kept from the \
         previous report (each section says when it was measured).\n\n## Summary\n\n\
         | benchmark | target | measured | verdict |\n| --- | --- | --- | --- |\n{}\n\n{}\n",
        ran.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        summary.join("\n"),
        sections.join("\n\n")
    );
    r
}

/// Opens a hand-written block in a section (a before/after table, an
/// analysis): a rerun of the benchmark regenerates the rest of the section
/// and carries these blocks over.
const NOTES_OPEN: &str = "<!-- notes: kept when the benchmark is rerun -->";
const NOTES_CLOSE: &str = "<!-- /notes -->";

/// The hand-written blocks of a section, markers included.
fn notes(section: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = section;
    while let Some(start) = rest.find(NOTES_OPEN) {
        let Some(len) = rest[start..].find(NOTES_CLOSE) else {
            break;
        };
        let end = start + len + NOTES_CLOSE.len();
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    out
}

/// `new` with each section's hand-written blocks from `old` put back
/// after its title and date line, where the new section has none.
fn keep_notes(new: &str, old: &str) -> String {
    let old_notes = |n: u32| -> Vec<&str> {
        old.split("\n## ")
            .skip(1)
            .find(|p| number(p) == Some(n))
            .map(notes)
            .unwrap_or_default()
    };
    let mut parts = new.split("\n## ");
    let mut out = parts.next().unwrap_or("").to_owned();
    for part in parts {
        out.push_str("\n## ");
        let kept = number(part)
            .filter(|_| notes(part).is_empty())
            .map(old_notes)
            .unwrap_or_default();
        if kept.is_empty() {
            out.push_str(part);
            continue;
        }
        // After the title and the `_Measured …_` line.
        let at = part
            .match_indices("\n\n")
            .nth(1)
            .map_or(part.len(), |(i, _)| i + 2);
        let (head, body) = part.split_at(at);
        out.push_str(head.trim_end());
        out.push_str("\n\n");
        out.push_str(&kept.join("\n\n"));
        out.push_str("\n\n");
        out.push_str(body);
    }
    out
}

/// Runs one benchmark; an error, or a panic of a test-kit fixture, becomes
/// a FAILED section, not an abort.
pub(crate) fn guard(title: &str, f: impl FnOnce() -> anyhow::Result<Section>) -> Section {
    eprintln!("bench: {title}");
    match caught(f) {
        Ok(s) => s,
        Err(e) => failed(title, &e),
    }
}

pub(crate) fn failed(title: &str, e: &anyhow::Error) -> Section {
    eprintln!("bench: {title} failed: {e:#}");
    Section {
        title: title.to_owned(),
        body: format!("The benchmark failed: `{e:#}`\n"),
        // One line: the summary is a table.
        checks: vec![Check::new(
            title,
            "",
            format!("{e:#}").replace('\n', " "),
            Verdict::Failed,
        )],
    }
}

/// The machine as the run found it, for the header.
struct Start {
    at: Instant,
    load: String,
    busiest: String,
    cpu: util::CpuTime,
}

impl Start {
    fn now() -> Start {
        Start {
            at: Instant::now(),
            load: loadavg(),
            busiest: util::busy_processes(),
            cpu: util::CpuTime::now(),
        }
    }
}

fn render(
    o: &Options,
    sections: &[Section],
    start: &Start,
    durations: &[(&str, std::time::Duration)],
) -> String {
    let mut r = String::new();
    let date = utc_now();
    let commit = short_commit();
    let mut command = String::from("cargo xtask bench");
    if o.quick {
        command.push_str(" --quick");
    }
    for n in &o.only {
        command.push_str(&format!(" --only {n}"));
    }
    if o.no_build {
        command.push_str(" --no-build");
    }
    if let Some(n) = o.fleet_agents {
        command.push_str(&format!(" --fleet-agents {n}"));
    }
    if let Some(m) = o.fleet_minutes {
        command.push_str(&format!(" --fleet-minutes {m}"));
    }
    let _ = writeln!(r, "# Tally benchmarks\n");
    let _ = writeln!(
        r,
        "Generated by `{command}` (as root; release build of commit `{commit}`). \
         Re-run it to refresh this file; `--quick` is a smoke run, `--only NAME` runs one. \
         Hand-written text inside a section goes between `{NOTES_OPEN}` and `{NOTES_CLOSE}`: \
         a rerun keeps it.\n"
    );
    let _ = writeln!(r, "- **Date:** {date}");
    let _ = writeln!(r, "- **Machine:** {}", util::machine());
    let _ = writeln!(
        r,
        "- **Load:** load average {} at the start, {} at the end; the hypervisor took {:.0} % \
         of the machine's CPU time during the run (steal, `/proc/stat`). The machine is shared \
         with other engineers' compilers and other guests; busiest processes at the start: {}. \
         Absolute numbers move with that load; ratios measured A/B in the same run are what \
         holds.",
        start.load,
        loadavg(),
        util::CpuTime::now().stolen_since(&start.cpu),
        start.busiest,
    );
    let total = start.at.elapsed();
    let parts: Vec<String> = durations
        .iter()
        .map(|(n, d)| format!("{n} {:.0} s", d.as_secs_f64()))
        .collect();
    let _ = writeln!(
        r,
        "- **Duration:** {:.1} min ({})\n",
        total.as_secs_f64() / 60.0,
        parts.join(", ")
    );
    let _ = writeln!(r, "## Summary\n");
    let _ = writeln!(r, "| benchmark | target | measured | verdict |");
    let _ = writeln!(r, "| --- | --- | --- | --- |");
    for s in sections {
        for c in &s.checks {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} |",
                c.what,
                c.target,
                c.measured.replace('|', "\\|"),
                c.verdict.word()
            );
        }
    }
    r.push('\n');
    for s in sections {
        let _ = writeln!(r, "## {}\n", s.title);
        r.push_str(&s.body);
        r.push('\n');
    }
    r
}

/// `_Measured <date>, load average <x>._`, the first line of a section.
pub(crate) fn stamp() -> String {
    let date = utc_now();
    format!("_Measured {date}, load average {}._\n\n", loadavg())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reruns_replace_their_own_sections() {
        let old = "# T\n\nhead old\n\n## Summary\n\n| benchmark | target | measured | verdict |\n\
                   | --- | --- | --- | --- |\n| 1. a | x | old1 | PASS |\n| 4. d | y | old4 | MISS |\n\n\
                   ## 1. A\n\nbody old 1\n\n## 4. D\n\nbody old 4\n";
        let new = "# T\n\nhead new\n\n## Summary\n\n| benchmark | target | measured | verdict |\n\
                   | --- | --- | --- | --- |\n| 4. d | y | new4 | PASS |\n\n## 4. D\n\nbody new 4\n";
        let m = merge(new, old);
        assert!(m.contains("head new") && !m.contains("head old"), "{m}");
        assert!(m.contains("| 1. a | x | old1 | PASS |"), "{m}");
        assert!(m.contains("new4") && !m.contains("old4"), "{m}");
        assert!(m.contains("body old 1") && m.contains("body new 4"), "{m}");
        assert!(!m.contains("body old 4"), "{m}");
        assert!(m.find("## 1. A") < m.find("## 4. D"), "{m}");
        assert_eq!(m.matches("## Summary").count(), 1, "{m}");
    }

    #[test]
    fn a_rerun_keeps_the_hand_written_notes() {
        let note = format!("{NOTES_OPEN}\n| before | after |\n{NOTES_CLOSE}");
        let old = format!(
            "# T\n\n## Summary\n\n| x |\n\n## 2. B\n\n_Measured then._\n\n{note}\n\n\
             old body 2\n\n## 3. C\n\n_Measured then._\n\nold body 3\n"
        );
        let new = "# T\n\n## Summary\n\n| y |\n\n## 2. B\n\n_Measured now._\n\nnew body 2\n\n\
                   ## 3. C\n\n_Measured now._\n\nnew body 3\n";
        let m = keep_notes(new, &old);
        assert_eq!(
            m,
            format!(
                "# T\n\n## Summary\n\n| y |\n\n## 2. B\n\n_Measured now._\n\n{note}\n\n\
                 new body 2\n\n## 3. C\n\n_Measured now._\n\nnew body 3\n"
            )
        );
        // Kept once, not again on the next rerun.
        assert_eq!(keep_notes(&m, &old), m);
        // Through an `--only` merge too.
        let merged = keep_notes(&merge(new, &old), &old);
        assert_eq!(merged.matches(NOTES_CLOSE).count(), 1, "{merged}");
    }
}
