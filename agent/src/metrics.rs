//! Prometheus exposition of the agent (OpenMetrics text): one registry,
//! into which each component registers its own typed families (the report
//! sender's counters), plus the families of a [`Snapshot`], written by hand
//! ([`text`]): no second copy of the numbers, and no NVML call on the
//! scrape path. The snapshot's text is encoded once per snapshot and served
//! from a cache ([`scrape`]), ahead of the scrape when one is expected
//! ([`ahead`], [`encode_ahead`]). Units are declared so the encoder
//! appends them (`tally_gpu_energy` + joules + counter →
//! `tally_gpu_energy_joules_total`).

mod ahead;
mod health;
mod scrape;
mod tenant_gpu;
mod text;

use std::{
    borrow::Cow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::body::Bytes;

use prometheus_client::{
    metrics::MetricType,
    registry::{Registry, Unit},
};

pub use self::scrape::accepts_gzip;
use self::text::{Labels, Sink};
use crate::{
    snapshot::{GpuHealth, GpuSnapshot, Latest, Snapshot},
    states::GpuState,
};

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The agent's `/metrics`: the snapshot's families and whatever the
/// components registered.
#[derive(Debug)]
pub struct Metrics {
    /// The components' families; each registers under a sub-registry of
    /// its own, so they come after the snapshot's in the text.
    registry: Registry,
    latest: Latest,
    cache: scrape::BodyCache,
    clock: Mutex<ahead::ScrapeClock>,
    /// Snapshots encoded, ahead or by a scrape.
    renders: AtomicU64,
}

impl Metrics {
    /// The exposition of `latest` and of what components register.
    pub fn new(latest: Latest) -> Self {
        Self {
            registry: Registry::default(),
            latest,
            cache: scrape::BodyCache::default(),
            clock: Mutex::default(),
            renders: AtomicU64::new(0),
        }
    }

    /// Where a component registers its own families.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The body of one scrape of the latest snapshot, gzipped when `gzip`:
    /// the bytes cached when the snapshot was encoded ahead or scraped
    /// before, else encoded now.
    pub fn body(&self, gzip: bool) -> Bytes {
        self.clock().scraped(Instant::now(), gzip);
        let latest = self.latest.borrow().clone();
        let (snapshot, text) = match self.cache.text(&latest) {
            Some(cached) => cached,
            None => (latest.clone(), self.render(&latest)),
        };
        self.send(snapshot, text, gzip)
    }

    /// The snapshot's families, encoded: once per snapshot scraped.
    // Out of line: `cargo xtask bench` counts instructions per call of it
    // (callgrind), which needs the symbol; and kept apart from `send`, as
    // callgrind's counting toggles rather than nests.
    #[inline(never)]
    fn render(&self, snapshot: &Arc<Snapshot>) -> Bytes {
        self.renders.fetch_add(1, Ordering::Relaxed);
        // The String's buffer becomes the Bytes, not a copy of it.
        Bytes::from(encode_snapshot(snapshot))
    }

    /// Whether a snapshot published now, replaced an `interval` later, is
    /// to be encoded ahead of its scrape: `Some(gzip)` if so.
    fn ahead(&self, interval: Duration) -> Option<bool> {
        self.clock().ahead(Instant::now(), interval)
    }

    /// Encodes `snapshot` (and gzips it, when scrapers ask for gzip) into
    /// the cache before any scrape of it, unless a scrape already did.
    fn prepare(&self, snapshot: &Arc<Snapshot>, gzip: bool) {
        if self.cache.text(snapshot).is_some() {
            return;
        }
        let text = self.render(snapshot);
        // Not through `send`: the bench counts that one per scrape.
        self.cache
            .body(snapshot.clone(), text, self.components(), gzip);
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, ahead::ScrapeClock> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One scrape's body from the snapshot's encoded families: the
    /// components' families joined on, gzipped when asked.
    // Out of line for the bench's instruction counts, as `render`.
    #[inline(never)]
    fn send(&self, snapshot: Arc<Snapshot>, text: Bytes, gzip: bool) -> Bytes {
        self.cache.body(snapshot, text, self.components(), gzip)
    }

    /// Every family as text, as one scrape sees it.
    pub fn encode(&self) -> String {
        String::from_utf8_lossy(&self.body(false)).into_owned()
    }

    fn components(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out
    }
}

/// Encodes each new snapshot of `latest` on a blocking thread, off the
/// request path, when a scrape is expected before the one after it
/// ([`ahead`]); ends when the sampler stops publishing.
pub fn encode_ahead(
    metrics: Arc<Metrics>,
    mut latest: Latest,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while latest.changed().await.is_ok() {
            let snapshot = latest.borrow_and_update().clone();
            let Some(gzip) = metrics.ahead(interval) else {
                continue;
            };
            let m = metrics.clone();
            if tokio::task::spawn_blocking(move || m.prepare(&snapshot, gzip))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// The snapshot's families, without the closing `# EOF`.
fn encode_snapshot(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(64 * 1024 + tenant_gpu::size_hint(&snapshot.tenant_gpu));
    // Writing into a String cannot fail.
    let _ = encode_head(snapshot, &mut out);
    tenant_gpu::write(&mut out, &snapshot.tenant_gpu);
    let _ = encode_tail(snapshot, &mut out);
    out
}

/// One metric family: a descriptor and its samples.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
}

impl Family<'_> {
    /// Writes the family and its samples into `sink`; nothing at all when
    /// it has no samples, as prometheus-client leaves such a family out.
    fn encode<L: Labels>(
        &self,
        sink: &mut impl Sink,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> std::fmt::Result {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return Ok(());
        }
        sink.family(self, samples)
    }
}

/// How a sample's value is written: whole numbers (counts, bytes, one-hot
/// states) as integers, since formatting every value as a float (dtoa) was
/// a quarter of the encoding's instructions; a counter's as unsigned, as
/// prometheus-client's counters take them.
#[derive(Debug, Clone, Copy)]
enum Number {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl Number {
    fn of(counter: bool, value: f64) -> Self {
        match whole(value) {
            Some(v) if counter && v >= 0 => Number::Unsigned(v.unsigned_abs()),
            Some(v) if !counter => Number::Signed(v),
            _ => Number::Float(value),
        }
    }
}

/// `value` as an integer when it is one that an `f64` holds exactly.
fn whole(value: f64) -> Option<i64> {
    const EXACT: f64 = (1u64 << 53) as f64;
    // A round trip through the integer, not `fract`: that is a libm call
    // (`trunc`) on baseline x86-64, a tenth of the encoding. NaN becomes 0
    // and the infinities saturate, so neither comes back equal.
    let integer = value as i64;
    (integer as f64 == value && value.abs() <= EXACT).then_some(integer)
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

/// The snapshot's families before the per-tenant GPU ones, which
/// [`tenant_gpu`] writes.
fn encode_head(snap: &Snapshot, e: &mut impl Sink) -> std::fmt::Result {
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
    gauge(
            "tally_gpu_info",
            "One series per GPU and MIG instance; always 1. MIG instances are gpu=\"<index>/<gi>/<ci>\". \
             energy_source: counter (NVML's energy counter) or power (integrated power readings: \
             the GPU has no counter).",
            None,
        )
        .encode(
            e,
            gpus.iter().map(|g| {
                (
                    [
                        ("gpu", &*g.gpu),
                        ("uuid", &*g.uuid),
                        ("model", &*g.model),
                        ("mig_mode", if g.mig_mode { "true" } else { "false" }),
                        ("mig_profile", g.mig_profile.as_deref().unwrap_or_default()),
                        (
                            "energy_source",
                            g.energy_source.map_or("", |s| s.as_str()),
                        ),
                    ],
                    1.0,
                )
            }),
        )?;
    gauge(
        "tally_gpu_slice_fraction",
        "What one hour of this GPU or MIG instance is charged as, in GPU-hours of gpu_model \
             (the model the aggregator's price table is keyed by): 1 for a whole GPU, a MIG \
             instance's compute slices over its parent's. Joined with tally_price_gpu_hour, it \
             prices usage as the chargeback does.",
        None,
    )
    .encode(
        e,
        gpus.iter().map(|g| {
            (
                [
                    ("gpu", &*g.gpu),
                    ("uuid", &*g.uuid),
                    ("gpu_model", g.priced_model(gpus)),
                ],
                g.priced_fraction(),
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
                    [("gpu", &*g.gpu), ("uuid", &*g.uuid), ("state", s.as_str())],
                    f64::from(u8::from(s == g.state)),
                )
            })
        }),
    )?;
    gauge(
        "tally_gpu_utilization",
        "GPU utilization 0..1 (physical GPUs; MIG instances where GPM measures their SM \
             activity, Hopper and later).",
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
        "Energy drawn by the GPU: NVML's total-energy counter, carried on across counter \
             resets, or the integral of its power where it has no counter (tally_gpu_info \
             energy_source).",
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
            let tx = g
                .pcie_tx_bytes_total
                .map(|v| (with(g, "direction", "tx"), v));
            let rx = g
                .pcie_rx_bytes_total
                .map(|v| (with(g, "direction", "rx"), v));
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
                                ("tenant", Cow::from(tenant.as_str())),
                                ("gpu", Cow::from(g.gpu.as_str())),
                                ("uuid", Cow::from(g.uuid.as_str())),
                                ("xid", Cow::from(xid.to_string())),
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
                        ("gpu", Cow::from(g.gpu.as_str())),
                        ("uuid", Cow::from(g.uuid.as_str())),
                        ("xid", Cow::from(xid.to_string())),
                    ],
                    *n as f64,
                )
            })
        }),
    )?;

    Ok(())
}

/// The snapshot's families after the per-tenant GPU ones.
fn encode_tail(snap: &Snapshot, e: &mut impl Sink) -> std::fmt::Result {
    encode_workloads(snap, e)?;
    health::encode(snap, e)?;
    encode_io(snap, e)?;
    encode_enforcement(snap, e)?;
    encode_process(e)
}

/// Per-workload GPU memory (opt-in: `[tenant.kubernetes] workload_series`;
/// processes carry a workload only then).
fn encode_workloads(snap: &Snapshot, e: &mut impl Sink) -> Result<(), std::fmt::Error> {
    let mut memory: std::collections::BTreeMap<[(&str, &str); 5], u64> = Default::default();
    for g in &snap.gpus {
        for p in &g.processes {
            let Some(w) = &p.workload else { continue };
            let labels = [
                ("tenant", &*p.tenant),
                ("namespace", &*w.namespace),
                ("pod", &*w.pod),
                ("container", &*w.container),
                ("gpu", &*g.gpu),
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

/// A GPU's (or MIG instance's) labels.
fn id(g: &GpuSnapshot) -> [(&'static str, &str); 2] {
    [("gpu", &*g.gpu), ("uuid", &*g.uuid)]
}

/// A GPU's labels and one more.
fn with<'a>(g: &'a GpuSnapshot, key: &'static str, value: &'a str) -> [(&'static str, &'a str); 3] {
    [("gpu", &*g.gpu), ("uuid", &*g.uuid), (key, value)]
}

/// eBPF-derived families: probe health and per-tenant I/O.
fn encode_io(snap: &Snapshot, e: &mut impl Sink) -> Result<(), std::fmt::Error> {
    gauge(
        "tally_probe_up",
        "1 when the eBPF program is loaded and attached.",
        None,
    )
    .encode(
        e,
        snap.probes
            .iter()
            .map(|p| ([("probe", &*p.probe)], f64::from(u8::from(p.up)))),
    )?;
    let io = &snap.tenant_io;
    fn t<'a>(tenant: &'a str, direction: &'a str) -> [(&'static str, &'a str); 2] {
        [("tenant", tenant), ("direction", direction)]
    }
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
        "Host↔device bytes of the tenant's explicit CUDA copies (uprobes); direction=\"other\": \
         generic copies on unified addresses, direction unknown; tenant=\"_unattributed\" is what \
         the GPU's PCIe counters saw beyond them.",
        Some(Unit::Bytes),
    )
    .encode(
        e,
        io.iter().flat_map(|r| {
            [
                (t(&r.tenant, "h2d"), r.pcie_h2d_bytes_total as f64),
                (t(&r.tenant, "d2h"), r.pcie_d2h_bytes_total as f64),
                (t(&r.tenant, "other"), r.pcie_other_bytes_total as f64),
            ]
        }),
    )
}

/// Quota limits, usage and enforcement actions (`crate::enforce`).
fn encode_enforcement(snap: &Snapshot, e: &mut impl Sink) -> Result<(), std::fmt::Error> {
    let q = &snap.tenant_quotas;
    fn tr(r: &crate::snapshot::TenantQuotaStatus) -> [(&'static str, &str); 2] {
        [("tenant", &r.tenant), ("resource", &r.resource)]
    }
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
    gauge(
        "tally_tenant_gpu_unallocated_use",
        "1 while a pod of the tenant uses a GPU or MIG device the kubelet did not allocate to it.",
        None,
    )
    .encode(
        e,
        // Once per label set: two namespaces of one tenant may reuse a pod name.
        snap.unallocated_gpu_use
            .iter()
            .map(|u| [("tenant", &*u.tenant), ("pod", &*u.pod), ("gpu", &*u.gpu)])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|labels| (labels, 1.0)),
    )?;
    counter(
        "tally_tenant_gpu_device_denied",
        "GPU device opens denied to the tenant's cgroups by its gpus quota (Tally's tenant cgroups \
         and every cgroup its rules match), since the agent started.",
        None,
    )
    .encode(
        e,
        snap.device_denials
            .iter()
            .map(|d| ([("tenant", &*d.tenant)], d.total as f64)),
    )?;
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
                    ("tenant", &*a.tenant),
                    ("resource", &*a.resource),
                    ("action", &*a.action),
                ],
                a.total as f64,
            )
        }),
    )
}

/// The agent's own footprint, under the standard `process_` names.
fn encode_process(e: &mut impl Sink) -> Result<(), std::fmt::Error> {
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use tokio::sync::watch;

    use super::*;
    use crate::{
        report::stats::ReportStats,
        snapshot::{EnergySource, GpuSnapshot, TENANT_IDLE, TenantGpuUsage},
    };

    /// GPU 0 shared by acme and `_idle`, MIG GPU 1 with instance 1/1/0
    /// held by beta.
    fn snapshot() -> Snapshot {
        let gpu = |label: &str, state, observed| GpuSnapshot {
            gpu: label.into(),
            uuid: format!("GPU-{label}"),
            model: "M".into(),
            state,
            observed_seconds_total: observed,
            ..Default::default()
        };
        let row = |tenant: &str, gpu: &str, allocated| TenantGpuUsage {
            tenant: tenant.into(),
            gpu: gpu.into(),
            uuid: format!("GPU-{gpu}").into(),
            allocated_seconds_total: allocated,
            energy_joules_total: 1.0,
            ..Default::default()
        };
        Snapshot {
            node: "n1".into(),
            samples: 7,
            gpus: vec![
                GpuSnapshot {
                    energy_source: Some(EnergySource::Counter),
                    ..gpu("0", GpuState::Busy, 10.0)
                },
                GpuSnapshot {
                    mig_mode: true,
                    energy_source: Some(EnergySource::Power),
                    ..gpu("1", GpuState::Free, 2.0)
                },
                GpuSnapshot {
                    mig_mode: true,
                    mig_profile: Some("3g.20gb".into()),
                    parent_uuid: Some("GPU-1".into()),
                    energy_source: Some(EnergySource::Power),
                    ..gpu("1/1/0", GpuState::Idle, 10.0)
                },
            ],
            tenant_gpu: vec![
                row("acme", "0", 7.5),
                row(TENANT_IDLE, "0", 2.5),
                row(TENANT_IDLE, "1", 2.0),
                row("beta", "1/1/0", 10.0),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn encode(snap: Snapshot, report: Option<&ReportStats>) -> String {
        let (_tx, latest) = watch::channel(Arc::new(snap));
        let mut metrics = Metrics::new(latest);
        if let Some(r) = report {
            r.register(metrics.registry());
        }
        metrics.encode()
    }

    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// `name{labels} value` → (labels, value); labels as written.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
            .map(|rest| {
                let (labels, value) = rest.rsplit_once("} ").expect("labels and value");
                (labels, value.parse().expect("a number"))
            })
            .collect()
    }

    /// The value of label `key` in `k="v",…` (values here have no quotes
    /// or commas).
    fn label<'a>(labels: &'a str, key: &str) -> &'a str {
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no {key} in {labels}"))
    }

    /// The snapshot's families but the per-tenant GPU ones (whose own test
    /// compares them), through prometheus-client's encoder.
    #[derive(Debug)]
    struct Reference(Snapshot);

    impl prometheus_client::collector::Collector for Reference {
        fn encode(
            &self,
            mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
        ) -> std::fmt::Result {
            encode_head(&self.0, &mut e)?;
            encode_tail(&self.0, &mut e)
        }
    }

    /// A snapshot with a sample in every family.
    fn every_family() -> Snapshot {
        let mut snap = snapshot();
        snap.nvml.up = true;
        snap.nvml.library = "libnvidia-ml.so.1".into();
        snap.taken_at_ms = 1_700_000_000_123;
        snap.sample_duration_seconds = 0.0034;
        let g = &mut snap.gpus[0];
        g.utilization_ratio = Some(0.1 + 0.2);
        g.memory_used_bytes = 3 << 30;
        g.memory_total_bytes = 80 << 30;
        g.power_watts = Some(312.25);
        g.temperature_celsius = Some(61.0);
        g.energy_joules_total = Some(3349.0717240570357);
        g.ecc_errors = Some(crate::snapshot::EccErrors {
            corrected: 12,
            uncorrected: 1,
        });
        g.remapped_rows = Some(crate::snapshot::RemappedRows {
            correctable: 1,
            uncorrectable: 2,
            pending: true,
            failed: false,
        });
        g.throttle_reasons = Some(0x9);
        g.pcie_tx_bytes_total = Some(1e12);
        g.pcie_rx_bytes_total = Some(2.5);
        g.xid_errors_total = [(79, 1), (13, 4)].into();
        g.xid_errors_by_tenant = [("acme".to_owned(), [(13, 4)].into())].into();
        g.processes = vec![crate::snapshot::GpuProcess {
            pid: 7,
            tenant: "acme".into(),
            memory_bytes: 1 << 20,
            workload: Some(Box::new(crate::snapshot::Workload {
                namespace: "ml".into(),
                pod: "train-0".into(),
                container: "main".into(),
            })),
            ..Default::default()
        }];
        snap.gpus[2].slice_fraction = Some(3.0 / 7.0);
        snap.probes = vec![crate::snapshot::ProbeStatus {
            probe: "network".into(),
            up: true,
            error: None,
        }];
        snap.tenant_io = vec![crate::snapshot::TenantIoUsage {
            tenant: "acme".into(),
            network_ingress_bytes_total: 1,
            network_egress_bytes_total: 2,
            network_ingress_packets_total: 3,
            network_egress_packets_total: 4,
            network_ingress_dropped_packets_total: 5,
            network_egress_dropped_packets_total: 6,
            pcie_h2d_bytes_total: 7,
            pcie_d2h_bytes_total: u64::MAX,
            pcie_other_bytes_total: 9,
        }];
        snap.tenant_quotas = vec![crate::snapshot::TenantQuotaStatus {
            tenant: "acme".into(),
            resource: "cpu_cores".into(),
            limit: 1.5,
            usage: Some(-0.25),
        }];
        snap.enforcement_actions = vec![crate::snapshot::EnforcementActionCount {
            tenant: "acme".into(),
            resource: "memory".into(),
            action: "throttle".into(),
            total: 3,
        }];
        snap.device_denials = vec![crate::snapshot::TenantDeviceDenials {
            tenant: "beta".into(),
            total: 2,
        }];
        let unallocated = crate::snapshot::UnallocatedGpuUse {
            tenant: "beta".into(),
            pod: "p".into(),
            gpu: "0".into(),
            ..Default::default()
        };
        snap.unallocated_gpu_use = vec![unallocated.clone(), unallocated];
        snap
    }

    #[test]
    fn the_text_is_prometheus_clients() {
        let snap = every_family();
        let mut mine = String::new();
        encode_head(&snap, &mut mine).unwrap();
        encode_tail(&snap, &mut mine).unwrap();
        let mut theirs = String::new();
        text::reference::encode_collector(&mut theirs, Reference(snap.clone()));
        // The agent's own CPU time and memory move between the two reads.
        let steady = |text: &str| {
            text.lines()
                .map(|l| match l.rsplit_once(' ') {
                    Some((series, _)) if l.starts_with("process_") => format!("{series} 0\n"),
                    _ => format!("{l}\n"),
                })
                .collect::<String>()
        };
        text::reference::same_samples(&steady(&mine), &steady(&theirs));

        // Every family of the snapshot but the per-tenant GPU ones.
        let families = mine.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, 36, "{mine}");
        for line in [
            "tally_samples_total{} 7\n",
            "tally_gpu_utilization_ratio{gpu=\"0\",uuid=\"GPU-0\"} 0.30000000000000004\n",
            "tally_tenant_gpu_xid_errors_total{tenant=\"acme\",gpu=\"0\",uuid=\"GPU-0\",xid=\"13\"} 4\n",
            "tally_tenant_pcie_bytes_total{tenant=\"acme\",direction=\"h2d\"} 7\n",
            "tally_tenant_gpu_unallocated_use{tenant=\"beta\",pod=\"p\",gpu=\"0\"} 1\n",
        ] {
            assert!(mine.contains(line), "{line} in {mine}");
        }
        // One series per label set.
        assert_eq!(lines(&mine, "tally_tenant_gpu_unallocated_use{").len(), 1);

        // A family without samples is left out, descriptor and all.
        let mut bare = String::new();
        encode_head(&snapshot(), &mut bare).unwrap();
        assert!(bare.contains("# TYPE tally_gpu_observed_seconds counter\n"));
        assert!(!bare.contains("tally_gpu_power"), "{bare}");
    }

    /// Tenant names are checked for control characters only: a quote or a
    /// backslash (a systemd unit's `\x2d`) is written escaped, on both
    /// paths (the per-tenant GPU families and every other one).
    #[test]
    fn quotes_and_backslashes_in_names_are_escaped() {
        const NAME: &str = r#"svc\x2dblue "q""#;
        const WRITTEN: &str = r#"svc\\x2dblue \"q\""#;
        let mut snap = every_family();
        Arc::make_mut(&mut snap.tenant_gpu)[0].tenant = NAME.into();
        snap.tenant_io[0].tenant = NAME.into();
        let text = encode(snap, None);
        assert_eq!(
            lines(
                &text,
                "tally_tenant_gpu_allocated_seconds_total{tenant=\"svc"
            ),
            [format!(
                r#"tally_tenant_gpu_allocated_seconds_total{{tenant="{WRITTEN}",gpu="0"}} 7.5"#
            )]
        );
        assert_eq!(
            lines(&text, "tally_tenant_pcie_bytes_total{tenant=\"svc")[0],
            format!(r#"tally_tenant_pcie_bytes_total{{tenant="{WRITTEN}",direction="h2d"}} 7"#)
        );
        assert!(!text.contains(NAME), "{text}");
    }

    #[test]
    fn whole_values_are_written_as_integers_and_the_rest_as_floats() {
        assert_eq!(whole(3.0), Some(3));
        assert_eq!(whole(-2.0), Some(-2));
        assert_eq!(whole(-0.0), Some(0));
        assert_eq!(whole(9_007_199_254_740_992.0), Some(1 << 53));
        assert_eq!(whole(1.5), None);
        assert_eq!(whole(1e300), None);
        assert_eq!(whole(f64::NAN), None);
        assert_eq!(whole(f64::INFINITY), None);
    }

    #[test]
    fn slice_fraction_prices_a_mig_instance_by_its_parent_model() {
        let mut snap = snapshot();
        // Real NVML names a MIG instance after its profile; the price table
        // is keyed by the parent's model.
        snap.gpus[2].model = "M MIG 3g.20gb".into();
        snap.gpus[2].slice_fraction = Some(0.5);
        let text = encode(snap, None);
        assert_eq!(
            lines(&text, "tally_gpu_slice_fraction{"),
            [
                r#"tally_gpu_slice_fraction{gpu="0",uuid="GPU-0",gpu_model="M"} 1"#,
                r#"tally_gpu_slice_fraction{gpu="1",uuid="GPU-1",gpu_model="M"} 1"#,
                r#"tally_gpu_slice_fraction{gpu="1/1/0",uuid="GPU-1/1/0",gpu_model="M"} 0.5"#,
            ]
        );
    }

    #[test]
    fn gpu_info_has_one_series_per_device() {
        let text = encode(snapshot(), None);
        assert_eq!(
            lines(&text, "tally_gpu_info"),
            [
                r#"tally_gpu_info{gpu="0",uuid="GPU-0",model="M",mig_mode="false",mig_profile="",energy_source="counter"} 1"#,
                r#"tally_gpu_info{gpu="1",uuid="GPU-1",model="M",mig_mode="true",mig_profile="",energy_source="power"} 1"#,
                r#"tally_gpu_info{gpu="1/1/0",uuid="GPU-1/1/0",model="M",mig_mode="true",mig_profile="3g.20gb",energy_source="power"} 1"#,
            ]
        );
        assert!(text.contains(
            "# HELP tally_gpu_info One series per GPU and MIG instance; always 1. MIG instances \
             are gpu=\"<index>/<gi>/<ci>\". energy_source: counter (NVML's energy counter) or \
             power (integrated power readings: the GPU has no counter).\n# TYPE tally_gpu_info \
             gauge\n"
        ));
    }

    #[test]
    fn health_signals_are_exported_where_nvml_has_them() {
        let mut snap = snapshot();
        snap.gpus[0].ecc_errors = Some(crate::snapshot::EccErrors {
            corrected: 12,
            uncorrected: 1,
        });
        snap.gpus[0].remapped_rows = Some(crate::snapshot::RemappedRows {
            uncorrectable: 2,
            pending: true,
            ..Default::default()
        });
        snap.gpus[0].throttle_reasons = Some(0x8 | 0x1);
        let text = encode(snap, None);
        assert_eq!(
            lines(&text, "tally_gpu_ecc_errors_total"),
            [
                r#"tally_gpu_ecc_errors_total{gpu="0",uuid="GPU-0",type="corrected"} 12"#,
                r#"tally_gpu_ecc_errors_total{gpu="0",uuid="GPU-0",type="uncorrected"} 1"#,
            ]
        );
        assert!(text.contains("# TYPE tally_gpu_ecc_errors counter"));
        assert!(
            text.contains(
                r#"tally_gpu_remapped_rows{gpu="0",uuid="GPU-0",cause="uncorrectable"} 2"#
            )
        );
        assert!(text.contains(r#"tally_gpu_row_remap_pending{gpu="0",uuid="GPU-0"} 1"#));
        assert!(text.contains(r#"tally_gpu_row_remap_failed{gpu="0",uuid="GPU-0"} 0"#));
        let throttled: Vec<_> = samples(&text, "tally_gpu_throttle_reasons")
            .into_iter()
            .filter(|(_, v)| *v == 1.0)
            .map(|(l, _)| label(l, "reason"))
            .collect();
        assert_eq!(throttled, ["gpu_idle", "hw_slowdown"]);
        // GPUs that do not report them have no such series.
        assert!(!text.contains(r#"tally_gpu_throttle_reasons{gpu="1""#));
    }

    #[test]
    fn state_is_one_hot() {
        let text = encode(snapshot(), None);
        assert_eq!(
            lines(&text, r#"tally_gpu_state{gpu="1/1/0""#),
            [
                r#"tally_gpu_state{gpu="1/1/0",uuid="GPU-1/1/0",state="free"} 0"#,
                r#"tally_gpu_state{gpu="1/1/0",uuid="GPU-1/1/0",state="busy"} 0"#,
                r#"tally_gpu_state{gpu="1/1/0",uuid="GPU-1/1/0",state="idle"} 1"#,
                r#"tally_gpu_state{gpu="1/1/0",uuid="GPU-1/1/0",state="stuck"} 0"#,
                r#"tally_gpu_state{gpu="1/1/0",uuid="GPU-1/1/0",state="lost"} 0"#,
            ]
        );
        let states = samples(&text, "tally_gpu_state");
        assert_eq!(states.len(), 3 * GpuState::ALL.len());
        for g in ["0", "1", "1/1/0"] {
            let hot: f64 = states
                .iter()
                .filter(|(l, _)| label(l, "gpu") == g)
                .map(|(_, v)| v)
                .sum();
            assert_eq!(hot, 1.0, "gpu {g}");
        }
    }

    #[test]
    fn tenant_allocated_seconds_are_a_counter_in_seconds() {
        let text = encode(snapshot(), None);
        assert!(text.contains(
            "# TYPE tally_tenant_gpu_allocated_seconds counter\n\
             # UNIT tally_tenant_gpu_allocated_seconds seconds\n"
        ));
        assert_eq!(
            lines(&text, "tally_tenant_gpu_allocated_seconds_total"),
            [
                r#"tally_tenant_gpu_allocated_seconds_total{tenant="acme",gpu="0"} 7.5"#,
                r#"tally_tenant_gpu_allocated_seconds_total{tenant="_idle",gpu="0"} 2.5"#,
                r#"tally_tenant_gpu_allocated_seconds_total{tenant="_idle",gpu="1"} 2"#,
                r#"tally_tenant_gpu_allocated_seconds_total{tenant="beta",gpu="1/1/0"} 10"#,
            ]
        );
    }

    #[test]
    fn idle_allocated_seconds_are_a_counter_per_tenant() {
        let mut snap = snapshot();
        Arc::make_mut(&mut snap.tenant_gpu)[0].idle_allocated_seconds_total = 4.0;
        let text = encode(snap, None);
        assert!(text.contains("# TYPE tally_tenant_gpu_idle_allocated_seconds counter\n"));
        assert_eq!(
            lines(&text, "tally_tenant_gpu_idle_allocated_seconds_total"),
            [
                r#"tally_tenant_gpu_idle_allocated_seconds_total{tenant="acme",gpu="0"} 4"#,
                r#"tally_tenant_gpu_idle_allocated_seconds_total{tenant="beta",gpu="1/1/0"} 0"#,
            ]
        );
    }

    #[test]
    fn allocated_seconds_sum_by_gpu_to_observed_seconds() {
        let text = encode(snapshot(), None);
        let mut allocated: BTreeMap<&str, f64> = BTreeMap::new();
        for (labels, v) in samples(&text, "tally_tenant_gpu_allocated_seconds_total") {
            *allocated.entry(label(labels, "gpu")).or_default() += v;
        }
        let observed: BTreeMap<&str, f64> = samples(&text, "tally_gpu_observed_seconds_total")
            .into_iter()
            .map(|(labels, v)| (label(labels, "gpu"), v))
            .collect();
        assert_eq!(observed.len(), 3);
        assert_eq!(allocated, observed);
    }

    #[test]
    fn report_counters_are_exported_once_registered() {
        let text = encode(snapshot(), None);
        assert!(!text.contains("tally_report_"));

        let report = ReportStats::default();
        report.spool_reports.set(3);
        report.spool_bytes.set(4096);
        report.sent.inc_by(5);
        report.failures.inc();
        report.last_success_seconds.set(1_700_000_000);
        let text = encode(snapshot(), Some(&report));
        assert_eq!(
            lines(&text, "tally_report_"),
            [
                "tally_report_spool_reports 3",
                "tally_report_spool_bytes 4096",
                "tally_report_sent_reports_total 5",
                "tally_report_send_failures_total 1",
                "tally_report_spool_dropped_reports_total 0",
                "tally_report_spool_full_intervals_total 0",
                "tally_report_last_success_timestamp_seconds 1700000000",
            ]
        );
        for meta in [
            "# HELP tally_report_sent_reports Reports the aggregator acknowledged.\n\
             # TYPE tally_report_sent_reports counter\n",
            "# HELP tally_report_spool_bytes Bytes of the reports waiting in the spool.\n\
             # TYPE tally_report_spool_bytes gauge\n# UNIT tally_report_spool_bytes bytes\n",
            "# TYPE tally_report_last_success_timestamp_seconds gauge\n\
             # UNIT tally_report_last_success_timestamp_seconds seconds\n",
        ] {
            assert!(text.contains(meta), "{meta}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// Waits until `n` snapshots were encoded.
    async fn encoded(metrics: &Metrics, n: u64) {
        for _ in 0..500 {
            if metrics.renders.load(Ordering::Relaxed) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("snapshot {n} was not encoded ahead");
    }

    #[tokio::test]
    async fn a_scraped_agent_encodes_new_snapshots_ahead_of_the_scrape() {
        let (tx, latest) = watch::channel(Arc::new(snapshot()));
        let metrics = Arc::new(Metrics::new(latest.clone()));
        let task = encode_ahead(metrics.clone(), latest, Duration::from_secs(1));
        let publish = |samples| {
            tx.send_replace(Arc::new(Snapshot {
                samples,
                ..snapshot()
            }))
        };

        // Nobody scraped yet: a new snapshot waits for its first scrape.
        publish(2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.renders.load(Ordering::Relaxed), 0);
        let first = metrics.body(true);
        assert_eq!(metrics.renders.load(Ordering::Relaxed), 1);

        // Scraped: the next snapshot is encoded (and gzipped) before any
        // scrape asks, and the scrape sends those bytes.
        publish(3);
        encoded(&metrics, 2).await;
        let gz = metrics.body(true);
        assert_ne!(gz, first);
        assert!(
            String::from_utf8_lossy(&metrics.body(false)).contains("tally_samples_total{} 3\n")
        );
        assert_eq!(metrics.renders.load(Ordering::Relaxed), 2);

        // The sampler stops: so does the encoder.
        drop(tx);
        task.await.unwrap();
    }
}
