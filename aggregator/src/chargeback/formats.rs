//! A chargeback as JSON, as CSV (one row per line) and as FinOps FOCUS 1.2
//! (one row per priced item), the last two written by the `csv` crate
//! from row structs.
//!
//! Both come from the same [`Line`]s and [`Item`]s, so a FOCUS row's
//! `BilledCost` is an item's `cost` and a CSV line's costs are the sums of
//! its items': the formats agree to the cent.

use serde::Serialize;

use super::{Chargeback, GroupBy, Item, Line, Money};
use crate::config::Prices;

/// Answers with this many lines are encoded in two halves at once: a
/// month by node is 200,000 lines (150 MB), and the second core took a
/// quarter off the encoding's 0.5-0.7 s.
const JSON_HALVES_FROM: usize = 20_000;

/// `lines` as JSON, comma-separated, after `out`.
fn json_lines(out: &mut Vec<u8>, lines: &[Line]) {
    for (n, line) in lines.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        // Only maps with non-string keys fail to encode; a line has none.
        serde_json::to_writer(&mut *out, line).expect("a line encodes");
    }
}

/// One CSV row: a chargeback line. The group columns that do not apply
/// to the grouping are left out of the file, not written empty.
#[derive(Serialize)]
struct CsvRow<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'a str>,
    tenant: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    gpu_hours: String,
    energy_kwh: String,
    network_gib: String,
    pcie_gib: String,
    gpu_cost: &'a str,
    energy_cost: &'a str,
    network_cost: &'a str,
    pcie_cost: &'a str,
    cost: &'a str,
    currency: &'a str,
    /// Parts of `gpu_hours` and `gpu_cost`: last, so that readers of the
    /// earlier columns by position keep working.
    idle_gpu_hours: String,
    idle_cost: &'a str,
}

/// One FOCUS 1.2 row: a priced item of a line. Columns in the order the
/// first releases wrote them (`BilledCost` first), then the rest.
#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
struct FocusRow<'a> {
    billed_cost: &'a str,
    effective_cost: &'a str,
    list_cost: &'a str,
    contracted_cost: &'a str,
    billing_currency: &'a str,
    charge_period_start: &'a str,
    charge_period_end: &'a str,
    charge_category: &'static str,
    charge_description: String,
    resource_id: String,
    resource_type: &'static str,
    service_name: &'static str,
    service_category: &'static str,
    sku_id: &'a str,
    pricing_category: &'static str,
    pricing_quantity: String,
    pricing_unit: &'a str,
    list_unit_price: String,
    consumed_quantity: String,
    consumed_unit: &'a str,
    sub_account_id: &'a str,
    tags: String,
    // Added for FOCUS 1.2 validation; after the first columns so readers
    // of the old layout keep working.
    billing_account_id: &'a str,
    billing_account_name: &'a str,
    billing_period_start: &'a str,
    billing_period_end: &'a str,
    /// Empty (null): no row is a correction.
    charge_class: &'static str,
    charge_frequency: &'static str,
    contracted_unit_price: String,
    /// Empty (null): a chargeback is not an issued invoice.
    invoice_id: &'static str,
    invoice_issuer_name: &'a str,
    provider_name: &'a str,
    publisher_name: &'a str,
    resource_name: String,
    service_subcategory: &'static str,
    /// The SKU; with time-of-use energy, `energy-kwh@<unit price>`: each
    /// price of the SKU is a price of its own.
    sku_price_id: String,
    sub_account_name: &'a str,
    /// GPU rows: the GPU-hours held idle and their cost, parts of the
    /// row's quantity and cost (FOCUS custom columns take `x_`); empty on
    /// other rows.
    #[serde(rename = "x_IdleGpuHours")]
    x_idle_gpu_hours: String,
    #[serde(rename = "x_IdleCost")]
    x_idle_cost: &'a str,
    /// Grouped by cluster: the cluster, as FOCUS's region (the columns
    /// are left out of the file otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    region_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region_name: Option<&'a str>,
}

/// What kind of resource an item is, by its SKU: one type per kind.
pub(crate) fn resource_type(sku: &str) -> &'static str {
    if sku.starts_with("gpu-hour") {
        "GPU"
    } else if sku == "energy-kwh" {
        "Energy"
    } else if sku == "pcie-gib" {
        "PCIe"
    } else {
        "Network"
    }
}

/// Serializes `rows` with a header; `empty` gives the header when there
/// are no rows (the csv crate writes headers only with a first record).
fn write<T: Serialize>(rows: impl IntoIterator<Item = T>, empty: T) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut any = false;
    for r in rows {
        w.serialize(r).expect("CSV into memory cannot fail");
        any = true;
    }
    if !any {
        w.serialize(empty).expect("CSV into memory cannot fail");
    }
    let mut out = String::from_utf8(w.into_inner().expect("CSV into memory cannot fail"))
        .expect("CSV of UTF-8 strings is UTF-8");
    if !any {
        out.truncate(out.find('\n').map_or(0, |i| i + 1));
    }
    out
}

impl Chargeback {
    /// The answer as compact JSON, byte for byte as `serde_json` writes
    /// the whole; a long answer's lines encoded in two halves at once.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        self.to_json_in_halves(JSON_HALVES_FROM)
    }

    pub(super) fn to_json_in_halves(&self, parallel_from: usize) -> Vec<u8> {
        // The answer without its lines, as serde writes it (every field
        // named: a new one is written here too), split where its lines go:
        // `{…,"lines":[` and `],…}`. Inside a JSON string a quote is
        // escaped, so the key is the one place `"lines":[]` can be.
        let shell = serde_json::to_vec(&Chargeback {
            currency: self.currency.clone(),
            decimals: self.decimals,
            basis: self.basis,
            group_by: self.group_by.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            lines: Vec::new(),
            total: self.total,
            total_minor: self.total_minor,
            rounded: self.rounded.clone(),
        })
        .expect("strings, numbers and an enum encode");
        const EMPTY: &[u8] = b"\"lines\":[]";
        let at = shell
            .windows(EMPTY.len())
            .position(|w| w == EMPTY)
            .expect("the answer has its lines")
            + EMPTY.len()
            - 1;
        let (head, tail) = shell.split_at(at);
        // The second half of the lines on another thread, then copied
        // after the first.
        let mut out = Vec::with_capacity(shell.len() + self.lines.len() * 800);
        out.extend_from_slice(head);
        let split = if self.lines.len() >= parallel_from.max(2) {
            self.lines.len() / 2
        } else {
            self.lines.len()
        };
        let (first, second) = self.lines.split_at(split);
        std::thread::scope(|s| {
            let second = (!second.is_empty()).then(|| {
                s.spawn(|| {
                    let mut out = Vec::with_capacity(second.len() * 800);
                    json_lines(&mut out, second);
                    out
                })
            });
            json_lines(&mut out, first);
            if let Some(second) = second {
                out.push(b',');
                match second.join() {
                    Ok(second) => out.extend_from_slice(&second),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        out.extend_from_slice(tail);
        out
    }

    /// CSV: one row per line.
    pub(crate) fn to_csv(&self) -> String {
        let by = GroupBy::parse(&self.group_by).unwrap_or(GroupBy::Tenant);
        fn row<'a>(l: &'a Line, currency: &'a str) -> CsvRow<'a> {
            CsvRow {
                cluster: l.cluster.as_deref(),
                tenant: &l.tenant,
                workload: l.workload.as_deref(),
                gpu_model: l.gpu_model.as_deref(),
                node: l.node.as_deref(),
                gpu_hours: format!("{:.6}", l.gpu_hours),
                energy_kwh: format!("{:.6}", l.energy_kwh),
                network_gib: format!("{:.6}", l.network_gib),
                pcie_gib: format!("{:.6}", l.pcie_gib),
                gpu_cost: &l.gpu_cost,
                energy_cost: &l.energy_cost,
                network_cost: &l.network_cost,
                pcie_cost: &l.pcie_cost,
                cost: &l.cost,
                currency,
                idle_gpu_hours: format!("{:.6}", l.idle_gpu_hours),
                idle_cost: &l.idle_cost,
            }
        }
        let empty = Line {
            cluster: by.by_cluster().then(String::new),
            tenant: String::new(),
            workload: by.by_workload().then(String::new),
            gpu_model: (by == GroupBy::TenantModel).then(String::new),
            node: (by == GroupBy::TenantNode).then(String::new),
            gpu_hours: 0.0,
            energy_kwh: 0.0,
            network_gib: 0.0,
            pcie_gib: 0.0,
            gpu_cost: Money::default(),
            energy_cost: Money::default(),
            network_cost: Money::default(),
            pcie_cost: Money::default(),
            cost: Money::default(),
            cost_minor: 0,
            idle_gpu_hours: 0.0,
            idle_cost: Money::default(),
            items: vec![],
        };
        write(
            self.lines.iter().map(|l| row(l, &self.currency)),
            row(&empty, &self.currency),
        )
    }

    /// FinOps FOCUS 1.2: one row per priced item, billed to the account
    /// `billing` names.
    pub(crate) fn to_focus(&self, billing: &Prices) -> String {
        let rows = self
            .lines
            .iter()
            .flat_map(|l| l.items.iter().map(move |i| (l, i)))
            .map(|(l, i)| self.focus_row(billing, l, i));
        let by_cluster = GroupBy::parse(&self.group_by).is_some_and(GroupBy::by_cluster);
        let empty = FocusRow {
            region_id: by_cluster.then_some(""),
            region_name: by_cluster.then_some(""),
            ..FocusRow::default()
        };
        write(rows, empty)
    }

    fn focus_row<'a>(&'a self, billing: &'a Prices, l: &'a Line, item: &'a Item) -> FocusRow<'a> {
        let mut tags = serde_json::Map::new();
        if let Some(c) = &l.cluster {
            tags.insert("cluster".into(), c.clone().into());
        }
        tags.insert("tenant".into(), l.tenant.clone().into());
        if let Some(w) = l.workload.as_deref().filter(|w| !w.is_empty()) {
            tags.insert("workload".into(), w.into());
        }
        if let Some(m) = &l.gpu_model {
            tags.insert("gpu_model".into(), m.clone().into());
        }
        if let Some(n) = &l.node {
            tags.insert("node".into(), n.clone().into());
        }
        // What a line's items were used on: the tenant's share of a node,
        // of a GPU model, or of the cluster.
        let mut resource_id = match (&l.node, &l.gpu_model) {
            (Some(n), _) => format!("{n}/{}", l.tenant),
            (None, Some(m)) => format!("{}/{m}", l.tenant),
            (None, None) => l.tenant.clone(),
        };
        // A workload is a part of its tenant; a cluster holds the tenant's
        // share of it.
        if let Some(w) = l.workload.as_deref().filter(|w| !w.is_empty()) {
            resource_id = format!("{resource_id}/{w}");
        }
        if let Some(c) = &l.cluster {
            resource_id = format!("{c}/{resource_id}");
        }
        let quantity = format!("{:.9}", item.quantity);
        let price = format!("{}", item.unit_price);
        FocusRow {
            billed_cost: &item.cost,
            effective_cost: &item.cost,
            list_cost: &item.cost,
            contracted_cost: &item.cost,
            billing_currency: &self.currency,
            charge_period_start: &self.from,
            charge_period_end: &self.to,
            charge_category: "Usage",
            charge_description: format!("{} for tenant {}", item.sku, l.tenant),
            resource_name: resource_id.clone(),
            resource_id,
            resource_type: resource_type(&item.sku),
            service_name: "Tally GPU",
            service_category: "AI and Machine Learning",
            sku_id: &item.sku,
            pricing_category: "Standard",
            pricing_quantity: quantity.clone(),
            pricing_unit: &item.unit,
            list_unit_price: price.clone(),
            consumed_quantity: quantity,
            consumed_unit: &item.unit,
            sub_account_id: &l.tenant,
            tags: serde_json::Value::Object(tags).to_string(),
            billing_account_id: &billing.billing_account,
            billing_account_name: &billing.billing_account_name,
            billing_period_start: &self.from,
            billing_period_end: &self.to,
            charge_class: "",
            charge_frequency: "Usage-Based",
            contracted_unit_price: price,
            invoice_id: "",
            invoice_issuer_name: &billing.invoice_issuer,
            provider_name: &billing.provider,
            publisher_name: &billing.publisher,
            service_subcategory: "Other (AI and Machine Learning)",
            sku_price_id: if billing.energy_tou.is_some() && &*item.sku == "energy-kwh" {
                format!("{}@{}", item.sku, item.unit_price)
            } else {
                item.sku.to_string()
            },
            sub_account_name: &l.tenant,
            region_id: l.cluster.as_deref(),
            region_name: l.cluster.as_deref(),
            x_idle_gpu_hours: item
                .idle_quantity
                .map_or_else(String::new, |q| format!("{q:.9}")),
            x_idle_cost: item.idle_cost.as_deref().unwrap_or(""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chargeback::Basis;

    fn chargeback(group_by: GroupBy, lines: Vec<Line>) -> Chargeback {
        Chargeback {
            currency: "EUR".into(),
            decimals: 2,
            basis: Basis::Allocated,
            group_by: group_by.as_str().into(),
            from: "2026-11-01T00:00:00Z".into(),
            to: "2026-12-01T00:00:00Z".into(),
            lines,
            total: "0.00".parse().unwrap(),
            total_minor: 0,
            rounded: None,
        }
    }

    fn item(sku: &str, cost: &str) -> Item {
        Item {
            sku: sku.to_owned().into(),
            quantity: 1.5,
            unit: "GiB".into(),
            unit_price: 0.1,
            cost_minor: 15,
            cost: cost.parse().unwrap(),
            idle_quantity: None,
            idle_cost_minor: None,
            idle_cost: None,
        }
    }

    #[test]
    fn empty_answers_keep_their_header() {
        let c = chargeback(GroupBy::TenantNode, vec![]);
        assert_eq!(
            c.to_csv(),
            "tenant,node,gpu_hours,energy_kwh,network_gib,pcie_gib,gpu_cost,energy_cost,\
             network_cost,pcie_cost,cost,currency,idle_gpu_hours,idle_cost\n"
        );
        let focus = c.to_focus(&Prices::default());
        assert_eq!(focus.lines().count(), 1);
        assert!(focus.starts_with("BilledCost,EffectiveCost,"), "{focus}");
        for col in ["BillingAccountId", "InvoiceIssuerName", "ChargeClass"] {
            assert!(focus.contains(col), "{col} in {focus}");
        }
    }

    #[test]
    fn one_resource_type_per_kind_and_fields_quoted() {
        assert_eq!(resource_type("gpu-hour:NVIDIA H100"), "GPU");
        assert_eq!(resource_type("energy-kwh"), "Energy");
        assert_eq!(resource_type("network-gib"), "Network");
        assert_eq!(resource_type("pcie-gib"), "PCIe");
        let line = Line {
            cluster: None,
            tenant: "acme".into(),
            workload: None,
            gpu_model: None,
            node: Some("rack 1, \"n1\"".into()),
            gpu_hours: 0.0,
            energy_kwh: 0.0,
            network_gib: 1.5,
            pcie_gib: 1.5,
            gpu_cost: "0.00".parse().unwrap(),
            energy_cost: "0.00".parse().unwrap(),
            network_cost: "0.15".parse().unwrap(),
            pcie_cost: "0.15".parse().unwrap(),
            cost: "0.30".parse().unwrap(),
            cost_minor: 30,
            idle_gpu_hours: 0.0,
            idle_cost: "0.00".parse().unwrap(),
            items: vec![item("network-gib", "0.15"), item("pcie-gib", "0.15")],
        };
        let c = chargeback(GroupBy::TenantNode, vec![line]);
        let csv = c.to_csv();
        assert!(
            csv.contains("acme,\"rack 1, \"\"n1\"\"\",0.000000"),
            "{csv}"
        );
        let prices = Prices {
            provider: "Lab, IT".into(),
            ..Prices::default()
        };
        let focus = c.to_focus(&prices);
        let mut r = csv::Reader::from_reader(focus.as_bytes());
        let header = r.headers().unwrap().clone();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[0][col("ResourceType")], "Network");
        assert_eq!(&rows[1][col("ResourceType")], "PCIe");
        assert_eq!(&rows[1][col("ResourceId")], "rack 1, \"n1\"/acme");
        assert_eq!(&rows[1][col("ProviderName")], "Lab, IT");
        assert_eq!(&rows[1][col("BilledCost")], "0.15");
        assert_eq!(&rows[1][col("ChargeClass")], "");
        assert_eq!(&rows[1][col("x_IdleCost")], "", "not a GPU row");
    }
}
