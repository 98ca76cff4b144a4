//! The aggregator's `/metrics`: ingest health (live counters) and cluster
//! totals per tenant (read from the ledger by a background task every
//! `[aggregator] metrics_refresh`, never on the scrape path).
//!
//! With several replicas on one PostgreSQL, every replica exports the same
//! `tally_cluster_*` totals: aggregate them with `max`, not `sum`.

use std::sync::{Arc, RwLock, atomic::AtomicU64};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::{ledger::totals::TenantTotals, time::MAX_CLOCK_SKEW_MS};

/// Content type of [`Metrics::encode`]'s output.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub result: String,
}

/// What a maintenance pass removed: a fixed set of words.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NodeLabel {
    pub node: LabelValue,
}

/// A label value that came from outside (a node, a tenant, a GPU model, a
/// currency), written escaped: prometheus-client 0.23 writes label values
/// as given, and a name with a quote would make the whole scrape
/// unreadable.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub(crate) struct LabelValue(pub String);

impl EncodeLabelValue for LabelValue {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        tally_contract::tenant::write_label_value(e, &self.0)
    }
}

impl From<&str> for LabelValue {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// What `/metrics` reads from the ledger, refreshed in the background.
#[derive(Debug, Default)]
pub(crate) struct Cached {
    pub totals: Vec<TenantTotals>,
    /// `(node, last report received, ms)`.
    pub nodes: Vec<(String, i64)>,
    pub ledger_up: bool,
    /// Where each `[[budget]]` stands.
    pub budgets: Vec<crate::budgets::BudgetStatus>,
}

/// The aggregator's metric families.
pub(crate) struct Metrics {
    registry: Registry,
    /// Reports by result: stored, duplicate, conflict, rejected,
    /// unauthorized, forbidden, rate_limited, error.
    pub reports: Family<ResultLabel, Counter>,
    /// Credential reloads by result: ok, error (old credentials kept).
    reloads: Family<ResultLabel, Counter>,
    pub ingest_duration: Histogram,
    pub ledger_errors: Counter,
    /// Ledger maintenance passes by result: ok, error.
    maintenance: Family<ResultLabel, Counter>,
    /// Rows the maintenance passes removed, by kind: raw, claims,
    /// rollup, audit.
    rows_removed: Family<KindLabel, Counter>,
    pub audit_chain_breaks: Family<NodeLabel, Counter>,
    /// Each node's clock minus the aggregator's, at its last report; also
    /// what tells whether a node has just gone skewed or back in step.
    clock_skew: Family<NodeLabel, Gauge<f64, AtomicU64>>,
    pub cached: Arc<RwLock<Cached>>,
}

/// The kinds of `tally_aggregator_ledger_rows_removed`, in the order
/// [`Metrics::maintained`] adds them.
const REMOVED_KINDS: [&str; 4] = ["raw", "claims", "rollup", "audit"];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        // `register` appends the full stop itself; collectors write their own.
        let mut registry = Registry::default();
        let reports = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tally_aggregator_reports",
            "Reports received, by result (stored, duplicate, conflict, rejected, unauthorized, \
             forbidden, rate_limited, error)",
            reports.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tally_aggregator_credential_reloads",
            "Rereads of the token files and audit keys (SIGHUP or a change), by result: ok, or \
             error (every old token and key kept)",
            reloads.clone(),
        );
        let ingest_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register_with_unit(
            "tally_aggregator_ingest_duration",
            "Time to validate and store one report",
            Unit::Seconds,
            ingest_duration.clone(),
        );
        let ledger_errors = Counter::default();
        registry.register(
            "tally_aggregator_ledger_errors",
            "Ledger statements that failed (the request got 503 and is retried by the agent)",
            ledger_errors.clone(),
        );
        let maintenance = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tally_aggregator_ledger_maintenance_passes",
            "Ledger maintenance passes (fold the rollups, then remove what is past retention), \
             by result: ok, or error (retried on the next pass, a minute later)",
            maintenance.clone(),
        );
        // Both results from the start: an alert compares them.
        for result in ["ok", "error"] {
            let _ = maintenance.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        let rows_removed = Family::<KindLabel, Counter>::default();
        registry.register(
            "tally_aggregator_ledger_rows_removed",
            "Ledger rows removed past their retention, by kind: raw (usage rows, raw_retention), \
             claims (reports' claims, raw_retention), rollup (rollup_retention), audit \
             (audit_retention)",
            rows_removed.clone(),
        );
        // Every kind from the start, at 0: the first pass's removals (an
        // upgrade's backlog, say) then show in `increase()` too.
        for kind in REMOVED_KINDS {
            let _ = rows_removed.get_or_create(&KindLabel { kind });
        }
        let audit_chain_breaks = Family::<NodeLabel, Counter>::default();
        registry.register(
            "tally_aggregator_audit_chain_breaks",
            "Audit records that do not follow their node's hash chain",
            audit_chain_breaks.clone(),
        );
        let clock_skew = Family::<NodeLabel, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "tally_aggregator_node_clock_skew",
            format!(
                "The node's clock minus the aggregator's when its last report was sent (from the \
                 report's Date header); beyond {} s either way its reports are filed by the \
                 aggregator's clock",
                MAX_CLOCK_SKEW_MS / 1000
            ),
            Unit::Seconds,
            clock_skew.clone(),
        );
        let cached = Arc::new(RwLock::new(Cached::default()));
        registry.register_collector(Box::new(ClusterCollector(cached.clone())));
        Self {
            registry,
            reports,
            reloads,
            ingest_duration,
            ledger_errors,
            maintenance,
            rows_removed,
            audit_chain_breaks,
            clock_skew,
            cached,
        }
    }

    /// Exports the `[prices]` table, so that boards and other tools price
    /// with the aggregator's numbers instead of their own copies.
    pub(crate) fn register_prices(&mut self, prices: &crate::config::Prices) {
        type Labels = Vec<(&'static str, LabelValue)>;
        let currency = || ("currency", LabelValue::from(prices.currency.as_str()));
        let gpu_hour = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (model, price) in &prices.gpu_hour {
            gpu_hour
                .get_or_create(&vec![
                    ("gpu_model", LabelValue::from(model.as_str())),
                    currency(),
                ])
                .set(*price);
        }
        self.registry.register(
            "tally_price_gpu_hour",
            "Price of one GPU-hour by GPU model ([prices] gpu_hour; gpu_model=\"default\": every \
             other model); a MIG instance costs its slice fraction of it",
            gpu_hour,
        );
        // Read at each scrape: with time of use, the price changes by hour.
        self.registry
            .register_collector(Box::new(EnergyPriceCollector(prices.clone())));
        for (name, help, price) in [
            (
                "tally_price_network_gib",
                "Price of one GiB of network traffic, ingress plus egress ([prices] network_gib)",
                prices.network_gib,
            ),
            (
                "tally_price_pcie_gib",
                "Price of one GiB of host-device copies ([prices] pcie_gib)",
                prices.pcie_gib,
            ),
        ] {
            let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            family.get_or_create(&vec![currency()]).set(price);
            self.registry.register(name, help, family);
        }
    }

    /// Records `node`'s clock skew; `Some(true)` when it has just gone
    /// skewed (beyond [`MAX_CLOCK_SKEW_MS`]), `Some(false)` when it has just
    /// come back in step. The gauge's previous value says where it was: a
    /// node not seen before starts at 0, in step.
    pub(crate) fn clock_skew(&self, node: &str, skew_ms: i64) -> Option<bool> {
        let skewed = |ms: i64| ms.abs() > MAX_CLOCK_SKEW_MS;
        let previous = self
            .clock_skew
            .get_or_create(&NodeLabel { node: node.into() })
            .set(skew_ms as f64 / 1000.0);
        // Whole milliseconds divided by 1000 come back exactly when rounded.
        let was = skewed((previous * 1000.0).round() as i64);
        let now = skewed(skew_ms);
        (was != now).then_some(now)
    }

    /// Counts one report outcome.
    pub(crate) fn report(&self, result: &str) {
        self.reports
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Counts one ledger maintenance pass and what it removed.
    pub(crate) fn maintained(
        &self,
        pass: Result<&crate::ledger::Maintained, &crate::ledger::LedgerError>,
    ) {
        let result = if pass.is_ok() { "ok" } else { "error" };
        self.maintenance
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        if let Ok(m) = pass {
            let rows = [m.raw_rows, m.claims, m.rollup_rows, m.audit_records];
            for (kind, rows) in REMOVED_KINDS.into_iter().zip(rows) {
                self.rows_removed
                    .get_or_create(&KindLabel { kind })
                    .inc_by(rows);
            }
        }
    }

    /// Counts one credential reload.
    pub(crate) fn reload(&self, result: &str) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct ClusterCollector(Arc<RwLock<Cached>>);

/// `tally_price_energy_kwh`: the price this hour's energy is charged at.
#[derive(Debug)]
struct EnergyPriceCollector(crate::config::Prices);

impl Collector for EnergyPriceCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let p = &self.0;
        family(
            &mut e,
            "tally_price_energy_kwh",
            "Price of one kWh of GPU energy in force now ([prices] energy_kwh): with a \
             time-of-use table, the price of the current hour's window, else the one price.",
            None,
            MetricType::Gauge,
            vec![(
                [("currency", LabelValue::from(p.currency.as_str()))],
                p.energy_kwh_at(crate::time::now_ms()),
            )],
        )
    }
}

fn family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: Vec<(L, f64)>,
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (labels, v) in samples {
        let f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(f)?,
            _ => ConstGauge::new(v).encode(f)?,
        }
    }
    Ok(())
}

impl Collector for ClusterCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let c = match self.0.read() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let e = &mut e;
        family(
            e,
            "tally_aggregator_ledger_up",
            "1 when the last read of the ledger succeeded.",
            None,
            MetricType::Gauge,
            vec![([("ledger", "main")], f64::from(u8::from(c.ledger_up)))],
        )?;
        family(
            e,
            "tally_aggregator_node_last_report_timestamp",
            "When the last report of each node was stored (Unix time).",
            Some(Unit::Seconds),
            MetricType::Gauge,
            c.nodes
                .iter()
                .map(|(n, ms)| {
                    (
                        [("node", LabelValue::from(n.as_str()))],
                        *ms as f64 / 1000.0,
                    )
                })
                .collect(),
        )?;
        let t = |r: &TenantTotals| [("tenant", LabelValue::from(r.tenant.as_str()))];
        let td = |r: &TenantTotals, d: &str| {
            [
                ("tenant", LabelValue::from(r.tenant.as_str())),
                ("direction", d.into()),
            ]
        };
        family(
            e,
            "tally_cluster_tenant_gpu_allocated",
            "GPU time the tenant held across the cluster (MIG instances count their own time), \
             from the ledger. tenant=\"_idle\" is time nobody held.",
            Some(Unit::Seconds),
            MetricType::Counter,
            c.totals
                .iter()
                .map(|r| (t(r), r.allocated_us / 1e6))
                .collect(),
        )?;
        family(
            e,
            "tally_cluster_tenant_gpu_sm",
            "SM-utilization-weighted GPU time of the tenant across the cluster.",
            Some(Unit::Seconds),
            MetricType::Counter,
            c.totals.iter().map(|r| (t(r), r.sm_us / 1e6)).collect(),
        )?;
        family(
            e,
            "tally_cluster_tenant_gpu_memory_byte",
            "Integral of the GPU memory the tenant held across the cluster (byte-seconds).",
            Some(Unit::Seconds),
            MetricType::Counter,
            c.totals
                .iter()
                .map(|r| (t(r), r.memory_byte_seconds))
                .collect(),
        )?;
        family(
            e,
            "tally_cluster_tenant_gpu_energy",
            "The tenant's share of GPU energy across the cluster.",
            Some(Unit::Joules),
            MetricType::Counter,
            c.totals.iter().map(|r| (t(r), r.energy_mj / 1e3)).collect(),
        )?;
        family(
            e,
            "tally_cluster_tenant_network",
            "Network bytes of the tenant across the cluster.",
            Some(Unit::Bytes),
            MetricType::Counter,
            c.totals
                .iter()
                .flat_map(|r| {
                    [
                        (td(r, "ingress"), r.network_ingress_bytes),
                        (td(r, "egress"), r.network_egress_bytes),
                    ]
                })
                .collect(),
        )?;
        family(
            e,
            "tally_cluster_tenant_pcie",
            "Host-device copy bytes of the tenant across the cluster.",
            Some(Unit::Bytes),
            MetricType::Counter,
            c.totals
                .iter()
                .flat_map(|r| {
                    [
                        (td(r, "h2d"), r.pcie_h2d_bytes),
                        (td(r, "d2h"), r.pcie_d2h_bytes),
                    ]
                })
                .collect(),
        )?;
        let b = |s: &crate::budgets::BudgetStatus| {
            [
                ("tenant", LabelValue::from(s.tenant.as_str())),
                ("period", s.period.as_str().into()),
                ("unit", LabelValue::from(s.unit.as_str())),
            ]
        };
        family(
            e,
            "tally_tenant_budget_used",
            "Part of the tenant's [[budget]] spent since its period (UTC day, week or month) \
             started, up to 1: all of it (tally_tenant_budget_used over \
             tally_tenant_budget_limit says how far over).",
            Some(Unit::Other("ratio".into())),
            MetricType::Gauge,
            c.budgets.iter().map(|s| (b(s), s.used_ratio())).collect(),
        )?;
        for (name, help, value) in [
            (
                "tally_tenant_budget_used",
                "Spent since the budget period started, in `unit` (the currency, or gpu_hours).",
                (|s| s.used) as fn(&crate::budgets::BudgetStatus) -> f64,
            ),
            (
                "tally_tenant_budget_projected",
                "Projected spend by the end of the budget period at the pace so far, in `unit`.",
                |s| s.projected,
            ),
            (
                "tally_tenant_budget_limit",
                "The tenant's budget for the period, in `unit`.",
                |s| s.limit,
            ),
        ] {
            family(
                e,
                name,
                help,
                None,
                MetricType::Gauge,
                c.budgets.iter().map(|s| (b(s), value(s))).collect(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maintenance passes are counted by result and what each removed by
    /// kind, every series from the start, and added up.
    #[test]
    fn maintenance_passes_and_rows_removed_are_counted() {
        let m = Metrics::new();
        let line = |body: &str, prefix: &str| -> Option<String> {
            body.lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_owned)
        };
        let body = m.encode();
        for result in ["ok", "error"] {
            let series =
                format!("tally_aggregator_ledger_maintenance_passes_total{{result=\"{result}\"}}");
            assert_eq!(line(&body, &series), Some(format!("{series} 0")), "{body}");
        }
        for kind in REMOVED_KINDS {
            let series = format!("tally_aggregator_ledger_rows_removed_total{{kind=\"{kind}\"}}");
            assert_eq!(line(&body, &series), Some(format!("{series} 0")), "{body}");
        }
        let removed = crate::ledger::Maintained {
            raw_rows: 5,
            claims: 2,
            audit_records: 1,
            ..Default::default()
        };
        m.maintained(Ok(&removed));
        m.maintained(Ok(&crate::ledger::Maintained {
            raw_rows: 3,
            ..Default::default()
        }));
        m.maintained(Err(&crate::ledger::LedgerError::Thread("gone".into())));
        let body = m.encode();
        for (series, value) in [
            (
                "tally_aggregator_ledger_maintenance_passes_total{result=\"ok\"}",
                2,
            ),
            (
                "tally_aggregator_ledger_maintenance_passes_total{result=\"error\"}",
                1,
            ),
            (
                "tally_aggregator_ledger_rows_removed_total{kind=\"raw\"}",
                8,
            ),
            (
                "tally_aggregator_ledger_rows_removed_total{kind=\"claims\"}",
                2,
            ),
            (
                "tally_aggregator_ledger_rows_removed_total{kind=\"rollup\"}",
                0,
            ),
            (
                "tally_aggregator_ledger_rows_removed_total{kind=\"audit\"}",
                1,
            ),
        ] {
            assert_eq!(
                line(&body, series),
                Some(format!("{series} {value}")),
                "{body}"
            );
        }
    }

    #[test]
    fn every_help_text_ends_in_one_full_stop() {
        let body = Metrics::new().encode();
        let helps: Vec<&str> = body.lines().filter(|l| l.starts_with("# HELP")).collect();
        assert!(!helps.is_empty(), "no HELP lines in:\n{body}");
        for help in helps {
            assert!(
                help.ends_with('.') && !help.ends_with(".."),
                "HELP line must end in one full stop: {help}"
            );
        }
    }

    #[test]
    fn the_price_table_is_exported_as_configured() {
        let mut m = Metrics::new();
        m.register_prices(&crate::config::Prices {
            currency: "EUR".into(),
            gpu_hour: [
                ("NVIDIA H100 80GB HBM3".into(), 2.49),
                ("default".into(), 1.0),
            ]
            .into(),
            energy_kwh: 0.12,
            network_gib: 0.01,
            ..Default::default()
        });
        let body = m.encode();
        for line in [
            "tally_price_gpu_hour{gpu_model=\"NVIDIA H100 80GB HBM3\",currency=\"EUR\"} 2.49",
            "tally_price_gpu_hour{gpu_model=\"default\",currency=\"EUR\"} 1.0",
            "tally_price_energy_kwh{currency=\"EUR\"} 0.12",
            "tally_price_network_gib{currency=\"EUR\"} 0.01",
            "tally_price_pcie_gib{currency=\"EUR\"} 0.0",
        ] {
            assert!(body.contains(line), "{line} missing from:\n{body}");
        }
    }

    /// A window covers the whole day but this hour: the gauge shows the
    /// default, then the window's price once the hour is inside it.
    #[test]
    fn the_energy_price_is_the_one_in_force_now() {
        let utc_hour = || crate::time::now_ms() / 3_600_000 % 24;
        let scrape = |window: String| {
            let (default, tou) = crate::config::TimeOfUse::parse(
                &format!("{{ default = 0.25, \"{window}\" = 0.07 }}"),
                "UTC",
            );
            let mut m = Metrics::new();
            m.register_prices(&crate::config::Prices {
                currency: "EUR".into(),
                energy_kwh: default,
                energy_tou: Some(tou),
                ..Default::default()
            });
            m.encode()
        };
        loop {
            let hour = utc_hour();
            let outside = scrape(format!("{:02}:00-{hour:02}:00", (hour + 1) % 24));
            let inside = scrape(format!("{hour:02}:00-{:02}:00", (hour + 1) % 24));
            if utc_hour() != hour {
                continue; // the hour turned while scraping
            }
            let line = |v: &str| format!("tally_price_energy_kwh{{currency=\"EUR\"}} {v}");
            assert!(outside.contains(&line("0.25")), "{outside}");
            assert!(inside.contains(&line("0.07")), "{inside}");
            assert!(inside.contains(
                "# HELP tally_price_energy_kwh Price of one kWh of GPU energy in force now"
            ));
            break;
        }
    }

    /// Names are checked for control characters only; a tenant or a node
    /// with a quote or a backslash is written escaped, not as a scrape no
    /// parser reads.
    #[test]
    fn quotes_and_backslashes_in_names_are_escaped() {
        const NAME: &str = r#"svc\x2dblue "q""#;
        const WRITTEN: &str = r#"svc\\x2dblue \"q\""#;
        let m = Metrics::new();
        m.clock_skew(NAME, 1_000);
        {
            let mut c = m.cached.write().unwrap();
            c.nodes = vec![(NAME.into(), 5_000)];
            c.totals = vec![TenantTotals {
                tenant: NAME.into(),
                allocated_us: 2e6,
                ..Default::default()
            }];
        }
        let body = m.encode();
        for line in [
            format!("tally_aggregator_node_clock_skew_seconds{{node=\"{WRITTEN}\"}} 1.0\n"),
            format!(
                "tally_aggregator_node_last_report_timestamp_seconds{{node=\"{WRITTEN}\"}} 5.0\n"
            ),
            format!(
                "tally_cluster_tenant_gpu_allocated_seconds_total{{tenant=\"{WRITTEN}\"}} 2.0\n"
            ),
        ] {
            assert!(body.contains(&line), "{line} missing from:\n{body}");
        }
        assert!(!body.contains(NAME), "{body}");
    }

    #[test]
    fn a_node_going_skewed_and_back_is_told_once_each_way() {
        let m = Metrics::new();
        assert_eq!(m.clock_skew("n1", 3_000), None);
        assert_eq!(m.clock_skew("n1", MAX_CLOCK_SKEW_MS), None);
        assert_eq!(m.clock_skew("n1", -MAX_CLOCK_SKEW_MS - 1), Some(true));
        assert_eq!(m.clock_skew("n1", 60_000), None);
        assert_eq!(m.clock_skew("n2", 60_000), Some(true));
        assert_eq!(m.clock_skew("n1", 10), Some(false));
        assert_eq!(m.clock_skew("n1", -10), None);
        let body = m.encode();
        assert!(
            body.contains(
                "# HELP tally_aggregator_node_clock_skew_seconds The node's clock minus the \
                 aggregator's when its last report was sent (from the report's Date header); \
                 beyond 10 s either way its reports are filed by the aggregator's clock.\n"
            ),
            "{body}"
        );
    }
}
