//! What `tally top` shows, as plain rows: built from an agent's snapshots
//! or an aggregator's cluster view, sorted, and nothing drawn yet (so it
//! is tested without a terminal).

use std::{cmp::Ordering, collections::BTreeMap};

use clap::ValueEnum;
use tally_agent::snapshot::{Snapshot, TENANT_IDLE};
use tally_aggregator::cluster::ClusterView;

/// One GPU or MIG instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GpuRow {
    /// `"0"`, `"2/1/0"`, or `"node/0"` in the cluster view.
    pub id: String,
    pub state: String,
    pub utilization: Option<f64>,
    pub memory_used: u64,
    pub memory_total: u64,
    pub power_watts: Option<f64>,
    pub tenants: Vec<String>,
}

/// One tenant. Rates are `None` until two samples are known, and in the
/// cluster view (the aggregator keeps usage, not live rates).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TenantRow {
    pub tenant: String,
    /// GPUs held, as a number of whole devices (a MIG slice counts its
    /// fraction; a shared GPU is split by the agent's attribution).
    pub gpu_share: Option<f64>,
    pub memory: u64,
    /// Energy rate: watts attributed to the tenant.
    pub power_watts: Option<f64>,
    pub net_in: Option<f64>,
    pub net_out: Option<f64>,
    /// PCIe copies, both directions, bytes per second.
    pub pcie: Option<f64>,
    /// The quota closest to (or over) its limit: `(resource, usage/limit)`.
    pub quota: Option<(String, f64)>,
}

/// Everything on one screen.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct View {
    /// `node gpu-a` or `cluster (3 nodes)`.
    pub scope: String,
    pub gpus: Vec<GpuRow>,
    pub tenants: Vec<TenantRow>,
}

/// The tenant column to sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SortKey {
    Tenant,
    Gpu,
    Memory,
    Energy,
    Network,
    Pcie,
    Quota,
}

impl SortKey {
    /// The key that selects this column in the live view.
    pub(crate) fn from_key(c: char) -> Option<SortKey> {
        Some(match c {
            't' => SortKey::Tenant,
            'g' => SortKey::Gpu,
            'm' => SortKey::Memory,
            'e' => SortKey::Energy,
            'n' => SortKey::Network,
            'p' => SortKey::Pcie,
            'u' => SortKey::Quota,
            _ => return None,
        })
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            SortKey::Tenant => "tenant",
            SortKey::Gpu => "GPU share",
            SortKey::Memory => "memory",
            SortKey::Energy => "energy",
            SortKey::Network => "network",
            SortKey::Pcie => "PCIe",
            SortKey::Quota => "quota",
        }
    }
}

/// Sorts tenants by `key`: names A→Z, numbers largest first (`reverse`
/// flips either); ties keep name order so rows do not jump between frames.
pub(crate) fn sort_tenants(rows: &mut [TenantRow], key: SortKey, reverse: bool) {
    let num = |r: &TenantRow| -> f64 {
        match key {
            SortKey::Tenant => 0.0,
            SortKey::Gpu => r.gpu_share.unwrap_or(0.0),
            SortKey::Memory => r.memory as f64,
            SortKey::Energy => r.power_watts.unwrap_or(0.0),
            SortKey::Network => r.net_in.unwrap_or(0.0) + r.net_out.unwrap_or(0.0),
            SortKey::Pcie => r.pcie.unwrap_or(0.0),
            SortKey::Quota => r.quota.as_ref().map_or(0.0, |q| q.1),
        }
    };
    rows.sort_by(|a, b| {
        let first = if key == SortKey::Tenant {
            a.tenant.cmp(&b.tenant)
        } else {
            num(b).partial_cmp(&num(a)).unwrap_or(Ordering::Equal)
        };
        let first = if reverse { first.reverse() } else { first };
        first.then_with(|| a.tenant.cmp(&b.tenant))
    });
}

/// The view of one node from its latest snapshot, with rates over the
/// time since `prev` (the snapshot before it), when there is one.
pub(crate) fn from_snapshot(prev: Option<&Snapshot>, cur: &Snapshot) -> View {
    let gpus = cur
        .gpus
        .iter()
        .map(|g| {
            let mut tenants: Vec<String> =
                g.processes.iter().map(|p| p.tenant.to_string()).collect();
            tenants.sort();
            tenants.dedup();
            GpuRow {
                id: g.gpu.clone(),
                state: g.state.as_str().to_owned(),
                utilization: g.utilization_ratio,
                memory_used: g.memory_used_bytes,
                memory_total: g.memory_total_bytes,
                power_watts: g.power_watts,
                tenants,
            }
        })
        .collect();
    let dt = prev
        .filter(|p| p.samples < cur.samples && p.taken_at_ms < cur.taken_at_ms)
        .map(|p| (p, (cur.taken_at_ms - p.taken_at_ms) as f64 / 1000.0));
    let rate = |now: f64, before: f64, secs: f64| ((now - before) / secs).max(0.0);
    let fraction: BTreeMap<&str, f64> = cur
        .gpus
        .iter()
        .map(|g| (g.gpu.as_str(), g.slice_fraction.unwrap_or(1.0)))
        .collect();

    let mut rows: BTreeMap<String, TenantRow> = BTreeMap::new();
    for u in cur.tenant_gpu.iter().filter(|u| &*u.tenant != TENANT_IDLE) {
        let r = entry(&mut rows, &u.tenant);
        r.memory += u.memory_bytes;
        if let Some((p, secs)) = dt {
            let before = p
                .tenant_gpu
                .iter()
                .find(|b| b.tenant == u.tenant && b.gpu == u.gpu);
            let (alloc, energy) = before.map_or((0.0, 0.0), |b| {
                (b.allocated_seconds_total, b.energy_joules_total)
            });
            let share = rate(u.allocated_seconds_total, alloc, secs)
                * fraction.get(&*u.gpu).copied().unwrap_or(1.0);
            *r.gpu_share.get_or_insert(0.0) += share;
            *r.power_watts.get_or_insert(0.0) += rate(u.energy_joules_total, energy, secs);
        }
    }
    for io in &cur.tenant_io {
        let r = entry(&mut rows, &io.tenant);
        if let Some((p, secs)) = dt {
            let b = p.tenant_io.iter().find(|b| b.tenant == io.tenant);
            let get = |f: fn(&tally_agent::snapshot::TenantIoUsage) -> u64| {
                rate(f(io) as f64, b.map_or(0, f) as f64, secs)
            };
            r.net_in = Some(get(|x| x.network_ingress_bytes_total));
            r.net_out = Some(get(|x| x.network_egress_bytes_total));
            r.pcie = Some(get(|x| x.pcie_h2d_bytes_total) + get(|x| x.pcie_d2h_bytes_total));
        }
    }
    for q in &cur.tenant_quotas {
        let r = entry(&mut rows, &q.tenant);
        note_quota(r, &q.resource, q.limit, q.usage);
    }
    View {
        scope: format!("node {}", cur.node),
        gpus,
        tenants: rows.into_values().collect(),
    }
}

fn entry<'a>(rows: &'a mut BTreeMap<String, TenantRow>, tenant: &str) -> &'a mut TenantRow {
    rows.entry(tenant.to_owned()).or_insert_with(|| TenantRow {
        tenant: tenant.to_owned(),
        ..TenantRow::default()
    })
}

/// Keeps the quota nearest its limit.
fn note_quota(r: &mut TenantRow, resource: &str, limit: f64, usage: Option<f64>) {
    note_ratio(
        r,
        resource,
        usage.filter(|_| limit > 0.0).map(|u| u / limit),
    );
}

/// Keeps the quota nearest its limit, given as `usage / limit` (`None`
/// when either is unknown).
fn note_ratio(r: &mut TenantRow, resource: &str, ratio: Option<f64>) {
    let Some(ratio) = ratio else {
        if r.quota.is_none() {
            r.quota = Some((resource.to_owned(), f64::NAN));
        }
        return;
    };
    if r.quota.as_ref().is_none_or(|q| q.1.is_nan() || ratio > q.1) {
        r.quota = Some((resource.to_owned(), ratio));
    }
}

/// The shortest report interval of the cluster's nodes: how often
/// anything new can arrive.
pub(crate) fn interval_ms(c: &ClusterView) -> Option<i64> {
    c.nodes.iter().filter_map(|n| n.report_interval_ms).min()
}

/// The view of the cluster: every node's devices, every tenant's holdings.
pub(crate) fn from_cluster(c: &ClusterView) -> View {
    let mut fraction = BTreeMap::new();
    let mut gpus = Vec::new();
    for n in &c.nodes {
        for g in &n.gpus {
            fraction.insert((n.node.as_str(), g.gpu.as_str()), g.slice_fraction);
            gpus.push(GpuRow {
                id: format!("{}/{}", n.node, g.gpu),
                state: if n.stale {
                    "stale".to_owned()
                } else {
                    g.state.clone()
                },
                utilization: g.utilization_ratio,
                memory_used: g.memory_used_bytes.max(0) as u64,
                memory_total: g.memory_total_bytes.max(0) as u64,
                power_watts: None,
                tenants: g.tenants.clone(),
            });
        }
    }
    let tenants = c
        .tenants
        .iter()
        .map(|t| {
            let mut r = TenantRow {
                tenant: t.tenant.clone(),
                gpu_share: Some(
                    t.devices
                        .iter()
                        .map(|d| {
                            fraction
                                .get(&(d.node.as_str(), d.gpu.as_str()))
                                .copied()
                                .flatten()
                                .unwrap_or(1.0)
                        })
                        .sum(),
                ),
                memory: t
                    .devices
                    .iter()
                    .map(|d| d.memory_used_bytes.max(0) as u64)
                    .sum(),
                ..TenantRow::default()
            };
            for q in &t.quotas {
                note_ratio(&mut r, &q.resource, q.ratio);
            }
            r
        })
        .collect();
    View {
        scope: format!("cluster ({} nodes)", c.nodes.len()),
        gpus,
        tenants,
    }
}

#[cfg(test)]
mod tests {
    use tally_agent::snapshot::{GpuSnapshot, TenantGpuUsage, TenantIoUsage, TenantQuotaStatus};

    use super::*;

    fn usage(tenant: &str, gpu: &str, alloc: f64, energy: f64, mem: u64) -> TenantGpuUsage {
        TenantGpuUsage {
            tenant: tenant.into(),
            gpu: gpu.into(),
            allocated_seconds_total: alloc,
            energy_joules_total: energy,
            memory_bytes: mem,
            ..TenantGpuUsage::default()
        }
    }

    fn snap(samples: u64, at_s: u64, usages: Vec<TenantGpuUsage>, pcie: u64) -> Snapshot {
        Snapshot {
            node: "n1".into(),
            samples,
            taken_at_ms: at_s * 1000,
            gpus: vec![
                GpuSnapshot {
                    gpu: "0".into(),
                    ..GpuSnapshot::default()
                },
                GpuSnapshot {
                    gpu: "2/1/0".into(),
                    slice_fraction: Some(0.5),
                    ..GpuSnapshot::default()
                },
            ],
            tenant_gpu: usages.into(),
            tenant_io: vec![TenantIoUsage {
                tenant: "acme".into(),
                pcie_h2d_bytes_total: pcie,
                ..TenantIoUsage::default()
            }],
            tenant_quotas: vec![TenantQuotaStatus {
                tenant: "beta".into(),
                resource: "gpu_memory".into(),
                limit: 100.0,
                usage: Some(150.0),
            }],
            ..Snapshot::default()
        }
    }

    #[test]
    fn rates_come_from_two_snapshots_and_mig_counts_its_fraction() {
        let a = snap(
            1,
            10,
            vec![
                usage("acme", "0", 5.0, 100.0, 1),
                usage("beta", "2/1/0", 0.0, 0.0, 2),
            ],
            0,
        );
        let b = snap(
            3,
            12,
            vec![
                usage("acme", "0", 6.0, 700.0, 1),
                usage("beta", "2/1/0", 2.0, 0.0, 2),
                usage(TENANT_IDLE, "0", 1.0, 0.0, 0),
            ],
            4096,
        );
        let first = from_snapshot(None, &b);
        assert_eq!(
            first.tenants[0].gpu_share, None,
            "no rate from one snapshot"
        );
        let v = from_snapshot(Some(&a), &b);
        let names: Vec<_> = v.tenants.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(names, ["acme", "beta"], "_idle is not a tenant");
        let acme = &v.tenants[0];
        assert_eq!(acme.gpu_share, Some(0.5));
        assert_eq!(acme.power_watts, Some(300.0));
        assert_eq!(acme.pcie, Some(2048.0));
        let beta = &v.tenants[1];
        assert_eq!(beta.gpu_share, Some(0.5), "a whole half-GPU slice");
        assert_eq!(beta.quota, Some(("gpu_memory".into(), 1.5)));
        assert_eq!(v.scope, "node n1");
    }

    #[test]
    fn sorting_puts_the_largest_first_and_reverse_flips() {
        let row = |t: &str, m: u64| TenantRow {
            tenant: t.into(),
            memory: m,
            ..TenantRow::default()
        };
        let mut rows = vec![row("a", 1), row("b", 3), row("c", 2), row("d", 3)];
        sort_tenants(&mut rows, SortKey::Memory, false);
        let order: String = rows.iter().map(|r| r.tenant.as_str()).collect();
        assert_eq!(order, "bdca");
        sort_tenants(&mut rows, SortKey::Memory, true);
        let order: String = rows.iter().map(|r| r.tenant.as_str()).collect();
        assert_eq!(order, "acbd");
        sort_tenants(&mut rows, SortKey::Tenant, false);
        let order: String = rows.iter().map(|r| r.tenant.as_str()).collect();
        assert_eq!(order, "abcd");
        for c in "tgmenpu".chars() {
            assert!(SortKey::from_key(c).is_some(), "{c}");
        }
    }

    #[test]
    fn the_cluster_view_reads_the_aggregators_json() {
        let capacity = r#"{"gpus":1,"healthy_gpus":1,"free_gpus":0,"mig":{},"free_mig":{},
            "free_memory_bytes":0,"idle":0,"unhealthy_gpus":[]}"#;
        let json = format!(
            r#"{{"generated_at":"x","generated_at_ms":1,
          "nodes":[{{"node":"a","last_report":"x","last_report_ms":1,"last_interval_end_ms":1,
            "stale_after_ms":30000,"stale":false,"reports":1,"report_interval_ms":2000,
            "capacity":{capacity},"quotas":[],"gpus":[
            {{"gpu":"0","uuid":"GPU-0","model":"H100","mig_mode":false,"health":"ok",
             "state":"busy","slice_fraction":null,"utilization_ratio":0.5,
             "memory_used_bytes":10,"memory_total_bytes":100,"memory_free_bytes":90,
             "processes":1,"tenants":["acme"],"updated_ms":1}}]}},
           {{"node":"b","last_report":"x","last_report_ms":1,"last_interval_end_ms":1,
            "stale_after_ms":30000,"stale":true,"reports":1,"report_interval_ms":null,
            "capacity":{capacity},"quotas":[],"gpus":[]}}],
          "tenants":[{{"tenant":"acme","devices":[{{"node":"a","gpu":"0","uuid":"GPU-0",
            "state":"busy","memory_used_bytes":10}}],
            "quotas":[{{"node":"a","resource":"gpus","limit":2,"usage":1,"ratio":0.5}}]}}]}}"#
        );
        let c: ClusterView = serde_json::from_str(&json).unwrap();
        assert_eq!(interval_ms(&c), Some(2000));
        let v = from_cluster(&c);
        assert_eq!(v.scope, "cluster (2 nodes)");
        assert_eq!(v.gpus[0].id, "a/0");
        assert_eq!(v.tenants[0].gpu_share, Some(1.0));
        assert_eq!(v.tenants[0].memory, 10);
        assert_eq!(v.tenants[0].quota, Some(("gpus".into(), 0.5)));
    }
}
