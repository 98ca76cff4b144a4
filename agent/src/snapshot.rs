//! The agent's view of the node at one sampling instant.
//!
//! Samplers and attribution build a [`Snapshot`]; `/metrics`,
//! `/api/v1/snapshot` and the report to the aggregator only read it. It is
//! the one contract between the sampling side and every output.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use tally_contract::tenant::{TENANT_IDLE, TENANT_UNATTRIBUTED};

/// The latest snapshot, as published by the sampling loop.
pub type Latest = watch::Receiver<Arc<Snapshot>>;

/// Everything the agent knows, as of `taken_at_ms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Node name (`[report] node`, default the host name).
    pub node: String,
    /// Wall-clock time at which the sampling cycle started, milliseconds
    /// since the Unix epoch.
    pub taken_at_ms: u64,
    /// Number of completed sampling cycles since start.
    pub samples: u64,
    /// Whether NVML could be opened; `None` until the first attempt.
    pub nvml: NvmlStatus,
    /// Every physical GPU and every MIG instance, physical GPUs first.
    pub gpus: Vec<GpuSnapshot>,
    /// Cumulative per-(tenant, gpu) counters since the agent started;
    /// shared with the sampler's running totals until its next cycle
    /// (`crate::attribution::Accounts`).
    pub tenant_gpu: Arc<Vec<TenantGpuUsage>>,
    /// The part of `tenant_gpu` that named workloads used: per (tenant,
    /// workload, gpu), `workload` set. What a tenant used outside them is
    /// its `tenant_gpu` row less these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_gpu: Vec<TenantGpuUsage>,
    /// Cumulative per-tenant counters from the eBPF probes.
    pub tenant_io: Vec<TenantIoUsage>,
    /// State of each eBPF probe.
    pub probes: Vec<ProbeStatus>,
    /// How long the last sampling cycle took, in seconds.
    pub sample_duration_seconds: f64,
    /// Each tenant's quota limits and current usage (enforcement).
    #[serde(default)]
    pub tenant_quotas: Vec<TenantQuotaStatus>,
    /// Enforcement actions taken since the agent started.
    #[serde(default)]
    pub enforcement_actions: Vec<EnforcementActionCount>,
    /// GPU device opens the tenants' device programs denied since start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_denials: Vec<TenantDeviceDenials>,
    /// Pods using a GPU the kubelet did not allocate to them, while they
    /// do (`tally_tenant_gpu_unallocated_use`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unallocated_gpu_use: Vec<UnallocatedGpuUse>,
    /// When this cycle's reads were done, on the monotonic clock: the
    /// usage counters cover time up to here, so a report cut from this
    /// snapshot ends here (not when it is cut) and a stalled sampler's
    /// long cycle lands in one long interval, never in a short one.
    #[serde(skip)]
    pub sampled_at: Option<std::time::Instant>,
}

/// Whether the NVML library is usable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NvmlStatus {
    pub up: bool,
    /// Library path that was opened (or tried).
    pub library: String,
    /// Driver version as NVML reports it, when up.
    pub driver_version: Option<String>,
    /// Why NVML is down, when it is.
    pub error: Option<String>,
}

/// Health of one GPU as the sampler sees it. (The issue on GPU states adds
/// idle/stuck detection on top of this.)
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GpuHealth {
    #[default]
    Ok,
    /// NVML answered `GPU_IS_LOST`: the device fell off the bus.
    Lost,
    /// An NVML call failed for another reason (see `error`).
    Error,
}

/// ECC errors a GPU counted since its driver loaded (NVML's volatile
/// counters).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EccErrors {
    pub corrected: u64,
    pub uncorrected: u64,
}

/// Memory rows a GPU remapped to spare rows, and the remap state.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemappedRows {
    pub correctable: u32,
    pub uncorrectable: u32,
    /// A remap waits for the next GPU reset.
    pub pending: bool,
    /// A remap failed: the GPU needs service.
    pub failed: bool,
}

/// Where a GPU's energy figures come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EnergySource {
    /// NVML's total-energy counter.
    Counter,
    /// The trapezoid integral of NVML's power readings: the GPU has no
    /// energy counter (pre-Volta, many GeForce boards, some vGPU guests).
    Power,
}

impl EnergySource {
    /// The `energy_source` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EnergySource::Counter => "counter",
            EnergySource::Power => "power",
        }
    }
}

/// One physical GPU or one MIG instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpuSnapshot {
    /// `"<index>"` for a GPU, `"<index>/<gi>/<ci>"` for a MIG instance.
    pub gpu: String,
    pub uuid: String,
    pub model: String,
    /// Physical GPU: MIG mode on. MIG instance: always true.
    pub mig_mode: bool,
    /// MIG instance only: profile name (`"3g.40gb"`).
    pub mig_profile: Option<String>,
    /// MIG instance only: UUID of the parent GPU.
    pub parent_uuid: Option<String>,
    /// MIG instance only: its compute slices over the parent's total, used
    /// to split the parent's energy and to price the slice.
    pub slice_fraction: Option<f64>,
    pub health: GpuHealth,
    /// The last NVML error for this device, when `health` is not `ok`.
    pub error: Option<String>,
    /// 0..1; `None` where NVML has none (MIG instances without GPM).
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Physical GPUs only.
    pub power_watts: Option<f64>,
    pub temperature_celsius: Option<f64>,
    /// Energy the GPU drew, in joules (physical GPUs only): NVML's
    /// total-energy counter, carried on across counter resets, or the
    /// integral of power where there is no counter (see `energy_source`).
    pub energy_joules_total: Option<f64>,
    /// Where `energy_joules_total` comes from; on a MIG instance, its
    /// parent's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<EnergySource>,
    /// ECC error counts since driver load (physical GPUs with ECC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_errors: Option<EccErrors>,
    /// Row remapping (Ampere and later HBM GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_rows: Option<RemappedRows>,
    /// NVML's clock throttle-reason bits (`nvmlClocksThrottleReason*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<u64>,
    /// Cumulative PCIe bytes integrated from NVML's throughput (physical
    /// GPUs only): `(tx, rx)`.
    pub pcie_tx_bytes_total: Option<f64>,
    pub pcie_rx_bytes_total: Option<f64>,
    /// Wall time the agent has accounted for this device since start: the
    /// sum of its tenants' allocated seconds (intervals in which the device
    /// failed are not accounted).
    pub observed_seconds_total: f64,
    /// XID events seen since start, by XID code.
    pub xid_errors_total: BTreeMap<u64, u64>,
    /// The same events by the tenant holding the device when they came.
    pub xid_errors_by_tenant: BTreeMap<String, BTreeMap<u64, u64>>,
    /// free, busy, idle, stuck or lost (see `crate::states`).
    pub state: crate::states::GpuState,
    /// When the device entered the `idle` state, ms since the Unix epoch;
    /// set only while it is `idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since_ms: Option<u64>,
    /// Processes on this device at the sample.
    pub processes: Vec<GpuProcess>,
}

impl GpuSnapshot {
    /// The model the aggregator prices this device's time by: a MIG
    /// instance's parent model (NVML names an instance "<model> MIG
    /// <profile>"), else its own; "unknown" when NVML gave none.
    pub fn priced_model<'a>(&'a self, gpus: &'a [GpuSnapshot]) -> &'a str {
        let parent = self
            .parent_uuid
            .as_ref()
            .and_then(|p| gpus.iter().find(|x| &x.uuid == p));
        let model = parent.map_or(&self.model, |p| &p.model);
        if model.is_empty() { "unknown" } else { model }
    }

    /// The GPU-hours of `priced_model` one hour of this device is charged
    /// as: its slice fraction for a MIG instance, else 1.
    pub fn priced_fraction(&self) -> f64 {
        self.slice_fraction
            .filter(|f| *f > 0.0 && *f <= 1.0)
            .unwrap_or(1.0)
    }
}

/// A process that holds memory on a GPU or MIG instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    /// Shared with the process cache (`crate::tenants`): a cycle copies a
    /// pointer per process, not the text.
    pub tenant: Arc<str>,
    /// The process's cgroup v2 path (`0::` line), when it could be read.
    pub cgroup: Option<Arc<str>>,
    pub memory_bytes: u64,
    /// SM utilization 0..1 from NVML's per-process samples; `None` where
    /// NVML has none (MIG instances) or no sample arrived this interval.
    pub sm_ratio: Option<f64>,
    /// The Kubernetes pod and container, when `[tenant.kubernetes]
    /// workload_series` is on and the pod is known. Boxed: a snapshot
    /// holds a row per process, most of them without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Box<Workload>>,
    /// The workload its usage is charged to (`crate::tenants::Attribution`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_id: Option<Arc<str>>,
}

/// A pod running on a GPU or MIG device the kubelet did not allocate to it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnallocatedGpuUse {
    pub tenant: String,
    pub namespace: String,
    pub pod: String,
    /// The device's `gpu` label.
    pub gpu: String,
    pub uuid: String,
    /// The pod's cgroup v2 path (its container's where the pod has no
    /// directory of its own): where `enforce_allocation` attaches.
    pub cgroup: String,
    /// The GPU and MIG UUIDs the kubelet did allocate to the pod.
    pub allocated: Vec<String>,
}

/// A Kubernetes container, by name: the labels of per-workload series.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    /// Empty when the pod is known but not which of its containers.
    pub container: String,
}

/// Cumulative usage of one tenant on one GPU (or MIG instance).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantGpuUsage {
    /// Shared with the sampler's running totals
    /// (`crate::attribution::Accounts`): a cycle's snapshot copies a
    /// pointer per row, not the text.
    pub tenant: Arc<str>,
    pub gpu: Arc<str>,
    pub uuid: Arc<str>,
    /// Wall time the tenant held the device (its share when shared).
    pub allocated_seconds_total: f64,
    /// Allocated time weighted by SM utilization. `None` on MIG instances,
    /// where NVML has no per-process utilization.
    pub sm_seconds_total: Option<f64>,
    /// GPU memory held now.
    pub memory_bytes: u64,
    /// Integral of memory held over time.
    pub memory_byte_seconds_total: f64,
    pub energy_joules_total: f64,
    /// The part of `allocated_seconds_total` during which the device was
    /// `idle`: held, doing nothing past `[states] idle_after`.
    #[serde(default)]
    pub idle_allocated_seconds_total: f64,
    /// Set on `Snapshot::workload_gpu` rows only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<str>>,
}

/// Cumulative eBPF-counted I/O of one tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantIoUsage {
    pub tenant: String,
    pub network_ingress_bytes_total: u64,
    pub network_egress_bytes_total: u64,
    pub network_ingress_packets_total: u64,
    pub network_egress_packets_total: u64,
    pub network_ingress_dropped_packets_total: u64,
    pub network_egress_dropped_packets_total: u64,
    pub pcie_h2d_bytes_total: u64,
    pub pcie_d2h_bytes_total: u64,
    /// Generic copies on unified addresses, whose direction the call does
    /// not say.
    #[serde(default)]
    pub pcie_other_bytes_total: u64,
}

/// Whether one eBPF program is attached.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeStatus {
    pub probe: String,
    pub up: bool,
    /// Why it is down, and what to do about it.
    pub error: Option<String>,
}

/// One quota of one tenant: its limit and what the tenant uses now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantQuotaStatus {
    pub tenant: String,
    /// `cpu_cores`, `memory` (bytes), `pids`, `gpus` (devices),
    /// `gpu_memory` (bytes), `gpu_seconds_per_hour`, `network_egress` /
    /// `network_ingress` (bytes per second).
    pub resource: String,
    pub limit: f64,
    /// `None` where the agent cannot read it.
    pub usage: Option<f64>,
}

/// GPU device opens denied to one tenant's cgroups since start (its
/// `gpus` quota).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantDeviceDenials {
    pub tenant: String,
    pub total: u64,
}

/// How often one enforcement action was taken since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EnforcementActionCount {
    pub tenant: String,
    pub resource: String,
    /// `alert`, `throttle`, `terminate`, `kill`.
    pub action: String,
    pub total: u64,
}
