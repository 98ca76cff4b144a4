//! Instruction counts per call from `valgrind --tool=callgrind`: the
//! agent runs under callgrind, which counts only inside one of the
//! functions named here and dumps (and zeroes) its counters after each of
//! its calls. One function per run: a dump writes and zeroes every
//! thread's counters, so with two functions counted on two threads (the
//! sampler's cycle, a scrape on the runtime) each dump took part of the
//! other's count, and the per-call figures came out as 0 or as the other's
//! (benchmark 3 showed 0 instructions per encode). The aggregator's
//! ledger writer is counted over a whole run instead
//! ([`whole_run_wrapper`]): its transaction is inlined into the thread's
//! loop, which never returns while the aggregator runs. An
//! instruction count repeats run to run whatever else the shared machine
//! does, so a regression shows as a number where wall and CPU time drown
//! in the load.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// One sampling cycle: NVML reads joined, attribution, states.
pub(super) const SAMPLE: &str = "Sampler::sample";
/// The `/metrics` text of one snapshot, encoded by its first scrape.
pub(super) const RENDER: &str = "Metrics::render";
/// One scrape's body: from the cache, plus the components' few families
/// (and the gzip, made by the first scrape of a snapshot asking for it).
pub(super) const SCRAPE: &str = "Metrics::send";

/// The functions counted, as callgrind matches their demangled names (the
/// agent keeps them out of line for this).
pub(super) const FUNCTIONS: [(&str, &str); 3] = [
    (SAMPLE, "tally_agent::gpu::sample::Sampler::sample"),
    (RENDER, "tally_agent::metrics::Metrics::render"),
    (SCRAPE, "tally_agent::metrics::Metrics::send"),
];

/// A script that runs `tally` under callgrind, writing one dump per call
/// of `function` (a full name from [`FUNCTIONS`]) into `dir`.
pub(super) fn wrapper(tally: &Path, dir: &Path, function: &str) -> anyhow::Result<PathBuf> {
    script(
        tally,
        dir,
        &[
            format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()),
            "--collect-atstart=no".to_owned(),
            format!("--toggle-collect={function}"),
            format!("--dump-after={function}"),
        ],
    )
}

/// A script that runs `tally` under callgrind, counting only inside
/// `function` (and what it calls) over the whole run, the count written
/// to [`whole_run_total`]'s file in `dir` when `tally` exits.
pub(super) fn whole_run_wrapper(
    tally: &Path,
    dir: &Path,
    function: &str,
) -> anyhow::Result<PathBuf> {
    script(
        tally,
        dir,
        &[
            format!("--callgrind-out-file={}/callgrind.out", dir.display()),
            "--collect-atstart=no".to_owned(),
            format!("--toggle-collect={function}"),
        ],
    )
}

/// The instructions counted by a [`whole_run_wrapper`] run in `dir`.
pub(super) fn whole_run_total(dir: &Path) -> anyhow::Result<f64> {
    let file = dir.join("callgrind.out");
    let text = fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    total(&text).with_context(|| format!("{} holds no total", file.display()))
}

/// The `totals:` (or `summary:`) line of one dump.
fn total(dump: &str) -> Option<f64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("totals: "))
        .or_else(|| dump.lines().find_map(|l| l.strip_prefix("summary: ")))
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
}

/// Writes `dir/tally-under-callgrind`, which runs `tally` under callgrind
/// with `args`.
fn script(tally: &Path, dir: &Path, args: &[String]) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let args: Vec<String> = std::iter::once("--tool=callgrind".to_owned())
        .chain(args.iter().cloned())
        .collect();
    let script = dir.join("tally-under-callgrind");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec valgrind {} '{}' \"$@\"\n",
            args.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" "),
            tally.display()
        ),
    )?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// Instructions per call of each counted function, in call order, from
/// the dumps in `dir`.
pub(super) fn per_call(dir: &Path) -> anyhow::Result<BTreeMap<&'static str, Vec<f64>>> {
    let mut dumps: Vec<(u64, &'static str, f64)> = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // `callgrind.out.<pid>.<n>`: the n-th dump.
        let Some(n) = name
            .strip_prefix("callgrind.out.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(_, n)| n.parse::<u64>().ok())
        else {
            continue;
        };
        let text = fs::read_to_string(&path)?;
        let trigger = text
            .lines()
            .find_map(|l| l.strip_prefix("desc: Trigger: --dump-after="));
        let total = total(&text);
        let key = trigger.and_then(|t| {
            FUNCTIONS
                .iter()
                .find(|(_, full)| t.trim() == *full)
                .map(|(k, _)| *k)
        });
        if let (Some(key), Some(total)) = (key, total) {
            dumps.push((n, key, total));
        }
    }
    dumps.sort_by_key(|(n, _, _)| *n);
    let mut out: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for (_, key, total) in dumps {
        out.entry(key).or_default().push(total);
    }
    Ok(out)
}

/// `1.23 M` style, for instruction counts.
pub(super) fn show(instructions: f64) -> String {
    if instructions >= 1e9 {
        format!("{:.2} G", instructions / 1e9)
    } else if instructions >= 1e6 {
        format!("{:.2} M", instructions / 1e6)
    } else if instructions >= 1e3 {
        format!("{:.1} k", instructions / 1e3)
    } else {
        format!("{instructions:.0}")
    }
}
