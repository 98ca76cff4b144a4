//! Prometheus exposition of the latest [`Snapshot`] (OpenMetrics text).
//!
//! A [`Collector`] reads the snapshot at scrape time and encodes it: no
//! second copy of the numbers, and no NVML call on the scrape path. Names
//! follow `DESIGN.md`; units are declared so the encoder appends them
//! (`tally_gpu_energy` + joules + counter → `tally_gpu_energy_joules_total`).

use std::{fmt::Write as _, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::sync::watch;

use crate::{
    snapshot::{GpuHealth, Snapshot},
    states::GpuState,
};

/// The latest snapshot, as published by the sampling loop.
pub type Latest = watch::Receiver<Arc<Snapshot>>;

/// Encodes the agent's metrics for one scrape.
pub fn encode(latest: &Latest) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(latest.clone())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct SnapshotCollector(Latest);

/// One metric family: a descriptor and its samples.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
}

impl Family<'_> {
    fn encode<L: EncodeLabelSet>(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return Ok(());
        }
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in samples {
            let family = metric.encode_family(&labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(value).encode(family)?,
                _ => ConstGauge::new(value).encode(family)?,
            }
        }
        Ok(())
    }
}

const fn gauge(name: &'static str, help: &'static str, unit: Option<Unit>) -> Family<'static> {
    Family {
        name,
        help,
        unit,
        kind: MetricType::Gauge,
    }
}

const fn counter(name: &'static str, help: &'static str, unit: Option<Unit>) -> Family<'static> {
    Family {
        name,
        help,
        unit,
        kind: MetricType::Counter,
    }
}

fn other(unit: &str) -> Option<Unit> {
    Some(Unit::Other(unit.to_owned()))
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.0.borrow().clone();
        let e = &mut enc;

        gauge("tally_build_info", "Tally build; always 1.", None)
            .encode(e, [([("version", env!("CARGO_PKG_VERSION"))], 1.0)])?;
        gauge(
            "tally_nvml_up",
            "1 when the NVML library is open and answering.",
            None,
        )
        .encode(
            e,
            [(
                [("library", snap.nvml.library.as_str())],
                f64::from(u8::from(snap.nvml.up)),
            )],
        )?;
        gauge(
            "tally_last_sample_timestamp",
            "Unix time at which the last sampling cycle started.",
            Some(Unit::Seconds),
        )
        .encode(e, [(NOLABELS, snap.taken_at_ms as f64 / 1000.0)])?;
        counter("tally_samples", "Sampling cycles completed.", None)
            .encode(e, [(NOLABELS, snap.samples as f64)])?;
        gauge(
            "tally_sample_duration",
            "Duration of the last sampling cycle (NVML, probes, attribution).",
            Some(Unit::Seconds),
        )
        .encode(e, [(NOLABELS, snap.sample_duration_seconds)])?;

        let gpus = &snap.gpus;
        let id =
            |g: &crate::snapshot::GpuSnapshot| [("gpu", g.gpu.clone()), ("uuid", g.uuid.clone())];
        gauge(
            "tally_gpu_info",
            "One series per GPU and MIG instance; always 1. MIG instances are gpu=\"<index>/<gi>/<ci>\".",
            None,
        )
        .encode(
            e,
            gpus.iter().map(|g| {
                (
                    [
                        ("gpu", g.gpu.clone()),
                        ("uuid", g.uuid.clone()),
                        ("model", g.model.clone()),
                        ("mig_mode", g.mig_mode.to_string()),
                        ("mig_profile", g.mig_profile.clone().unwrap_or_default()),
                    ],
                    1.0,
                )
            }),
        )?;
        gauge(
            "tally_gpu_state",
            "Current state of the GPU or MIG instance, one-hot: free (no process), busy (held and \
             working), idle (held, utilization below [states] idle_utilization for idle_after), \
             stuck (holders gone, zombie or in D state, or spinning without CPU progress, for \
             stuck_after), lost (fell off the bus, NVML failing, or a fatal XID).",
            None,
        )
        .encode(
            e,
            gpus.iter().flat_map(|g| {
                GpuState::ALL.into_iter().map(move |s| {
                    (
                        [
                            ("gpu", g.gpu.clone()),
                            ("uuid", g.uuid.clone()),
                            ("state", s.as_str().to_owned()),
                        ],
                        f64::from(u8::from(s == g.state)),
                    )
                })
            }),
        )?;
        gauge(
            "tally_gpu_utilization",
            "GPU utilization 0..1 (physical GPUs; NVML has none for MIG instances).",
            other("ratio"),
        )
        .encode(
            e,
            gpus.iter()
                .filter_map(|g| Some((id(g), g.utilization_ratio?))),
        )?;
        gauge(
            "tally_gpu_memory_used",
            "GPU memory in use.",
            Some(Unit::Bytes),
        )
        .encode(
            e,
            gpus.iter()
                .filter(|g| g.health == GpuHealth::Ok)
                .map(|g| (id(g), g.memory_used_bytes as f64)),
        )?;
        gauge(
            "tally_gpu_memory_total",
            "GPU memory installed.",
            Some(Unit::Bytes),
        )
        .encode(
            e,
            gpus.iter()
                .filter(|g| g.health == GpuHealth::Ok)
                .map(|g| (id(g), g.memory_total_bytes as f64)),
        )?;
        gauge(
            "tally_gpu_power",
            "Power draw (physical GPUs).",
            other("watts"),
        )
        .encode(e, gpus.iter().filter_map(|g| Some((id(g), g.power_watts?))))?;
        gauge(
            "tally_gpu_temperature",
            "GPU core temperature.",
            Some(Unit::Celsius),
        )
        .encode(
            e,
            gpus.iter()
                .filter_map(|g| Some((id(g), g.temperature_celsius?))),
        )?;
        counter(
            "tally_gpu_energy",
            "NVML's total energy counter of the GPU since driver load.",
            Some(Unit::Joules),
        )
        .encode(
            e,
            gpus.iter()
                .filter_map(|g| Some((id(g), g.energy_joules_total?))),
        )?;
        counter(
            "tally_gpu_pcie",
            "PCIe bytes of the GPU, integrated from NVML's throughput samples (tx: device to \
             host, rx: host to device).",
            Some(Unit::Bytes),
        )
        .encode(
            e,
            gpus.iter().flat_map(|g| {
                let tx = g.pcie_tx_bytes_total.map(|v| (dir(g, "tx"), v));
                let rx = g.pcie_rx_bytes_total.map(|v| (dir(g, "rx"), v));
                tx.into_iter().chain(rx)
            }),
        )?;
        counter(
            "tally_gpu_observed",
            "Wall time the agent accounted for this GPU or MIG instance: what \
             sum by (gpu) (tally_tenant_gpu_allocated_seconds_total) adds up to.",
            Some(Unit::Seconds),
        )
        .encode(e, gpus.iter().map(|g| (id(g), g.observed_seconds_total)))?;
        counter(
            "tally_tenant_gpu_xid_errors",
            "XID errors by the tenants holding the GPU when they came (a shared GPU's XID counts \
             for each of its tenants).",
            None,
        )
        .encode(
            e,
            gpus.iter().flat_map(|g| {
                g.xid_errors_by_tenant
                    .iter()
                    .flat_map(move |(tenant, counts)| {
                        counts.iter().map(move |(xid, n)| {
                            (
                                [
                                    ("tenant", tenant.clone()),
                                    ("gpu", g.gpu.clone()),
                                    ("uuid", g.uuid.clone()),
                                    ("xid", xid.to_string()),
                                ],
                                *n as f64,
                            )
                        })
                    })
            }),
        )?;
        counter(
            "tally_gpu_xid_errors",
            "XID errors reported by the driver, by XID code.",
            None,
        )
        .encode(
            e,
            gpus.iter().flat_map(|g| {
                g.xid_errors_total.iter().map(|(xid, n)| {
                    (
                        [
                            ("gpu", g.gpu.clone()),
                            ("uuid", g.uuid.clone()),
                            ("xid", xid.to_string()),
                        ],
                        *n as f64,
                    )
                })
            }),
        )?;

        let rows = &snap.tenant_gpu;
        let tg = |r: &crate::snapshot::TenantGpuUsage| {
            [("tenant", r.tenant.clone()), ("gpu", r.gpu.clone())]
        };
        counter(
            "tally_tenant_gpu_allocated",
            "Wall time the tenant held the GPU or MIG instance (shared devices split by memory \
             held). tenant=\"_idle\" is time nobody held it; the sum over tenants is wall time.",
            Some(Unit::Seconds),
        )
        .encode(e, rows.iter().map(|r| (tg(r), r.allocated_seconds_total)))?;
        counter(
            "tally_tenant_gpu_sm",
            "SM work of the tenant: its processes' SM utilization × wall time (a device sums to \
             at most its wall time). Absent for MIG instances: NVML \
             has no per-process utilization there.",
            Some(Unit::Seconds),
        )
        .encode(
            e,
            rows.iter()
                .filter_map(|r| Some((tg(r), r.sm_seconds_total?))),
        )?;
        gauge(
            "tally_tenant_gpu_memory",
            "GPU memory the tenant holds now.",
            Some(Unit::Bytes),
        )
        .encode(
            e,
            rows.iter()
                .filter(|r| r.tenant != crate::snapshot::TENANT_IDLE)
                .map(|r| (tg(r), r.memory_bytes as f64)),
        )?;
        counter(
            "tally_tenant_gpu_energy",
            "The tenant's share of the GPU's energy: idle draw by allocation, the rest by SM time \
             (MIG: the parent's energy by compute-slice fraction). Sums to the GPU's counter.",
            Some(Unit::Joules),
        )
        .encode(e, rows.iter().map(|r| (tg(r), r.energy_joules_total)))?;

        encode_workloads(&snap, e)?;
        encode_io(&snap, e)?;
        encode_enforcement(&snap, e)?;
        encode_report(e)?;
        encode_process(e)
    }
}

/// Per-workload GPU memory (opt-in: `[tenant.kubernetes] workload_series`;
/// processes carry a workload only then).
fn encode_workloads(snap: &Snapshot, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let mut memory: std::collections::BTreeMap<[(&str, String); 5], u64> = Default::default();
    for g in &snap.gpus {
        for p in &g.processes {
            let Some(w) = &p.workload else { continue };
            let labels = [
                ("tenant", p.tenant.clone()),
                ("namespace", w.namespace.clone()),
                ("pod", w.pod.clone()),
                ("container", w.container.clone()),
                ("gpu", g.gpu.clone()),
            ];
            *memory.entry(labels).or_default() += p.memory_bytes;
        }
    }
    gauge(
        "tally_workload_gpu_memory",
        "GPU memory held by one Kubernetes container's processes (opt-in: [tenant.kubernetes] \
         workload_series).",
        Some(Unit::Bytes),
    )
    .encode(e, memory.into_iter().map(|(l, v)| (l, v as f64)))
}

type NoLabels = [(&'static str, &'static str); 0];
const NOLABELS: NoLabels = [];

fn dir(g: &crate::snapshot::GpuSnapshot, direction: &str) -> [(&'static str, String); 3] {
    [
        ("gpu", g.gpu.clone()),
        ("uuid", g.uuid.clone()),
        ("direction", direction.to_owned()),
    ]
}

/// eBPF-derived families: probe health and per-tenant I/O.
fn encode_io(snap: &Snapshot, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    gauge(
        "tally_probe_up",
        "1 when the eBPF program is loaded and attached.",
        None,
    )
    .encode(
        e,
        snap.probes
            .iter()
            .map(|p| ([("probe", p.probe.clone())], f64::from(u8::from(p.up)))),
    )?;
    let io = &snap.tenant_io;
    let t = |tenant: &str, d: &str| [("tenant", tenant.to_owned()), ("direction", d.to_owned())];
    counter(
        "tally_tenant_network",
        "Bytes the tenant's cgroups sent and received (IP packets incl. headers), from cgroup_skb.",
        Some(Unit::Bytes),
    )
    .encode(
        e,
        io.iter().flat_map(|r| {
            [
                (
                    t(&r.tenant, "ingress"),
                    r.network_ingress_bytes_total as f64,
                ),
                (t(&r.tenant, "egress"), r.network_egress_bytes_total as f64),
            ]
        }),
    )?;
    counter(
        "tally_tenant_network_packets",
        "Packets (skbs) of the tenant's cgroups.",
        None,
    )
    .encode(
        e,
        io.iter().flat_map(|r| {
            [
                (
                    t(&r.tenant, "ingress"),
                    r.network_ingress_packets_total as f64,
                ),
                (
                    t(&r.tenant, "egress"),
                    r.network_egress_packets_total as f64,
                ),
            ]
        }),
    )?;
    counter(
        "tally_tenant_network_dropped_packets",
        "Packets dropped by the tenant's network rate limit.",
        None,
    )
    .encode(
        e,
        io.iter().flat_map(|r| {
            [
                (
                    t(&r.tenant, "ingress"),
                    r.network_ingress_dropped_packets_total as f64,
                ),
                (
                    t(&r.tenant, "egress"),
                    r.network_egress_dropped_packets_total as f64,
                ),
            ]
        }),
    )?;
    counter(
        "tally_tenant_pcie",
        "Host↔device bytes of the tenant's explicit CUDA copies (uprobes); tenant=\"_unattributed\" \
         is what the GPU's PCIe counters saw beyond them.",
        Some(Unit::Bytes),
    )
    .encode(
        e,
        io.iter().flat_map(|r| {
            [
                (t(&r.tenant, "h2d"), r.pcie_h2d_bytes_total as f64),
                (t(&r.tenant, "d2h"), r.pcie_d2h_bytes_total as f64),
            ]
        }),
    )
}

/// Quota limits, usage and enforcement actions (`crate::enforce`).
fn encode_enforcement(
    snap: &Snapshot,
    e: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let q = &snap.tenant_quotas;
    let tr = |r: &crate::snapshot::TenantQuotaStatus| {
        [
            ("tenant", r.tenant.clone()),
            ("resource", r.resource.clone()),
        ]
    };
    gauge(
        "tally_tenant_quota_limit",
        "The tenant's quota on this node, by resource: cpu_cores (cores), memory and gpu_memory \
         (bytes), pids, gpus (devices), gpu_seconds_per_hour (seconds), network_egress and \
         network_ingress (bytes per second).",
        None,
    )
    .encode(e, q.iter().map(|r| (tr(r), r.limit)))?;
    gauge(
        "tally_tenant_quota_usage",
        "What the tenant uses now, in the unit of tally_tenant_quota_limit.",
        None,
    )
    .encode(e, q.iter().filter_map(|r| Some((tr(r), r.usage?))))?;
    counter(
        "tally_enforcement_actions",
        "Enforcement actions taken since the agent started (alert, throttle, terminate, kill).",
        None,
    )
    .encode(
        e,
        snap.enforcement_actions.iter().map(|a| {
            (
                [
                    ("tenant", a.tenant.clone()),
                    ("resource", a.resource.clone()),
                    ("action", a.action.clone()),
                ],
                a.total as f64,
            )
        }),
    )
}

/// The report sender's spool and delivery counters (`crate::report`).
fn encode_report(e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    for s in crate::report::stats::stats().samples() {
        let family = Family {
            name: s.name,
            help: s.help,
            unit: s.unit.map(|u| match u {
                "bytes" => Unit::Bytes,
                "seconds" => Unit::Seconds,
                other => Unit::Other(other.to_owned()),
            }),
            kind: if s.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            },
        };
        family.encode(e, [(NOLABELS, s.value)])?;
    }
    Ok(())
}

/// The agent's own footprint, under the standard `process_` names.
fn encode_process(e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let Ok(me) = procfs::process::Process::myself() else {
        return Ok(());
    };
    let Ok(stat) = me.stat() else {
        return Ok(());
    };
    let ticks = procfs::ticks_per_second() as f64;
    counter(
        "process_cpu",
        "CPU time of the agent process.",
        Some(Unit::Seconds),
    )
    .encode(e, [(NOLABELS, (stat.utime + stat.stime) as f64 / ticks)])?;
    let page = procfs::page_size() as f64;
    gauge(
        "process_resident_memory",
        "Resident memory of the agent process.",
        Some(Unit::Bytes),
    )
    .encode(e, [(NOLABELS, stat.rss as f64 * page)])
}

/// Renders a snapshot as a plain text table, for the demo and the CLI.
pub fn tenant_table(snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>12} {:>12} {:>12} {:>12}",
        "TENANT", "GPU", "ALLOC s", "SM s", "MEM MiB", "ENERGY J"
    );
    for r in &snap.tenant_gpu {
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>12.1} {:>12} {:>12.0} {:>12.1}",
            r.tenant,
            r.gpu,
            r.allocated_seconds_total,
            r.sm_seconds_total
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "n/a".into()),
            r.memory_bytes as f64 / (1 << 20) as f64,
            r.energy_joules_total
        );
    }
    out
}
