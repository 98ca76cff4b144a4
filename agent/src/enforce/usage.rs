//! Usage against each quota, for the `tally_tenant_quota_*` series and the
//! policy: GPU memory and GPU seconds in the last hour from the snapshot,
//! CPU cores and network rates from cumulative counters between samples.
//!
//! Pure: the caller reads the cgroup counters and passes them in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::quota::Quota;
use crate::snapshot::{GpuProcess, Snapshot, TenantQuotaStatus};

/// The GPU time budget's window.
pub(crate) const HOUR_MS: u64 = 3_600_000;

/// Counters of earlier samples, to turn totals into windows and rates.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// Per tenant: `(taken_at_ms, allocated GPU seconds total)`.
    gpu_time: HashMap<String, VecDeque<(u64, f64)>>,
    /// Per tenant: `(taken_at_ms, ingress bytes, egress bytes)` and rates.
    net: HashMap<String, (u64, u64, u64)>,
    net_rate: HashMap<String, (f64, f64)>,
    /// Per tenant: `(taken_at_ms, cumulative CPU seconds)`.
    cpu: HashMap<String, (u64, f64)>,
}

impl Meter {
    /// Allocated GPU seconds of `tenant` in the last hour (since start when
    /// the agent has run for less).
    pub(crate) fn gpu_seconds_last_hour(&mut self, snap: &Snapshot, tenant: &str, now: u64) -> f64 {
        let total: f64 = snap
            .tenant_gpu
            .iter()
            .filter(|r| &*r.tenant == tenant)
            .map(|r| r.allocated_seconds_total)
            .sum();
        let q = self.gpu_time.entry(tenant.to_owned()).or_default();
        q.push_back((now, total));
        while q.len() > 1 && q[1].0 + HOUR_MS <= now {
            q.pop_front();
        }
        (total - q.front().map_or(total, |f| f.1)).max(0.0)
    }

    /// Limits and usage of the cgroup-enforced and network quotas, given
    /// the tenant cgroup's counters (`cpu_seconds`, `memory`, `pids`).
    pub(crate) fn cgroup_status(
        &mut self,
        snap: &Snapshot,
        tenant: &str,
        quota: &Quota,
        usage: &BTreeMap<&'static str, f64>,
        status: &mut Vec<TenantQuotaStatus>,
    ) {
        if let Some(c) = quota.cpu_cores {
            let cores = usage.get("cpu_seconds").and_then(|&secs| {
                let now = snap.taken_at_ms;
                let prev = self.cpu.insert(tenant.to_owned(), (now, secs))?;
                (now > prev.0).then(|| (secs - prev.1).max(0.0) / ((now - prev.0) as f64 / 1e3))
            });
            status.push(row(tenant, "cpu_cores", c, cores));
        }
        if let Some(m) = quota.memory {
            status.push(row(
                tenant,
                "memory",
                m as f64,
                usage.get("memory").copied(),
            ));
        }
        if let Some(p) = quota.pids {
            status.push(row(tenant, "pids", p as f64, usage.get("pids").copied()));
        }
        if let Some(g) = &quota.gpus {
            let held: BTreeSet<&str> = snap
                .gpus
                .iter()
                .filter(|g| g.processes.iter().any(|p| &*p.tenant == tenant))
                .map(|g| g.uuid.as_str())
                .collect();
            status.push(row(tenant, "gpus", g.len() as f64, Some(held.len() as f64)));
        }
        if quota.network_egress.is_some() || quota.network_ingress.is_some() {
            if let Some(io) = snap.tenant_io.iter().find(|r| r.tenant == tenant) {
                let cur = (
                    snap.taken_at_ms,
                    io.network_ingress_bytes_total,
                    io.network_egress_bytes_total,
                );
                if let Some(prev) = self.net.insert(tenant.to_owned(), cur)
                    && cur.0 > prev.0
                {
                    let secs = (cur.0 - prev.0) as f64 / 1000.0;
                    self.net_rate.insert(
                        tenant.to_owned(),
                        (
                            cur.1.saturating_sub(prev.1) as f64 / secs,
                            cur.2.saturating_sub(prev.2) as f64 / secs,
                        ),
                    );
                }
            }
            let rate = self.net_rate.get(tenant).copied();
            if let Some(l) = quota.network_ingress {
                status.push(row(tenant, "network_ingress", l as f64, rate.map(|r| r.0)));
            }
            if let Some(l) = quota.network_egress {
                status.push(row(tenant, "network_egress", l as f64, rate.map(|r| r.1)));
            }
        }
    }
}

/// The tenant's GPU processes in a snapshot, one per pid (memory summed
/// over devices).
pub(crate) fn tenant_processes(snap: &Snapshot, tenant: &str) -> Vec<GpuProcess> {
    let mut by_pid: BTreeMap<u32, GpuProcess> = BTreeMap::new();
    for p in snap.gpus.iter().flat_map(|g| &g.processes) {
        if &*p.tenant != tenant {
            continue;
        }
        by_pid
            .entry(p.pid)
            .and_modify(|e| e.memory_bytes += p.memory_bytes)
            .or_insert_with(|| p.clone());
    }
    by_pid.into_values().collect()
}

/// One `tally_tenant_quota_*` row.
pub(crate) fn row(
    tenant: &str,
    resource: &str,
    limit: f64,
    usage: Option<f64>,
) -> TenantQuotaStatus {
    TenantQuotaStatus {
        tenant: tenant.to_owned(),
        resource: resource.to_owned(),
        limit,
        usage,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::snapshot::{GpuSnapshot, TenantGpuUsage};

    /// A process of `tenant` holding `mib` MiB (the enforcer's tests use it
    /// too).
    pub(in crate::enforce) fn proc(pid: u32, tenant: &str, mib: u64) -> GpuProcess {
        GpuProcess {
            pid,
            tenant: tenant.into(),
            memory_bytes: mib << 20,
            ..GpuProcess::default()
        }
    }

    #[test]
    fn tenant_processes_sum_memory_per_pid() {
        let snap = Snapshot {
            gpus: vec![
                GpuSnapshot {
                    processes: vec![proc(1, "a", 10), proc(2, "b", 5)],
                    ..Default::default()
                },
                GpuSnapshot {
                    processes: vec![proc(1, "a", 20)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let p = tenant_processes(&snap, "a");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].memory_bytes, 30 << 20);
    }

    #[test]
    fn gpu_time_counts_the_last_hour_only() {
        let mut m = Meter::default();
        let snap = |total: f64| Snapshot {
            tenant_gpu: vec![TenantGpuUsage {
                tenant: "a".into(),
                allocated_seconds_total: total,
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        assert_eq!(m.gpu_seconds_last_hour(&snap(100.0), "a", 1_000), 0.0);
        assert_eq!(m.gpu_seconds_last_hour(&snap(130.0), "a", 1_800_000), 30.0);
        // An hour after the first sample, the first one leaves the window.
        assert_eq!(
            m.gpu_seconds_last_hour(&snap(140.0), "a", HOUR_MS + 1_000),
            40.0
        );
        assert_eq!(
            m.gpu_seconds_last_hour(&snap(150.0), "a", HOUR_MS + 1_800_000),
            20.0
        );
    }

    #[test]
    fn cpu_cores_are_a_rate_between_two_samples() {
        let mut m = Meter::default();
        let q = Quota {
            cpu_cores: Some(2.0),
            ..Quota::default()
        };
        let mut at = |ms: u64, secs: f64| {
            let snap = Snapshot {
                taken_at_ms: ms,
                ..Default::default()
            };
            let mut status = Vec::new();
            let usage = BTreeMap::from([("cpu_seconds", secs)]);
            m.cgroup_status(&snap, "a", &q, &usage, &mut status);
            (status[0].limit, status[0].usage)
        };
        assert_eq!(at(1_000, 10.0), (2.0, None), "no rate from one sample");
        assert_eq!(at(3_000, 13.0), (2.0, Some(1.5)));
        assert_eq!(at(3_000, 14.0), (2.0, None), "no time passed");
    }
}
