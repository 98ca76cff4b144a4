//! What the soak watches while it runs: RSS and open descriptors of the
//! agent and the aggregator (/proc), and the entry count of every BPF map
//! the agent pinned (bpftool), sampled on a thread of its own so that a
//! slow map dump never slows the churn.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::churn::Counts;
use crate::exec::rss_mib;

/// RSS (MiB) and open descriptors of one process.
#[derive(Debug, Clone, Copy)]
pub(super) struct Footprint {
    pub rss_mib: f64,
    pub fds: f64,
}

impl Footprint {
    pub(super) fn of(pid: u32) -> anyhow::Result<Footprint> {
        let rss_mib = rss_mib(pid)?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("/proc/{pid}/fd"))?
            .count();
        Ok(Footprint {
            rss_mib,
            fds: fds as f64,
        })
    }
}

/// A pinned BPF map: what bpftool says of it.
#[derive(Debug, Clone)]
pub(super) struct MapInfo {
    pub name: String,
    /// bpftool's `type` (`hash`, `percpu_hash`, `lru_hash`, `array`, …).
    pub kind: String,
    pub max_entries: u64,
}

impl MapInfo {
    /// LRU maps evict by design: reaching their size is not growth
    /// without bound, and arrays always hold `max_entries`.
    pub(super) fn bounded_by_kernel(&self) -> bool {
        self.kind.contains("lru") || self.kind.contains("array")
    }
}

/// The maps pinned in `pin_dir` (other pins, links and programs, skipped).
pub(super) fn pinned_maps(pin_dir: &Path) -> anyhow::Result<Vec<(PathBuf, MapInfo)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(pin_dir).with_context(|| format!("read {}", pin_dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        let o = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("run bpftool (apt-get install bpftool)")?;
        if !o.status.success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .with_context(|| format!("bpftool map show {}", path.display()))?;
        out.push((
            path.clone(),
            MapInfo {
                name: v["name"].as_str().unwrap_or("?").to_owned(),
                kind: v["type"].as_str().unwrap_or("?").to_owned(),
                max_entries: v["max_entries"].as_u64().unwrap_or(0),
            },
        ));
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(out)
}

/// Entries in a pinned map now.
pub(super) fn map_entries(path: &Path) -> anyhow::Result<u64> {
    let o = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .context("run bpftool")?;
    if !o.status.success() {
        bail!(
            "bpftool map dump {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("bpftool map dump {}", path.display()))?;
    Ok(v.as_array().map_or(0, |a| a.len() as u64))
}

/// Everything sampled, as `(seconds since the start, value)` series.
#[derive(Debug, Default)]
pub(super) struct Samples {
    pub agent: Vec<(f64, Footprint)>,
    pub aggregator: Vec<(f64, Footprint)>,
    /// Map name → entries over time.
    pub maps: BTreeMap<String, Vec<(f64, f64)>>,
    /// Processes created so far, at each footprint sample.
    pub created: Vec<(f64, f64)>,
    /// Problems met while sampling (the first few).
    pub errors: Vec<String>,
}

/// The sampling thread; it stops when [`Targets::stop`] is set, and
/// [`Watch::finish`] then hands the samples.
pub(super) struct Watch<'scope> {
    handle: thread::ScopedJoinHandle<'scope, Samples>,
}

/// What to watch, and how often.
pub(super) struct Targets<'a> {
    pub agent: u32,
    pub aggregator: u32,
    pub maps: Vec<(PathBuf, MapInfo)>,
    pub every: Duration,
    /// Maps are dumped once in this many footprint samples (a dump of a
    /// full LRU map takes a while).
    pub maps_every: u32,
    pub counts: &'a Counts,
    /// The soak's stop flag (the churn workers' too).
    pub stop: &'a AtomicBool,
}

impl<'scope> Watch<'scope> {
    pub(super) fn start<'env>(
        scope: &'scope thread::Scope<'scope, 'env>,
        start: Instant,
        t: Targets<'env>,
    ) -> Watch<'scope> {
        let flag = t.stop;
        let handle = thread::Builder::new()
            .name("soak-watch".into())
            .spawn_scoped(scope, move || {
                let mut s = Samples::default();
                let note = |s: &mut Samples, e: anyhow::Error| {
                    if s.errors.len() < 10 {
                        s.errors.push(format!("{e:#}"));
                    }
                };
                let mut n = 0u32;
                let mut next = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    let at = start.elapsed().as_secs_f64();
                    match Footprint::of(t.agent) {
                        Ok(f) => s.agent.push((at, f)),
                        Err(e) => note(&mut s, e.context("agent")),
                    }
                    match Footprint::of(t.aggregator) {
                        Ok(f) => s.aggregator.push((at, f)),
                        Err(e) => note(&mut s, e.context("aggregator")),
                    }
                    s.created.push((at, Counts::get(&t.counts.created) as f64));
                    if n.is_multiple_of(t.maps_every) {
                        for (path, info) in &t.maps {
                            match map_entries(path) {
                                Ok(c) => s
                                    .maps
                                    .entry(info.name.clone())
                                    .or_default()
                                    .push((at, c as f64)),
                                Err(e) => note(&mut s, e),
                            }
                        }
                    }
                    n += 1;
                    next += t.every;
                    while !flag.load(Ordering::Relaxed) && Instant::now() < next {
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                s
            })
            .expect("spawn the soak's sampling thread");
        Watch { handle }
    }

    /// Waits for the thread, once the stop flag is set.
    pub(super) fn finish(self) -> Samples {
        self.handle.join().expect("the sampling thread panicked")
    }
}
