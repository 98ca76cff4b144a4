//! The five `tally_tenant_gpu_*` families, written by hand as [`text`]
//! writes the others, but column by column over the rows, with no label
//! arrays: they are nearly all of a node's series (one per tenant per
//! device per family: 2,600 of benchmark 1's 2,650).

use std::borrow::Cow;

use prometheus_client::{metrics::MetricType, registry::Unit};
use tally_contract::tenant::escape_label_value;

use super::text::{self, Numbers};
use crate::snapshot::{TENANT_IDLE, TenantGpuUsage};

/// One family: its descriptor, and the value of a row (`None`: no sample).
struct Column {
    name: &'static str,
    help: &'static str,
    unit: Unit,
    kind: MetricType,
    value: fn(&TenantGpuUsage) -> Option<f64>,
}

/// A row of a tenant, not of nobody (`_idle`).
fn held(r: &TenantGpuUsage) -> bool {
    &*r.tenant != TENANT_IDLE
}

const COLUMNS: [Column; 5] = [
    Column {
        name: "tally_tenant_gpu_allocated",
        help: "Wall time the tenant held the GPU or MIG instance (shared devices split by memory \
               held). tenant=\"_idle\" is time nobody held it; the sum over tenants is wall time.",
        unit: Unit::Seconds,
        kind: MetricType::Counter,
        value: |r| Some(r.allocated_seconds_total),
    },
    Column {
        name: "tally_tenant_gpu_idle_allocated",
        help: "The part of the tenant's allocated time during which the device was idle: held, \
               doing nothing past [states] idle_after. Wasted GPU time, priced as idle_cost.",
        unit: Unit::Seconds,
        kind: MetricType::Counter,
        value: |r| held(r).then_some(r.idle_allocated_seconds_total),
    },
    Column {
        name: "tally_tenant_gpu_sm",
        help: "SM work of the tenant: its processes' SM utilization × wall time (a device sums to \
               at most its wall time). Absent for MIG instances: NVML \
               has no per-process utilization there.",
        unit: Unit::Seconds,
        kind: MetricType::Counter,
        value: |r| r.sm_seconds_total,
    },
    Column {
        name: "tally_tenant_gpu_memory",
        help: "GPU memory the tenant holds now.",
        unit: Unit::Bytes,
        kind: MetricType::Gauge,
        value: |r| held(r).then_some(r.memory_bytes as f64),
    },
    Column {
        name: "tally_tenant_gpu_energy",
        help: "The tenant's share of the GPU's energy: idle draw by allocation, the rest by SM time \
               (MIG: the parent's energy by compute-slice fraction). Sums to the GPU's counter.",
        unit: Unit::Joules,
        kind: MetricType::Counter,
        value: |r| Some(r.energy_joules_total),
    },
];

/// About how many bytes [`write`] adds for `rows`.
pub(super) fn size_hint(rows: &[TenantGpuUsage]) -> usize {
    let labels: usize = rows.iter().map(|r| r.tenant.len() + r.gpu.len()).sum();
    COLUMNS.len() * (labels + rows.len() * 72 + 512)
}

/// Appends the families that have samples, in order.
pub(super) fn write(out: &mut String, rows: &[TenantGpuUsage]) {
    // Each row's label values escaped once, not once per column.
    let labels: Vec<[Cow<'_, str>; 2]> = rows
        .iter()
        .map(|r| [escape_label_value(&r.tenant), escape_label_value(&r.gpu)])
        .collect();
    for column in &COLUMNS {
        let mut samples = rows
            .iter()
            .zip(&labels)
            .filter_map(|(r, labels)| Some((labels, (column.value)(r)?)))
            .peekable();
        if samples.peek().is_none() {
            continue;
        }
        let unit = Some(column.unit.as_str());
        text::descriptor(out, column.name, column.help, unit, column.kind);
        let counter = matches!(column.kind, MetricType::Counter);
        // What every sample of the column starts with, written once.
        let mut head = String::with_capacity(64);
        text::series(&mut head, column.name, unit, counter);
        head.push_str("{tenant=\"");
        let mut numbers = Numbers::default();
        for ([tenant, gpu], value) in samples {
            out.push_str(&head);
            out.push_str(tenant);
            out.push_str("\",gpu=\"");
            out.push_str(gpu);
            out.push_str("\"} ");
            numbers.push(out, counter, value);
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

    use super::*;
    use crate::metrics::{
        Family,
        text::reference::{encode_collector, same_samples},
    };

    /// The same rows through prometheus-client's encoder.
    #[derive(Debug)]
    struct Reference(Vec<TenantGpuUsage>);

    impl Collector for Reference {
        fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            for c in &COLUMNS {
                let family = Family {
                    name: c.name,
                    help: c.help,
                    unit: Some(c.unit.clone()),
                    kind: c.kind,
                };
                family.encode(
                    &mut e,
                    self.0.iter().filter_map(|r| {
                        let labels = [("tenant", &*r.tenant), ("gpu", &*r.gpu)];
                        Some((labels, (c.value)(r)?))
                    }),
                )?;
            }
            Ok(())
        }
    }

    fn row(tenant: &str, gpu: &str, value: f64, sm: Option<f64>, memory: u64) -> TenantGpuUsage {
        TenantGpuUsage {
            tenant: Arc::from(tenant),
            gpu: Arc::from(gpu),
            uuid: Arc::from("GPU-x"),
            allocated_seconds_total: value,
            sm_seconds_total: sm,
            memory_bytes: memory,
            memory_byte_seconds_total: 0.0,
            energy_joules_total: value * 3.5,
            idle_allocated_seconds_total: -value,
            workload: None,
        }
    }

    #[test]
    fn the_text_is_prometheus_clients() {
        let values = [
            0.0,
            1.0,
            1.5,
            0.1 + 0.2,
            3349.0717240570357,
            1e-7,
            123_456_789.125,
            9_007_199_254_740_992.0,
            1e300,
            -2.0,
            -0.25,
            f64::NAN,
            f64::INFINITY,
        ];
        let mut rows: Vec<TenantGpuUsage> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let sm = (i % 3 != 0).then_some(v / 2.0);
                row(
                    &format!("t{i}"),
                    &format!("{}", i % 4),
                    v,
                    sm,
                    i as u64 * 1024,
                )
            })
            .collect();
        rows.push(row(TENANT_IDLE, "0", 42.0, None, 0));
        rows.push(row("a:b c", "MIG-0/1/2", 7.0, None, u64::MAX));

        let mine = |rows: &[TenantGpuUsage]| {
            let mut out = String::new();
            write(&mut out, rows);
            out
        };
        let theirs = |rows: Vec<TenantGpuUsage>| {
            let mut out = String::new();
            encode_collector(&mut out, Reference(rows));
            out
        };
        let text = mine(&rows);
        same_samples(&text, &theirs(rows.clone()));
        assert!(
            text.contains("tally_tenant_gpu_allocated_seconds_total{tenant=\"t1\",gpu=\"1\"} 1\n")
        );
        assert!(text.contains("# UNIT tally_tenant_gpu_memory_bytes bytes\n"));
        assert!(
            size_hint(&rows) >= text.len(),
            "{} < {}",
            size_hint(&rows),
            text.len()
        );

        // Families without samples are left out, as prometheus-client does.
        let idle_only = vec![row(TENANT_IDLE, "0", 1.0, None, 0)];
        same_samples(&mine(&idle_only), &theirs(idle_only.clone()));
        assert!(!mine(&idle_only).contains("tally_tenant_gpu_memory"));
        assert_eq!(mine(&[]), "");
    }
}
