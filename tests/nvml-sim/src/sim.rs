//! The simulated driver: device handles, derived readings (utilization,
//! power, energy, temperature, PCIe) from the state directory as `watch`
//! keeps it, and XID delivery. Safe Rust; `ffi` turns it into NVML's C API.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    energy::Energy,
    scenario::{self, COMPUTE_SLICES, Gpu, MigInstance, Scenario},
    state::{self, Registration, XidFault},
    watch::Watched,
    xid_wait::XidChanges,
};

/// Most GPUs a scenario may have (handles encode the index in 12 bits).
pub(crate) const MAX_GPUS: usize = 64;
/// What `nvmlDeviceGetMaxMigDeviceCount` reports (A100/H100: 7).
pub(crate) const MAX_MIG_DEVICES: u32 = 7;
/// `gpuInstanceId`/`computeInstanceId` of a process not in a MIG instance.
pub(crate) const NO_INSTANCE: u32 = 0xFFFF_FFFF;

/// NVML return codes (`nvmlReturn_t`).
pub(crate) mod code {
    pub(crate) const SUCCESS: u32 = 0;
    pub(crate) const UNINITIALIZED: u32 = 1;
    pub(crate) const INVALID_ARGUMENT: u32 = 2;
    pub(crate) const NOT_SUPPORTED: u32 = 3;
    pub(crate) const NOT_FOUND: u32 = 6;
    pub(crate) const INSUFFICIENT_SIZE: u32 = 7;
    pub(crate) const DRIVER_NOT_LOADED: u32 = 9;
    pub(crate) const TIMEOUT: u32 = 10;
    pub(crate) const GPU_IS_LOST: u32 = 15;
    pub(crate) const ARGUMENT_VERSION_MISMATCH: u32 = 25;
    pub(crate) const UNKNOWN: u32 = 999;
}

/// NVML event type bits.
pub(crate) mod event {
    pub(crate) const SINGLE_BIT_ECC: u64 = 0x1;
    pub(crate) const DOUBLE_BIT_ECC: u64 = 0x2;
    pub(crate) const PSTATE: u64 = 0x4;
    pub(crate) const XID_CRITICAL: u64 = 0x8;
    pub(crate) const CLOCK: u64 = 0x10;
    /// What every simulated physical GPU claims to support; only XIDs fire.
    pub(crate) const SUPPORTED: u64 =
        SINGLE_BIT_ECC | DOUBLE_BIT_ECC | PSTATE | XID_CRITICAL | CLOCK;
}

/// An `nvmlReturn_t` error code.
pub(crate) type Code = u32;

/// A device handle: a physical GPU or one of its MIG instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Handle {
    Gpu(u32),
    Mig(u32, u32),
}

const HANDLE_BASE: usize = 0x7A11_0000;

impl Handle {
    /// The opaque pointer value handed to C: stable for the life of the
    /// process, never dereferenced.
    pub(crate) fn to_raw(self) -> usize {
        match self {
            Handle::Gpu(g) => HANDLE_BASE + (g as usize) * 16,
            Handle::Mig(g, m) => HANDLE_BASE + (g as usize) * 16 + 1 + m as usize,
        }
    }

    fn from_raw(raw: usize) -> Option<Handle> {
        let off = raw.checked_sub(HANDLE_BASE)?;
        let (g, slot) = (off / 16, off % 16);
        if g >= MAX_GPUS {
            return None;
        }
        let g = g as u32;
        Some(match slot {
            0 => Handle::Gpu(g),
            s if s <= MAX_MIG_DEVICES as usize => Handle::Mig(g, s as u32 - 1),
            _ => return None,
        })
    }

    pub(crate) fn gpu(self) -> u32 {
        match self {
            Handle::Gpu(g) | Handle::Mig(g, _) => g,
        }
    }
}

/// A live registered process on a GPU.
#[derive(Debug, Clone)]
pub(crate) struct Proc {
    pub pid: u32,
    pub reg: Registration,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// Everything a device query can answer, computed at one instant: a pure
/// function of the handle, its GPU's live registrations and its health
/// (see [`View::new`]), so one view serves every query while those hold.
#[derive(Debug, Clone)]
pub(crate) struct View {
    /// Shared with the simulator: a view costs no copy of the GPU's strings.
    pub gpu: Arc<Gpu>,
    pub mig: Option<MigInstance>,
    /// Processes on this handle (the whole GPU for a physical handle), by pid.
    pub procs: Arc<[Proc]>,
    /// Utilization of the physical GPU, 0..=1.
    pub gpu_util: f64,
    /// Memory-bandwidth utilization of the physical GPU, 0..=1.
    pub gpu_mem_util: f64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    /// Power of the physical GPU now, mW.
    pub power_mw: u64,
    /// What the GPU reports about its own health (`health/<index>.toml`).
    pub health: Arc<state::Health>,
    /// The throttle bits of `health`, worked out when the file was read.
    pub health_throttle: u64,
}

impl View {
    /// The view of `h` (a handle of `gpu`) with `all`, the live
    /// registrations on `gpu`, and its health.
    fn new(
        gpu: Arc<Gpu>,
        h: Handle,
        all: &Arc<[Proc]>,
        (health, health_throttle): (Arc<state::Health>, u64),
    ) -> Result<View, Code> {
        let gpu_util = match &gpu.mig {
            None => all.iter().map(|p| p.reg.sm).sum::<f64>().min(1.0),
            Some(mig) => {
                mig.iter()
                    .map(|m| instance_util(all, m.index) * f64::from(m.compute_slices))
                    .sum::<f64>()
                    .min(f64::from(COMPUTE_SLICES))
                    / f64::from(COMPUTE_SLICES)
            }
        };
        let gpu_mem_util = all
            .iter()
            .map(|p| f64::from(mem_pct(p.reg.sm)) / 100.0)
            .sum::<f64>()
            .min(1.0);
        let power_mw = gpu.power_idle_mw
            + ((gpu.power_max_mw - gpu.power_idle_mw) as f64 * gpu_util).round() as u64;
        let (mig, procs, mem_total_mib) = match h {
            Handle::Gpu(_) => (None, Arc::clone(all), gpu.memory_mib),
            Handle::Mig(_, m) => {
                let inst = gpu.mig.as_ref().and_then(|v| v.get(m as usize)).cloned();
                let inst = inst.ok_or(code::INVALID_ARGUMENT)?;
                let procs = all
                    .iter()
                    .filter(|p| p.reg.mig == Some(m))
                    .cloned()
                    .collect();
                let total = inst.memory_mib;
                (Some(inst), procs, total)
            }
        };
        let used: u64 = procs.iter().map(|p: &Proc| p.reg.memory_mib).sum();
        Ok(View {
            health,
            health_throttle,
            mem_used_mib: used.min(mem_total_mib),
            gpu,
            mig,
            procs,
            gpu_util,
            gpu_mem_util,
            mem_total_mib,
            power_mw,
        })
    }

    pub(crate) fn is_mig_handle(&self) -> bool {
        self.mig.is_some()
    }

    /// Errors with NOT_SUPPORTED on MIG handles: the query is physical-only.
    pub(crate) fn physical(&self) -> Result<&Self, Code> {
        if self.is_mig_handle() {
            Err(code::NOT_SUPPORTED)
        } else {
            Ok(self)
        }
    }

    pub(crate) fn temperature_c(&self) -> u32 {
        let g = &self.gpu;
        let span = f64::from(g.temperature_max_c - g.temperature_idle_c);
        g.temperature_idle_c + (span * self.gpu_util).round() as u32
    }

    /// PCIe throughput, KB/s: RX (host to GPU) = 50 % of the link × utilization,
    /// TX (GPU to host) = 25 % of the link × utilization.
    pub(crate) fn pcie_kbps(&self, counter: u32) -> Option<u32> {
        let share = match counter {
            0 => 0.25,
            1 => 0.5,
            _ => return None,
        };
        Some((f64::from(self.gpu.pcie_max_kbps) * share * self.gpu_util).round() as u32)
    }

    /// (max SM/graphics MHz, memory MHz, video MHz) of the architecture.
    pub(crate) fn max_clocks(&self) -> (u32, u32, u32) {
        match self.gpu.arch {
            Some(scenario::Arch::Hopper | scenario::Arch::Blackwell) => (1980, 2619, 1755),
            Some(scenario::Arch::Ampere) => (1410, 1593, 1440),
            _ => (1740, 1750, 1500),
        }
    }

    /// Current clock of `clock_type` (0 graphics, 1 SM, 2 memory, 3 video):
    /// idle clocks at 0 % utilization, boost otherwise.
    pub(crate) fn clock_mhz(&self, clock_type: u32) -> Option<u32> {
        let (sm, mem, video) = self.max_clocks();
        let busy = self.gpu_util > 0.0;
        Some(match clock_type {
            0 | 1 if busy => sm,
            0 | 1 => 345,
            2 => mem,
            3 if busy => video,
            3 => 555,
            _ => return None,
        })
    }

    pub(crate) fn max_clock_mhz(&self, clock_type: u32) -> Option<u32> {
        let (sm, mem, video) = self.max_clocks();
        Some(match clock_type {
            0 | 1 => sm,
            2 => mem,
            3 => video,
            _ => return None,
        })
    }
}

/// One per-process utilization sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub pid: u32,
    pub time_stamp_us: u64,
    pub sm_pct: u32,
    pub mem_pct: u32,
}

/// An event set: which GPUs registered which event types, and what wakes
/// its waiters (with a state directory).
#[derive(Debug, Default)]
struct EventSet {
    registered: HashMap<u32, u64>,
    changes: Option<Arc<XidChanges>>,
}

/// A delivered event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub gpu: u32,
    pub event_type: u64,
    pub data: u64,
}

/// A handle's last view and the registrations it was computed from.
#[derive(Debug)]
struct Memo {
    /// `procs_on`'s list for the handle's GPU. Holding it keeps its
    /// allocation from being freed and reused, so a list at the same
    /// address is this list: the same registrations.
    all: Arc<[Proc]>,
    view: Arc<View>,
}

/// The initialized simulator.
#[derive(Debug)]
pub(crate) struct Sim {
    scenario: Scenario,
    /// The scenario's GPUs, shared with every [`View`].
    gpus: Vec<Arc<Gpu>>,
    state: Option<PathBuf>,
    /// The state directory as last read (with a state directory).
    watched: Option<Watched>,
    energy: Energy,
    /// Per handle, its view as last computed: the agent asks about 20
    /// questions per device per cycle, and recomputing utilization and the
    /// MIG instances' process lists from every registration for each was a
    /// visible part of its CPU in benchmarks.
    views: HashMap<Handle, Memo>,
    event_sets: HashMap<usize, EventSet>,
    next_set: usize,
    /// Allocated GPM samples by id (`crate::gpm`); `None` until filled.
    pub(crate) gpm_samples: HashMap<usize, Option<crate::gpm::Record>>,
    pub(crate) next_gpm: usize,
}

/// Global driver state: the init count and the simulator while initialized.
#[derive(Debug, Default)]
pub(crate) struct Driver {
    pub refcount: u32,
    pub sim: Option<Sim>,
}

static DRIVER: Mutex<Driver> = Mutex::new(Driver {
    refcount: 0,
    sim: None,
});

/// Locks the driver; a panic caught at the FFI boundary must not wedge it.
pub(crate) fn driver() -> MutexGuard<'static, Driver> {
    DRIVER.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Driver {
    /// `nvmlInit`: the first init reads the environment and the scenario;
    /// later ones only count.
    pub(crate) fn init(&mut self) -> Result<(), Code> {
        if self.refcount > 0 {
            self.refcount += 1;
            return Ok(());
        }
        let Some(path) = std::env::var_os(state::SCENARIO_ENV) else {
            eprintln!("nvml-sim: {}", scenario::ScenarioError::NotSet);
            return Err(code::DRIVER_NOT_LOADED);
        };
        let scenario = match scenario::load(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("nvml-sim: {e}");
                return Err(match e {
                    scenario::ScenarioError::Invalid { .. } => code::INVALID_ARGUMENT,
                    _ => code::UNKNOWN,
                });
            }
        };
        let state = std::env::var_os(state::STATE_ENV)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        self.sim = Some(Sim::new(scenario, state));
        self.refcount = 1;
        Ok(())
    }

    /// `nvmlShutdown`.
    pub(crate) fn shutdown(&mut self) -> Result<(), Code> {
        match self.refcount {
            0 => Err(code::UNINITIALIZED),
            1 => {
                self.refcount = 0;
                self.sim = None;
                Ok(())
            }
            _ => {
                self.refcount -= 1;
                Ok(())
            }
        }
    }

    pub(crate) fn sim(&mut self) -> Result<&mut Sim, Code> {
        self.sim.as_mut().ok_or(code::UNINITIALIZED)
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Sim {
    /// The simulator of `scenario`, with the state directory `state`.
    fn new(scenario: Scenario, state: Option<PathBuf>) -> Sim {
        let watched = state
            .clone()
            .map(|dir| Watched::new(dir, scenario.gpus.len()));
        Sim {
            gpus: scenario.gpus.iter().cloned().map(Arc::new).collect(),
            energy: Energy::new(state.clone()),
            watched,
            scenario,
            state,
            views: HashMap::new(),
            event_sets: HashMap::new(),
            next_set: 0,
            gpm_samples: HashMap::new(),
            next_gpm: 0,
        }
    }

    pub(crate) fn gpu_count(&self) -> u32 {
        self.gpus.len() as u32
    }

    fn gpu(&self, index: u32) -> Result<&Arc<Gpu>, Code> {
        self.gpus.get(index as usize).ok_or(code::INVALID_ARGUMENT)
    }

    /// Validates a raw handle from C.
    pub(crate) fn resolve(&self, raw: usize) -> Result<Handle, Code> {
        let h = Handle::from_raw(raw).ok_or(code::INVALID_ARGUMENT)?;
        let gpu = self.gpu(h.gpu())?;
        if let Handle::Mig(_, m) = h {
            let n = gpu.mig.as_ref().map_or(0, Vec::len);
            if m as usize >= n {
                return Err(code::INVALID_ARGUMENT);
            }
        }
        Ok(h)
    }

    pub(crate) fn handle_by_index(&self, index: u32) -> Result<Handle, Code> {
        self.gpu(index).map(|_| Handle::Gpu(index))
    }

    /// A GPU or MIG UUID to its handle.
    pub(crate) fn handle_by_uuid(&self, uuid: &str) -> Result<Handle, Code> {
        for g in &self.scenario.gpus {
            if g.uuid == uuid {
                return Ok(Handle::Gpu(g.index));
            }
            for m in g.mig.iter().flatten() {
                if m.uuid == uuid {
                    return Ok(Handle::Mig(g.index, m.index));
                }
            }
        }
        Err(code::NOT_FOUND)
    }

    /// Brings the copy of the state directory up to date: once per device
    /// query, before anything of it is read (`ffi::with_handle`).
    pub(crate) fn refresh(&mut self) {
        if let Some(w) = &mut self.watched {
            w.refresh(&self.scenario);
        }
    }

    /// Whether `hang/<gpu>` existed at the last refresh.
    pub(crate) fn hung(&self, gpu: u32) -> bool {
        self.watched.as_ref().is_some_and(|w| w.hung(gpu))
    }

    /// Returns GPU_IS_LOST when `lost/<gpu>` existed at the last refresh.
    pub(crate) fn lost_as_read(&self, gpu: u32) -> Result<(), Code> {
        match &self.watched {
            Some(w) if w.lost(gpu) => Err(code::GPU_IS_LOST),
            _ => Ok(()),
        }
    }

    /// Reads the state (as of the last refresh) for the device behind `h`,
    /// advances the GPU's energy integral, and returns every reading.
    /// GPU_IS_LOST for a lost GPU.
    ///
    /// The view is computed again only when the GPU's live registrations
    /// (`procs_on` hands out the same list while they hold) or its health
    /// changed since the handle's last one; the energy integral advances
    /// on every call, at the view's power.
    pub(crate) fn observe(&mut self, h: Handle) -> Result<Arc<View>, Code> {
        let g = h.gpu();
        self.gpu(g)?;
        self.lost_as_read(g)?;
        // Without a state directory, each call has a new empty list (and
        // default health): never the memo's, and nothing to save anyway.
        let all = match &mut self.watched {
            Some(w) => w.procs_on(g, &self.scenario),
            None => Arc::from([]),
        };
        let health = self
            .watched
            .as_ref()
            .map(|w| w.health(g))
            .unwrap_or_default();
        let view = match self.views.get(&h) {
            // The health file's throttle bits come and go with its Arc.
            Some(m) if Arc::ptr_eq(&m.all, &all) && Arc::ptr_eq(&m.view.health, &health.0) => {
                Arc::clone(&m.view)
            }
            _ => {
                let gpu = Arc::clone(self.gpu(g)?);
                let view = Arc::new(View::new(gpu, h, &all, health)?);
                let memo = Memo {
                    all,
                    view: Arc::clone(&view),
                };
                self.views.insert(h, memo);
                view
            }
        };
        let reset = self.watched.as_ref().is_some_and(|w| w.reset_pending(g));
        self.energy.advance(g, view.power_mw, reset)?;
        Ok(view)
    }

    /// GPU `gpu`'s energy counter, mJ, right after `observe` read `power_mw`.
    pub(crate) fn energy_mj(&mut self, gpu: u32, power_mw: u64) -> Result<u64, Code> {
        self.energy.read_mj(gpu, power_mw)
    }

    /// Per-process samples newer than `last_seen_us`. Samples are taken once
    /// per sampling period and stamped with the period's start.
    pub(crate) fn samples(&self, view: &View, last_seen_us: u64) -> Vec<Sample> {
        let period_us = u128::from(self.scenario.sample_period_ms) * 1000;
        let now_us = now_ns() / 1000;
        let ts = (now_us / period_us * period_us) as u64;
        if ts <= last_seen_us {
            return Vec::new();
        }
        view.procs
            .iter()
            .map(|p| Sample {
                pid: p.pid,
                time_stamp_us: ts,
                sm_pct: (p.reg.sm * 100.0).round() as u32,
                mem_pct: mem_pct(p.reg.sm),
            })
            .collect()
    }

    pub(crate) fn event_set_create(&mut self) -> usize {
        self.next_set += 1;
        let id = self.next_set;
        let changes = self.state.as_deref().map(|d| Arc::new(XidChanges::new(d)));
        self.event_sets.insert(
            id,
            EventSet {
                changes,
                ..EventSet::default()
            },
        );
        id
    }

    pub(crate) fn event_set_free(&mut self, id: usize) -> Result<(), Code> {
        self.event_sets
            .remove(&id)
            .map(|_| ())
            .ok_or(code::INVALID_ARGUMENT)
    }

    pub(crate) fn register_events(
        &mut self,
        h: Handle,
        types: u64,
        set: usize,
    ) -> Result<(), Code> {
        let Handle::Gpu(g) = h else {
            return Err(code::NOT_SUPPORTED);
        };
        self.lost_as_read(g)?;
        if types & !event::SUPPORTED != 0 {
            return Err(code::NOT_SUPPORTED);
        }
        let set = self
            .event_sets
            .get_mut(&set)
            .ok_or(code::INVALID_ARGUMENT)?;
        *set.registered.entry(g).or_insert(0) |= types;
        Ok(())
    }

    /// What wakes `set`'s waiters when an XID may have come; `None`
    /// without a state directory, where none ever comes.
    pub(crate) fn xid_changes(&self, set: usize) -> Result<Option<Arc<XidChanges>>, Code> {
        let set = self.event_sets.get(&set).ok_or(code::INVALID_ARGUMENT)?;
        Ok(set.changes.clone())
    }

    /// Claims the first pending XID for a GPU that `set` watches. Claiming is
    /// a rename to `*.delivered`, so each XID goes to exactly one waiter,
    /// across processes too.
    pub(crate) fn poll_xid(&mut self, set: usize) -> Result<Option<Event>, Code> {
        let watched: Vec<u32> = self
            .event_sets
            .get(&set)
            .ok_or(code::INVALID_ARGUMENT)?
            .registered
            .iter()
            .filter(|(_, t)| *t & event::XID_CRITICAL != 0)
            .map(|(g, _)| *g)
            .collect();
        let Some(dir) = self.state.clone() else {
            return Ok(None);
        };
        if watched.is_empty() {
            return Ok(None);
        }
        let Ok(entries) = fs::read_dir(state::xid_dir(&dir)) else {
            return Ok(None);
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "toml")
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        for path in files {
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let fault: XidFault = match state::parse_xid(&self.scenario, &text) {
                Ok(f) => f,
                Err(problem) => {
                    if let Some(w) = &mut self.watched {
                        let mtime = fs::metadata(&path).and_then(|m| m.modified()).ok();
                        w.report_once(&path, mtime, &problem);
                    }
                    continue;
                }
            };
            if !watched.contains(&fault.gpu) {
                continue;
            }
            let mut delivered = path.clone().into_os_string();
            delivered.push(state::DELIVERED_SUFFIX);
            if fs::rename(&path, &delivered).is_ok() {
                return Ok(Some(Event {
                    gpu: fault.gpu,
                    event_type: event::XID_CRITICAL,
                    data: fault.xid,
                }));
            }
        }
        Ok(None)
    }
}

/// SM activity of MIG instance `mig` (its position in the GPU's `mig`
/// list), 0..=1: min(1, Σ `sm` of `procs` on it). The one number behind
/// the physical load in MIG mode and GPM's instance samples.
pub(crate) fn instance_util(procs: &[Proc], mig: u32) -> f64 {
    procs
        .iter()
        .filter(|p| p.reg.mig == Some(mig))
        .map(|p| p.reg.sm)
        .sum::<f64>()
        .min(1.0)
}

/// Memory-bandwidth utilization attributed to a process: 60 % of its SM use.
fn mem_pct(sm: f64) -> u32 {
    (sm * 60.0).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip() {
        for h in [
            Handle::Gpu(0),
            Handle::Gpu(63),
            Handle::Mig(2, 0),
            Handle::Mig(5, 6),
        ] {
            assert_eq!(Handle::from_raw(h.to_raw()), Some(h));
        }
        assert_eq!(Handle::from_raw(0), None);
        assert_eq!(Handle::from_raw(HANDLE_BASE + 8), None);
        assert_eq!(Handle::from_raw(HANDLE_BASE + 64 * 16), None);
    }

    const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
mig = ["3g.40gb", "2g.20gb", "1g.10gb"]
"#;

    /// A simulator over a temporary state directory.
    struct Fixture {
        dir: tempfile::TempDir,
        sim: Sim,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let scenario = scenario::parse(Path::new("scenario.toml"), SCENARIO).unwrap();
            let sim = Sim::new(scenario, Some(dir.path().to_owned()));
            Fixture { dir, sim }
        }

        fn register(&self, pid: u32, gpu: u32, mig: Option<u32>, sm: f64, memory_mib: u64) {
            let reg = Registration {
                gpu,
                mig,
                memory_mib,
                sm,
                kind: state::ProcKind::Compute,
            };
            crate::register(self.dir.path(), pid, &reg).unwrap();
        }

        /// One device query's view, as `ffi::with_view` takes it.
        fn observe(&mut self, h: Handle) -> Arc<View> {
            self.sim.refresh();
            self.sim.observe(h).unwrap()
        }
    }

    fn pids(v: &View) -> Vec<u32> {
        v.procs.iter().map(|p| p.pid).collect()
    }

    /// `sleep 60`, killed and reaped on drop.
    struct Sleep(std::process::Child);

    impl Sleep {
        fn new() -> Sleep {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap();
            Sleep(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Sleep {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Idle 70 W, max 700 W: the power at `util`, mW.
    fn power_mw(util: f64) -> u64 {
        70_000 + (630_000.0 * util).round() as u64
    }

    #[test]
    fn a_view_is_shared_until_registrations_or_health_change() {
        let mut f = Fixture::new();
        let (a, b) = (Sleep::new(), Sleep::new());
        let gpu = Handle::Gpu(0);
        f.register(a.pid(), 0, None, 0.25, 1000);
        let v1 = f.observe(gpu);
        let v2 = f.observe(gpu);
        assert!(Arc::ptr_eq(&v1, &v2), "nothing changed: the same view");
        assert!(Arc::ptr_eq(&v1.procs, &v2.procs));
        assert_eq!(pids(&v2), vec![a.pid()]);
        assert_eq!(
            (v2.gpu_util, v2.gpu_mem_util, v2.mem_used_mib, v2.power_mw),
            (0.25, 0.15, 1000, power_mw(0.25))
        );

        // sm and memory changed: seen by the very next call.
        f.register(a.pid(), 0, None, 0.5, 2000);
        let v = f.observe(gpu);
        assert!(!Arc::ptr_eq(&v, &v2));
        assert_eq!(
            (v.gpu_util, v.mem_used_mib, v.power_mw),
            (0.5, 2000, power_mw(0.5))
        );

        // Only the memory changed.
        f.register(a.pid(), 0, None, 0.5, 3000);
        assert_eq!(f.observe(gpu).mem_used_mib, 3000);

        // Rewritten in place, same size: seen too.
        let file = state::proc_file(f.dir.path(), a.pid());
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.contains("sm = 0.5\n"), "{text}");
        fs::write(&file, text.replace("sm = 0.5\n", "sm = 0.7\n")).unwrap();
        let v = f.observe(gpu);
        assert_eq!((v.gpu_util, v.power_mw), (0.7, power_mw(0.7)));

        // Another process added, on the same GPU.
        f.register(b.pid(), 0, None, 0.25, 500);
        let v = f.observe(gpu);
        let mut both = vec![a.pid(), b.pid()];
        both.sort_unstable();
        assert_eq!(pids(&v), both);
        assert_eq!((v.mem_used_mib, v.power_mw), (3500, power_mw(0.95)));
        assert!(Arc::ptr_eq(&v, &f.observe(gpu)));

        // Registrations on another GPU leave this one's numbers alone.
        let c = Sleep::new();
        f.register(c.pid(), 1, Some(0), 1.0, 100);
        let after = f.observe(gpu);
        assert_eq!(pids(&after), both);
        assert_eq!((after.mem_used_mib, after.power_mw), (3500, power_mw(0.95)));

        // A reaped process is gone from the next call.
        drop(b);
        let v = f.observe(gpu);
        assert_eq!(pids(&v), vec![a.pid()]);
        assert_eq!((v.mem_used_mib, v.power_mw), (3000, power_mw(0.7)));

        // A health change: a new view, the same process list.
        let health = state::Health {
            ecc_uncorrected: 3,
            ..Default::default()
        };
        state::set_health(f.dir.path(), 0, &health).unwrap();
        let h = f.observe(gpu);
        assert!(!Arc::ptr_eq(&h, &v));
        assert!(Arc::ptr_eq(&h.procs, &v.procs));
        assert_eq!(h.health.ecc_uncorrected, 3);
        assert!(Arc::ptr_eq(&h, &f.observe(gpu)));
    }

    #[test]
    fn mig_handles_have_their_instances_processes() {
        let mut f = Fixture::new();
        let (c, d, e) = (Sleep::new(), Sleep::new(), Sleep::new());
        f.register(c.pid(), 1, Some(0), 0.5, 3000);
        f.register(d.pid(), 1, Some(2), 1.0, 500);
        f.register(e.pid(), 1, Some(0), 0.75, 100);
        let (gpu, m0, m1, m2) = (
            Handle::Gpu(1),
            Handle::Mig(1, 0),
            Handle::Mig(1, 1),
            Handle::Mig(1, 2),
        );
        let mut on_0 = vec![c.pid(), e.pid()];
        on_0.sort_unstable();
        let mut all = vec![c.pid(), d.pid(), e.pid()];
        all.sort_unstable();
        // Instance 0 is busy (capped at 1) on 3 slices, instance 2 on 1.
        let util = 4.0 / 7.0;
        let first = f.observe(m0);
        for _ in 0..2 {
            let v = f.observe(m0);
            assert!(Arc::ptr_eq(&v, &first), "each handle keeps its own view");
            assert_eq!(pids(&v), on_0);
            assert_eq!((v.mem_used_mib, v.power_mw), (3100, power_mw(util)));
            let v = f.observe(m1);
            assert_eq!(pids(&v), Vec::<u32>::new());
            assert_eq!(v.mem_used_mib, 0);
            let v = f.observe(m2);
            assert_eq!(pids(&v), vec![d.pid()]);
            assert_eq!((v.mem_used_mib, v.power_mw), (500, power_mw(util)));
            let v = f.observe(gpu);
            assert_eq!(pids(&v), all);
            assert_eq!((v.gpu_util, v.mem_used_mib), (util, 3600));
            assert!(v.mig.is_none());
        }

        // A registration on instance 2 changed: instance 0's processes are
        // the same, but the GPU's load (and power) is not.
        f.register(d.pid(), 1, Some(2), 0.5, 500);
        let v = f.observe(m0);
        assert!(!Arc::ptr_eq(&v, &first));
        assert_eq!(pids(&v), on_0);
        assert_eq!(v.power_mw, power_mw(3.5 / 7.0));
        let v = f.observe(m2);
        assert_eq!(v.procs[0].reg.sm, 0.5);
    }

    #[test]
    fn energy_advances_on_every_call() {
        let mut f = Fixture::new();
        let a = Sleep::new();
        f.register(a.pid(), 0, None, 0.5, 1000);
        let gpu = Handle::Gpu(0);
        let v1 = f.observe(gpu);
        let e1 = f.sim.energy_mj(0, v1.power_mw).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let v2 = f.observe(gpu);
        assert!(Arc::ptr_eq(&v1, &v2));
        let e2 = f.sim.energy_mj(0, v2.power_mw).unwrap();
        // 385 W for 50 ms at least: 19 250 mJ.
        assert!(e2 >= e1 + 19_250, "{e1} -> {e2}");

        // The reset marker is taken by the next call, memoized or not:
        // the counter restarts from 0.
        state::reset_energy(f.dir.path(), 0).unwrap();
        let v3 = f.observe(gpu);
        assert!(Arc::ptr_eq(&v3, &v2));
        assert!(!state::reset_file(f.dir.path(), 0).exists());
        let e3 = f.sim.energy_mj(0, v3.power_mw).unwrap();
        assert!(e3 < e2, "{e2} -> {e3}");

        // A MIG handle's call advances its GPU's counter too.
        let file = state::energy_file(f.dir.path(), 1);
        f.observe(Handle::Mig(1, 0));
        let stored = fs::read_to_string(&file).unwrap();
        let power: Vec<&str> = stored.split_whitespace().collect();
        assert_eq!(power[2], power_mw(0.0).to_string());
    }
}
