//! The cluster view of `GET /api/v1/cluster`: every node and every GPU /
//! MIG instance as their latest reports left them, each node's free
//! capacity (what the scheduler extender decides by), and each tenant's
//! usage against its quotas.
//!
//! Pure: built from the rows the ledger read ([`ClusterView::build`]),
//! which the server reads on each request, never from memory, so any
//! replica behind a Service answers the same. The schema is in
//! `docs/cluster-api.md`.
//!
//! *Reclaimable* lists every device that is `idle` (held, doing nothing
//! past the agent's `[states] idle_after`) with who holds it, since when,
//! and what its idle time cost so far: evidence a scheduler or queue can
//! preempt on.
//!
//! A node is *stale* when nothing arrived from it for three of its report
//! intervals: its data is shown as it was, flagged, and the extender does
//! not place pods on it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tally_contract::wire::HeldBy;

use crate::{
    chargeback::{format_minor, to_minor},
    config::Prices,
    ledger::cluster::ClusterRows,
    time::rfc3339,
};

/// Missed report intervals after which a node is stale.
pub(crate) const STALE_INTERVALS: i64 = 3;
/// Report interval assumed for agents that do not send theirs (the
/// agent's default `[report] interval`).
pub(crate) const DEFAULT_INTERVAL_MS: i64 = 10_000;

/// The whole cluster as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// When the view was read (aggregator clock).
    pub generated_at: String,
    pub generated_at_ms: i64,
    /// Every node that ever reported, by name.
    pub nodes: Vec<NodeView>,
    /// Every tenant holding a device or having a quota somewhere.
    pub tenants: Vec<TenantView>,
    /// Every idle device, by node and label: held and wasted.
    #[serde(default)]
    pub reclaimable: Vec<Reclaimable>,
}

/// A device held but idle, with what its idle time cost so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reclaimable {
    pub node: String,
    pub gpu: String,
    pub uuid: String,
    /// The model its time is priced by (a MIG instance's parent's).
    pub model: String,
    pub mig_profile: Option<String>,
    /// GPU-hours one hour of it is charged as (a MIG slice's fraction).
    pub slice_fraction: f64,
    /// Tenants holding it. For a tenant-scoped reader: only its own.
    pub tenants: Vec<String>,
    /// The named workloads holding it, by tenant.
    pub workloads: Vec<HeldBy>,
    /// When it entered the `idle` state (node clock).
    pub idle_since: String,
    pub idle_since_ms: i64,
    /// Idle time up to its node's last report (`updated_ms`), seconds.
    pub idle_seconds: f64,
    /// `idle_seconds` in GPU-hours (× `slice_fraction`).
    pub idle_gpu_hours: f64,
    /// `idle_gpu_hours` at the model's GPU-hour price, as chargeback
    /// prices it (`idle_cost`); absent until priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_so_far: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    /// When its last report arrived (aggregator clock).
    pub(crate) last_report: String,
    pub(crate) last_report_ms: i64,
    /// End of the newest interval it reported (node clock).
    pub(crate) last_interval_end_ms: i64,
    /// Its `[report] interval`; `None` from agents that do not send it
    /// ([`DEFAULT_INTERVAL_MS`] is assumed).
    pub report_interval_ms: Option<i64>,
    /// Time without a report after which the node is stale.
    pub(crate) stale_after_ms: i64,
    pub stale: bool,
    /// Reports stored from it.
    pub(crate) reports: i64,
    /// Physical GPUs first, each followed by its MIG instances.
    pub gpus: Vec<GpuView>,
    pub(crate) capacity: Capacity,
    /// Its tenants' local quotas, as of its newest report.
    pub(crate) quotas: Vec<QuotaView>,
}

/// One GPU or MIG instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    /// `"<index>"`, or `"<index>/<gi>/<ci>"` for a MIG instance.
    pub gpu: String,
    pub uuid: String,
    pub model: String,
    /// Physical GPU in MIG mode (always true for an instance).
    pub mig_mode: bool,
    pub mig_profile: Option<String>,
    pub parent_uuid: Option<String>,
    pub slice_fraction: Option<f64>,
    /// `ok`, `lost` or `error`: whether NVML answers for it.
    pub health: String,
    /// `free`, `busy`, `idle`, `stuck` or `lost`.
    pub state: String,
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub memory_free_bytes: i64,
    pub processes: i64,
    /// Tenants holding it. For a tenant-scoped reader: only its own.
    pub tenants: Vec<String>,
    /// Tenant-scoped reader only: how many other tenants hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_tenants: Option<usize>,
    /// End of the report interval these values are from (node clock).
    pub updated_ms: i64,
    /// When it entered the `idle` state (node clock); only while idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since_ms: Option<i64>,
    /// The named workloads holding it. For a tenant-scoped reader: only
    /// its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<HeldBy>,
}

/// What a node can take now: the numbers the extender filters and scores by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Capacity {
    /// Whole GPUs (physical, not in MIG mode), in any state.
    pub gpus: u64,
    /// Whole GPUs that are neither stuck nor lost.
    pub healthy_gpus: u64,
    /// Healthy whole GPUs that no process holds: `nvidia.com/gpu` capacity.
    pub free_gpus: u64,
    /// Healthy MIG instances by profile.
    pub mig: BTreeMap<String, u64>,
    /// Healthy MIG instances no process holds, by profile:
    /// `nvidia.com/mig-<profile>` capacity.
    pub free_mig: BTreeMap<String, u64>,
    /// Free memory of the free devices above, bytes.
    pub free_memory_bytes: i64,
    /// Devices held but idle (allocated and wasted).
    pub idle: u64,
    /// Physical GPUs that are stuck or lost, or have an instance that is:
    /// the extender down-ranks the node.
    pub unhealthy_gpus: Vec<String>,
}

/// One quota of one tenant on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct QuotaView {
    pub tenant: String,
    pub resource: String,
    pub limit: f64,
    pub usage: Option<f64>,
}

/// One tenant across the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant: String,
    /// Devices it holds, with their state (`idle` = allocated and wasted).
    pub devices: Vec<HeldDevice>,
    /// Its quotas on every node.
    pub quotas: Vec<NodeQuota>,
}

/// A device a tenant holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldDevice {
    pub node: String,
    pub gpu: String,
    pub uuid: String,
    pub mig_profile: Option<String>,
    pub state: String,
    pub memory_used_bytes: i64,
}

/// A quota of a tenant on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeQuota {
    pub node: String,
    pub resource: String,
    pub limit: f64,
    pub usage: Option<f64>,
    /// `usage / limit` when both are known and the limit is above 0.
    pub ratio: Option<f64>,
}

impl GpuView {
    /// Whether the device counts as out of service.
    pub(crate) fn unhealthy(&self) -> bool {
        self.health != "ok" || matches!(self.state.as_str(), "stuck" | "lost")
    }

    fn free(&self) -> bool {
        !self.unhealthy() && self.state == "free"
    }
}

/// The state of a device from an agent that does not send one.
fn derived_state(health: &str, processes: i64) -> &'static str {
    if health != "ok" {
        "lost"
    } else if processes > 0 {
        "busy"
    } else {
        "free"
    }
}

/// Order of GPU labels: numerically by each `/` part.
fn label_key(gpu: &str) -> Vec<u64> {
    gpu.split('/')
        .map(|p| p.parse().unwrap_or(u64::MAX))
        .collect()
}

/// Free capacity of a node from its devices.
pub(crate) fn capacity(gpus: &[GpuView]) -> Capacity {
    let mut c = Capacity::default();
    let by_uuid: BTreeMap<&str, &GpuView> = gpus.iter().map(|g| (g.uuid.as_str(), g)).collect();
    let mut unhealthy = BTreeSet::new();
    for g in gpus {
        if g.state == "idle" {
            c.idle += 1;
        }
        match &g.parent_uuid {
            None => {
                if g.unhealthy() {
                    unhealthy.insert(g.gpu.clone());
                }
                if g.mig_mode {
                    continue;
                }
                c.gpus += 1;
                if !g.unhealthy() {
                    c.healthy_gpus += 1;
                }
                if g.free() {
                    c.free_gpus += 1;
                    c.free_memory_bytes += g.memory_free_bytes;
                }
            }
            Some(parent) => {
                let parent = by_uuid.get(parent.as_str());
                let parent_bad = parent.is_some_and(|p| p.health != "ok" || p.state == "lost");
                if g.unhealthy() || parent_bad {
                    let label = parent.map_or_else(
                        || g.gpu.split('/').next().unwrap_or(&g.gpu).to_owned(),
                        |p| p.gpu.clone(),
                    );
                    unhealthy.insert(label);
                    continue;
                }
                let profile = g.mig_profile.clone().unwrap_or_else(|| "unknown".into());
                *c.mig.entry(profile.clone()).or_default() += 1;
                if g.free() {
                    *c.free_mig.entry(profile).or_default() += 1;
                    c.free_memory_bytes += g.memory_free_bytes;
                } else {
                    c.free_mig.entry(profile).or_default();
                }
            }
        }
    }
    let mut u: Vec<String> = unhealthy.into_iter().collect();
    u.sort_by_key(|g| label_key(g));
    c.unhealthy_gpus = u;
    c
}

impl ClusterView {
    /// The view as of `now_ms` (aggregator clock), from what the ledger
    /// read.
    pub(crate) fn build(rows: ClusterRows, now_ms: i64) -> Self {
        let mut gpus: BTreeMap<String, Vec<GpuView>> = BTreeMap::new();
        for row in rows.gpus {
            let state = row
                .state
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| derived_state(&row.health, row.processes).into());
            let g = GpuView {
                gpu: row.gpu,
                uuid: row.uuid,
                model: row.model,
                mig_mode: row.mig_mode.map_or(row.parent_uuid.is_some(), |m| m != 0),
                mig_profile: row.mig_profile,
                parent_uuid: row.parent_uuid,
                slice_fraction: row.slice_fraction,
                state,
                health: row.health,
                utilization_ratio: row.utilization_ratio,
                memory_used_bytes: row.memory_used_bytes,
                memory_total_bytes: row.memory_total_bytes,
                memory_free_bytes: (row.memory_total_bytes - row.memory_used_bytes).max(0),
                processes: row.processes,
                tenants: row
                    .tenants
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
                other_tenants: None,
                updated_ms: row.updated_ms,
                idle_since_ms: row.idle_since_ms,
                workloads: row
                    .workloads
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
            };
            gpus.entry(row.node).or_default().push(g);
        }
        let mut quotas: BTreeMap<String, Vec<QuotaView>> = BTreeMap::new();
        for row in rows.quotas {
            quotas.entry(row.node).or_default().push(QuotaView {
                tenant: row.tenant,
                resource: row.resource,
                limit: row.limit_value,
                usage: row.usage_value,
            });
        }
        let mut nodes = Vec::new();
        for row in rows.nodes {
            let node = row.node;
            let last_report_ms = row.last_received_ms;
            let report_interval_ms = row.report_interval_ms;
            let stale_after_ms = STALE_INTERVALS.saturating_mul(
                report_interval_ms
                    .filter(|v| *v > 0)
                    .unwrap_or(DEFAULT_INTERVAL_MS),
            );
            let mut devices = gpus.remove(&node).unwrap_or_default();
            devices.sort_by_key(|g| label_key(&g.gpu));
            nodes.push(NodeView {
                last_report: rfc3339(last_report_ms),
                last_report_ms,
                last_interval_end_ms: row.last_interval_end_ms,
                report_interval_ms,
                stale_after_ms,
                stale: now_ms.saturating_sub(last_report_ms) > stale_after_ms,
                reports: row.reports,
                capacity: capacity(&devices),
                gpus: devices,
                quotas: quotas.remove(&node).unwrap_or_default(),
                node,
            });
        }
        let tenants = tenants_of(&nodes);
        let reclaimable = reclaimable(&nodes);
        ClusterView {
            generated_at: rfc3339(now_ms),
            generated_at_ms: now_ms,
            nodes,
            tenants,
            reclaimable,
        }
    }

    /// Prices each reclaimable device's idle time as chargeback does.
    pub(crate) fn priced(mut self, prices: &Prices) -> Self {
        for r in &mut self.reclaimable {
            let minor = to_minor(
                r.idle_gpu_hours * prices.gpu_hour(&r.model),
                prices.decimals,
            );
            r.cost_so_far = Some(format_minor(minor, prices.decimals).to_string());
            r.currency = Some(prices.currency.clone());
        }
        self
    }
}

/// The idle devices of `nodes` that someone holds.
fn reclaimable(nodes: &[NodeView]) -> Vec<Reclaimable> {
    let mut out = Vec::new();
    for n in nodes {
        for g in n.gpus.iter().filter(|g| g.state == "idle") {
            // Agents that predate `idle_since_ms` say only that it is idle.
            let since = g.idle_since_ms.unwrap_or(g.updated_ms);
            let parent = g
                .parent_uuid
                .as_ref()
                .and_then(|p| n.gpus.iter().find(|x| &x.uuid == p));
            let model = parent.map_or(&g.model, |p| &p.model);
            let slice = g
                .slice_fraction
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .unwrap_or(1.0);
            let idle_seconds = (g.updated_ms - since).max(0) as f64 / 1000.0;
            out.push(Reclaimable {
                node: n.node.clone(),
                gpu: g.gpu.clone(),
                uuid: g.uuid.clone(),
                model: if model.is_empty() {
                    "unknown".into()
                } else {
                    model.clone()
                },
                mig_profile: g.mig_profile.clone(),
                slice_fraction: slice,
                tenants: g.tenants.clone(),
                workloads: g.workloads.clone(),
                idle_since: rfc3339(since),
                idle_since_ms: since,
                idle_seconds,
                idle_gpu_hours: idle_seconds / 3600.0 * slice,
                cost_so_far: None,
                currency: None,
            });
        }
    }
    out
}

fn tenants_of(nodes: &[NodeView]) -> Vec<TenantView> {
    let mut out: BTreeMap<String, TenantView> = BTreeMap::new();
    fn entry<'a>(out: &'a mut BTreeMap<String, TenantView>, t: &str) -> &'a mut TenantView {
        out.entry(t.to_owned()).or_insert_with(|| TenantView {
            tenant: t.to_owned(),
            devices: Vec::new(),
            quotas: Vec::new(),
        })
    }
    for n in nodes {
        for g in &n.gpus {
            for t in &g.tenants {
                entry(&mut out, t).devices.push(HeldDevice {
                    node: n.node.clone(),
                    gpu: g.gpu.clone(),
                    uuid: g.uuid.clone(),
                    mig_profile: g.mig_profile.clone(),
                    state: g.state.clone(),
                    memory_used_bytes: g.memory_used_bytes,
                });
            }
        }
        for q in &n.quotas {
            entry(&mut out, &q.tenant).quotas.push(NodeQuota {
                node: n.node.clone(),
                resource: q.resource.clone(),
                limit: q.limit,
                usage: q.usage,
                ratio: q.usage.filter(|_| q.limit > 0.0).map(|u| u / q.limit),
            });
        }
    }
    out.into_values().collect()
}

impl ClusterView {
    /// What a tenant-scoped reader sees: every node, device and capacity
    /// (a team deciding where to run needs them), but no other tenant's
    /// name or quota; devices held by others say only how many hold them.
    pub(crate) fn for_tenant(mut self, tenant: &str) -> Self {
        for n in &mut self.nodes {
            for g in &mut n.gpus {
                let others = g.tenants.iter().filter(|t| *t != tenant).count();
                g.tenants.retain(|t| t == tenant);
                g.other_tenants = Some(others);
                g.workloads.retain(|w| w.tenant == tenant);
            }
            n.quotas.retain(|q| q.tenant == tenant);
        }
        self.tenants.retain(|t| t.tenant == tenant);
        self.reclaimable
            .retain(|r| r.tenants.iter().any(|t| t == tenant));
        for r in &mut self.reclaimable {
            r.tenants.retain(|t| t == tenant);
            r.workloads.retain(|w| w.tenant == tenant);
        }
        self
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tally_contract::wire::{GpuGauge, Report, SCHEMA_VERSION, TenantQuota};

    use super::*;
    use crate::ledger::chargeback::tests::sqlite_ledger;

    pub(crate) fn gpu(label: &str, state: &str, tenants: &[&str]) -> GpuView {
        let parent = label.contains('/');
        GpuView {
            gpu: label.into(),
            uuid: format!("UUID-{label}"),
            model: "NVIDIA A100-SXM4-40GB".into(),
            mig_mode: parent,
            mig_profile: None,
            parent_uuid: parent.then(|| format!("UUID-{}", label.split('/').next().unwrap())),
            slice_fraction: None,
            health: if state == "lost" { "lost" } else { "ok" }.into(),
            state: state.into(),
            utilization_ratio: None,
            memory_used_bytes: 0,
            memory_total_bytes: 40 << 30,
            memory_free_bytes: 40 << 30,
            processes: tenants.len() as i64,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            other_tenants: None,
            updated_ms: 0,
            idle_since_ms: None,
            workloads: vec![],
        }
    }

    pub(crate) fn mig(label: &str, profile: &str, state: &str) -> GpuView {
        GpuView {
            mig_profile: Some(profile.into()),
            ..gpu(label, state, if state == "free" { &[] } else { &["acme"] })
        }
    }

    #[test]
    fn capacity_counts_free_healthy_devices() {
        let mut parent = gpu("2", "busy", &[]);
        parent.mig_mode = true;
        let devices = vec![
            gpu("0", "free", &[]),
            gpu("1", "stuck", &["acme"]),
            gpu("3", "idle", &["beta"]),
            parent,
            mig("2/1/0", "3g.20gb", "busy"),
            mig("2/2/0", "1g.5gb", "free"),
            mig("2/3/0", "1g.5gb", "free"),
        ];
        let c = capacity(&devices);
        assert_eq!((c.gpus, c.healthy_gpus, c.free_gpus), (3, 2, 1));
        assert_eq!(c.mig["1g.5gb"], 2);
        assert_eq!(c.free_mig["1g.5gb"], 2);
        assert_eq!(c.free_mig["3g.20gb"], 0);
        assert_eq!(c.idle, 1);
        assert_eq!(c.unhealthy_gpus, ["1"]);
        assert_eq!(c.free_memory_bytes, 3 * (40 << 30));

        // A lost parent takes its instances with it.
        let mut lost = gpu("2", "lost", &[]);
        lost.mig_mode = true;
        let c = capacity(&[lost, mig("2/2/0", "1g.5gb", "free")]);
        assert!(c.free_mig.is_empty());
        assert_eq!(c.unhealthy_gpus, ["2"]);
    }

    #[test]
    fn a_tenant_sees_capacity_but_no_other_names() {
        let node = NodeView {
            node: "n1".into(),
            last_report: String::new(),
            last_report_ms: 0,
            last_interval_end_ms: 0,
            report_interval_ms: None,
            stale_after_ms: 30_000,
            stale: false,
            reports: 1,
            gpus: vec![
                gpu("0", "busy", &["acme", "beta"]),
                gpu("1", "idle", &["beta"]),
            ],
            capacity: Capacity::default(),
            quotas: vec![
                QuotaView {
                    tenant: "acme".into(),
                    resource: "gpus".into(),
                    limit: 2.0,
                    usage: Some(1.0),
                },
                QuotaView {
                    tenant: "beta".into(),
                    resource: "gpus".into(),
                    limit: 1.0,
                    usage: Some(1.0),
                },
            ],
        };
        let nodes = vec![node];
        let view = ClusterView {
            generated_at: String::new(),
            generated_at_ms: 0,
            tenants: tenants_of(&nodes),
            reclaimable: reclaimable(&nodes),
            nodes,
        };
        assert_eq!(view.tenants.len(), 2);
        assert_eq!(view.reclaimable[0].tenants, ["beta"]);
        assert_eq!(view.tenants[1].devices.len(), 2);
        assert_eq!(view.tenants[0].quotas[0].ratio, Some(0.5));
        let acme = view.for_tenant("acme");
        let text = serde_json::to_string(&acme).unwrap();
        assert!(!text.contains("beta"), "{text}");
        assert_eq!(acme.nodes[0].gpus[0].other_tenants, Some(1));
        assert_eq!(acme.nodes[0].gpus[1].other_tenants, Some(1));
        assert_eq!(acme.nodes[0].quotas.len(), 1);
        assert_eq!(acme.tenants.len(), 1);
        assert!(acme.reclaimable.is_empty(), "beta's idle GPU is not acme's");
    }

    fn report(node: &str, seq: u64, end: u64, state: &str) -> Report {
        Report {
            version: SCHEMA_VERSION,
            node: node.into(),
            boot_id: "b".into(),
            seq,
            interval_start_ms: end - 1000,
            interval_end_ms: end,
            gpu_usage: vec![],
            io_usage: vec![],
            gpus: vec![GpuGauge {
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                model: "H100".into(),
                health: "ok".into(),
                memory_total_bytes: 80 << 30,
                memory_used_bytes: 1 << 30,
                processes: 1,
                state: state.into(),
                tenants: vec!["acme".into()],
                ..Default::default()
            }],
            audit: vec![],
            report_interval_ms: Some(1000),
            tenant_quotas: vec![TenantQuota {
                tenant: "acme".into(),
                resource: "gpus".into(),
                limit: 1.0,
                usage: Some(seq as f64),
            }],
            cluster: None,
        }
    }

    #[tokio::test]
    async fn the_view_follows_the_newest_report_and_goes_stale() {
        let (_dir, ledger) = sqlite_ledger(2).await;
        for (seq, end, state) in [
            (1, 10_000, "busy"),
            (3, 30_000, "stuck"),
            (2, 20_000, "idle"),
        ] {
            let r = report("n1", seq, end, state);
            ledger
                .ingest(&r, &r.digest(), 50_000, &Default::default())
                .await
                .unwrap();
        }
        let v = ClusterView::build(ledger.cluster_rows().await.unwrap(), 51_000);
        let n = &v.nodes[0];
        assert_eq!(n.gpus.len(), 1);
        assert_eq!(
            n.gpus[0].state, "stuck",
            "the replayed older report changes nothing"
        );
        assert_eq!(n.gpus[0].tenants, ["acme"]);
        assert_eq!(n.gpus[0].memory_free_bytes, 79 << 30);
        assert_eq!(n.quotas[0].usage, Some(3.0));
        assert_eq!(
            (n.report_interval_ms, n.stale_after_ms, n.stale),
            (Some(1000), 3000, false)
        );
        assert_eq!(n.capacity.unhealthy_gpus, ["0"]);
        assert_eq!(v.tenants[0].devices[0].state, "stuck");
        let v = ClusterView::build(ledger.cluster_rows().await.unwrap(), 53_001);
        assert!(v.nodes[0].stale);
    }

    /// An idle device is reclaimable, with its holders, since when, and
    /// its idle time priced as chargeback prices it: a MIG instance by its
    /// parent's model and its slice.
    #[tokio::test]
    async fn idle_devices_are_reclaimable_with_their_cost_so_far() {
        let (_dir, ledger) = sqlite_ledger(2).await;
        let mut r = report("n1", 1, 7_210_000, "idle");
        r.gpus[0].idle_since_ms = Some(10_000);
        r.gpus[0].workloads = vec![HeldBy {
            tenant: "acme".into(),
            workload: "job-1".into(),
        }];
        r.gpus.push(GpuGauge {
            gpu: "1".into(),
            uuid: "GPU-1".into(),
            model: "A100".into(),
            mig_mode: true,
            health: "ok".into(),
            state: "busy".into(),
            ..Default::default()
        });
        r.gpus.push(GpuGauge {
            gpu: "1/1/0".into(),
            uuid: "MIG-1".into(),
            model: "A100 MIG 3g.20gb".into(),
            mig_mode: true,
            mig_profile: Some("3g.20gb".into()),
            parent_uuid: Some("GPU-1".into()),
            slice_fraction: Some(0.5),
            health: "ok".into(),
            state: "idle".into(),
            tenants: vec!["beta".into()],
            idle_since_ms: Some(3_610_000),
            ..Default::default()
        });
        ledger
            .ingest(&r, &r.digest(), 7_300_000, &Default::default())
            .await
            .unwrap();
        let prices = Prices {
            gpu_hour: [("H100".to_owned(), 2.0), ("A100".to_owned(), 1.5)].into(),
            ..Prices::default()
        };
        let v = ClusterView::build(ledger.cluster_rows().await.unwrap(), 7_300_000).priced(&prices);
        let got: Vec<_> = v
            .reclaimable
            .iter()
            .map(|r| {
                (
                    r.gpu.as_str(),
                    r.model.as_str(),
                    r.tenants.clone(),
                    r.idle_seconds,
                    r.cost_so_far.clone().unwrap(),
                )
            })
            .collect();
        // 2 h of an H100 at 2.00; 1 h of half an A100 at 1.50.
        assert_eq!(
            got,
            [
                (
                    "0",
                    "H100",
                    vec!["acme".to_owned()],
                    7200.0,
                    "4.00".to_owned()
                ),
                (
                    "1/1/0",
                    "A100",
                    vec!["beta".to_owned()],
                    3600.0,
                    "0.75".to_owned()
                ),
            ]
        );
        assert_eq!(v.reclaimable[0].workloads[0].workload, "job-1");
        assert_eq!(v.reclaimable[0].idle_since, rfc3339(10_000));
        assert_eq!(v.nodes[0].gpus[0].idle_since_ms, Some(10_000));
        assert_eq!(v.nodes[0].gpus[1].idle_since_ms, None, "busy");
        let beta = v.for_tenant("beta");
        assert_eq!(beta.reclaimable.len(), 1);
        assert!(!serde_json::to_string(&beta).unwrap().contains("job-1"));
    }
}
