//! GPU sampling through NVML (`nvml-wrapper`): the one GPU code path.
//!
//! Each cycle, every GPU is read on its own worker thread ([`workers`],
//! [`read`]) with a deadline, so a driver call that hangs marks its GPU and
//! stalls nothing else; HTTP handlers never call NVML. The sampler then
//! attributes the processes to tenants, accumulates per-tenant counters
//! ([`crate::attribution`]) and sets each device's state
//! ([`crate::states`]). A device whose calls fail is marked and logged once;
//! the others carry on.

mod read;
mod workers;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nvml_wrapper::{Nvml, bitmasks::event::EventTypes, enums::event::XidError, error::NvmlError};
use tracing::{info, warn};

use self::{
    read::{RawDevice, RawProcess},
    workers::{Outcome, Workers},
};
use crate::{
    attribution::{Accounts, Holder, Share, split_interval},
    snapshot::{
        GpuHealth, GpuProcess, GpuSnapshot, NvmlStatus, TENANT_UNATTRIBUTED, TenantGpuUsage,
    },
    states::{DeviceObs, ProcObs, ProcState, StatesConfig, Tracker},
    tenants::Resolver,
};

/// How long one GPU's NVML calls may take in a cycle before the GPU is
/// marked (real MIG queries take up to ~100 ms each).
pub const DEFAULT_NVML_TIMEOUT: Duration = Duration::from_secs(5);

/// XID events, filled by the event thread, drained by the sampler.
#[derive(Debug, Default)]
pub struct XidLog {
    /// Events by device UUID and XID code since start.
    pub counts: HashMap<String, BTreeMap<u64, u64>>,
    /// Events not yet tied to the tenants holding the device.
    pub pending: Vec<(String, u64)>,
}

pub type XidCounts = Arc<Mutex<XidLog>>;

/// Opens NVML from `library`: a path, or a bare name for the loader.
pub fn open(library: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(library.as_os_str()).init()
}

/// What one sampling cycle produced.
#[derive(Debug, Default)]
pub struct Sample {
    pub nvml: NvmlStatus,
    pub gpus: Vec<GpuSnapshot>,
    pub tenant_gpu: Vec<TenantGpuUsage>,
}

/// Per-device memory between cycles.
#[derive(Debug, Default)]
struct DeviceState {
    last_at: Option<Instant>,
    last_energy_mj: Option<u64>,
    /// Newest per-process utilization sample consumed (µs): no sample is
    /// counted twice.
    util_cursor: u64,
    /// Last SM ratio per pid: NVML samples at its own period, so a cycle
    /// may bring no new sample; utilization is a rate, so it is held.
    last_sm: HashMap<u32, f64>,
    /// Last power seen while nobody held the device: its idle draw.
    idle_power_watts: Option<f64>,
    pcie_tx_bytes: f64,
    pcie_rx_bytes: f64,
    /// The error last logged, so each distinct failure is logged once.
    logged_error: Option<String>,
    /// Identity from the last good sample, for a device that fails now.
    uuid: String,
    model: String,
    /// MIG instances from the last good sample, so a lost GPU's instances
    /// are reported lost rather than vanishing.
    instances: Vec<GpuSnapshot>,
}

/// The GPU sampler: owns the NVML handle, the readers and running totals.
pub struct Sampler {
    library: PathBuf,
    timeout: Duration,
    nvml: Option<&'static Nvml>,
    nvml_error_logged: bool,
    workers: Workers,
    devices: Vec<DeviceState>,
    accounts: Accounts,
    xids: XidCounts,
    events_started: bool,
    stop: Arc<AtomicBool>,
    states: Tracker,
    fatal_xids: BTreeSet<u64>,
    /// XIDs by (device label, tenant holding it at the time).
    xid_tenants: BTreeMap<(String, String), BTreeMap<u64, u64>>,
}

impl Sampler {
    pub fn new(library: PathBuf, states: StatesConfig, stop: Arc<AtomicBool>) -> Self {
        Self {
            library,
            timeout: DEFAULT_NVML_TIMEOUT,
            nvml: None,
            nvml_error_logged: false,
            workers: Workers::default(),
            devices: Vec::new(),
            accounts: Accounts::default(),
            xids: XidCounts::default(),
            events_started: false,
            stop,
            fatal_xids: states.fatal_xids.clone(),
            states: Tracker::new(states),
            xid_tenants: BTreeMap::new(),
        }
    }

    /// Sets how long a GPU's reads may take per cycle.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// NVML, opened on first use and retried each cycle until it opens.
    fn nvml(&mut self) -> Result<&'static Nvml, String> {
        if let Some(nvml) = self.nvml {
            return Ok(nvml);
        }
        match open(&self.library) {
            Ok(nvml) => {
                // The handle lives as long as the agent; leaking it lets the
                // reader and event threads share it without lifetimes.
                let nvml: &'static Nvml = Box::leak(Box::new(nvml));
                info!(library = %self.library.display(), "NVML opened");
                self.nvml = Some(nvml);
                self.nvml_error_logged = false;
                Ok(nvml)
            }
            Err(e) => {
                let msg = format!(
                    "cannot open NVML from `{}`: {e}; install the NVIDIA driver or point \
                     --nvml-lib (or [agent] nvml_lib) at libnvidia-ml.so.1",
                    self.library.display()
                );
                if !self.nvml_error_logged {
                    warn!("{msg}");
                    self.nvml_error_logged = true;
                }
                Err(msg)
            }
        }
    }

    /// One full cycle: every device, its processes, and attribution.
    pub fn sample(&mut self, resolver: &mut Resolver) -> Sample {
        let mut status = NvmlStatus {
            up: false,
            library: self.library.display().to_string(),
            driver_version: None,
            error: None,
        };
        let nvml = match self.nvml() {
            Ok(n) => n,
            Err(e) => {
                status.error = Some(e);
                return self.finish(status, Vec::new());
            }
        };
        status.up = true;
        status.driver_version = nvml.sys_driver_version().ok();
        if !self.events_started {
            self.events_started = true;
            spawn_xid_thread(nvml, self.xids.clone(), self.stop.clone());
        }
        let count = match nvml.device_count() {
            Ok(c) => c as usize,
            Err(e) => {
                status.error = Some(format!("nvmlDeviceGetCount failed: {e}"));
                return self.finish(status, Vec::new());
            }
        };
        self.devices
            .resize_with(count.max(self.devices.len()), Default::default);
        let cursors: Vec<u64> = self.devices[..count]
            .iter()
            .map(|d| d.util_cursor)
            .collect();
        let outcomes = self.workers.read_all(nvml, &cursors, self.timeout);

        let mut gpus = Vec::new();
        for (index, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Read(raw) => self.account(index, *raw, resolver, &mut gpus),
                Outcome::Failed(e) => {
                    let health = if matches!(e, NvmlError::GpuLost) {
                        GpuHealth::Lost
                    } else {
                        GpuHealth::Error
                    };
                    self.mark_failed(index, health, format!("NVML: {e}"), &mut gpus);
                }
                Outcome::Hung { since } => {
                    let reason = format!(
                        "NVML calls timed out (no answer for {:.1}s, limit {:?})",
                        since.as_secs_f64(),
                        self.timeout
                    );
                    self.mark_failed(index, GpuHealth::Error, reason, &mut gpus);
                }
            }
        }
        self.finish(status, gpus)
    }

    fn finish(&mut self, nvml: NvmlStatus, mut gpus: Vec<GpuSnapshot>) -> Sample {
        for g in &mut gpus {
            g.observed_seconds_total = self.accounts.observed_seconds(&g.gpu);
            g.xid_errors_total = self.xid_counts(&g.uuid);
        }
        let fatal = self.tie_xids_to_tenants(&mut gpus);
        self.update_states(&mut gpus, &fatal);
        Sample {
            nvml,
            gpus,
            tenant_gpu: self.accounts.rows(),
        }
    }

    /// A device whose read failed or hung: reported with its last known
    /// identity (and its MIG instances), its interval not accounted.
    fn mark_failed(
        &mut self,
        index: usize,
        health: GpuHealth,
        reason: String,
        out: &mut Vec<GpuSnapshot>,
    ) {
        let label = index.to_string();
        let state = &mut self.devices[index];
        log_once(state, &label, &reason);
        // The next good sample starts a fresh interval; the energy counter
        // reading is kept, so what the GPU drew meanwhile is not lost.
        state.last_at = None;
        out.push(GpuSnapshot {
            gpu: label,
            uuid: state.uuid.clone(),
            model: state.model.clone(),
            health,
            error: Some(reason.clone()),
            ..Default::default()
        });
        out.extend(state.instances.iter().map(|i| GpuSnapshot {
            health,
            error: Some(reason.clone()),
            ..i.clone()
        }));
    }

    /// Turns one good read into snapshots and accounts its interval.
    fn account(
        &mut self,
        index: usize,
        raw: RawDevice,
        resolver: &mut Resolver,
        out: &mut Vec<GpuSnapshot>,
    ) {
        let label = index.to_string();
        let state = &mut self.devices[index];
        if state.logged_error.take().is_some() {
            info!(gpu = %label, "GPU answers again");
        }
        state.uuid.clone_from(&raw.uuid);
        state.model.clone_from(&raw.model);

        let seconds = state.last_at.map(|t| (raw.read_at - t).as_secs_f64());
        state.last_at = Some(raw.read_at);
        let energy_delta_j = match (state.last_energy_mj, raw.energy_mj) {
            // A counter that went backwards (driver reload) restarts.
            (Some(prev), Some(cur)) if cur >= prev => Some((cur - prev) as f64 / 1000.0),
            _ => None,
        };
        state.last_energy_mj = raw.energy_mj;
        if let (None, Some(energy)) = (seconds, energy_delta_j) {
            // Energy drawn while the GPU could not be read: no tenant can
            // be told apart for it, so it is `_unattributed`, not dropped.
            let gap = BTreeMap::from([(
                TENANT_UNATTRIBUTED.to_owned(),
                Share {
                    energy_joules: energy,
                    ..Default::default()
                },
            )]);
            self.accounts.add(&label, &raw.uuid, 0.0, &gap);
        }
        if let (Some(dt), Some((tx, rx))) = (seconds, raw.pcie_kbps) {
            state.pcie_tx_bytes += f64::from(tx) * 1024.0 * dt;
            state.pcie_rx_bytes += f64::from(rx) * 1024.0 * dt;
        }
        let mut snap = GpuSnapshot {
            gpu: label.clone(),
            uuid: raw.uuid.clone(),
            model: raw.model.clone(),
            mig_mode: raw.mig_mode,
            utilization_ratio: raw.utilization,
            memory_used_bytes: raw.memory_used,
            memory_total_bytes: raw.memory_total,
            power_watts: raw.power_watts,
            temperature_celsius: raw.temperature_celsius,
            energy_joules_total: raw.energy_mj.map(|mj| mj as f64 / 1000.0),
            pcie_tx_bytes_total: raw.pcie_kbps.map(|_| state.pcie_tx_bytes),
            pcie_rx_bytes_total: raw.pcie_kbps.map(|_| state.pcie_rx_bytes),
            ..Default::default()
        };

        if raw.mig_mode {
            let instances: Vec<GpuSnapshot> = raw
                .instances
                .iter()
                .map(|i| GpuSnapshot {
                    gpu: format!("{index}/{}/{}", i.gi, i.ci),
                    uuid: i.uuid.clone(),
                    model: raw.model.clone(),
                    mig_mode: true,
                    mig_profile: i.profile.clone(),
                    parent_uuid: Some(raw.uuid.clone()),
                    slice_fraction: Some(i.slice_fraction),
                    memory_used_bytes: i.memory_used,
                    memory_total_bytes: i.memory_total,
                    processes: attribute(&i.processes, &i.uuid, resolver),
                    ..Default::default()
                })
                .collect();
            state.instances = instances
                .iter()
                .map(|i| GpuSnapshot {
                    processes: Vec::new(),
                    memory_used_bytes: 0,
                    ..i.clone()
                })
                .collect();
            if instances.iter().all(|i| i.processes.is_empty()) {
                state.idle_power_watts = raw.power_watts;
            }
            if let (Some(dt), Some(energy)) = (seconds, energy_delta_j) {
                let mut occupied = 0.0;
                for inst in &instances {
                    let fraction = inst.slice_fraction.unwrap_or(0.0);
                    occupied += fraction;
                    let holders = holders_of(&inst.processes);
                    // NVML has no per-process utilization on MIG: no SM split.
                    let shares = split_interval(dt, &holders, energy * fraction, None, false);
                    self.accounts.add(&inst.gpu, &inst.uuid, dt, &shares);
                }
                // Slices carved into no instance are idle capacity, on the
                // parent, in GPU-equivalent seconds: priced like the rest,
                // the parent and its instances add up to the whole GPU.
                let unoccupied = (1.0 - occupied).max(0.0);
                let idle = split_interval(dt * unoccupied, &[], energy * unoccupied, None, false);
                self.accounts.add(&label, &raw.uuid, dt * unoccupied, &idle);
            }
            out.push(snap);
            out.extend(instances);
            return;
        }

        // Average SM per pid over the new samples; hold the last value for
        // processes without one this cycle.
        let mut fresh: HashMap<u32, (f64, u32)> = HashMap::new();
        for &(pid, ts, sm) in &raw.sm_samples {
            state.util_cursor = state.util_cursor.max(ts);
            let e = fresh.entry(pid).or_default();
            e.0 += sm;
            e.1 += 1;
        }
        snap.processes = attribute(&raw.processes, &raw.uuid, resolver)
            .into_iter()
            .map(|mut p| {
                p.sm_ratio = fresh
                    .get(&p.pid)
                    .map(|(sum, n)| sum / f64::from(*n))
                    .or_else(|| state.last_sm.get(&p.pid).copied());
                p
            })
            .collect();
        state.last_sm = snap
            .processes
            .iter()
            .filter_map(|p| Some((p.pid, p.sm_ratio?)))
            .collect();
        if snap.processes.is_empty() {
            state.idle_power_watts = raw.power_watts;
        }
        if let (Some(dt), Some(energy)) = (seconds, energy_delta_j) {
            let holders = holders_of(&snap.processes);
            let shares = split_interval(dt, &holders, energy, state.idle_power_watts, true);
            self.accounts.add(&label, &raw.uuid, dt, &shares);
        }
        out.push(snap);
    }

    fn xid_counts(&self, uuid: &str) -> BTreeMap<u64, u64> {
        self.xids
            .lock()
            .map(|x| x.counts.get(uuid).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Ties XIDs that arrived since the last cycle to the tenants holding
    /// their device now; returns the UUIDs that had a fatal one.
    fn tie_xids_to_tenants(&mut self, gpus: &mut [GpuSnapshot]) -> HashSet<String> {
        let pending = self
            .xids
            .lock()
            .map(|mut x| std::mem::take(&mut x.pending))
            .unwrap_or_default();
        let mut fatal = HashSet::new();
        for (uuid, xid) in pending {
            if self.fatal_xids.contains(&xid) {
                fatal.insert(uuid.clone());
            }
            let Some(device) = gpus.iter().find(|g| g.uuid == uuid) else {
                continue;
            };
            let gpu = device.gpu.clone();
            let tenants: BTreeSet<String> = holders_of_device(gpus, &uuid)
                .map(|p| p.tenant.clone())
                .collect();
            warn!(
                gpu = %gpu,
                gpu_uuid = %uuid,
                xid,
                tenants = ?tenants,
                "XID error on a GPU held by these tenants"
            );
            for tenant in tenants {
                *self
                    .xid_tenants
                    .entry((gpu.clone(), tenant))
                    .or_default()
                    .entry(xid)
                    .or_default() += 1;
            }
        }
        for g in gpus.iter_mut() {
            g.xid_errors_by_tenant = self
                .xid_tenants
                .range((g.gpu.clone(), String::new())..)
                .take_while(|((gpu, _), _)| *gpu == g.gpu)
                .map(|((_, tenant), counts)| (tenant.clone(), counts.clone()))
                .collect();
        }
        fatal
    }

    /// Sets each device's state from what was sampled and the holders'
    /// process states.
    fn update_states(&mut self, gpus: &mut [GpuSnapshot], fatal: &HashSet<String>) {
        let now = Instant::now();
        let parents: HashMap<String, (Option<f64>, bool)> = gpus
            .iter()
            .filter(|g| g.parent_uuid.is_none())
            .map(|g| {
                (
                    g.uuid.clone(),
                    (g.utilization_ratio, fatal.contains(&g.uuid)),
                )
            })
            .collect();
        // A process on a MIG instance holds its parent too: read each
        // process's /proc/<pid>/stat once per cycle, not once per device.
        let mut procs: HashMap<u32, ProcObs> = HashMap::new();
        for p in gpus.iter().flat_map(|g| g.processes.iter()) {
            procs.entry(p.pid).or_insert_with(|| process_obs(p.pid));
        }
        let mut states = Vec::with_capacity(gpus.len());
        for g in gpus.iter() {
            let parent = g.parent_uuid.as_ref().and_then(|p| parents.get(p));
            let holders: Vec<ProcObs> = holders_of_device(gpus, &g.uuid)
                .filter_map(|p| procs.get(&p.pid).copied())
                .collect();
            let obs = DeviceObs {
                failing: g.health != GpuHealth::Ok,
                // NVML has no utilization for a MIG instance: when its
                // whole parent does nothing, neither does the instance.
                utilization: g.utilization_ratio.or_else(|| parent.and_then(|p| p.0)),
                holders,
                fatal_xid: fatal.contains(&g.uuid) || parent.is_some_and(|p| p.1),
            };
            states.push(self.states.observe(&g.gpu, &obs, now));
        }
        for (g, state) in gpus.iter_mut().zip(states) {
            g.state = state;
        }
    }
}

/// Processes holding the device `uuid`: its own, or for a physical GPU in
/// MIG mode, those of all its instances.
fn holders_of_device<'a>(
    gpus: &'a [GpuSnapshot],
    uuid: &'a str,
) -> impl Iterator<Item = &'a GpuProcess> + 'a {
    gpus.iter()
        .filter(move |g| g.uuid == uuid || g.parent_uuid.as_deref() == Some(uuid))
        .flat_map(|g| g.processes.iter())
}

/// What `/proc/<pid>/stat` says about a holder.
fn process_obs(pid: u32) -> ProcObs {
    let stat = procfs::process::Process::new(pid as i32).and_then(|p| p.stat());
    match stat {
        Err(_) => ProcObs {
            pid,
            state: ProcState::Gone,
            cpu_ticks: None,
        },
        Ok(st) => ProcObs {
            pid,
            state: match st.state {
                'Z' | 'X' => ProcState::Zombie,
                'D' => ProcState::DiskSleep,
                'T' | 't' => ProcState::Stopped,
                _ => ProcState::Alive,
            },
            cpu_ticks: Some(st.utime + st.stime),
        },
    }
}

fn log_once(state: &mut DeviceState, gpu: &str, reason: &str) {
    if state.logged_error.as_deref() != Some(reason) {
        warn!(
            gpu,
            reason, "GPU marked unhealthy; other GPUs are still sampled"
        );
        state.logged_error = Some(reason.to_owned());
    }
}

fn holders_of(processes: &[GpuProcess]) -> Vec<Holder<'_>> {
    processes
        .iter()
        .map(|p| Holder {
            tenant: &p.tenant,
            memory_bytes: p.memory_bytes,
            sm_ratio: p.sm_ratio,
        })
        .collect()
}

/// NVML's processes with their tenants; `device` is the UUID of the GPU or
/// MIG instance they run on (Kubernetes tenants join the kubelet's device
/// assignments on it).
fn attribute(processes: &[RawProcess], device: &str, resolver: &mut Resolver) -> Vec<GpuProcess> {
    processes
        .iter()
        .map(|p| {
            let attribution = resolver.attribute_on(p.pid, Some(device));
            GpuProcess {
                pid: p.pid,
                tenant: attribution.tenant,
                cgroup: attribution.cgroup,
                memory_bytes: p.memory_bytes,
                sm_ratio: None,
                workload: attribution.workload,
            }
        })
        .collect()
}

/// Waits for XID events on every GPU and counts them by device UUID. The
/// counts only grow: an XID never "sticks" as a gauge would.
fn spawn_xid_thread(nvml: &'static Nvml, xids: XidCounts, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("tally-xid".into())
        .spawn(move || {
            let Ok(mut set) = nvml.create_event_set() else {
                warn!("NVML event sets unavailable: XID errors will not be counted");
                return;
            };
            let count = nvml.device_count().unwrap_or(0);
            for index in 0..count {
                let Ok(device) = nvml.device_by_index(index) else {
                    continue;
                };
                set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(set) => set,
                    Err(e) => {
                        warn!(gpu = index, error = %e.error, "cannot watch XID events");
                        return;
                    }
                };
            }
            while !stop.load(Ordering::Relaxed) {
                match set.wait(500) {
                    Ok(event) => {
                        let Some(XidError::Value(xid)) = event.event_data else {
                            continue;
                        };
                        let uuid = event.device.uuid().unwrap_or_default();
                        if let Ok(mut x) = xids.lock() {
                            *x.counts
                                .entry(uuid.clone())
                                .or_default()
                                .entry(xid)
                                .or_default() += 1;
                            x.pending.push((uuid, xid));
                        }
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(e) => {
                        warn!(error = %e, "XID event wait failed; retrying in 1s");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the XID thread");
    }
}

/// The file the loader would open for a bare library name, for messages.
pub fn describe_library(library: &Path) -> String {
    if library.components().count() > 1 || library.is_absolute() {
        library.display().to_string()
    } else {
        format!(
            "{} (found through the dynamic loader)",
            OsStr::new(library).to_string_lossy()
        )
    }
}
