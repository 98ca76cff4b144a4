//! `cargo xtask soak --minutes N`: the release agent (every probe on) and
//! aggregator (SQLite) run for N minutes on a simulated 8-GPU node while
//! GPU processes and tenant cgroups come and go at 50/s, with XIDs and lost
//! GPUs sprinkled in; then the pass criteria are checked and printed: RSS
//! and descriptors flat after warm-up, no BPF map growing without bound,
//! every conservation sum holding, every report in the ledger exactly once.
//! Exits non-zero when one fails. Never part of `cargo xtask test`.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tally_e2e::{
    Agent, Cgroup, H100, Launch, Metrics, STANDARD_SCENARIO, SimNode,
    aggregator_support::{
        Aggregator, LedgerReader, agent_config_with, assert_ledger_exact, reported_counters,
        spooled, sqlite,
    },
    conservation::{Scrape, assert_conserved, assert_shares},
    free_port, unique,
};

use crate::{
    deps,
    exec::{cargo, caught, exec, is_root, loadavg, short_commit, target_dir, utc_now},
};

mod churn;
mod trend;
mod watch;

use churn::{Counts, Faults, Shared};
use trend::{Fit, Limit};
use watch::{Footprint, MapInfo, Samples, Targets, Watch};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// How long the churn runs, warm-up included (at least 3).
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// GPU processes (each in a new job cgroup) started per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Use the release binaries as they are (no `cargo build --release`).
    #[arg(long)]
    pub no_build: bool,
}

/// The node name the agent reports as.
const NODE: &str = "soak";

/// Leak limits: a real leak crosses both (see [`trend::Limit`]). 4 MiB/h
/// is ~25 bytes per churned process at 50/s, or 100 MiB a day.
const RSS_LIMIT: Limit = Limit {
    per_hour: 4.0,
    floor: 2.0,
};
const FD_LIMIT: Limit = Limit {
    per_hour: 10.0,
    floor: 3.0,
};
/// Entries of a hash map keyed by cgroup or pid: a map that forgets
/// nothing grows by ~180,000 an hour at 50/s.
const MAP_LIMIT: Limit = Limit {
    per_hour: 500.0,
    floor: 100.0,
};

/// Faults stop this long before the end, so that the conservation window
/// (the last [`WINDOW`]) has every GPU readable and no fatal XID pending.
const QUIET: Duration = Duration::from_secs(75);
const WINDOW: Duration = Duration::from_secs(30);

/// Churn threads: one alone cannot start 50 processes a second on a
/// loaded 2-core machine (15/s was measured), as each start and end waits
/// on fork, exec and cgroup files.
const WORKERS: usize = 4;

/// One pass criterion, as printed.
struct Criterion {
    what: String,
    measured: String,
    limit: String,
    pass: bool,
}

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the soak puts processes in real cgroups and loads eBPF programs, which needs root: \
             run `sudo cargo xtask soak`"
        );
    }
    if o.minutes < 3 {
        bail!("--minutes must be at least 3 (warm-up, faults and a quiet window at the end)");
    }
    if !(1..=500).contains(&o.rate) {
        bail!("--rate must be within 1..=500 processes per second");
    }
    // Beyond the build's packages, which the bootstrap installed.
    deps::ensure(&["bpftool"])?;
    if !o.no_build {
        exec(cargo().args(["build", "--release", "-p", "tally", "-p", "nvml-sim"]))?;
    }
    let release = target_dir().join("release");
    let launch = Launch {
        tally: release.join("tally"),
        sim_lib: release.join("libnvml_sim.so"),
        log_level: "warn".into(),
        ready_within: Duration::from_secs(120),
        ..Launch::default()
    };
    for p in [&launch.tally, &launch.sim_lib] {
        if !p.exists() {
            bail!("{} is not built: run without --no-build", p.display());
        }
    }
    let dir = target_dir().join("soak");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let pin = PathBuf::from(format!("/sys/fs/bpf/tally-soak-{}", std::process::id()));
    let started = utc_now();
    // What was built, said at the start: main may move during an hour.
    let commit = short_commit();
    let built = if o.no_build {
        format!("release binaries as found (--no-build), HEAD `{commit}` at the start")
    } else {
        format!("release build of commit `{commit}`")
    };
    let result = caught(|| soak(&o, &launch, &dir, &pin));
    let _ = fs::remove_dir_all(&pin);
    let (criteria, facts) = result?;
    let report = render(&o, &started, &built, &criteria, &facts);
    let out = dir.join("result.md");
    fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    println!("{report}");
    println!("soak: wrote {}", out.display());
    let failed: Vec<&str> = criteria
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.what.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("soak failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Seven H100s and an A100 in MIG mode: 8 GPUs, 11 devices (the
/// standard scenario's two H100s and MIG A100, after five more H100s).
fn scenario() -> String {
    H100.repeat(5) + STANDARD_SCENARIO
}

/// Runs the soak; returns the criteria and a description of the run.
fn soak(
    o: &Options,
    launch: &Launch,
    dir: &Path,
    pin: &Path,
) -> anyhow::Result<(Vec<Criterion>, String)> {
    let sim = SimNode::in_dir(dir, &scenario());
    let agg_dir = dir.join("aggregator");
    let backend = sqlite(&agg_dir);
    let agg = Aggregator::start_bin(&launch.tally, &agg_dir, &backend, "");
    let ledger = LedgerReader::new(&backend);
    let state = dir.join("agent-state");
    let config = dir.join("tally.toml");
    let sections = format!(
        r#"
[probes]
pin_dir = "{pin}"

[states]
# Fatal XIDs are injected too; the GPU must be back before the final window.
fatal_xid_clear_after = "30s"

[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#,
        pin = pin.display(),
    );
    fs::write(
        &config,
        agent_config_with(&agg.url(), NODE, &state, &agg_dir, "2s", "5s", &sections),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = Agent::launch(launch, &sim, &config, addr, &["--sample-interval", "1s"]);
    let tree = Cgroup::create(&unique("tally-soak"));
    let maps = watch::pinned_maps(pin)?;
    if maps.is_empty() {
        bail!(
            "the agent pinned no BPF maps in {}; its log:\n{}",
            pin.display(),
            agent.log_text()
        );
    }
    // The first sample's scrape: a GPU's energy series starts at its
    // counter's reading then (what it drew before the agent), its tenants'
    // at 0, so the whole-run check counts growth from here.
    let first = agent.metrics();
    let probes = probes_up(&first);

    let duration = Duration::from_secs(o.minutes * 60);
    let warm_up = (duration / 3).min(Duration::from_secs(600));
    let every = (duration / 200).clamp(Duration::from_secs(2), Duration::from_secs(10));
    let seed = u64::from(std::process::id());
    let counts = Counts::default();
    let stop = AtomicBool::new(false);
    let base = tree.child("tally");
    let start = Instant::now();
    let end = start + duration;
    eprintln!(
        "soak: {} min at {}/s ({WORKERS} workers); warm-up {} s; log of the agent {}",
        o.minutes,
        o.rate,
        warm_up.as_secs(),
        agent.log.display()
    );
    let (window_start, window_end, faults, samples) = std::thread::scope(|s| {
        let watch = Watch::start(
            s,
            start,
            Targets {
                agent: agent.child.pid(),
                aggregator: agg.child.as_ref().map(|c| c.pid()).unwrap_or(0),
                maps: maps.clone(),
                every,
                maps_every: 3,
                counts: &counts,
                stop: &stop,
            },
        );
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let with = Shared {
                    base: &base,
                    sim: &sim,
                    counts: &counts,
                    stop: &stop,
                };
                let seed = seed.wrapping_mul(31).wrapping_add(w as u64);
                s.spawn(move || churn::work(&with, (w, WORKERS), o.rate, seed, (start, end)))
            })
            .collect();
        let mut faults = Faults::new(&sim, seed ^ 0x5eed, start, end - QUIET);
        let mut window_start = None;
        let watched = caught(|| {
            while Instant::now() < end {
                let now = Instant::now();
                faults.tick(now);
                if window_start.is_none() && now >= end - WINDOW {
                    window_start = Some(Scrape::of(&agent));
                }
                if agent.child.has_exited() {
                    bail!(
                        "the agent exited during the soak; its log:\n{}",
                        agent.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(Scrape::of(&agent))
        });
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("a churn worker panicked");
        }
        let samples = watch.finish();
        let faults = (faults.xids, faults.losses);
        (window_start, watched, faults, samples)
    });
    let window_end = window_end?;
    let window_start = window_start.context("no scrape at the start of the final window")?;
    let churn_secs = duration.as_secs_f64();
    let created = Counts::get(&counts.created);
    let fault_counts = format!(
        "{} XIDs injected (13, 31, 43, 79), {} times a GPU lost for 10 s",
        faults.0, faults.1
    );
    let counts_text = format!(
        "{created} processes started ({:.1}/s), {} ended; {} cgroups created ({:.1}/s: job and \
         tenant cgroups), {} removed; {} starts skipped while a worker was more than 1 s \
         behind; at most {} live at once in one of {WORKERS} workers",
        created as f64 / churn_secs,
        Counts::get(&counts.destroyed),
        Counts::get(&counts.cgroups_created),
        Counts::get(&counts.cgroups_created) as f64 / churn_secs,
        Counts::get(&counts.cgroups_removed),
        Counts::get(&counts.missed),
        Counts::get(&counts.peak_live),
    );
    let slowest = slowest_rate(&samples.created, every);
    drop(base);

    let mut criteria = Vec::new();
    let warm = warm_up.as_secs_f64();
    footprint_criteria(&mut criteria, "agent", &samples.agent, warm);
    footprint_criteria(&mut criteria, "aggregator", &samples.aggregator, warm);
    map_criteria(&mut criteria, &maps, &samples, warm);
    criteria.push(Criterion {
        what: "churn rate achieved".into(),
        measured: format!(
            "{:.1} processes/s overall, {:.1}/s in the slowest sampling interval",
            created as f64 / churn_secs,
            slowest
        ),
        limit: format!("{}/s asked; reported, not judged", o.rate),
        pass: true,
    });

    // Conservation: over the quiet window at the end (every sum of the
    // spine), and over the whole run (allocated = observed per device,
    // the tenants' energy = each GPU's, across every fault).
    let devices = caught(|| Ok(assert_conserved(&window_start, &window_end)));
    criteria.push(Criterion {
        what: format!("conservation over the last {} s", WINDOW.as_secs()),
        measured: match &devices {
            Ok(d) => format!("held on {} devices", d.len()),
            Err(e) => format!("{e:#}"),
        },
        limit: "tenants = observed = wall per device; tenants' energy = GPU's".into(),
        pass: devices.is_ok(),
    });
    let whole = caught(|| Ok(conserved_since_start(&first, &window_end.metrics)));
    criteria.push(Criterion {
        what: "conservation since the agent's first sample".into(),
        measured: match &whole {
            Ok((n, unread)) if unread.is_empty() => format!("held on {n} devices"),
            Ok((n, unread)) => format!(
                "held on {n} devices; energy not checked on GPU {} (unreadable at the end)",
                unread.join(", ")
            ),
            Err(e) => format!("{e:#}"),
        },
        limit: "tenants = observed per device; tenants' energy = GPU's".into(),
        pass: whole.is_ok(),
    });

    // The ledger: the agent's last report (cut on SIGTERM) delivered, and
    // every seq it ever cut stored exactly once, with its GPU time.
    agent.wait_samples(2);
    let status = agent.stop();
    let left = spooled(&state);
    let ledger_check = caught(|| {
        if !status.success() {
            bail!("the agent exited with {status} on SIGTERM");
        }
        if left != 0 {
            bail!("{left} reports still in the spool");
        }
        let expected = reported_counters(&state);
        assert_ledger_exact(&ledger, &agg, NODE, &state, &expected);
        Ok(ledger.reports(NODE))
    });
    criteria.push(Criterion {
        what: "ledger complete".into(),
        measured: match &ledger_check {
            Ok((n, first, last)) => {
                format!("{n} reports, seq {first}..={last}, each once; GPU time as cut")
            }
            Err(e) => format!("{e:#}"),
        },
        limit: "every report the agent cut, exactly once".into(),
        pass: ledger_check.is_ok(),
    });
    let errors = if samples.errors.is_empty() {
        String::new()
    } else {
        format!(" Sampling problems: {}.", samples.errors.join("; "))
    };
    let facts = format!(
        "{counts_text}. {fault_counts}. Probes: {probes}. Sampled every {} s (maps every {} s); \
         warm-up {} s left out of the fits.{errors}",
        every.as_secs(),
        every.as_secs() * 3,
        warm_up.as_secs()
    );
    drop(tree);
    Ok((criteria, facts))
}

/// RSS and descriptor criteria of one process.
fn footprint_criteria(out: &mut Vec<Criterion>, who: &str, s: &[(f64, Footprint)], warm: f64) {
    let rss: Vec<(f64, f64)> = s.iter().map(|(t, f)| (*t, f.rss_mib)).collect();
    let fds: Vec<(f64, f64)> = s.iter().map(|(t, f)| (*t, f.fds)).collect();
    out.push(flat(&format!("{who} RSS"), "MiB", &rss, warm, RSS_LIMIT));
    out.push(flat(
        &format!("{who} open descriptors"),
        "",
        &fds,
        warm,
        FD_LIMIT,
    ));
}

/// A series is flat after warm-up: its fitted slope is within `limit`.
fn flat(what: &str, unit: &str, points: &[(f64, f64)], warm: f64, limit: Limit) -> Criterion {
    let after = trend::after(points, warm);
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    let limit_text = format!(
        "slope ≤ {}{unit}/h, or a rise ≤ {}{unit} over the run",
        limit.per_hour, limit.floor
    );
    match trend::fit(&after) {
        Some(f) => Criterion {
            what: what.to_owned(),
            measured: describe(&f, points, &unit),
            limit: limit_text,
            pass: !limit.leaks(&f),
        },
        None => Criterion {
            what: what.to_owned(),
            measured: format!("{} samples after warm-up: too few to fit", after.len()),
            limit: limit_text,
            pass: false,
        },
    }
}

fn describe(f: &Fit, points: &[(f64, f64)], unit: &str) -> String {
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    format!(
        "slope {:+.2}{unit}/h (fitted rise {:+.2}{unit}) over {} samples, mean {:.1}{unit}; \
         whole run {lo:.1}–{hi:.1}{unit}",
        f.per_hour, f.rise, f.samples, f.mean
    )
}

/// Maps: hash maps flat after warm-up and never full; LRU maps and arrays
/// are bounded by the kernel, their counts shown.
fn map_criteria(out: &mut Vec<Criterion>, maps: &[(PathBuf, MapInfo)], s: &Samples, warm: f64) {
    for (_, info) in maps {
        let points = s.maps.get(&info.name).cloned().unwrap_or_default();
        let what = format!(
            "BPF map {} ({}, max {})",
            info.name, info.kind, info.max_entries
        );
        if info.bounded_by_kernel() {
            let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
            out.push(Criterion {
                what,
                measured: format!("at most {hi:.0} entries"),
                limit: "bounded by the kernel (LRU eviction or a fixed array)".into(),
                pass: !points.is_empty(),
            });
            continue;
        }
        let mut c = flat(&what, "entries", &points, warm, MAP_LIMIT);
        let full = points
            .iter()
            .any(|p| p.1 >= info.max_entries as f64 && info.max_entries > 0);
        if full {
            c.pass = false;
            c.measured.push_str("; the map was full");
        }
        c.limit.push_str("; never full");
        out.push(c);
    }
}

/// From the agent's `first` scrape to `m`, across every fault: each
/// device's tenants hold its observed time, and each physical GPU's
/// tenants (its MIG instances' too) its energy. A GPU unreadable at the
/// end has no energy series then (the last window's check says so):
/// returned with the devices checked.
fn conserved_since_start(first: &Metrics, m: &Metrics) -> (usize, Vec<String>) {
    let unread: Vec<String> = m
        .select("tally_gpu_info", &[])
        .map(|s| s.labels["gpu"].clone())
        .filter(|g| {
            !g.contains('/')
                && m.value("tally_gpu_energy_joules_total", &[("gpu", g)])
                    .is_none()
        })
        .collect();
    let skip: Vec<&str> = unread.iter().map(String::as_str).collect();
    let devices = assert_shares(Some(first), m, &skip);
    (devices.len(), unread)
}

/// The lowest start rate between consecutive samples of the count.
fn slowest_rate(created: &[(f64, f64)], every: Duration) -> f64 {
    created
        .windows(2)
        .filter(|w| w[1].0 - w[0].0 >= every.as_secs_f64() / 2.0)
        .map(|w| (w[1].1 - w[0].1) / (w[1].0 - w[0].0))
        .fold(f64::INFINITY, f64::min)
}

/// `probe=1, …` from `tally_probe_up`.
fn probes_up(m: &Metrics) -> String {
    m.select("tally_probe_up", &[])
        .map(|s| {
            let probe = s.labels.get("probe").map(String::as_str).unwrap_or("?");
            format!("{probe}={}", s.value)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result as Markdown, for the terminal and `docs/faults.md`.
fn render(o: &Options, started: &str, built: &str, criteria: &[Criterion], facts: &str) -> String {
    let load = loadavg();
    let pass = criteria.iter().all(|c| c.pass);
    let mut r = String::new();
    let _ = writeln!(
        r,
        "`cargo xtask soak --minutes {} --rate {}`, started {started}, {built}, load average \
         {} at the end: **{}**.\n",
        o.minutes,
        o.rate,
        load,
        if pass { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(r, "{facts}\n");
    let _ = writeln!(r, "| criterion | measured | limit | verdict |");
    let _ = writeln!(r, "| --- | --- | --- | --- |");
    for c in criteria {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} |",
            c.what,
            c.measured.replace('|', "/").replace('\n', " "),
            c.limit,
            if c.pass { "PASS" } else { "**FAIL**" }
        );
    }
    r
}
