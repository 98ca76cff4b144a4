//! Chargeback: the ledger's usage over a period, priced.
//!
//! **Arithmetic.** The ledger holds exact integers (microseconds,
//! millijoules, bytes). A line is split into priced items, one per SKU
//! (`gpu-hour:<model>`, `energy-kwh`, `network-gib`, `pcie-gib`); each
//! item's cost is computed once in f64 from the exact integer sums
//! (GPU: Σ µs × slice fraction / 3.6e9 × price) and rounded once, half away
//! from zero, to the currency's minor unit (`[prices] decimals`). A line's
//! cost is the sum of its rounded items and the total is the sum of the
//! lines, so every figure adds up to the cent in every format.
//!
//! **Time-of-use energy.** When `[prices] energy_kwh` is a table of
//! prices by local time of day, each UTC hour's energy is charged at the
//! price in force when that hour began (see `config/energy.rs`), and a
//! line has one `energy-kwh` item per price, each with its `unit_price`,
//! summed as integers per price and rounded once.
//!
//! **Basis.** `allocated` charges the time a tenant held a device.
//! `used` charges SM-weighted time (allocated time on MIG instances, where
//! NVML has no per-process utilization); the held-but-unused remainder goes
//! to `_idle`, so the lines still add up to the fleet's cost.
//!
//! **Waste.** GPU time a tenant held while the device was `idle` (the
//! agent's state: held, doing nothing past `[states] idle_after`) is
//! shown on every line and GPU item as `idle_gpu_hours` and `idle_cost`:
//! a part of the GPU time and cost, never added to them, priced as the
//! item is (per model and slice). Under `basis=used` idle time is unused
//! time, so it moves to `_idle` with the rest of the unused remainder.
//!
//! **Workloads.** Grouped by workload, a tenant's item costs are first
//! rounded for the tenant as a whole, then shared among its workload lines
//! by largest remainder, so the workload lines of a tenant sum to its
//! tenant line to the cent. The empty workload is the tenant's usage
//! outside any named workload (and all of its I/O, which is per tenant).
//!
//! **Period.** A report belongs to the period that contains its interval's
//! end: `from ≤ interval_end < to`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Prices,
    ledger::{
        chargeback::{GpuGroup, IoGroup},
        energy::EnergyHour,
    },
};
use tally_contract::tenant::TENANT_IDLE;

mod formats;
mod money;

pub(crate) use money::{Money, format_minor, to_minor};

/// How lines are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum GroupBy {
    #[serde(rename = "tenant")]
    Tenant,
    #[serde(rename = "tenant,gpu_model")]
    TenantModel,
    #[serde(rename = "tenant,node")]
    TenantNode,
    #[serde(rename = "tenant,workload")]
    TenantWorkload,
    #[serde(rename = "cluster,tenant")]
    ClusterTenant,
    #[serde(rename = "cluster,tenant,workload")]
    ClusterTenantWorkload,
}

impl GroupBy {
    /// Every grouping, as `group_by` spells it.
    pub(crate) const ALL: &'static str = "tenant, tenant,gpu_model, tenant,node, tenant,workload, cluster,tenant or \
         cluster,tenant,workload";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.replace(' ', "").as_str() {
            "tenant" => Some(Self::Tenant),
            "tenant,gpu_model" | "tenant,model" => Some(Self::TenantModel),
            "tenant,node" => Some(Self::TenantNode),
            "tenant,workload" => Some(Self::TenantWorkload),
            "cluster,tenant" => Some(Self::ClusterTenant),
            "cluster,tenant,workload" => Some(Self::ClusterTenantWorkload),
            _ => None,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::TenantModel => "tenant,gpu_model",
            Self::TenantNode => "tenant,node",
            Self::TenantWorkload => "tenant,workload",
            Self::ClusterTenant => "cluster,tenant",
            Self::ClusterTenantWorkload => "cluster,tenant,workload",
        }
    }
    pub(crate) fn by_cluster(self) -> bool {
        matches!(self, Self::ClusterTenant | Self::ClusterTenantWorkload)
    }
    pub(crate) fn by_workload(self) -> bool {
        matches!(self, Self::TenantWorkload | Self::ClusterTenantWorkload)
    }
}

/// What GPU time is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Basis {
    Allocated,
    Used,
}

impl Basis {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "allocated" => Some(Self::Allocated),
            "used" => Some(Self::Used),
            _ => None,
        }
    }
}

/// One priced SKU of one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Item {
    /// `gpu-hour:<model>`, `energy-kwh`, `network-gib`, `pcie-gib`.
    /// (Shared: a month by node has 800,000 items and a handful of SKUs.)
    pub sku: Arc<str>,
    /// In `unit`s; GPU-hours are slice-weighted (a 3/7 MIG hour is 3/7).
    pub quantity: f64,
    pub unit: Cow<'static, str>,
    pub unit_price: f64,
    /// Cost in minor units (cents).
    pub cost_minor: i64,
    pub cost: Money,
    /// GPU items: the part of `quantity` held idle, and its part of the
    /// cost (minor units, and as a decimal).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idle_quantity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idle_cost_minor: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idle_cost: Option<Money>,
}

/// One chargeback line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Line {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cluster: Option<String>,
    pub tenant: String,
    /// Grouped by workload: the workload, empty for the tenant's usage
    /// outside any named workload.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
    pub gpu_hours: f64,
    pub energy_kwh: f64,
    pub network_gib: f64,
    pub pcie_gib: f64,
    pub gpu_cost: Money,
    pub energy_cost: Money,
    pub network_cost: Money,
    pub pcie_cost: Money,
    pub cost: Money,
    pub cost_minor: i64,
    /// GPU-hours held idle: a part of `gpu_hours`.
    #[serde(default)]
    pub idle_gpu_hours: f64,
    /// What the idle GPU-hours cost: a part of `gpu_cost`.
    #[serde(default)]
    pub idle_cost: Money,
    pub items: Vec<Item>,
}

/// A whole chargeback answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chargeback {
    pub(crate) currency: String,
    pub(crate) decimals: u32,
    pub(crate) basis: Basis,
    pub(crate) group_by: String,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) lines: Vec<Line>,
    pub(crate) total: Money,
    pub(crate) total_minor: i64,
    /// Set when the period reaches past `[ledger] raw_retention`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) rounded: Option<Rounded>,
}

/// How a period reaching past raw retention was read: from the hourly
/// rollups, its edges rounded down to whole hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rounded {
    /// Always `hour`.
    pub granularity: String,
    /// The period actually read, `[from, to)`.
    pub from: String,
    pub to: String,
    /// Raw rows before this time may have been removed.
    pub raw_retention_cutoff: String,
}

/// Milliseconds per hour: the rollups' granularity.
const HOUR_MS: i64 = 3_600_000;

/// The period to read for `[from_ms, to_ms)` when raw rows before
/// `raw_cutoff_ms` may be gone: an edge whose partial hour would be read
/// from such rows is rounded down to its hour. `None`: read as asked.
pub(crate) fn hour_bounds(from_ms: i64, to_ms: i64, raw_cutoff_ms: i64) -> Option<(i64, i64)> {
    let hour = |t: i64| t - t.rem_euclid(HOUR_MS);
    let from_gone = from_ms < raw_cutoff_ms && from_ms != hour(from_ms);
    // The end's partial hour is read from raw rows from its hour's start,
    // or from the period's start when that is later.
    let to_gone = hour(to_ms).max(from_ms) < raw_cutoff_ms && to_ms != hour(to_ms);
    (from_gone || to_gone).then(|| {
        (
            if from_gone { hour(from_ms) } else { from_ms },
            if to_gone { hour(to_ms) } else { to_ms },
        )
    })
}

/// Microseconds per hour, millijoules per kWh, bytes per GiB.
const US_PER_HOUR: f64 = 3.6e9;
const MJ_PER_KWH: f64 = 3.6e9;
const BYTES_PER_GIB: f64 = 1_073_741_824.0;

/// A line's group: (cluster, tenant, model, node, workload), each `None`
/// where the grouping does not have it; borrowed from the ledger's rows,
/// copied only into the answer's lines.
type Key<'a> = (
    Option<&'a str>,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// A line's sums. Small vectors searched in turn, not maps: a line has
/// one model and one price or a few, and a month by node 200,000 lines.
#[derive(Default)]
struct Acc<'a> {
    /// Per model and slice fraction: Σ charged and Σ idle µs (the idle
    /// time a part of the charged), summed as integers, so the cents do
    /// not depend on how the ledger split the sums into groups (per node,
    /// or over nodes).
    gpu: Vec<GpuSums<'a>>,
    /// Per price per kWh (its bits: prices are ≥ 0, so bits sort as the
    /// prices do): Σ millijoules.
    energy_mj: Vec<(u64, i64)>,
    network_bytes: i64,
    pcie_bytes: i64,
}

struct GpuSums<'a> {
    model: &'a str,
    /// The slice fraction's bits.
    slice: u64,
    charged_us: i64,
    idle_us: i64,
}

impl<'a> Acc<'a> {
    /// `charged_us` more on `model` at `slice` (its bits), `idle_us` of
    /// it idle.
    fn add_gpu(&mut self, model: &'a str, slice: u64, charged_us: i64, idle_us: i64) {
        let at = match self
            .gpu
            .iter()
            .position(|g| g.slice == slice && g.model == model)
        {
            Some(at) => at,
            None => {
                self.gpu.push(GpuSums {
                    model,
                    slice,
                    charged_us: 0,
                    idle_us: 0,
                });
                self.gpu.len() - 1
            }
        };
        let sums = &mut self.gpu[at];
        sums.charged_us = sums.charged_us.saturating_add(charged_us);
        sums.idle_us = sums.idle_us.saturating_add(idle_us);
    }

    /// `mj` more at `price` (its bits).
    fn energy(&mut self, price: u64, mj: i64) {
        match self.energy_mj.iter_mut().find(|(p, _)| *p == price) {
            Some((_, sum)) => *sum += mj,
            None => self.energy_mj.push((price, mj)),
        }
    }
}

/// The SKU names of one answer, made once each and shared by its items.
struct Skus<'a> {
    /// Per model: its SKU and its price per GPU-hour.
    gpu_hour: HashMap<&'a str, (Arc<str>, f64)>,
    energy: Arc<str>,
    network: Arc<str>,
    pcie: Arc<str>,
}

impl<'a> Skus<'a> {
    fn new() -> Self {
        Self {
            gpu_hour: HashMap::new(),
            energy: "energy-kwh".into(),
            network: "network-gib".into(),
            pcie: "pcie-gib".into(),
        }
    }

    /// `gpu-hour:<model>`, and the model's price.
    fn gpu_hour(&mut self, prices: &Prices, model: &'a str) -> (Arc<str>, f64) {
        let (sku, price) = self
            .gpu_hour
            .entry(model)
            .or_insert_with(|| (format!("gpu-hour:{model}").into(), prices.gpu_hour(model)));
        (sku.clone(), *price)
    }
}

/// One item of a line before it is rounded.
struct Priced {
    sku: Arc<str>,
    unit: &'static str,
    quantity: f64,
    unit_price: f64,
    minor: i64,
    /// GPU items: the idle part of `quantity` and of `minor`.
    idle: Option<(f64, i64)>,
}

/// The items of one line, each rounded on its own.
fn priced<'a>(prices: &Prices, skus: &mut Skus<'a>, mut a: Acc<'a>) -> Vec<Priced> {
    let d = prices.decimals;
    let mut items = Vec::with_capacity(a.gpu.len() + a.energy_mj.len() + 2);
    // Models in name order, each model's slices summed in the order of
    // their fractions' bits (as the B-trees these were summed in).
    a.gpu
        .sort_unstable_by(|x, y| (x.model, x.slice).cmp(&(y.model, y.slice)));
    for same in a.gpu.chunk_by(|x, y| x.model == y.model) {
        let weighted = |us: fn(&GpuSums<'_>) -> i64| {
            same.iter()
                .map(|g| us(g) as f64 * f64::from_bits(g.slice))
                // From +0: an empty `sum()` of floats is -0.
                .fold(0.0, |sum, x| sum + x)
        };
        let weighted_us = weighted(|g| g.charged_us);
        if weighted_us <= 0.0 {
            continue;
        }
        let model = same[0].model;
        let hours = weighted_us / US_PER_HOUR;
        let idle_hours = weighted(|g| g.idle_us) / US_PER_HOUR;
        let (sku, price) = skus.gpu_hour(prices, model);
        items.push(Priced {
            sku,
            unit: "GPU-Hours",
            quantity: hours,
            unit_price: price,
            minor: to_minor(hours * price, d),
            // Idle time is a part of the charged time (see `compute`), so
            // rounded alike it is a part of the cost.
            idle: Some((idle_hours, to_minor(idle_hours * price, d))),
        });
    }
    a.energy_mj.sort_unstable_by_key(|(price, _)| *price);
    let energy = a.energy_mj.iter().map(|(price, mj)| {
        (
            &skus.energy,
            "kWh",
            *mj as f64 / MJ_PER_KWH,
            f64::from_bits(*price),
        )
    });
    for (sku, unit, quantity, price) in energy.chain([
        (
            &skus.network,
            "GiB",
            a.network_bytes as f64 / BYTES_PER_GIB,
            prices.network_gib,
        ),
        (
            &skus.pcie,
            "GiB",
            a.pcie_bytes as f64 / BYTES_PER_GIB,
            prices.pcie_gib,
        ),
    ]) {
        if quantity > 0.0 {
            items.push(Priced {
                sku: sku.clone(),
                unit,
                quantity,
                unit_price: price,
                minor: to_minor(quantity * price, d),
                idle: None,
            });
        }
    }
    items
}

/// Re-rounds the items of lines that share a parent (the key without its
/// workload), SKU by SKU and price by price: the parent's cost is rounded
/// once and shared by largest remainder, so the lines sum to it exactly.
fn apportion(lines: &mut BTreeMap<Key<'_>, Vec<Priced>>, decimals: u32) {
    share_out(
        lines,
        decimals,
        |it| Some(it.quantity),
        |it, m| it.minor = m,
    );
    // The idle parts likewise, so they too sum to the tenant's.
    share_out(
        lines,
        decimals,
        |it| it.idle.map(|i| i.0),
        |it, m| {
            if let Some(i) = it.idle.as_mut() {
                i.1 = m;
            }
        },
    );
}

/// [`apportion`] of one amount of the items: `quantity` gives it (priced
/// at the item's unit price), `set` stores its minor units.
fn share_out(
    lines: &mut BTreeMap<Key<'_>, Vec<Priced>>,
    decimals: u32,
    quantity: impl Fn(&Priced) -> Option<f64>,
    set: impl Fn(&mut Priced, i64),
) {
    // (parent, SKU, unit price) → (line, item index, exact minor units)
    // of each part.
    type Parts<'k> = BTreeMap<(Key<'k>, Arc<str>, u64), Vec<(Key<'k>, usize, f64)>>;

    let mut parts: Parts<'_> = BTreeMap::new();
    for (key, items) in lines.iter() {
        let mut parent = *key;
        parent.4 = None;
        for (n, it) in items.iter().enumerate() {
            let Some(q) = quantity(it) else { continue };
            let exact = q * it.unit_price * 10f64.powi(decimals as i32);
            parts
                .entry((parent, it.sku.clone(), it.unit_price.to_bits()))
                .or_default()
                .push((*key, n, exact));
        }
    }
    for mut shares in parts.into_values() {
        let whole = shares.iter().map(|s| s.2).sum::<f64>().round() as i64;
        let mut given: i64 = shares.iter().map(|s| s.2.floor() as i64).sum();
        // Largest fraction first; ties in key order, so answers repeat.
        shares.sort_by(|a, b| (b.2 - b.2.floor()).total_cmp(&(a.2 - a.2.floor())));
        for (key, n, exact) in shares {
            let mut minor = exact.floor() as i64;
            if given < whole {
                minor += 1;
                given += 1;
            }
            if let Some(it) = lines.get_mut(&key).and_then(|v| v.get_mut(n)) {
                set(it, minor);
            }
        }
    }
}

/// Prices the usage groups of a period. `energy`: the period's energy per
/// hour, read when `[prices] energy_kwh` is a time-of-use table; it then
/// replaces the energy of the GPU groups. `None`: the groups' energy, at
/// the one price.
// The inputs are read apart (and `energy` only with time of use); a struct
// of them would only be built to be taken apart here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compute(
    prices: &Prices,
    gpu: &[GpuGroup],
    io: &[IoGroup],
    energy: Option<&[EnergyHour]>,
    group_by: GroupBy,
    basis: Basis,
    from: String,
    to: String,
) -> Chargeback {
    fn line_key<'a>(
        group_by: GroupBy,
        cluster: &'a str,
        tenant: &'a str,
        model: Option<&'a str>,
        node: &'a str,
        workload: &'a str,
    ) -> Key<'a> {
        (
            group_by.by_cluster().then_some(cluster),
            tenant,
            (group_by == GroupBy::TenantModel).then_some(model.unwrap_or("-")),
            (group_by == GroupBy::TenantNode).then_some(node),
            group_by.by_workload().then_some(workload),
        )
    }
    let key = |cluster, tenant, model, node, workload| {
        line_key(group_by, cluster, tenant, model, node, workload)
    };
    // Hashed while summing, sorted once after: a month by node is 200,000
    // keys, and a B-tree compared strings ~17 times per row to find each.
    // Sized up front (rows bound the keys): each growth rehashed them all.
    // (foldhash: SipHash's defence against chosen keys is not needed for
    // the ledger's own names, and was a tenth of the summing.)
    let mut acc: HashMap<Key<'_>, Acc<'_>, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(gpu.len().max(io.len()), Default::default());
    for g in gpu {
        let idle_us = g.idle_us.clamp(0, g.allocated_us);
        let (charged, remainder) = match basis {
            Basis::Allocated => (g.allocated_us, 0),
            Basis::Used if g.tenant == TENANT_IDLE => (g.allocated_us, 0),
            Basis::Used => {
                let used = g.used_us.clamp(0, g.allocated_us);
                (used, g.allocated_us - used)
            }
        };
        let a = acc
            .entry(key(
                &g.cluster,
                &g.tenant,
                Some(&g.model),
                &g.node,
                &g.workload,
            ))
            .or_default();
        let slice = g.slice_fraction.to_bits();
        // Idle time is unused time: under `used` it goes with the unused
        // remainder, so each line's idle time stays a part of its own.
        let moved = idle_us.min(remainder);
        a.add_gpu(&g.model, slice, charged, idle_us - moved);
        if energy.is_none() {
            a.energy(prices.energy_kwh.to_bits(), g.energy_mj);
        }
        if remainder > 0 {
            let idle = acc
                .entry(key(&g.cluster, TENANT_IDLE, Some(&g.model), &g.node, ""))
                .or_default();
            idle.add_gpu(&g.model, slice, remainder, moved);
        }
    }
    for r in io {
        let a = acc
            .entry(key(&r.cluster, &r.tenant, None, &r.node, ""))
            .or_default();
        a.network_bytes += r.network_ingress_bytes + r.network_egress_bytes;
        a.pcie_bytes += r.pcie_h2d_bytes + r.pcie_d2h_bytes;
    }
    // An hour's price, looked up once: a month has 720 hours, and many
    // groups in each.
    let mut hour_price: BTreeMap<i64, u64> = BTreeMap::new();
    for h in energy.unwrap_or_default() {
        let price = *hour_price
            .entry(h.hour_ms)
            .or_insert_with(|| prices.energy_kwh_at(h.hour_ms).to_bits());
        let a = acc
            .entry(key(
                &h.cluster,
                &h.tenant,
                Some(&h.model),
                &h.node,
                &h.workload,
            ))
            .or_default();
        a.energy(price, h.energy_mj);
    }
    let d = prices.decimals;
    let mut skus = Skus::new();
    let mut items: Vec<(Key<'_>, Vec<Priced>)> = acc
        .into_iter()
        .map(|(k, a)| (k, priced(prices, &mut skus, a)))
        .collect();
    items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if group_by.by_workload() {
        let mut by_key = items.into_iter().collect();
        apportion(&mut by_key, d);
        items = by_key.into_iter().collect();
    }
    let mut lines = Vec::with_capacity(items.len());
    for ((cluster, tenant, gpu_model, node, workload), priced) in items {
        if priced.is_empty() {
            continue;
        }
        let (mut gpu_hours, mut gpu_minor) = (0.0, 0);
        let (mut idle_gpu_hours, mut idle_minor) = (0.0, 0);
        let (mut energy_kwh, mut energy_minor) = (0.0, 0);
        let (mut network_gib, mut network_minor) = (0.0, 0);
        let (mut pcie_gib, mut pcie_minor) = (0.0, 0);
        for p in &priced {
            let (q, m) = match p.sku.as_ref() {
                "energy-kwh" => (&mut energy_kwh, &mut energy_minor),
                "network-gib" => (&mut network_gib, &mut network_minor),
                "pcie-gib" => (&mut pcie_gib, &mut pcie_minor),
                _ => (&mut gpu_hours, &mut gpu_minor),
            };
            *q += p.quantity;
            *m += p.minor;
            if let Some((hours, minor)) = p.idle {
                idle_gpu_hours += hours;
                idle_minor += minor;
            }
        }
        let items = priced
            .into_iter()
            .map(|p| Item {
                sku: p.sku,
                quantity: p.quantity,
                unit: Cow::Borrowed(p.unit),
                unit_price: p.unit_price,
                cost_minor: p.minor,
                cost: format_minor(p.minor, d),
                idle_quantity: p.idle.map(|i| i.0),
                idle_cost_minor: p.idle.map(|i| i.1),
                idle_cost: p.idle.map(|i| format_minor(i.1, d)),
            })
            .collect();
        let cost_minor = gpu_minor + energy_minor + network_minor + pcie_minor;
        lines.push(Line {
            cluster: cluster.map(str::to_owned),
            tenant: tenant.to_owned(),
            workload: workload.map(str::to_owned),
            gpu_model: gpu_model.map(str::to_owned),
            node: node.map(str::to_owned),
            gpu_hours,
            energy_kwh,
            network_gib,
            pcie_gib,
            gpu_cost: format_minor(gpu_minor, d),
            energy_cost: format_minor(energy_minor, d),
            network_cost: format_minor(network_minor, d),
            pcie_cost: format_minor(pcie_minor, d),
            cost: format_minor(cost_minor, d),
            cost_minor,
            idle_gpu_hours,
            idle_cost: format_minor(idle_minor, d),
            items,
        });
    }
    let total_minor = lines.iter().map(|l| l.cost_minor).sum();
    Chargeback {
        currency: prices.currency.clone(),
        decimals: d,
        basis,
        group_by: group_by.as_str().into(),
        from,
        to,
        lines,
        total: format_minor(total_minor, d),
        total_minor,
        rounded: None,
    }
}

impl Chargeback {
    /// Keeps only `tenant`'s lines (a tenant-scoped reader).
    pub(crate) fn only_tenant(mut self, tenant: &str) -> Self {
        self.lines.retain(|l| l.tenant == tenant);
        self.total_minor = self.lines.iter().map(|l| l.cost_minor).sum();
        self.total = format_minor(self.total_minor, self.decimals);
        self
    }

    fn group_columns(&self) -> Vec<&'static str> {
        match GroupBy::parse(&self.group_by) {
            Some(GroupBy::TenantModel) => vec!["tenant", "gpu_model"],
            Some(GroupBy::TenantNode) => vec!["tenant", "node"],
            Some(GroupBy::TenantWorkload) => vec!["tenant", "workload"],
            Some(GroupBy::ClusterTenant) => vec!["cluster", "tenant"],
            Some(GroupBy::ClusterTenantWorkload) => vec!["cluster", "tenant", "workload"],
            _ => vec!["tenant"],
        }
    }

    fn group_values<'a>(&self, l: &'a Line) -> Vec<&'a str> {
        let mut v = Vec::new();
        if let Some(c) = &l.cluster {
            v.push(c.as_str());
        }
        v.push(l.tenant.as_str());
        if let Some(w) = &l.workload {
            v.push(w);
        }
        if let Some(m) = &l.gpu_model {
            v.push(m);
        }
        if let Some(n) = &l.node {
            v.push(n);
        }
        v
    }

    /// A plain text table, for `tally report`.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let cols = self.group_columns();
        let width = |i: usize, min: usize| {
            self.lines
                .iter()
                .map(|l| self.group_values(l).get(i).map_or(0, |s| s.len()))
                .max()
                .unwrap_or(0)
                .max(min)
        };
        let widths: Vec<usize> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| width(i, c.len()))
            .collect();
        for (c, w) in cols.iter().zip(&widths) {
            let _ = write!(out, "{:<w$}  ", c.to_uppercase(), w = *w);
        }
        let _ = writeln!(
            out,
            "{:>12} {:>10} {:>10} {:>10} {:>12}",
            "GPU-HOURS",
            "KWH",
            "NET GIB",
            "PCIE GIB",
            format!("COST {}", self.currency)
        );
        for l in &self.lines {
            for (v, w) in self.group_values(l).iter().zip(&widths) {
                let _ = write!(out, "{v:<w$}  ", w = *w);
            }
            let _ = writeln!(
                out,
                "{:>12.4} {:>10.4} {:>10.4} {:>10.4} {:>12}",
                l.gpu_hours, l.energy_kwh, l.network_gib, l.pcie_gib, l.cost
            );
        }
        let pad: usize = widths.iter().map(|w| w + 2).sum();
        let _ = writeln!(
            out,
            "{:<pad$}{:>12} {:>10} {:>10} {:>10} {:>12}",
            "TOTAL",
            "",
            "",
            "",
            "",
            self.total,
            pad = pad
        );
        let _ = writeln!(
            out,
            "period {} .. {}, basis {}",
            self.from,
            self.to,
            match self.basis {
                Basis::Allocated => "allocated",
                Basis::Used => "used",
            }
        );
        if let Some(r) = &self.rounded {
            let _ = writeln!(
                out,
                "read {} .. {} in whole hours: raw rows before {} are past retention",
                r.from, r.to, r.raw_retention_cutoff
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_past_raw_retention_are_rounded_down_to_hours() {
        let h = 1_800_000_000_000 / HOUR_MS * HOUR_MS;
        let m = 60_000;
        // Everything after the cutoff, or hour-aligned: read as asked.
        assert_eq!(hour_bounds(h + 5 * m, h + 9 * HOUR_MS + m, h), None);
        assert_eq!(hour_bounds(h - 9 * HOUR_MS, h + 7 * m, h), None);
        assert_eq!(hour_bounds(h - 9 * HOUR_MS, h - HOUR_MS, h), None);
        // The start's partial hour is before the cutoff.
        assert_eq!(
            hour_bounds(h - 9 * HOUR_MS + 5 * m, h + 7 * m, h),
            Some((h - 9 * HOUR_MS, h + 7 * m))
        );
        // Both edges' partial hours are.
        assert_eq!(
            hour_bounds(h - 9 * HOUR_MS + 5 * m, h - HOUR_MS + m, h + m),
            Some((h - 9 * HOUR_MS, h - HOUR_MS))
        );
        // Inside one hour: read as asked while the start is after the
        // cutoff, else nothing whole is left.
        assert_eq!(hour_bounds(h + 20 * m, h + 30 * m, h + 10 * m), None);
        assert_eq!(hour_bounds(h + m, h + 30 * m, h + 10 * m), Some((h, h)));
    }

    fn prices() -> Prices {
        Prices {
            currency: "USD".into(),
            decimals: 2,
            gpu_hour: [("H100".to_owned(), 2.49), ("default".to_owned(), 1.0)].into(),
            network_gib: 0.01,
            energy_kwh: 0.12,
            pcie_gib: 0.0,
            ..Prices::default()
        }
    }

    fn g(tenant: &str, model: &str, slice: f64, alloc_h: f64, used_h: f64) -> GpuGroup {
        GpuGroup {
            tenant: tenant.into(),
            node: "n1".into(),
            cluster: "default".into(),
            workload: String::new(),
            model: model.into(),
            slice_fraction: slice,
            allocated_us: (alloc_h * 3.6e9) as i64,
            used_us: (used_h * 3.6e9) as i64,
            energy_mj: 3_600_000_000, // 1 kWh
            memory_byte_seconds: 0.0,
            idle_us: 0,
        }
    }

    #[test]
    fn mig_is_priced_by_slice_and_lines_add_up() {
        let gpu = [
            g("acme", "H100", 1.0, 10.0, 5.0),
            g("acme", "H100", 3.0 / 7.0, 7.0, 7.0),
            g("beta", "T4", 1.0, 2.0, 1.0),
            g(TENANT_IDLE, "H100", 1.0, 1.0, 0.0),
        ];
        let io = [IoGroup {
            tenant: "beta".into(),
            cluster: "default".into(),
            node: "n1".into(),
            network_egress_bytes: 100 << 30,
            ..Default::default()
        }];
        let c = compute(
            &prices(),
            &gpu,
            &io,
            None,
            GroupBy::Tenant,
            Basis::Allocated,
            "2026-11-01T00:00:00Z".into(),
            "2026-12-01T00:00:00Z".into(),
        );
        let line =
            |c: &Chargeback, t: &str| c.lines.iter().find(|l| l.tenant == t).cloned().unwrap();
        assert_eq!(
            c.lines[0].tenant, TENANT_IDLE,
            "Tally's own tenants sort first"
        );
        let acme = line(&c, "acme");
        assert_eq!(acme.tenant, "acme");
        // 10 h + 3/7 of 7 h = 13 GPU-hours at 2.49; 2 kWh at 0.12.
        assert_eq!(acme.gpu_cost, "32.37");
        assert_eq!(acme.energy_cost, "0.24");
        assert_eq!(acme.cost, "32.61");
        let beta = line(&c, "beta");
        assert_eq!(beta.gpu_cost, "2.00", "default price");
        assert_eq!(beta.network_cost, "1.00");
        let idle = line(&c, TENANT_IDLE);
        assert_eq!(idle.tenant, TENANT_IDLE);
        assert_eq!(idle.gpu_cost, "2.49");
        assert_eq!(
            c.total_minor,
            c.lines.iter().map(|l| l.cost_minor).sum::<i64>()
        );

        // basis=used: the held-but-unused part goes to _idle; total equal.
        let u = compute(
            &prices(),
            &gpu,
            &io,
            None,
            GroupBy::Tenant,
            Basis::Used,
            "2026-11-01T00:00:00Z".into(),
            "2026-12-01T00:00:00Z".into(),
        );
        assert_eq!(
            line(&u, "acme").gpu_cost,
            "19.92",
            "5 h + 3 h (MIG: allocated)"
        );
        let gpu_total = |c: &Chargeback| {
            c.lines
                .iter()
                .flat_map(|l| &l.items)
                .filter(|i| i.sku.starts_with("gpu"))
                .map(|i| i.quantity)
                .sum::<f64>()
        };
        assert!((gpu_total(&u) - gpu_total(&c)).abs() < 1e-9);

        let by_model = compute(
            &prices(),
            &gpu,
            &io,
            None,
            GroupBy::TenantModel,
            Basis::Allocated,
            "2026-11-01T00:00:00Z".into(),
            "2026-12-01T00:00:00Z".into(),
        );
        assert_eq!(by_model.total_minor, c.total_minor);
        assert!(
            by_model
                .lines
                .iter()
                .any(|l| l.gpu_model.as_deref() == Some("-"))
        );
        let csv = by_model.to_csv();
        assert!(csv.starts_with("tenant,gpu_model,gpu_hours"), "{csv}");
        let focus = c.to_focus(&prices());
        assert_eq!(
            focus.lines().count(),
            1 + c.lines.iter().map(|l| l.items.len()).sum::<usize>()
        );
        assert!(focus.contains("gpu-hour:H100"));
        assert!(c.to_table().contains("TOTAL"));
        let t = c.only_tenant("beta");
        assert_eq!(t.lines.len(), 1);
        assert_eq!(t.total, "3.12");
    }

    /// An answer encoded in halves is byte for byte serde_json's of the
    /// whole, however the lines split, with and without `rounded`.
    #[test]
    fn json_in_halves_is_the_whole_answers() {
        let gpu: Vec<GpuGroup> = (0..9)
            .map(|n| GpuGroup {
                node: format!("n{n}"),
                idle_us: n * 1_000_000_000,
                ..g(
                    ["acme", "beta", "\"q\""][n as usize % 3],
                    "H100",
                    1.0,
                    1.0 + n as f64,
                    0.5,
                )
            })
            .collect();
        let io: Vec<IoGroup> = (0..9)
            .map(|n| IoGroup {
                tenant: "acme".into(),
                node: format!("n{n}"),
                cluster: "default".into(),
                network_ingress_bytes: n << 30,
                ..IoGroup::default()
            })
            .collect();
        for basis in [Basis::Allocated, Basis::Used] {
            let mut c = compute(
                &prices(),
                &gpu,
                &io,
                None,
                GroupBy::TenantNode,
                basis,
                "2026-11-01T00:00:00Z".into(),
                "2026-12-01T00:00:00Z".into(),
            );
            assert!(c.lines.len() >= 15, "{:?}", c.lines);
            for rounded in [
                None,
                Some(Rounded {
                    granularity: "hour".into(),
                    from: "a".into(),
                    to: "b".into(),
                    raw_retention_cutoff: "c".into(),
                }),
            ] {
                c.rounded = rounded;
                let whole = serde_json::to_vec(&c).unwrap();
                for parallel_from in [1, 2, 5, usize::MAX] {
                    assert_eq!(
                        String::from_utf8(c.to_json_in_halves(parallel_from)).unwrap(),
                        String::from_utf8(whole.clone()).unwrap(),
                    );
                }
                let mut empty = c.clone();
                empty.lines.clear();
                assert_eq!(
                    empty.to_json_in_halves(1),
                    serde_json::to_vec(&empty).unwrap()
                );
            }
        }
    }

    /// Idle time is shown as a part of the GPU time and cost, priced per
    /// model and slice; under `basis=used` it moves to `_idle` with the
    /// unused time; workload lines' idle costs sum to the tenant's.
    #[test]
    fn idle_time_is_a_priced_part_of_the_gpu_cost() {
        let idle = |h: f64| (h * 3.6e9) as i64;
        let gpu = [
            GpuGroup {
                idle_us: idle(4.0),
                ..g("acme", "H100", 1.0, 10.0, 5.0)
            },
            GpuGroup {
                idle_us: idle(7.0),
                workload: "job-1".into(),
                ..g("acme", "H100", 3.0 / 7.0, 7.0, 7.0)
            },
            g("beta", "T4", 1.0, 2.0, 1.0),
        ];
        let run = |by, basis| {
            compute(
                &prices(),
                &gpu,
                &[],
                None,
                by,
                basis,
                "2026-11-01T00:00:00Z".into(),
                "2026-12-01T00:00:00Z".into(),
            )
        };
        let line = |c: &Chargeback, t: &str| c.lines.iter().find(|l| l.tenant == t).cloned();
        let c = run(GroupBy::Tenant, Basis::Allocated);
        let acme = line(&c, "acme").unwrap();
        // 4 h + 3/7 of 7 h = 7 idle GPU-hours of 13, at 2.49.
        assert!((acme.idle_gpu_hours - 7.0).abs() < 1e-9, "{acme:?}");
        assert_eq!(acme.idle_cost, "17.43");
        assert_eq!(acme.gpu_cost, "32.37", "idle is a part, not added");
        let item = &acme.items[0];
        assert_eq!(item.idle_cost.as_deref(), Some("17.43"));
        assert_eq!(line(&c, "beta").unwrap().idle_cost, "0.00");
        assert!(
            c.to_csv()
                .lines()
                .nth(1)
                .unwrap()
                .ends_with(",7.000000,17.43")
        );
        assert!(c.to_focus(&prices()).contains(",7.000000000,17.43\n"));
        assert!(!c.to_focus(&prices()).contains("-0.0"));

        // basis=used: acme is charged 5 h + 3 h; its 4 h idle of the 5 h
        // unused on the whole H100 moves to _idle, the MIG hours stay.
        let u = run(GroupBy::Tenant, Basis::Used);
        let acme = line(&u, "acme").unwrap();
        assert!((acme.idle_gpu_hours - 3.0).abs() < 1e-9, "{acme:?}");
        let moved = line(&u, TENANT_IDLE).unwrap();
        assert!((moved.idle_gpu_hours - 4.0).abs() < 1e-9, "{moved:?}");

        let w = run(GroupBy::TenantWorkload, Basis::Allocated);
        let parts: i64 = w
            .lines
            .iter()
            .filter(|l| l.tenant == "acme")
            .flat_map(|l| &l.items)
            .filter_map(|i| i.idle_cost_minor)
            .sum();
        assert_eq!(parts, 1743);
    }

    /// Energy in a cheap hour and a dear one: one `energy-kwh` item per
    /// price, each at its own; the groups' own energy is not counted
    /// again; workload lines still sum to their tenant's, price by price.
    #[test]
    fn time_of_use_energy_is_priced_hour_by_hour() {
        // 2026-11-30T21:00Z is 22:00 in Paris: the night window.
        let night = 1_796_072_400_000;
        let (default, tou) = crate::config::TimeOfUse::parse(
            r#"{ default = 0.12, "22:00-06:00" = 0.07 }"#,
            "Europe/Paris",
        );
        let prices = Prices {
            energy_kwh: default,
            energy_tou: Some(tou),
            ..prices()
        };
        let hour = |workload: &str, hour_ms: i64, kwh: f64| EnergyHour {
            tenant: "acme".into(),
            node: String::new(),
            cluster: "default".into(),
            workload: workload.into(),
            model: "T4".into(),
            hour_ms,
            energy_mj: (kwh * MJ_PER_KWH) as i64,
        };
        let energy = [
            hour("a", night - HOUR_MS, 1.0 / 3.0),
            hour("b", night - HOUR_MS, 1.0 / 3.0),
            hour("c", night - HOUR_MS, 1.0 / 3.0),
            hour("a", night, 2.0),
            hour("b", night + 8 * HOUR_MS, 10.0),
        ];
        let gpu = [g("acme", "T4", 1.0, 1.0, 1.0)];
        let run = |by| {
            compute(
                &prices,
                &gpu,
                &[],
                Some(&energy),
                by,
                Basis::Allocated,
                "f".into(),
                "t".into(),
            )
        };
        let tenant = run(GroupBy::Tenant);
        let items: Vec<(f64, f64, &str)> = tenant.lines[0]
            .items
            .iter()
            .filter(|i| &*i.sku == "energy-kwh")
            .map(|i| (i.unit_price, i.quantity, &*i.cost))
            .collect();
        // 2 kWh at night (0.14); 1 kWh before it and 10 after 06:00
        // (11 × 0.12 = 1.32).
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!((items[0].0, items[0].2), (0.07, "0.14"));
        assert_eq!((items[1].0, items[1].2), (0.12, "1.32"));
        assert!((items[1].1 - 11.0).abs() < 1e-9);
        assert_eq!(tenant.lines[0].energy_cost, "1.46");
        let by_workload = run(GroupBy::TenantWorkload);
        assert_eq!(by_workload.total_minor, tenant.total_minor);
        // The workload lines share each price item of their tenant line.
        let energy_minor: i64 = by_workload
            .lines
            .iter()
            .flat_map(|l| &l.items)
            .filter(|i| &*i.sku == "energy-kwh")
            .map(|i| i.cost_minor)
            .sum();
        assert_eq!(energy_minor, 146);
        let focus = tenant.to_focus(&prices);
        assert!(focus.contains(",energy-kwh@0.07,"), "{focus}");
        assert!(focus.contains(",energy-kwh@0.12,"), "{focus}");
    }

    /// Three workloads of a third of an hour at 1.00: rounded apart, each
    /// would be 0.33 (0.99 in all, the tenant's line 1.00); shared by
    /// largest remainder, they sum to the tenant's line exactly. Clusters
    /// give lines of their own.
    #[test]
    fn workload_lines_sum_to_their_tenant_line_to_the_cent() {
        let third = |workload: &str, cluster: &str| GpuGroup {
            workload: workload.into(),
            cluster: cluster.into(),
            energy_mj: 1_234_567,
            ..g("acme", "T4", 1.0, 1.0 / 3.0, 0.0)
        };
        let gpu = [
            third("", "default"),
            third("job-1", "default"),
            third("job-2", "prod-eu"),
            g("beta", "H100", 1.0, 0.5, 0.5),
        ];
        let io = [IoGroup {
            tenant: "acme".into(),
            cluster: "prod-eu".into(),
            network_egress_bytes: 7 << 30,
            ..Default::default()
        }];
        let run = |by| {
            compute(
                &prices(),
                &gpu,
                &io,
                None,
                by,
                Basis::Allocated,
                "2026-11-01T00:00:00Z".into(),
                "2026-12-01T00:00:00Z".into(),
            )
        };
        let tenant = run(GroupBy::Tenant);
        let acme = tenant.lines.iter().find(|l| l.tenant == "acme").unwrap();
        let by_workload = run(GroupBy::TenantWorkload);
        let parts: Vec<&Line> = by_workload
            .lines
            .iter()
            .filter(|l| l.tenant == "acme")
            .collect();
        assert_eq!(
            parts
                .iter()
                .map(|l| l.workload.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["", "job-1", "job-2"]
        );
        assert_eq!(
            parts.iter().map(|l| l.cost_minor).sum::<i64>(),
            acme.cost_minor,
            "{parts:?} vs {acme:?}"
        );
        assert_eq!(acme.gpu_cost, "1.00");
        for sku in ["gpu-hour:T4", "energy-kwh", "network-gib"] {
            let item = |l: &Line| {
                l.items
                    .iter()
                    .find(|i| &*i.sku == sku)
                    .map_or(0, |i| i.cost_minor)
            };
            assert_eq!(
                parts.iter().map(|l| item(l)).sum::<i64>(),
                item(acme),
                "{sku}"
            );
        }
        assert_eq!(by_workload.total_minor, tenant.total_minor);
        assert!(
            by_workload
                .to_csv()
                .starts_with("tenant,workload,gpu_hours")
        );

        let by_cluster = run(GroupBy::ClusterTenant);
        let clusters: Vec<(&str, &str)> = by_cluster
            .lines
            .iter()
            .map(|l| (l.cluster.as_deref().unwrap(), l.tenant.as_str()))
            .collect();
        assert_eq!(
            clusters,
            [
                ("default", "acme"),
                ("default", "beta"),
                ("prod-eu", "acme")
            ]
        );
        let focus = by_cluster.to_focus(&prices());
        assert!(
            focus
                .lines()
                .next()
                .unwrap()
                .ends_with(",RegionId,RegionName"),
            "{focus}"
        );
        assert!(focus.contains(",prod-eu,prod-eu"), "{focus}");
        assert!(
            !run(GroupBy::Tenant)
                .to_focus(&prices())
                .contains("RegionId")
        );
        let both = run(GroupBy::ClusterTenantWorkload);
        assert_eq!(both.total_minor, tenant.total_minor);
        assert_eq!(
            GroupBy::parse("cluster, tenant, workload"),
            Some(GroupBy::ClusterTenantWorkload)
        );
    }
}
