//! GPU states: free, busy, idle (held but wasted), stuck, lost.
//!
//! Pure logic over observations the sampler makes each cycle, with the
//! clock passed in, so every transition is unit-tested without waiting.
//! Precedence: lost > stuck > idle > busy > free.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::pids::PidMap;

/// `[states]`: thresholds of the idle and stuck states.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatesConfig {
    /// Below this utilization (0..1) a held GPU counts as doing nothing.
    pub idle_utilization: f64,
    /// How long a held GPU must do nothing to be `idle`.
    #[serde(with = "humantime_serde")]
    pub idle_after: Duration,
    /// At or above this utilization with no CPU progress of its holders, a
    /// GPU counts as spinning.
    pub stuck_utilization: f64,
    /// How long a stuck condition must last to be `stuck`.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// XID codes after which the GPU is `lost` until reset.
    pub fatal_xids: BTreeSet<u64>,
    /// A GPU lost by a fatal XID is considered reset after this long
    /// without another one (NVML does not report resets).
    #[serde(with = "humantime_serde")]
    pub fatal_xid_clear_after: Duration,
}

impl Default for StatesConfig {
    fn default() -> Self {
        Self {
            idle_utilization: 0.05,
            idle_after: Duration::from_secs(600),
            stuck_utilization: 0.95,
            stuck_after: Duration::from_secs(300),
            // Fallen off the bus, double-bit ECC, uncontained ECC, GSP and
            // unrecoverable engine errors: NVIDIA's "reset the GPU" XIDs.
            fatal_xids: [48, 74, 79, 92, 94, 95, 119, 120].into_iter().collect(),
            fatal_xid_clear_after: Duration::from_secs(3600),
        }
    }
}

impl StatesConfig {
    /// Problems with the values, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, v) in [
            ("states.idle_utilization", self.idle_utilization),
            ("states.stuck_utilization", self.stuck_utilization),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.push((key, format!("must be between 0 and 1, got {v}")));
            }
        }
        if self.idle_utilization >= self.stuck_utilization {
            out.push((
                "states.idle_utilization",
                "must be below states.stuck_utilization".to_owned(),
            ));
        }
        out
    }
}

/// The state of a GPU or MIG instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuState {
    /// No process holds it.
    #[default]
    Free,
    /// Held and working.
    Busy,
    /// Held (memory allocated by a live process) but not working.
    Idle,
    /// Held by processes that are gone, zombie or in uninterruptible sleep,
    /// or spinning at full utilization while its holders make no progress.
    Stuck,
    /// Fell off the bus, failing NVML calls, or a fatal XID.
    Lost,
}

impl GpuState {
    pub const ALL: [GpuState; 5] = [Self::Free, Self::Busy, Self::Idle, Self::Stuck, Self::Lost];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Busy => "busy",
            Self::Idle => "idle",
            Self::Stuck => "stuck",
            Self::Lost => "lost",
        }
    }
}

/// What the kernel says about a process holding a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Running or sleeping normally.
    Alive,
    /// Stopped (SIGSTOP) or traced: alive but making no progress.
    Stopped,
    /// Uninterruptible sleep (`D`).
    DiskSleep,
    /// Exited, not reaped.
    Zombie,
    /// No `/proc` entry: the driver holds a context of a dead process.
    Gone,
}

/// One holder process at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcObs {
    pub pid: u32,
    pub state: ProcState,
    /// utime + stime in clock ticks, when readable.
    pub cpu_ticks: Option<u64>,
}

/// One device at one sample.
#[derive(Debug, Clone, Default)]
pub struct DeviceObs {
    /// NVML failed for the device (or it fell off the bus).
    pub failing: bool,
    /// Device utilization (for a MIG instance: its parent's).
    pub utilization: Option<f64>,
    pub holders: Vec<ProcObs>,
    /// A fatal XID arrived on this device since the last sample.
    pub fatal_xid: bool,
}

#[derive(Debug, Default)]
struct Track {
    idle_since: Option<Instant>,
    stuck_since: Option<Instant>,
    fatal_xid_at: Option<Instant>,
    cpu: PidMap<u64>,
    cpu_before: PidMap<u64>,
}

/// Per-device memory of conditions and since when they hold.
#[derive(Debug, Default)]
pub struct Tracker {
    config: StatesConfig,
    devices: HashMap<String, Track>,
}

impl Tracker {
    pub fn new(config: StatesConfig) -> Self {
        Self {
            config,
            devices: HashMap::new(),
        }
    }

    /// Folds one observation of device `gpu` in and returns its state.
    pub fn observe(&mut self, gpu: &str, obs: &DeviceObs, now: Instant) -> GpuState {
        let c = &self.config;
        // Looked up before inserting: the label is copied once per device,
        // not per cycle.
        if !self.devices.contains_key(gpu) {
            self.devices.insert(gpu.to_owned(), Track::default());
        }
        let t = self.devices.get_mut(gpu).expect("inserted above");
        if obs.fatal_xid {
            t.fatal_xid_at = Some(now);
        }
        // Last cycle's ticks move to `cpu_before`, whose table is refilled
        // as this cycle's: both keep their capacity.
        std::mem::swap(&mut t.cpu, &mut t.cpu_before);
        t.cpu.clear();
        t.cpu.extend(
            obs.holders
                .iter()
                .filter_map(|p| Some((p.pid, p.cpu_ticks?))),
        );
        let cpu_before = &t.cpu_before;

        let xid_lost = t
            .fatal_xid_at
            .is_some_and(|at| now.duration_since(at) < c.fatal_xid_clear_after);
        if obs.failing || xid_lost {
            t.idle_since = None;
            t.stuck_since = None;
            return GpuState::Lost;
        }
        if obs.holders.is_empty() {
            t.idle_since = None;
            t.stuck_since = None;
            return GpuState::Free;
        }

        let dead_holder = obs.holders.iter().any(|p| {
            matches!(
                p.state,
                ProcState::Gone | ProcState::Zombie | ProcState::DiskSleep
            )
        });
        let util = obs.utilization;
        // Spinning: pinned utilization while no holder's CPU time moved.
        let no_progress = obs
            .holders
            .iter()
            .all(|p| match (p.cpu_ticks, cpu_before.get(&p.pid)) {
                (Some(now), Some(before)) => now == *before,
                _ => false,
            });
        let spinning = util.is_some_and(|u| u >= c.stuck_utilization) && no_progress;
        t.stuck_since = if dead_holder || spinning {
            t.stuck_since.or(Some(now))
        } else {
            None
        };
        let live_holder = obs
            .holders
            .iter()
            .any(|p| matches!(p.state, ProcState::Alive | ProcState::Stopped));
        let doing_nothing = util.is_some_and(|u| u < c.idle_utilization);
        t.idle_since = if live_holder && doing_nothing {
            t.idle_since.or(Some(now))
        } else {
            None
        };

        if t.stuck_since
            .is_some_and(|s| now.duration_since(s) >= c.stuck_after)
        {
            GpuState::Stuck
        } else if t
            .idle_since
            .is_some_and(|s| now.duration_since(s) >= c.idle_after)
        {
            GpuState::Idle
        } else {
            GpuState::Busy
        }
    }

    /// When device `gpu` entered (or enters) the `idle` state: `idle_after`
    /// past the first sample that saw it held and doing nothing. `None`
    /// while it is not doing nothing.
    pub fn idle_state_since(&self, gpu: &str) -> Option<Instant> {
        let since = self.devices.get(gpu)?.idle_since?;
        Some(since + self.config.idle_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        Tracker::new(StatesConfig {
            idle_after: Duration::from_secs(10),
            stuck_after: Duration::from_secs(5),
            fatal_xid_clear_after: Duration::from_secs(60),
            ..Default::default()
        })
    }

    fn proc(pid: u32, state: ProcState, cpu: u64) -> ProcObs {
        ProcObs {
            pid,
            state,
            cpu_ticks: Some(cpu),
        }
    }

    fn obs(util: f64, holders: Vec<ProcObs>) -> DeviceObs {
        DeviceObs {
            utilization: Some(util),
            holders,
            ..Default::default()
        }
    }

    #[test]
    fn free_then_busy_then_free() {
        let mut t = tracker();
        let t0 = Instant::now();
        assert_eq!(t.observe("0", &obs(0.0, vec![]), t0), GpuState::Free);
        let p = vec![proc(1, ProcState::Alive, 10)];
        assert_eq!(t.observe("0", &obs(0.8, p), t0), GpuState::Busy);
        assert_eq!(t.observe("0", &obs(0.0, vec![]), t0), GpuState::Free);
    }

    #[test]
    fn held_and_unused_becomes_idle_after_the_threshold_only() {
        let mut t = tracker();
        let t0 = Instant::now();
        let held = || obs(0.01, vec![proc(1, ProcState::Alive, 10)]);
        assert_eq!(t.observe("0", &held(), t0), GpuState::Busy);
        assert_eq!(
            t.observe("0", &held(), t0 + Duration::from_secs(9)),
            GpuState::Busy
        );
        assert_eq!(
            t.observe("0", &held(), t0 + Duration::from_secs(10)),
            GpuState::Idle
        );
        assert_eq!(t.idle_state_since("0"), Some(t0 + Duration::from_secs(10)));
        // Work resumes: busy at once, and the idle clock restarts.
        let working = obs(0.5, vec![proc(1, ProcState::Alive, 11)]);
        assert_eq!(
            t.observe("0", &working, t0 + Duration::from_secs(11)),
            GpuState::Busy
        );
        assert_eq!(t.idle_state_since("0"), None);
        assert_eq!(
            t.observe("0", &held(), t0 + Duration::from_secs(12)),
            GpuState::Busy
        );
    }

    #[test]
    fn a_zombie_holder_makes_it_stuck() {
        let mut t = tracker();
        let t0 = Instant::now();
        let z = || obs(0.0, vec![proc(1, ProcState::Zombie, 10)]);
        assert_eq!(t.observe("0", &z(), t0), GpuState::Busy);
        assert_eq!(
            t.observe("0", &z(), t0 + Duration::from_secs(5)),
            GpuState::Stuck
        );
    }

    #[test]
    fn spinning_without_cpu_progress_is_stuck_with_progress_is_busy() {
        let mut t = tracker();
        let t0 = Instant::now();
        // A stopped process at full utilization: CPU time frozen.
        let frozen = || obs(1.0, vec![proc(1, ProcState::Stopped, 10)]);
        assert_eq!(t.observe("0", &frozen(), t0), GpuState::Busy);
        assert_eq!(
            t.observe("0", &frozen(), t0 + Duration::from_secs(1)),
            GpuState::Busy
        );
        assert_eq!(
            t.observe("0", &frozen(), t0 + Duration::from_secs(6)),
            GpuState::Stuck
        );
        // A healthy busy process: CPU time moves each sample.
        let mut t = tracker();
        for i in 0..10u64 {
            let o = obs(1.0, vec![proc(1, ProcState::Alive, 10 + i)]);
            assert_eq!(
                t.observe("0", &o, t0 + Duration::from_secs(i)),
                GpuState::Busy
            );
        }
    }

    #[test]
    fn lost_wins_and_a_fatal_xid_clears_after_its_window() {
        let mut t = tracker();
        let t0 = Instant::now();
        let failing = DeviceObs {
            failing: true,
            ..Default::default()
        };
        assert_eq!(t.observe("0", &failing, t0), GpuState::Lost);
        let xid = DeviceObs {
            fatal_xid: true,
            ..obs(0.5, vec![proc(1, ProcState::Alive, 1)])
        };
        assert_eq!(t.observe("1", &xid, t0), GpuState::Lost);
        let later = obs(0.5, vec![proc(1, ProcState::Alive, 2)]);
        assert_eq!(
            t.observe("1", &later, t0 + Duration::from_secs(59)),
            GpuState::Lost
        );
        assert_eq!(
            t.observe("1", &later, t0 + Duration::from_secs(60)),
            GpuState::Busy
        );
    }

    #[test]
    fn thresholds_are_validated() {
        let c = StatesConfig {
            idle_utilization: 1.5,
            ..Default::default()
        };
        assert_eq!(c.problems().len(), 2);
        assert!(StatesConfig::default().problems().is_empty());
    }
}
