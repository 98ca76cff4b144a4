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
//! **Basis.** `allocated` charges the time a tenant held a device.
//! `used` charges SM-weighted time (allocated time on MIG instances, where
//! NVML has no per-process utilization); the held-but-unused remainder goes
//! to `_idle`, so the lines still add up to the fleet's cost.
//!
//! **Period.** A report belongs to the period that contains its interval's
//! end: `from ≤ interval_end < to`.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    config::Prices,
    ledger::chargeback::{GpuGroup, IoGroup},
};
use tally_contract::tenant::TENANT_IDLE;

mod formats;

/// How lines are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum GroupBy {
    #[serde(rename = "tenant")]
    Tenant,
    #[serde(rename = "tenant,gpu_model")]
    TenantModel,
    #[serde(rename = "tenant,node")]
    TenantNode,
}

impl GroupBy {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.replace(' ', "").as_str() {
            "tenant" => Some(Self::Tenant),
            "tenant,gpu_model" | "tenant,model" => Some(Self::TenantModel),
            "tenant,node" => Some(Self::TenantNode),
            _ => None,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::TenantModel => "tenant,gpu_model",
            Self::TenantNode => "tenant,node",
        }
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
    pub sku: String,
    /// In `unit`s; GPU-hours are slice-weighted (a 3/7 MIG hour is 3/7).
    pub quantity: f64,
    pub unit: String,
    pub unit_price: f64,
    /// Cost in minor units (cents).
    pub cost_minor: i64,
    pub cost: String,
}

/// One chargeback line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Line {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
    pub gpu_hours: f64,
    pub energy_kwh: f64,
    pub network_gib: f64,
    pub pcie_gib: f64,
    pub gpu_cost: String,
    pub energy_cost: String,
    pub network_cost: String,
    pub pcie_cost: String,
    pub cost: String,
    pub cost_minor: i64,
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
    pub(crate) total: String,
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

/// Rounds `amount` (in currency units) to minor units, half away from zero.
pub(crate) fn to_minor(amount: f64, decimals: u32) -> i64 {
    (amount * 10f64.powi(decimals as i32)).round() as i64
}

/// Formats minor units as a decimal amount (`1234`, 2 → `"12.34"`).
pub(crate) fn format_minor(minor: i64, decimals: u32) -> String {
    if decimals == 0 {
        return minor.to_string();
    }
    let scale = 10i64.pow(decimals);
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        m / scale as u64,
        m % scale as u64,
        width = decimals as usize
    )
}

type Key = (String, Option<String>, Option<String>);

#[derive(Default)]
struct Acc {
    /// Per model and slice fraction (its bits): Σ charged µs, summed as
    /// integers, so the cents do not depend on how the ledger split the
    /// sums into groups (per node, or over nodes).
    gpu_us: BTreeMap<String, BTreeMap<u64, i64>>,
    energy_mj: i64,
    network_bytes: i64,
    pcie_bytes: i64,
}

/// Prices the usage groups of a period.
pub(crate) fn compute(
    prices: &Prices,
    gpu: &[GpuGroup],
    io: &[IoGroup],
    group_by: GroupBy,
    basis: Basis,
    from: String,
    to: String,
) -> Chargeback {
    let key = |tenant: &str, model: Option<&str>, node: &str| -> Key {
        match group_by {
            GroupBy::Tenant => (tenant.to_owned(), None, None),
            GroupBy::TenantModel => (
                tenant.to_owned(),
                Some(model.unwrap_or("-").to_owned()),
                None,
            ),
            GroupBy::TenantNode => (tenant.to_owned(), None, Some(node.to_owned())),
        }
    };
    let mut acc: BTreeMap<Key, Acc> = BTreeMap::new();
    for g in gpu {
        let (charged, remainder) = match basis {
            Basis::Allocated => (g.allocated_us, 0),
            Basis::Used if g.tenant == TENANT_IDLE => (g.allocated_us, 0),
            Basis::Used => {
                let used = g.used_us.clamp(0, g.allocated_us);
                (used, g.allocated_us - used)
            }
        };
        let a = acc
            .entry(key(&g.tenant, Some(&g.model), &g.node))
            .or_default();
        let slice = g.slice_fraction.to_bits();
        let us = a.gpu_us.entry(g.model.clone()).or_default();
        let sum = us.entry(slice).or_default();
        *sum = sum.saturating_add(charged);
        a.energy_mj += g.energy_mj;
        if remainder > 0 {
            let idle = acc
                .entry(key(TENANT_IDLE, Some(&g.model), &g.node))
                .or_default();
            let sum = idle
                .gpu_us
                .entry(g.model.clone())
                .or_default()
                .entry(slice)
                .or_default();
            *sum = sum.saturating_add(remainder);
        }
    }
    for r in io {
        let a = acc.entry(key(&r.tenant, None, &r.node)).or_default();
        a.network_bytes += r.network_ingress_bytes + r.network_egress_bytes;
        a.pcie_bytes += r.pcie_h2d_bytes + r.pcie_d2h_bytes;
    }
    let d = prices.decimals;
    let mut lines = Vec::new();
    for ((tenant, gpu_model, node), a) in acc {
        let mut items = Vec::new();
        let mut gpu_hours = 0.0;
        let mut gpu_minor = 0;
        for (model, by_slice) in &a.gpu_us {
            let weighted_us: f64 = by_slice
                .iter()
                .map(|(slice, us)| *us as f64 * f64::from_bits(*slice))
                .sum();
            let hours = weighted_us / US_PER_HOUR;
            if weighted_us <= 0.0 {
                continue;
            }
            let price = prices.gpu_hour(model);
            let minor = to_minor(hours * price, d);
            gpu_hours += hours;
            gpu_minor += minor;
            items.push(Item {
                sku: format!("gpu-hour:{model}"),
                quantity: hours,
                unit: "GPU-Hours".into(),
                unit_price: price,
                cost_minor: minor,
                cost: format_minor(minor, d),
            });
        }
        let mut simple = |sku: &str, unit: &str, quantity: f64, price: f64| -> i64 {
            if quantity <= 0.0 {
                return 0;
            }
            let minor = to_minor(quantity * price, d);
            items.push(Item {
                sku: sku.into(),
                quantity,
                unit: unit.into(),
                unit_price: price,
                cost_minor: minor,
                cost: format_minor(minor, d),
            });
            minor
        };
        let energy_kwh = a.energy_mj as f64 / MJ_PER_KWH;
        let network_gib = a.network_bytes as f64 / BYTES_PER_GIB;
        let pcie_gib = a.pcie_bytes as f64 / BYTES_PER_GIB;
        let energy_minor = simple("energy-kwh", "kWh", energy_kwh, prices.energy_kwh);
        let network_minor = simple("network-gib", "GiB", network_gib, prices.network_gib);
        let pcie_minor = simple("pcie-gib", "GiB", pcie_gib, prices.pcie_gib);
        if items.is_empty() {
            continue;
        }
        let cost_minor = gpu_minor + energy_minor + network_minor + pcie_minor;
        lines.push(Line {
            tenant,
            gpu_model,
            node,
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
            _ => vec!["tenant"],
        }
    }

    fn group_values<'a>(&self, l: &'a Line) -> Vec<&'a str> {
        let mut v = vec![l.tenant.as_str()];
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
            model: model.into(),
            slice_fraction: slice,
            allocated_us: (alloc_h * 3.6e9) as i64,
            used_us: (used_h * 3.6e9) as i64,
            energy_mj: 3_600_000_000, // 1 kWh
            memory_byte_seconds: 0.0,
        }
    }

    #[test]
    fn money_formats_exactly() {
        assert_eq!(format_minor(1234, 2), "12.34");
        assert_eq!(format_minor(5, 2), "0.05");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(7, 0), "7");
        assert_eq!(to_minor(0.125, 2), 13, "half away from zero");
        assert_eq!(to_minor(2.49 * 10.0, 2), 2490);
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
            node: "n1".into(),
            network_egress_bytes: 100 << 30,
            ..Default::default()
        }];
        let c = compute(
            &prices(),
            &gpu,
            &io,
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
}
