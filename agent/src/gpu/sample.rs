//! The sampler: one cycle reads every GPU on its worker thread, turns the
//! reads into snapshots with their tenants, charges each device's interval
//! ([`super::account`]), ties new XIDs to tenants ([`super::xid`]) and sets
//! each device's state ([`crate::states`]). A device whose calls fail is
//! marked and logged once; the others carry on.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use nvml_wrapper::{Nvml, error::NvmlError};
use tracing::{info, warn};

use super::{
    account::{self, holders_of_device},
    read::{RawDevice, RawProcess},
    workers::{Outcome, Workers},
    xid::{self, SharedXidLog, TenantXids},
};
use crate::{
    attribution::Accounts,
    pids::PidMap,
    snapshot::{EnergySource, GpuHealth, GpuProcess, GpuSnapshot, NvmlStatus, TenantGpuUsage},
    states::{DeviceObs, GpuState, ProcObs, StatesConfig, Tracker},
    tenants::Resolver,
};

/// How long one GPU's NVML calls may take in a cycle before the GPU is
/// marked (real MIG queries take up to ~100 ms each).
pub const DEFAULT_NVML_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens NVML from `library`: a path, or a bare name for the loader.
pub fn open(library: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(library.as_os_str()).init()
}

/// What one sampling cycle produced.
#[derive(Debug, Default)]
pub struct Sample {
    pub nvml: NvmlStatus,
    pub gpus: Vec<GpuSnapshot>,
    pub tenant_gpu: Arc<Vec<TenantGpuUsage>>,
    /// The named workloads' part of `tenant_gpu`.
    pub workload_gpu: Vec<TenantGpuUsage>,
}

/// Per-device memory between cycles.
#[derive(Debug, Default)]
struct DeviceState {
    last_at: Option<Instant>,
    energy: account::EnergyMeter,
    /// Newest per-process utilization sample consumed (µs): no sample is
    /// counted twice.
    util_cursor: u64,
    /// Last SM ratio per pid: NVML samples at its own period, so a cycle
    /// may bring no new sample; utilization is a rate, so it is held.
    last_sm: PidMap<f64>,
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
    xids: SharedXidLog,
    events_started: bool,
    stop: Arc<AtomicBool>,
    states: Tracker,
    tenant_xids: TenantXids,
    /// Devices that were `idle` at the last sample: the interval that
    /// follows is charged as idle time ([`account::mark_idle`]).
    idle: HashSet<String>,
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
            xids: SharedXidLog::default(),
            events_started: false,
            stop,
            tenant_xids: TenantXids::new(states.fatal_xids.clone()),
            states: Tracker::new(states),
            idle: HashSet::new(),
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
    // Out of line: `cargo xtask bench` counts instructions per call of it
    // (callgrind), which needs the symbol.
    #[inline(never)]
    pub fn sample(&mut self, resolver: &mut Resolver) -> Sample {
        resolver.begin_cycle();
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
                return self.finish(status, Vec::new(), resolver);
            }
        };
        status.up = true;
        status.driver_version = nvml.sys_driver_version().ok();
        if !self.events_started {
            self.events_started = true;
            xid::spawn_thread(nvml, self.xids.clone(), self.stop.clone());
        }
        let count = match nvml.device_count() {
            Ok(c) => c as usize,
            Err(e) => {
                status.error = Some(format!("nvmlDeviceGetCount failed: {e}"));
                return self.finish(status, Vec::new(), resolver);
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
        self.finish(status, gpus, resolver)
    }

    fn finish(
        &mut self,
        nvml: NvmlStatus,
        mut gpus: Vec<GpuSnapshot>,
        resolver: &mut Resolver,
    ) -> Sample {
        for g in &mut gpus {
            g.observed_seconds_total = self.accounts.observed_seconds(&g.gpu);
            g.xid_errors_total = xid::counts(&self.xids, &g.uuid);
        }
        let fatal = self
            .tenant_xids
            .tie(xid::take_pending(&self.xids), &mut gpus);
        self.update_states(&mut gpus, &fatal, resolver);
        resolver.end_cycle();
        Sample {
            nvml,
            gpus,
            tenant_gpu: self.accounts.rows(),
            workload_gpu: self.accounts.workload_rows(),
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
        // The next good sample starts a fresh interval; the energy meter
        // keeps its counter reading, so what the GPU drew meanwhile is not
        // lost.
        state.last_at = None;
        out.push(GpuSnapshot {
            gpu: label,
            uuid: state.uuid.clone(),
            model: state.model.clone(),
            health,
            error: Some(reason.clone()),
            // The energy total stays on /metrics at its last value: a
            // series that vanished and came back would read as a reset to
            // `increase()`, and its tenants' series stay too.
            energy_joules_total: state.energy.total_joules(),
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
        let energy_joules = state.energy.read(seconds, raw.energy_mj, raw.power_watts);
        let energy_source = match (raw.energy_mj, raw.power_watts) {
            (Some(_), _) => Some(EnergySource::Counter),
            (None, Some(_)) => Some(EnergySource::Power),
            (None, None) => None,
        };
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
            energy_joules_total: state.energy.total_joules(),
            energy_source,
            ecc_errors: raw.ecc_errors,
            remapped_rows: raw.remapped_rows,
            throttle_reasons: raw.throttle_reasons,
            pcie_tx_bytes_total: raw.pcie_kbps.map(|_| state.pcie_tx_bytes),
            pcie_rx_bytes_total: raw.pcie_kbps.map(|_| state.pcie_rx_bytes),
            ..Default::default()
        };

        let instances: Vec<GpuSnapshot> = if raw.mig_mode {
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
                    energy_source,
                    memory_used_bytes: i.memory_used,
                    memory_total_bytes: i.memory_total,
                    utilization_ratio: i.sm_activity,
                    processes: account::with_instance_sm(
                        attribute(&i.processes, &i.uuid, resolver),
                        i.sm_activity,
                    ),
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
            instances
        } else {
            // Average SM per pid over the new samples; hold the last value
            // for processes without one this cycle.
            let (fresh, cursor) = account::mean_sm(&raw.sm_samples, state.util_cursor);
            state.util_cursor = cursor;
            snap.processes = attribute(&raw.processes, &raw.uuid, resolver)
                .into_iter()
                .map(|mut p| {
                    p.sm_ratio = fresh
                        .get(&p.pid)
                        .copied()
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
            Vec::new()
        };
        let charges = account::charges(
            &snap,
            &instances,
            seconds,
            energy_joules,
            state.idle_power_watts,
        );
        for mut c in charges {
            if self.idle.contains(c.gpu) {
                account::mark_idle(&mut c);
            }
            self.accounts.add(c.gpu, c.uuid, c.seconds, &c.shares);
            self.accounts
                .add_workloads(c.gpu, c.uuid, c.seconds, &c.workloads);
        }
        out.push(snap);
        out.extend(instances);
    }

    /// Sets each device's state from what was sampled and the holders'
    /// process states.
    fn update_states(
        &mut self,
        gpus: &mut [GpuSnapshot],
        fatal: &HashSet<String>,
        resolver: &mut Resolver,
    ) {
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
        // A process on a MIG instance holds its parent too: the resolver
        // read each process's /proc/<pid>/stat once this cycle, while
        // attributing it, and answers from that read.
        let mut states = Vec::with_capacity(gpus.len());
        for g in gpus.iter() {
            let parent = g.parent_uuid.as_ref().and_then(|p| parents.get(p));
            let holders: Vec<ProcObs> = holders_of_device(gpus, &g.uuid)
                .map(|p| resolver.proc_obs(p.pid))
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
        // Wall time of `now`, to say since when a device is idle.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (g, state) in gpus.iter_mut().zip(states) {
            g.state = state;
            if state == GpuState::Idle {
                g.idle_since_ms = self.states.idle_state_since(&g.gpu).map(|since| {
                    now_ms.saturating_sub(now.saturating_duration_since(since).as_millis() as u64)
                });
            }
        }
        // Kept, not rebuilt, so a label is copied once per idle spell.
        self.idle.retain(|gpu| {
            gpus.iter()
                .any(|g| &g.gpu == gpu && g.state == GpuState::Idle)
        });
        for g in gpus.iter().filter(|g| g.state == GpuState::Idle) {
            if !self.idle.contains(&g.gpu) {
                self.idle.insert(g.gpu.clone());
            }
        }
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
                workload_id: attribution.workload_id,
            }
        })
        .collect()
}
