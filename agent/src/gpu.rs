//! GPU sampling through NVML (`nvml-wrapper`): the one GPU code path.
//!
//! The sampler runs on its own thread (NVML calls block, and MIG queries can
//! take tens of milliseconds on real hardware); HTTP handlers never call
//! NVML. Each cycle reads every GPU and MIG instance, attributes their
//! processes to tenants and accumulates per-tenant counters
//! ([`crate::attribution`]). A device whose calls fail is marked and logged
//! once; the others carry on.

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

use nvml_wrapper::{
    Device, Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::device::{PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
};
use tracing::{info, warn};

use crate::{
    attribution::{Accounts, Holder, split_interval},
    snapshot::{GpuHealth, GpuProcess, GpuSnapshot, NvmlStatus, TenantGpuUsage},
    states::{DeviceObs, ProcObs, ProcState, StatesConfig, Tracker},
    tenants::Resolver,
};

/// Compute slices of a full A100/H100 when NVML does not say.
const DEFAULT_COMPUTE_SLICES: u32 = 7;

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
    last_util_ts_us: u64,
    /// Last power seen while nobody held the device: its idle draw.
    idle_power_watts: Option<f64>,
    /// Last SM ratio per pid: NVML samples at its own period, so a cycle
    /// may bring no new sample; utilization is a rate, so it is held.
    last_sm: HashMap<u32, f64>,
    pcie_tx_bytes: f64,
    pcie_rx_bytes: f64,
    /// The error last logged, so each distinct failure is logged once.
    logged_error: Option<String>,
    /// Identity from the last good sample, for a device that is lost now.
    uuid: String,
    model: String,
    /// MIG instances from the last good sample, so a lost GPU's instances
    /// are reported lost rather than vanishing.
    instances: Vec<GpuSnapshot>,
}

/// The GPU sampler: owns the NVML handle and the running totals.
pub struct Sampler {
    library: PathBuf,
    nvml: Option<&'static Nvml>,
    nvml_error_logged: bool,
    devices: HashMap<String, DeviceState>,
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
            nvml: None,
            nvml_error_logged: false,
            devices: HashMap::new(),
            accounts: Accounts::default(),
            xids: XidCounts::default(),
            events_started: false,
            stop,
            fatal_xids: states.fatal_xids.clone(),
            states: Tracker::new(states),
            xid_tenants: BTreeMap::new(),
        }
    }

    /// NVML, opened on first use and retried each cycle until it opens.
    fn nvml(&mut self) -> Result<&'static Nvml, String> {
        if let Some(nvml) = self.nvml {
            return Ok(nvml);
        }
        match open(&self.library) {
            Ok(nvml) => {
                // The handle lives as long as the agent; leaking it lets the
                // event thread and the sampler share it without lifetimes.
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
                return Sample {
                    nvml: status,
                    gpus: Vec::new(),
                    tenant_gpu: self.accounts.rows(),
                };
            }
        };
        status.up = true;
        status.driver_version = nvml.sys_driver_version().ok();
        if !self.events_started {
            self.events_started = true;
            spawn_xid_thread(nvml, self.xids.clone(), self.stop.clone());
        }

        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                status.error = Some(format!("nvmlDeviceGetCount failed: {e}"));
                return Sample {
                    nvml: status,
                    gpus: Vec::new(),
                    tenant_gpu: self.accounts.rows(),
                };
            }
        };
        let mut gpus = Vec::new();
        for index in 0..count {
            self.sample_device(nvml, index, resolver, &mut gpus);
        }
        for g in &mut gpus {
            g.observed_seconds_total = self.accounts.observed_seconds(&g.gpu);
        }
        let fatal = self.tie_xids_to_tenants(&mut gpus);
        self.update_states(&mut gpus, &fatal);
        Sample {
            nvml: status,
            gpus,
            tenant_gpu: self.accounts.rows(),
        }
    }

    /// Samples GPU `index` and, in MIG mode, its instances into `out`.
    fn sample_device(
        &mut self,
        nvml: &'static Nvml,
        index: u32,
        resolver: &mut Resolver,
        out: &mut Vec<GpuSnapshot>,
    ) {
        let label = index.to_string();
        let now = Instant::now();
        let read = nvml
            .device_by_index(index)
            .and_then(|device| read_physical(&device).map(|snap| (device, snap)));
        let (device, mut snap) = match read {
            Ok(v) => v,
            Err(e) => {
                let state = self.devices.entry(label.clone()).or_default();
                let health = if matches!(e, NvmlError::GpuLost) {
                    GpuHealth::Lost
                } else {
                    GpuHealth::Error
                };
                let reason = format!("NVML: {e}");
                log_once(state, &label, &reason);
                // The interval in which a device failed is not accounted:
                // its next good sample starts a fresh interval.
                state.last_at = None;
                state.last_energy_mj = None;
                let (uuid, model) = (state.uuid.clone(), state.model.clone());
                let instances: Vec<GpuSnapshot> = state
                    .instances
                    .iter()
                    .map(|i| GpuSnapshot {
                        health,
                        error: Some(reason.clone()),
                        ..i.clone()
                    })
                    .collect();
                let xid_errors_total = self.xid_counts(&uuid);
                out.push(GpuSnapshot {
                    gpu: label,
                    uuid,
                    model,
                    health,
                    error: Some(reason),
                    xid_errors_total,
                    ..Default::default()
                });
                out.extend(instances);
                return;
            }
        };
        snap.gpu = label.clone();
        snap.xid_errors_total = self.xid_counts(&snap.uuid);

        let state = self.devices.entry(label.clone()).or_default();
        if state.logged_error.take().is_some() {
            info!(gpu = %label, "GPU answers again");
        }
        state.uuid.clone_from(&snap.uuid);
        state.model.clone_from(&snap.model);
        let seconds = state.last_at.map(|t| (now - t).as_secs_f64());
        state.last_at = Some(now);
        let energy_mj = device.total_energy_consumption().ok();
        let energy_delta_j = match (state.last_energy_mj, energy_mj) {
            // A counter that went backwards (driver reload) restarts.
            (Some(prev), Some(cur)) if cur >= prev => Some((cur - prev) as f64 / 1000.0),
            _ => None,
        };
        state.last_energy_mj = energy_mj;
        snap.energy_joules_total = energy_mj.map(|mj| mj as f64 / 1000.0);
        if let Some(dt) = seconds {
            let kb = |c| device.pcie_throughput(c).map(|v| v as f64 * 1024.0 * dt);
            state.pcie_tx_bytes += kb(PcieUtilCounter::Send).unwrap_or(0.0);
            state.pcie_rx_bytes += kb(PcieUtilCounter::Receive).unwrap_or(0.0);
        }
        snap.pcie_tx_bytes_total = Some(state.pcie_tx_bytes);
        snap.pcie_rx_bytes_total = Some(state.pcie_rx_bytes);

        if snap.mig_mode {
            let instances = read_mig_instances(&device, index, resolver);
            state.instances = instances
                .iter()
                .map(|i| GpuSnapshot {
                    gpu: i.gpu.clone(),
                    uuid: i.uuid.clone(),
                    model: i.model.clone(),
                    mig_mode: true,
                    mig_profile: i.mig_profile.clone(),
                    parent_uuid: i.parent_uuid.clone(),
                    slice_fraction: i.slice_fraction,
                    memory_total_bytes: i.memory_total_bytes,
                    ..Default::default()
                })
                .collect();
            let held = instances.iter().any(|i| !i.processes.is_empty());
            if !held {
                state.idle_power_watts = snap.power_watts;
            }
            if let (Some(dt), Some(energy)) = (seconds, energy_delta_j) {
                let mut occupied = 0.0;
                for inst in &instances {
                    let fraction = inst.slice_fraction.unwrap_or(0.0);
                    occupied += fraction;
                    let holders = holders_of(&inst.processes);
                    let shares = split_interval(dt, &holders, energy * fraction, None, false);
                    self.accounts.add(&inst.gpu, &inst.uuid, dt, &shares);
                }
                let unoccupied = (1.0 - occupied).max(0.0) * energy;
                self.accounts
                    .add_idle_energy(&label, &snap.uuid, unoccupied);
            }
            out.push(snap);
            out.extend(instances);
            return;
        }

        let processes = read_processes(&device, resolver);
        let utilization = read_process_utilization(&device, state);
        snap.processes = processes
            .into_iter()
            .map(|mut p| {
                p.sm_ratio = utilization
                    .get(&p.pid)
                    .or_else(|| state.last_sm.get(&p.pid))
                    .copied();
                p
            })
            .collect();
        state.last_sm = snap
            .processes
            .iter()
            .filter_map(|p| Some((p.pid, p.sm_ratio?)))
            .collect();
        if snap.processes.is_empty() {
            state.idle_power_watts = snap.power_watts;
        }
        if let (Some(dt), Some(energy)) = (seconds, energy_delta_j) {
            let holders = holders_of(&snap.processes);
            let shares = split_interval(dt, &holders, energy, state.idle_power_watts, true);
            self.accounts.add(&label, &snap.uuid, dt, &shares);
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
        let mut states = Vec::with_capacity(gpus.len());
        for g in gpus.iter() {
            let parent = g.parent_uuid.as_ref().and_then(|p| parents.get(p));
            let holders: Vec<ProcObs> = holders_of_device(gpus, &g.uuid)
                .map(|p| process_obs(p.pid))
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

/// Device-level gauges of a physical GPU. Fails only on calls every GPU
/// answers (UUID, name, memory); optional ones become `None`.
fn read_physical(device: &Device<'_>) -> Result<GpuSnapshot, NvmlError> {
    let uuid = device.uuid()?;
    let model = device.name()?;
    let memory = device.memory_info()?;
    let mig_mode = device.mig_mode().map(|m| m.current == 1).unwrap_or(false);
    let utilization_ratio = match device.utilization_rates() {
        Ok(u) => Some(f64::from(u.gpu) / 100.0),
        Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
        Err(_) => None,
    };
    Ok(GpuSnapshot {
        uuid,
        model,
        mig_mode,
        utilization_ratio,
        memory_used_bytes: memory.used,
        memory_total_bytes: memory.total,
        power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        temperature_celsius: device
            .temperature(TemperatureSensor::Gpu)
            .ok()
            .map(f64::from),
        ..Default::default()
    })
}

/// Compute processes on a device (or MIG instance), attributed to tenants.
fn read_processes(device: &Device<'_>, resolver: &mut Resolver) -> Vec<GpuProcess> {
    let Ok(list) = device.running_compute_processes() else {
        return Vec::new();
    };
    // Kubernetes tenants join the kubelet's device list on this UUID.
    let uuid = device.uuid().ok();
    list.into_iter()
        .map(|p| {
            let attribution = resolver.attribute_on(p.pid, uuid.as_deref());
            GpuProcess {
                pid: p.pid,
                tenant: attribution.tenant,
                cgroup: attribution.cgroup,
                workload: attribution.workload,
                memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
                sm_ratio: None,
            }
        })
        .collect()
}

/// Average SM utilization per pid over the samples NVML took since the
/// last cycle. The timestamp cursor makes sure no sample counts twice.
fn read_process_utilization(device: &Device<'_>, state: &mut DeviceState) -> HashMap<u32, f64> {
    let samples = match device.process_utilization_stats(state.last_util_ts_us) {
        Ok(s) => s,
        // NOT_FOUND: no sample since the cursor. Others: not supported here.
        Err(_) => return HashMap::new(),
    };
    let mut sums: HashMap<u32, (f64, u32)> = HashMap::new();
    for s in &samples {
        state.last_util_ts_us = state.last_util_ts_us.max(s.timestamp);
        let e = sums.entry(s.pid).or_default();
        e.0 += f64::from(s.sm_util.min(100)) / 100.0;
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(pid, (sum, n))| (pid, sum / f64::from(n)))
        .collect()
}

/// Every MIG instance of a GPU in MIG mode.
fn read_mig_instances(
    parent: &Device<'_>,
    index: u32,
    resolver: &mut Resolver,
) -> Vec<GpuSnapshot> {
    let parent_uuid = parent.uuid().ok();
    let parent_model = parent.name().unwrap_or_default();
    let total_slices = parent
        .attributes()
        .ok()
        .map(|a| a.gpu_instance_slice_count)
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_COMPUTE_SLICES);
    let max = parent.mig_device_count().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..max {
        // Unpopulated indices answer NOT_FOUND: skip them.
        let Ok(mig) = parent.mig_device_by_index(i) else {
            continue;
        };
        let (gi, ci) = mig_ids(parent.nvml(), &mig).unwrap_or((i, 0));
        let attrs = mig.attributes().ok();
        let name = mig.name().unwrap_or_default();
        let profile = name
            .rsplit_once(" MIG ")
            .map(|(_, p)| p.to_owned())
            .or_else(|| {
                attrs.as_ref().map(|a| {
                    format!(
                        "{}g.{}gb",
                        a.compute_instance_slice_count,
                        (a.memory_size_mb as f64 / 1024.0).round()
                    )
                })
            });
        let slices = attrs
            .as_ref()
            .map(|a| a.gpu_instance_slice_count)
            .unwrap_or(0);
        let memory = mig.memory_info().ok();
        out.push(GpuSnapshot {
            gpu: format!("{index}/{gi}/{ci}"),
            uuid: mig.uuid().unwrap_or_default(),
            model: parent_model.clone(),
            mig_mode: true,
            mig_profile: profile,
            parent_uuid: parent_uuid.clone(),
            slice_fraction: Some(f64::from(slices) / f64::from(total_slices)),
            memory_used_bytes: memory.as_ref().map(|m| m.used).unwrap_or(0),
            memory_total_bytes: memory.as_ref().map(|m| m.total).unwrap_or(0),
            processes: read_processes(&mig, resolver),
            ..Default::default()
        });
    }
    out
}

/// GPU instance and compute instance ids of a MIG device handle.
///
/// nvml-wrapper 0.13 has no safe wrapper for these two calls, so they go
/// through its raw symbol table: the only `unsafe` in the agent crate.
#[allow(unsafe_code)]
fn mig_ids(nvml: &Nvml, mig: &Device<'_>) -> Option<(u32, u32)> {
    let lib = nvml.lib();
    let gi_fn = lib.nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
    let ci_fn = lib.nvmlDeviceGetComputeInstanceId.as_ref().ok()?;
    let (mut gi, mut ci) = (0u32, 0u32);
    // SAFETY: `mig` is a live handle from this NVML instance, and both
    // functions write one `unsigned int` through a valid pointer.
    let ok = unsafe {
        let handle = mig.handle();
        gi_fn(handle, &mut gi) == 0 && ci_fn(handle, &mut ci) == 0
    };
    ok.then_some((gi, ci))
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
