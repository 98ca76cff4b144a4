//! Cutting reports from cumulative counters, and the state that makes it
//! restart-safe: the next sequence number and the counters already
//! reported (the base), persisted in `<state_dir>/report-state.json`.
//!
//! A report's deltas are `counter now − base`, in integer units. Two
//! kinds of counter are handled:
//! - GPU counters live in the agent process and restart from 0 with it, so
//!   the GPU base only applies to the process (`instance`) that made it;
//! - eBPF counters may continue from pinned maps across agent restarts, so
//!   their base survives a restart; a counter below its base restarted
//!   (maps re-created), and its whole value is the delta.
//!
//! A new boot id resets every base. Sequence numbers never repeat for a
//! node: they continue across restarts and boots, and a state directory
//! that was lost starts again from the current Unix time in milliseconds,
//! which is above any number an earlier state directory handed out.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::wire::{GpuGauge, GpuUsage, HeldBy, IoUsage, Report, SCHEMA_VERSION};
use crate::snapshot::{GpuHealth, Snapshot, TenantGpuUsage, TenantIoUsage};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The state file is not what this version writes.
    #[error("{path}: not a report state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Cumulative GPU counters of one (tenant, device), in wire units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCounters {
    pub allocated_us: u64,
    pub sm_us: Option<u64>,
    pub memory_byte_seconds: u64,
    pub energy_mj: u64,
    /// Absent from state files written before idle time was reported.
    #[serde(default)]
    pub idle_us: u64,
}

/// Cumulative I/O counters of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    pub network_ingress_bytes: u64,
    pub network_egress_bytes: u64,
    pub network_ingress_packets: u64,
    pub network_egress_packets: u64,
    pub network_dropped_packets: u64,
    pub pcie_h2d_bytes: u64,
    pub pcie_d2h_bytes: u64,
}

/// What a device looked like the last time it was seen (for usage rows of
/// a device that has since disappeared from the snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub model: String,
    pub mig_profile: Option<String>,
    pub slice_fraction: f64,
}

/// The persisted report state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Boot the bases belong to.
    pub boot_id: String,
    /// Agent process the GPU base belongs to.
    pub instance: String,
    /// First sequence number this state directory handed out.
    pub first_seq: u64,
    /// Sequence number of the next report.
    pub next_seq: u64,
    /// End of the last report of `instance`, ms since the epoch.
    pub last_end_ms: u64,
    /// GPU counters already reported, by `tenant\tuuid` (the tenant's
    /// usage outside named workloads) and `tenant\tuuid\tworkload`.
    pub gpu_base: BTreeMap<String, GpuCounters>,
    /// I/O counters already reported, by tenant.
    pub io_base: BTreeMap<String, IoCounters>,
    /// Devices seen, by uuid.
    pub devices: BTreeMap<String, DeviceInfo>,
    /// Bytes of the audit log already reported, and the log's inode.
    pub audit_offset: u64,
    pub audit_inode: u64,
    /// The last report cut, kept until the next one so that a crash
    /// between persisting this state and spooling the report loses nothing
    /// (it is spooled again at start; a duplicate is harmless).
    pub last: Option<Report>,
}

/// Integer units of a seconds/joules counter.
fn micros(seconds: f64) -> u64 {
    units(seconds, 1e6)
}
fn units(value: f64, scale: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        (value * scale).round() as u64
    } else {
        0
    }
}

/// `now − base`, or `now` when the counter restarted below its base.
fn delta(now: u64, base: u64) -> u64 {
    if now >= base { now - base } else { now }
}

impl GpuCounters {
    /// The counters of a snapshot row, in wire units.
    pub fn of(row: &TenantGpuUsage) -> Self {
        Self {
            allocated_us: micros(row.allocated_seconds_total),
            sm_us: row.sm_seconds_total.map(micros),
            memory_byte_seconds: units(row.memory_byte_seconds_total, 1.0),
            energy_mj: units(row.energy_joules_total, 1e3),
            idle_us: micros(row.idle_allocated_seconds_total),
        }
    }

    fn minus(&self, base: &Self) -> Self {
        Self {
            allocated_us: delta(self.allocated_us, base.allocated_us),
            sm_us: self.sm_us.map(|s| delta(s, base.sm_us.unwrap_or(0))),
            memory_byte_seconds: delta(self.memory_byte_seconds, base.memory_byte_seconds),
            energy_mj: delta(self.energy_mj, base.energy_mj),
            idle_us: delta(self.idle_us, base.idle_us),
        }
    }

    /// `self − other`, each counter at least 0.
    fn less(&self, other: &Self) -> Self {
        Self {
            allocated_us: self.allocated_us.saturating_sub(other.allocated_us),
            sm_us: self
                .sm_us
                .map(|s| s.saturating_sub(other.sm_us.unwrap_or(0))),
            memory_byte_seconds: self
                .memory_byte_seconds
                .saturating_sub(other.memory_byte_seconds),
            energy_mj: self.energy_mj.saturating_sub(other.energy_mj),
            idle_us: self.idle_us.saturating_sub(other.idle_us),
        }
    }

    /// Each counter raised to `floor`'s where below it.
    fn at_least(&self, floor: &Self) -> Self {
        Self {
            allocated_us: self.allocated_us.max(floor.allocated_us),
            sm_us: self.sm_us.map(|s| s.max(floor.sm_us.unwrap_or(0))),
            memory_byte_seconds: self.memory_byte_seconds.max(floor.memory_byte_seconds),
            energy_mj: self.energy_mj.max(floor.energy_mj),
            idle_us: self.idle_us.max(floor.idle_us),
        }
    }

    fn is_zero(&self) -> bool {
        self.allocated_us == 0
            && self.sm_us.unwrap_or(0) == 0
            && self.memory_byte_seconds == 0
            && self.energy_mj == 0
            && self.idle_us == 0
    }
}

impl IoCounters {
    pub fn of(row: &TenantIoUsage) -> Self {
        Self {
            network_ingress_bytes: row.network_ingress_bytes_total,
            network_egress_bytes: row.network_egress_bytes_total,
            network_ingress_packets: row.network_ingress_packets_total,
            network_egress_packets: row.network_egress_packets_total,
            network_dropped_packets: row.network_ingress_dropped_packets_total
                + row.network_egress_dropped_packets_total,
            pcie_h2d_bytes: row.pcie_h2d_bytes_total,
            pcie_d2h_bytes: row.pcie_d2h_bytes_total,
        }
    }

    fn minus(&self, b: &Self) -> Self {
        Self {
            network_ingress_bytes: delta(self.network_ingress_bytes, b.network_ingress_bytes),
            network_egress_bytes: delta(self.network_egress_bytes, b.network_egress_bytes),
            network_ingress_packets: delta(self.network_ingress_packets, b.network_ingress_packets),
            network_egress_packets: delta(self.network_egress_packets, b.network_egress_packets),
            network_dropped_packets: delta(self.network_dropped_packets, b.network_dropped_packets),
            pcie_h2d_bytes: delta(self.pcie_h2d_bytes, b.pcie_h2d_bytes),
            pcie_d2h_bytes: delta(self.pcie_d2h_bytes, b.pcie_d2h_bytes),
        }
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// Where this agent process stands.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub boot_id: String,
    /// Unique per agent process.
    pub instance: String,
    /// When this process started, ms since the epoch: the start of its
    /// first interval.
    pub started_ms: u64,
    /// `[report] interval` in ms (0: unknown), carried in every report.
    pub report_interval_ms: u64,
    /// `[report] cluster`, carried in every report.
    pub cluster: String,
}

impl State {
    /// The state for `id`: bases that no longer apply are cleared.
    pub fn adopt(mut self, id: &Identity, now_ms: u64) -> Self {
        if self.next_seq == 0 {
            self.next_seq = now_ms.max(1);
            self.first_seq = self.next_seq;
        }
        if self.boot_id != id.boot_id {
            self.gpu_base.clear();
            self.io_base.clear();
            self.boot_id = id.boot_id.clone();
        }
        if self.instance != id.instance {
            self.gpu_base.clear();
            self.instance = id.instance.clone();
            self.last_end_ms = 0;
        }
        self
    }

    /// Cuts the report for `snap` (plus `audit` records) and advances the
    /// state past it. The interval ends at `end_ms` (when `snap` was
    /// sampled), or where the last one ended if that is later: a cut with
    /// no new snapshot carries gauges over an empty interval. The caller
    /// persists the state, then spools the report.
    pub fn cut(
        &mut self,
        id: &Identity,
        snap: &Snapshot,
        audit: Vec<super::wire::AuditRecord>,
        end_ms: u64,
    ) -> Report {
        for g in &snap.gpus {
            self.devices.insert(
                g.uuid.clone(),
                DeviceInfo {
                    model: g.priced_model(&snap.gpus).to_owned(),
                    mig_profile: g.mig_profile.clone(),
                    slice_fraction: g.priced_fraction(),
                },
            );
        }
        // The named workloads' rows of each (tenant, device); the tenant's
        // own row is what is left of its counters: the rows of one tenant
        // still sum to its counter (exactly without workloads; within a
        // microsecond per workload with them, each rounded on its own).
        let mut parts: BTreeMap<(&str, &str), Vec<&TenantGpuUsage>> = BTreeMap::new();
        for row in &snap.workload_gpu {
            parts
                .entry((&*row.tenant, &*row.uuid))
                .or_default()
                .push(row);
        }
        let mut gpu_usage = Vec::new();
        for row in snap.tenant_gpu.iter() {
            let mut rest = GpuCounters::of(row);
            for part in parts.get(&(&*row.tenant, &*row.uuid)).into_iter().flatten() {
                let now = GpuCounters::of(part);
                rest = rest.less(&now);
                let key = format!(
                    "{}\t{}\t{}",
                    row.tenant,
                    row.uuid,
                    part.workload.as_deref().unwrap_or("")
                );
                self.push_usage(
                    &mut gpu_usage,
                    key,
                    now,
                    row,
                    part.workload.as_deref().map(str::to_owned),
                );
            }
            let key = format!("{}\t{}", row.tenant, row.uuid);
            // Rounding each workload on its own may take a microsecond
            // more than the whole had: the rest never goes below its base.
            let base = self.gpu_base.get(&key).copied().unwrap_or_default();
            self.push_usage(&mut gpu_usage, key, rest.at_least(&base), row, None);
        }
        let mut io_usage = Vec::new();
        for row in &snap.tenant_io {
            let now = IoCounters::of(row);
            let base = self.io_base.get(&row.tenant).copied().unwrap_or_default();
            let d = now.minus(&base);
            self.io_base.insert(row.tenant.clone(), now);
            if d.is_zero() {
                continue;
            }
            io_usage.push(IoUsage {
                tenant: row.tenant.clone(),
                network_ingress_bytes: d.network_ingress_bytes,
                network_egress_bytes: d.network_egress_bytes,
                network_ingress_packets: d.network_ingress_packets,
                network_egress_packets: d.network_egress_packets,
                network_dropped_packets: d.network_dropped_packets,
                pcie_h2d_bytes: d.pcie_h2d_bytes,
                pcie_d2h_bytes: d.pcie_d2h_bytes,
            });
        }
        let gpus = snap
            .gpus
            .iter()
            .map(|g| GpuGauge {
                gpu: g.gpu.clone(),
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                mig_mode: g.mig_mode,
                mig_profile: g.mig_profile.clone(),
                parent_uuid: g.parent_uuid.clone(),
                slice_fraction: g.slice_fraction,
                health: match g.health {
                    GpuHealth::Ok => "ok",
                    GpuHealth::Lost => "lost",
                    GpuHealth::Error => "error",
                }
                .into(),
                utilization_ratio: g.utilization_ratio.map(|r| r.clamp(0.0, 1.0)),
                memory_used_bytes: g.memory_used_bytes,
                memory_total_bytes: g.memory_total_bytes,
                processes: g.processes.len() as u32,
                state: g.state.as_str().into(),
                tenants: g
                    .processes
                    .iter()
                    .map(|p| p.tenant.to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                idle_since_ms: g.idle_since_ms,
                workloads: g
                    .processes
                    .iter()
                    .filter_map(|p| {
                        Some(HeldBy {
                            tenant: p.tenant.to_string(),
                            workload: p.workload_id.as_deref()?.to_owned(),
                        })
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            })
            .collect();
        let tenant_quotas = snap
            .tenant_quotas
            .iter()
            .map(|q| super::wire::TenantQuota {
                tenant: q.tenant.clone(),
                resource: q.resource.clone(),
                limit: q.limit,
                usage: q.usage,
            })
            .collect();
        let start = if self.last_end_ms > 0 {
            self.last_end_ms
        } else {
            id.started_ms
        };
        let end = end_ms.max(start);
        let report = Report {
            version: SCHEMA_VERSION,
            node: id.node.clone(),
            boot_id: id.boot_id.clone(),
            seq: self.next_seq,
            interval_start_ms: start,
            interval_end_ms: end,
            gpu_usage,
            io_usage,
            gpus,
            audit,
            report_interval_ms: (id.report_interval_ms > 0).then_some(id.report_interval_ms),
            tenant_quotas,
            cluster: Some(id.cluster.clone()),
        };
        self.next_seq += 1;
        self.last_end_ms = end;
        self.last = Some(report.clone());
        report
    }
}

impl State {
    /// Adds the usage of counters `now` (of `row`'s device) since their
    /// base `key`, unless nothing was used, and advances the base.
    fn push_usage(
        &mut self,
        out: &mut Vec<GpuUsage>,
        key: String,
        now: GpuCounters,
        row: &TenantGpuUsage,
        workload: Option<String>,
    ) {
        let base = self.gpu_base.get(&key).copied().unwrap_or_default();
        let d = now.minus(&base);
        self.gpu_base.insert(key, now);
        if d.is_zero() {
            return;
        }
        let dev = self.devices.get(&*row.uuid).cloned().unwrap_or(DeviceInfo {
            model: "unknown".into(),
            mig_profile: None,
            slice_fraction: 1.0,
        });
        out.push(GpuUsage {
            tenant: row.tenant.to_string(),
            gpu: row.gpu.to_string(),
            uuid: row.uuid.to_string(),
            model: if dev.model.is_empty() {
                "unknown".into()
            } else {
                dev.model
            },
            mig_profile: dev.mig_profile,
            slice_fraction: dev.slice_fraction,
            allocated_us: d.allocated_us,
            sm_us: d.sm_us,
            memory_byte_seconds: d.memory_byte_seconds,
            energy_mj: d.energy_mj,
            workload,
            idle_us: d.idle_us,
        });
    }
}

/// Where a report cut at `now` from a snapshot sampled at `sampled_at`
/// ends, in ms since the epoch on the report clock (`started_ms` at the
/// monotonic `started`, then monotonic time, immune to wall-clock steps).
/// The snapshot's counters end when it was sampled: ending at the cut
/// instead would squeeze a stalled sampler's long cycle into one short
/// interval, which the aggregator refuses as impossible.
pub fn interval_end(
    started_ms: u64,
    started: Instant,
    sampled_at: Option<Instant>,
    now: Instant,
) -> u64 {
    let on_report_clock =
        |t: Instant| started_ms + t.saturating_duration_since(started).as_millis() as u64;
    let cut = on_report_clock(now);
    sampled_at.map_or(cut, |s| on_report_clock(s).min(cut))
}

/// The state file inside a state directory.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::paths::REPORT_STATE_FILE)
}

/// Reads the state file; a missing file is a fresh state.
pub fn load(file: &Path) -> Result<State, StateError> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: file.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(StateError::Io {
            path: file.to_owned(),
            source,
        }),
    }
}

/// Writes the state durably: temporary file, fsync, rename, fsync the dir.
pub fn save(file: &Path, state: &State) -> Result<(), StateError> {
    let bytes = serde_json::to_vec(state).unwrap_or_default();
    write_durably(file, &bytes).map_err(|source| StateError::Io {
        path: file.to_owned(),
        source,
    })
}

/// Writes `bytes` to `file` so that after a crash the file is either the
/// old content or the new, never half of it.
pub fn write_durably(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::snapshot::GpuSnapshot;

    fn id(instance: &str, boot: &str) -> Identity {
        Identity {
            node: "n1".into(),
            boot_id: boot.into(),
            instance: instance.into(),
            started_ms: 1_000,
            report_interval_ms: 10_000,
            cluster: "default".into(),
        }
    }

    fn snap(alloc: f64, net: u64) -> Snapshot {
        Snapshot {
            gpus: vec![GpuSnapshot {
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                model: "H100".into(),
                ..Default::default()
            }],
            tenant_gpu: vec![TenantGpuUsage {
                tenant: "acme".into(),
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                allocated_seconds_total: alloc,
                sm_seconds_total: Some(alloc / 2.0),
                energy_joules_total: alloc * 100.0,
                ..Default::default()
            }]
            .into(),
            tenant_io: vec![TenantIoUsage {
                tenant: "acme".into(),
                network_egress_bytes_total: net,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A tenant's named workloads get rows of their own, the rest of its
    /// counters one without a workload: the rows of the tenant sum to its
    /// counter's growth (within the microsecond each workload is rounded
    /// to), and the report names the cluster.
    #[test]
    fn workload_rows_and_the_rest_sum_to_the_tenant() {
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        let with = |alloc: f64, w1: f64, w2: f64| {
            let mut s = snap(alloc, 0);
            let part = |w: &str, a: f64| TenantGpuUsage {
                workload: Some(w.into()),
                allocated_seconds_total: a,
                sm_seconds_total: Some(a / 2.0),
                energy_joules_total: a * 100.0,
                ..s.tenant_gpu[0].clone()
            };
            s.workload_gpu = vec![part("j1", w1), part("j2", w2)];
            s
        };
        let rows = |r: &Report| -> Vec<(Option<String>, u64)> {
            // (Other counters round apart too: a row may hold only those.)
            r.gpu_usage
                .iter()
                .filter(|u| u.allocated_us > 0)
                .map(|u| (u.workload.clone(), u.allocated_us))
                .collect()
        };
        let r = st.cut(&p1, &with(10.0, 4.0, 3.0), vec![], 6_000);
        assert_eq!(r.cluster.as_deref(), Some("default"));
        assert_eq!(
            rows(&r),
            [
                (Some("j1".into()), 4_000_000),
                (Some("j2".into()), 3_000_000),
                (None, 3_000_000)
            ]
        );
        r.validate().unwrap();
        // Rounded apart, the workloads may exceed the whole by a
        // microsecond each: the rest does not go back for it.
        let r = st.cut(&p1, &with(20.0000012, 11.0000006, 6.0000006), vec![], 7_000);
        assert_eq!(
            rows(&r),
            [
                (Some("j1".into()), 7_000_001),
                (Some("j2".into()), 3_000_001),
            ]
        );
        let r = st.cut(&p1, &with(30.0, 11.0000006, 6.0000006), vec![], 8_000);
        assert_eq!(rows(&r), [(None, 9_999_998)]);
        let r = st.cut(&p1, &with(30.0, 11.0000006, 6.0000006), vec![], 8_000);
        assert!(r.gpu_usage.is_empty(), "{:?}", r.gpu_usage);
    }

    /// Idle time travels as the other counters do: each report carries
    /// its growth, the workload rows and the rest sum to the tenant's.
    #[test]
    fn idle_time_is_reported_as_a_delta_and_split_by_workload() {
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        let with = |alloc: f64, idle: f64, w_idle: f64| {
            let mut s = snap(alloc, 0);
            std::sync::Arc::make_mut(&mut s.tenant_gpu)[0].idle_allocated_seconds_total = idle;
            s.workload_gpu = vec![TenantGpuUsage {
                workload: Some("j1".into()),
                allocated_seconds_total: alloc / 2.0,
                idle_allocated_seconds_total: w_idle,
                ..s.tenant_gpu[0].clone()
            }];
            s
        };
        let idle = |r: &Report| -> Vec<(Option<String>, u64)> {
            r.gpu_usage
                .iter()
                .map(|u| (u.workload.clone(), u.idle_us))
                .collect()
        };
        let r = st.cut(&p1, &with(10.0, 0.0, 0.0), vec![], 6_000);
        assert_eq!(idle(&r), [(Some("j1".into()), 0), (None, 0)]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("idle_us"), "absent when 0: {json}");
        let r = st.cut(&p1, &with(20.0, 6.0, 2.5), vec![], 20_000);
        assert_eq!(
            idle(&r),
            [(Some("j1".into()), 2_500_000), (None, 3_500_000)]
        );
        r.validate().unwrap();
    }

    #[test]
    fn a_stalled_sampler_gives_one_long_interval_the_aggregator_accepts() {
        let a = id("p1", "b1");
        let mut st = State::default().adopt(&a, 5_000);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut sampled = snap(0.9, 10);
        sampled.sampled_at = Some(at(1_000));
        // Cuts every 2 s while the sampler is stuck after its first cycle.
        for cut in (2_000..=38_000).step_by(2_000) {
            let end = interval_end(a.started_ms, t0, sampled.sampled_at, at(cut));
            let r = st.cut(&a, &sampled, vec![], end);
            assert_eq!(r.interval_end_ms, 2_000, "no new sample, no new time");
            assert!(r.validate().is_ok(), "{:?}", r.validate());
        }
        // The stalled cycle ends 39 s later with 39 s of GPU time.
        let mut late = snap(39.9, 20);
        late.sampled_at = Some(at(40_000));
        let mut by_cut_time = st.clone();
        let end = interval_end(a.started_ms, t0, late.sampled_at, at(40_500));
        let r = st.cut(&a, &late, vec![], end);
        assert_eq!((r.interval_start_ms, r.interval_end_ms), (2_000, 41_000));
        assert_eq!(r.gpu_usage[0].allocated_us, 39_000_000);
        assert!(r.validate().is_ok(), "{:?}", r.validate());
        // Ending at the cut instead (the old way: the last of the cuts
        // above ended at 39 s) gives an impossible report.
        by_cut_time.last_end_ms = 39_000;
        let wrong = by_cut_time.cut(&a, &late, vec![], 41_500);
        assert!(wrong.validate().is_err());
    }

    #[test]
    fn deltas_telescope_to_the_cumulative_counter() {
        let a = id("p1", "b1");
        let mut st = State::default().adopt(&a, 5_000);
        assert_eq!(st.next_seq, 5_000);
        let mut total = 0;
        for (i, v) in [0.1, 0.2, 0.30000000000000004, 1.7].iter().enumerate() {
            let r = st.cut(&a, &snap(*v, 10), vec![], 6_000 + i as u64);
            total += r.gpu_usage.iter().map(|u| u.allocated_us).sum::<u64>();
        }
        assert_eq!(total, 1_700_000);
        assert_eq!(st.next_seq, 5_004);
    }

    #[test]
    fn a_restart_resets_gpu_base_but_keeps_io_base() {
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        st.cut(&p1, &snap(10.0, 1000), vec![], 6_000);
        // The agent restarts: GPU counters start from 0 again (here 12 s,
        // more than the old base), eBPF counters continue.
        let p2 = id("p2", "b1");
        let json = serde_json::to_vec(&st).unwrap();
        let mut st: State = serde_json::from_slice::<State>(&json)
            .unwrap()
            .adopt(&p2, 9_000);
        let r = st.cut(&p2, &snap(12.0, 1500), vec![], 10_000);
        assert_eq!(r.seq, 5_001, "no sequence number is reused");
        assert_eq!(r.interval_start_ms, 1_000, "new process: from its start");
        assert_eq!(r.gpu_usage[0].allocated_us, 12_000_000);
        assert_eq!(r.io_usage[0].network_egress_bytes, 500);
        // A counter below its base restarted: all of it is new.
        let r = st.cut(&p2, &snap(13.0, 200), vec![], 11_000);
        assert_eq!(r.io_usage[0].network_egress_bytes, 200);
        assert_eq!(r.gpu_usage[0].allocated_us, 1_000_000);
        assert_eq!(r.interval_start_ms, 10_000);
    }

    #[test]
    fn a_new_boot_resets_every_base() {
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        st.cut(&p1, &snap(10.0, 1000), vec![], 6_000);
        let p2 = id("p2", "b2");
        let mut st = st.adopt(&p2, 7_000);
        let r = st.cut(&p2, &snap(1.0, 1500), vec![], 8_000);
        assert_eq!(r.io_usage[0].network_egress_bytes, 1500);
        assert_eq!(r.seq, 5_001);
        assert_eq!(r.boot_id, "b2");
    }

    #[test]
    fn unchanged_counters_make_no_rows() {
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        st.cut(&p1, &snap(10.0, 1000), vec![], 6_000);
        let r = st.cut(&p1, &snap(10.0, 1000), vec![], 7_000);
        assert!(r.gpu_usage.is_empty() && r.io_usage.is_empty());
        assert_eq!(r.gpus.len(), 1);
    }

    #[test]
    fn gauges_carry_state_tenants_quotas_and_the_interval() {
        use crate::{
            snapshot::{GpuProcess, TenantQuotaStatus},
            states::GpuState,
        };
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        let mut s = snap(1.0, 1);
        s.gpus[0].state = GpuState::Idle;
        s.gpus[0].processes = ["beta", "acme", "beta"]
            .iter()
            .map(|t| GpuProcess {
                tenant: (*t).into(),
                workload_id: (*t == "beta").then(|| "job-1".into()),
                ..Default::default()
            })
            .collect();
        s.tenant_quotas = vec![TenantQuotaStatus {
            tenant: "acme".into(),
            resource: "gpus".into(),
            limit: 2.0,
            usage: Some(1.0),
        }];
        s.gpus[0].idle_since_ms = Some(5_500);
        let r = st.cut(&p1, &s, vec![], 6_000);
        assert_eq!(r.gpus[0].state, "idle");
        assert_eq!(r.gpus[0].idle_since_ms, Some(5_500));
        assert_eq!(r.gpus[0].tenants, ["acme", "beta"]);
        assert_eq!(
            r.gpus[0].workloads,
            [HeldBy {
                tenant: "beta".into(),
                workload: "job-1".into()
            }]
        );
        assert_eq!(r.gpus[0].processes, 3);
        assert_eq!(r.tenant_quotas[0].limit, 2.0);
        assert_eq!(r.report_interval_ms, Some(10_000));
        r.validate().unwrap();
    }

    #[test]
    fn state_is_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = state_file(dir.path());
        assert_eq!(load(&file).unwrap(), State::default());
        let p1 = id("p1", "b1");
        let mut st = State::default().adopt(&p1, 5_000);
        st.cut(&p1, &snap(1.0, 1), vec![], 6_000);
        save(&file, &st).unwrap();
        assert_eq!(load(&file).unwrap(), st);
    }
}
