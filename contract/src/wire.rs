//! The report's wire format: the one thing the agent and the aggregator
//! share. Versioned by [`SCHEMA_VERSION`]; the aggregator refuses any other.
//!
//! Quantities are integers in fine units (microseconds, millijoules,
//! byte-seconds, bytes) so that the deltas of a counter telescope exactly:
//! the sum of every report's delta equals the agent's cumulative counter,
//! rounded once, and the ledger's sums are exact.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of [`Report`] this build speaks.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest accepted name (node, tenant, GPU label, model, …).
pub const MAX_NAME: usize = 256;

/// One report: what a node used over one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// Node name (`[report] node`).
    pub node: String,
    /// The kernel's boot id when the report was cut.
    pub boot_id: String,
    /// Sequence number, unique per (node, boot_id); strictly increasing.
    pub seq: u64,
    /// Interval covered, milliseconds since the Unix epoch.
    pub interval_start_ms: u64,
    pub interval_end_ms: u64,
    /// Per (tenant, device) GPU usage over the interval.
    #[serde(default)]
    pub gpu_usage: Vec<GpuUsage>,
    /// Per-tenant I/O over the interval (eBPF probes).
    #[serde(default)]
    pub io_usage: Vec<IoUsage>,
    /// Gauges of every GPU and MIG instance at the end of the interval.
    #[serde(default)]
    pub gpus: Vec<GpuGauge>,
    /// Audit records written since the previous report, in log order.
    #[serde(default)]
    pub audit: Vec<AuditRecord>,
    /// The agent's `[report] interval`, milliseconds: the aggregator calls a
    /// node stale after three intervals without a report. Absent from
    /// older agents. (Skipped when absent, like every field added after
    /// version 1 shipped, so an old report's digest does not change.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval_ms: Option<u64>,
    /// Each tenant's local quota limits and usage at the end of the
    /// interval (enforcement), for the cluster view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenant_quotas: Vec<TenantQuota>,
    /// The agent's `[report] cluster`: which cluster the node belongs to,
    /// so one ledger serves several. Absent from older agents, which the
    /// aggregator files under [`DEFAULT_CLUSTER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// The cluster of a report that names none (`[report] cluster`'s default).
pub const DEFAULT_CLUSTER: &str = "default";

impl Report {
    /// The report's cluster, [`DEFAULT_CLUSTER`] when it names none.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER)
    }
}

/// One quota of one tenant on the node at the end of the interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    pub tenant: String,
    /// `gpus`, `gpu_memory`, `memory`, `cpu_cores`, … (the agent's names).
    pub resource: String,
    pub limit: f64,
    /// `None` where the agent cannot read it.
    #[serde(default)]
    pub usage: Option<f64>,
}

/// One tenant's use of one GPU or MIG instance over the interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuUsage {
    pub tenant: String,
    /// Device label: `"<index>"` or `"<index>/<gi>/<ci>"` for MIG.
    pub gpu: String,
    pub uuid: String,
    /// Marketing name of the (parent) GPU, the price table's key.
    pub model: String,
    /// MIG profile (`"3g.40gb"`) for a MIG instance.
    #[serde(default)]
    pub mig_profile: Option<String>,
    /// Share of the physical GPU this device is: 1 for a whole GPU, compute
    /// slices over the parent's total for a MIG instance. Prices scale by it.
    pub slice_fraction: f64,
    /// Time the tenant held the device, microseconds.
    pub allocated_us: u64,
    /// Held time weighted by SM utilization, microseconds; absent where
    /// NVML has no per-process utilization (MIG instances).
    #[serde(default)]
    pub sm_us: Option<u64>,
    /// Integral of GPU memory held, byte-seconds.
    pub memory_byte_seconds: u64,
    /// The tenant's share of the device's energy, millijoules.
    pub energy_mj: u64,
    /// The workload within the tenant (a `workload` capture of a `cgroup`
    /// rule, `<namespace>/<pod>` on Kubernetes, the job id on Slurm);
    /// absent for usage no workload was named for, and from older agents.
    /// A tenant's rows, with and without a workload, sum to its usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The part of `allocated_us` during which the device was `idle` (held,
    /// doing nothing past `[states] idle_after`), microseconds. Absent when
    /// 0, and from older agents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub idle_us: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One tenant's I/O over the interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IoUsage {
    pub tenant: String,
    pub network_ingress_bytes: u64,
    pub network_egress_bytes: u64,
    pub network_ingress_packets: u64,
    pub network_egress_packets: u64,
    pub network_dropped_packets: u64,
    pub pcie_h2d_bytes: u64,
    pub pcie_d2h_bytes: u64,
}

/// The state of one GPU or MIG instance at the end of the interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuGauge {
    pub gpu: String,
    pub uuid: String,
    pub model: String,
    pub mig_mode: bool,
    pub mig_profile: Option<String>,
    pub parent_uuid: Option<String>,
    pub slice_fraction: Option<f64>,
    /// `ok`, `lost` or `error`, as the agent's sampler saw it.
    pub health: String,
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Processes on the device at the end of the interval.
    pub processes: u32,
    /// `free`, `busy`, `idle`, `stuck` or `lost` (the agent's GPU state);
    /// empty from agents that predate GPU states.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Tenants of the processes holding the device, sorted, distinct.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// When the device entered the `idle` state, ms since the Unix epoch;
    /// absent unless `state` is `idle`, and from older agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_since_ms: Option<u64>,
    /// The named workloads holding the device, by tenant, sorted and
    /// distinct; absent when none is named, and from older agents.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<HeldBy>,
}

/// A named workload of a tenant holding a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldBy {
    pub tenant: String,
    pub workload: String,
}

/// One record of a node's append-only audit log (enforcement actions), as
/// the enforcement side writes it (one JSON object per line).
///
/// The log is a hash chain: `prev_sha256` is the previous record's
/// `sha256` ([`GENESIS_SHA256`] for the first record of a log). The
/// aggregator checks that linkage per node on ingest; the node's own
/// `tally audit verify` checks each record's content hash. Fields other
/// than the named ones are kept as they are (`rest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it happened, milliseconds since the Unix epoch (the report's
    /// interval end when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// The tenant acted on, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What happened (`throttle`, `terminate`, `alert`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    pub prev_sha256: String,
    pub sha256: String,
    /// Every other field of the record.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// `prev_sha256` of the first record of a chain.
pub const GENESIS_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl Report {
    /// Digest of the report's canonical JSON, to tell a retry (same digest)
    /// from a conflicting report that reuses a (node, boot, seq).
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }

    /// Checks what serde cannot: names, ranges and quantities that no real
    /// interval can produce. Returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.version != SCHEMA_VERSION {
            p.push(format!(
                "schema version {} is not supported (this aggregator speaks {SCHEMA_VERSION})",
                self.version
            ));
        }
        name(&mut p, format_args!("node"), &self.node);
        name(&mut p, format_args!("boot_id"), &self.boot_id);
        if let Some(c) = &self.cluster {
            name(&mut p, format_args!("cluster"), c);
        }
        signed(&mut p, format_args!("seq"), self.seq);
        if self.interval_end_ms < self.interval_start_ms {
            p.push(format!(
                "interval_end_ms {} is before interval_start_ms {}",
                self.interval_end_ms, self.interval_start_ms
            ));
        }
        // 2^53 ms is ~285,000 years: anything beyond is not a time.
        if self.interval_end_ms > 1 << 53 {
            p.push("interval_end_ms is not a plausible time".into());
        }
        let span_us = self
            .interval_end_ms
            .saturating_sub(self.interval_start_ms)
            .saturating_mul(1000);
        // Sampling runs on a monotonic clock, the interval on the wall
        // clock: allow 10 % and 5 s of skew before calling a value impossible.
        let max_us = span_us
            .saturating_add(span_us / 10)
            .saturating_add(5_000_000);
        let mut per_device: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for (i, u) in self.gpu_usage.iter().enumerate() {
            // Paths are written only for a problem: a valid report's
            // hundreds of fields format nothing.
            let at = format_args!("gpu_usage[{i}]");
            name(&mut p, format_args!("{at}.tenant"), &u.tenant);
            name(&mut p, format_args!("{at}.gpu"), &u.gpu);
            name(&mut p, format_args!("{at}.uuid"), &u.uuid);
            name(&mut p, format_args!("{at}.model"), &u.model);
            if let Some(profile) = &u.mig_profile {
                name(&mut p, format_args!("{at}.mig_profile"), profile);
            }
            if let Some(w) = &u.workload {
                name(&mut p, format_args!("{at}.workload"), w);
            }
            if !(u.slice_fraction > 0.0 && u.slice_fraction <= 1.0) {
                p.push(format!(
                    "{at}.slice_fraction {} is not within (0, 1]",
                    u.slice_fraction
                ));
            }
            if u.allocated_us > max_us {
                p.push(format!(
                    "{at}.allocated_us {} exceeds the interval ({} us)",
                    u.allocated_us, span_us
                ));
            }
            // SM work is bounded by the interval, not by the allocation: on a
            // shared GPU time is split by memory held, and a tenant holding
            // little memory may do most of the work (refusing that lost the
            // report for good).
            if let Some(sm) = u.sm_us
                && sm > max_us
            {
                p.push(format!(
                    "{at}.sm_us {sm} exceeds the interval ({span_us} us)"
                ));
            }
            // Bounded by the interval, not by `allocated_us`: the two are
            // rounded from separate counters (and per workload), so idle
            // time may pass the allocation by a few microseconds.
            if u.idle_us > max_us {
                p.push(format!(
                    "{at}.idle_us {} exceeds the interval ({span_us} us)",
                    u.idle_us
                ));
            }
            // 10 kW for the whole interval is beyond any GPU.
            if u.energy_mj > max_us.saturating_mul(10) {
                p.push(format!("{at}.energy_mj {} is impossible", u.energy_mj));
            }
            // Saturating: two entries near u64::MAX must not wrap to a small
            // total that passes (found by the `report` fuzz target).
            let (allocated, sm) = per_device.entry(u.uuid.as_str()).or_default();
            *allocated = allocated.saturating_add(u.allocated_us);
            *sm = sm.saturating_add(u.sm_us.unwrap_or(0));
        }
        for (uuid, (allocated, sm)) in per_device {
            if allocated > max_us {
                p.push(format!(
                    "allocated time on device {uuid} sums to {allocated} us, more than the interval"
                ));
            }
            if sm > max_us {
                p.push(format!(
                    "SM time on device {uuid} sums to {sm} us, more than the interval"
                ));
            }
        }
        for (i, u) in self.io_usage.iter().enumerate() {
            name(&mut p, format_args!("io_usage[{i}].tenant"), &u.tenant);
            for (key, v) in [
                ("network_ingress_bytes", u.network_ingress_bytes),
                ("network_egress_bytes", u.network_egress_bytes),
                ("pcie_h2d_bytes", u.pcie_h2d_bytes),
                ("pcie_d2h_bytes", u.pcie_d2h_bytes),
            ] {
                signed(&mut p, format_args!("io_usage[{i}].{key}"), v);
            }
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if let Some(r) = g.utilization_ratio
                && !(0.0..=1.0).contains(&r)
            {
                p.push(format!(
                    "gpus[{i}].utilization_ratio {r} is not within 0..1"
                ));
            }
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if !matches!(
                g.state.as_str(),
                "" | "free" | "busy" | "idle" | "stuck" | "lost"
            ) {
                p.push(format!("gpus[{i}].state `{}` is not a GPU state", g.state));
            }
            for (j, t) in g.tenants.iter().enumerate() {
                name(&mut p, format_args!("gpus[{i}].tenants[{j}]"), t);
            }
            for (j, h) in g.workloads.iter().enumerate() {
                name(
                    &mut p,
                    format_args!("gpus[{i}].workloads[{j}].tenant"),
                    &h.tenant,
                );
                name(
                    &mut p,
                    format_args!("gpus[{i}].workloads[{j}].workload"),
                    &h.workload,
                );
            }
        }
        if self.report_interval_ms == Some(0) {
            p.push("report_interval_ms must be above 0".into());
        }
        // The ledger's integers are signed 64-bit: a larger value would be
        // stored as another number (a schemathesis finding: a
        // report_interval_ms of 2^63 was stored as 2^63 - 1 and answered 200).
        if let Some(v) = self.report_interval_ms {
            signed(&mut p, format_args!("report_interval_ms"), v);
        }
        for (i, u) in self.gpu_usage.iter().enumerate() {
            signed(
                &mut p,
                format_args!("gpu_usage[{i}].memory_byte_seconds"),
                u.memory_byte_seconds,
            );
        }
        for (i, u) in self.io_usage.iter().enumerate() {
            for (key, v) in [
                ("network_ingress_packets", u.network_ingress_packets),
                ("network_egress_packets", u.network_egress_packets),
                ("network_dropped_packets", u.network_dropped_packets),
            ] {
                signed(&mut p, format_args!("io_usage[{i}].{key}"), v);
            }
        }
        for (i, g) in self.gpus.iter().enumerate() {
            signed(
                &mut p,
                format_args!("gpus[{i}].memory_used_bytes"),
                g.memory_used_bytes,
            );
            signed(
                &mut p,
                format_args!("gpus[{i}].memory_total_bytes"),
                g.memory_total_bytes,
            );
            if let Some(v) = g.idle_since_ms {
                signed(&mut p, format_args!("gpus[{i}].idle_since_ms"), v);
            }
        }
        for (i, a) in self.audit.iter().enumerate() {
            if let Some(v) = a.time_ms {
                signed(&mut p, format_args!("audit[{i}].time_ms"), v);
            }
        }
        for (i, q) in self.tenant_quotas.iter().enumerate() {
            name(&mut p, format_args!("tenant_quotas[{i}].tenant"), &q.tenant);
            name(
                &mut p,
                format_args!("tenant_quotas[{i}].resource"),
                &q.resource,
            );
            if !q.limit.is_finite() || q.usage.is_some_and(|u| !u.is_finite()) {
                p.push(format!("tenant_quotas[{i}] limit and usage must be finite"));
            }
        }
        for (i, a) in self.audit.iter().enumerate() {
            for (key, h) in [("prev_sha256", &a.prev_sha256), ("sha256", &a.sha256)] {
                if !is_hex_sha256(h) {
                    p.push(format!("audit[{i}].{key} is not a hex SHA-256"));
                }
            }
            // A keyed record's HMAC (schemathesis: any value was stored).
            if let Some(h) = a.rest.get("hmac_sha256")
                && !h.as_str().is_some_and(is_hex_sha256)
            {
                p.push(format!("audit[{i}].hmac_sha256 is not a hex HMAC-SHA256"));
            }
            if let Some(t) = &a.tenant {
                name(&mut p, format_args!("audit[{i}].tenant"), t);
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }
}

/// A SHA-256 (or HMAC-SHA256) written as hex: 64 hex digits.
fn is_hex_sha256(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A name's problem, if any, under the field path `key` (formatted only
/// then).
fn name(p: &mut Vec<String>, key: std::fmt::Arguments<'_>, value: &str) {
    if value.is_empty() || value.len() > MAX_NAME {
        p.push(format!("{key} must be 1..={MAX_NAME} bytes"));
    } else if value.chars().any(char::is_control) {
        p.push(format!("{key} contains a control character"));
    }
}

/// `value`'s problem, if any, where the ledger stores it as a signed
/// 64-bit integer.
fn signed(p: &mut Vec<String>, key: std::fmt::Arguments<'_>, value: u64) {
    if value > i64::MAX as u64 {
        p.push(format!("{key} is out of range"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Report {
        Report {
            version: SCHEMA_VERSION,
            node: "n1".into(),
            boot_id: "b".into(),
            seq: 7,
            interval_start_ms: 1_000_000,
            interval_end_ms: 1_010_000,
            gpu_usage: vec![GpuUsage {
                tenant: "acme".into(),
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                mig_profile: None,
                slice_fraction: 1.0,
                allocated_us: 10_000_000,
                sm_us: Some(5_000_000),
                memory_byte_seconds: 1 << 30,
                energy_mj: 3_000_000,
                workload: None,
                idle_us: 0,
            }],
            io_usage: vec![],
            gpus: vec![],
            audit: vec![],
            report_interval_ms: None,
            tenant_quotas: vec![],
            cluster: None,
        }
    }

    /// A report written before `workload`, `cluster` and idle time existed parses,
    /// validates, falls in the default cluster, and keeps its digest (the
    /// aggregator tells a retry from a conflict by it); the new fields
    /// round-trip and change the digest.
    #[test]
    fn reports_without_workload_or_cluster_still_verify() {
        let old = r#"{"version":1,"node":"n1","boot_id":"b","seq":7,"interval_start_ms":1000000,"interval_end_ms":1010000,"gpu_usage":[{"tenant":"acme","gpu":"0","uuid":"GPU-0","model":"NVIDIA H100 80GB HBM3","mig_profile":null,"slice_fraction":1.0,"allocated_us":10000000,"sm_us":5000000,"memory_byte_seconds":1073741824,"energy_mj":3000000}],"io_usage":[],"gpus":[],"audit":[]}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        r.validate().unwrap();
        assert_eq!(r, sample());
        assert_eq!(r.cluster(), DEFAULT_CLUSTER);
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
        assert_eq!(
            r.digest(),
            hex::encode(Sha256::digest(old.as_bytes())),
            "an old report's digest is that of its own bytes"
        );

        let mut new = sample();
        new.cluster = Some("prod-eu".into());
        new.gpu_usage[0].workload = Some("job-1".into());
        new.gpu_usage[0].idle_us = 4_000_000;
        new.gpus = vec![GpuGauge {
            state: "idle".into(),
            idle_since_ms: Some(1_005_000),
            workloads: vec![HeldBy {
                tenant: "acme".into(),
                workload: "job-1".into(),
            }],
            ..Default::default()
        }];
        new.validate().unwrap();
        let back: Report = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        assert_ne!(new.digest(), r.digest());

        new.cluster = Some(String::new());
        new.gpu_usage[0].workload = Some("a\nb".into());
        let errs = new.validate().unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("cluster "), "{errs:?}");
        assert!(errs[1].starts_with("gpu_usage[0].workload "), "{errs:?}");
    }

    #[test]
    fn a_plain_report_is_valid_and_round_trips() {
        let r = sample();
        r.validate().unwrap();
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.digest(), r.digest());
    }

    #[test]
    fn impossible_values_are_named() {
        let mut r = sample();
        r.version = 2;
        r.gpu_usage[0].allocated_us = 60_000_000;
        r.gpu_usage[0].slice_fraction = 1.5;
        r.node = String::new();
        let errs = r.validate().unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs[0].contains("schema version 2"), "{errs:?}");
    }

    /// On a shared GPU a tenant holding little memory (a small allocated
    /// share) may do most of the SM work: valid. More SM work than the
    /// interval (with its 10 % and 5 s of slack), per tenant or per device,
    /// is not.
    #[test]
    fn sm_work_is_bounded_by_the_interval_not_the_allocation() {
        let mut r = sample();
        let beta = GpuUsage {
            tenant: "beta".into(),
            allocated_us: 1_000_000,
            sm_us: Some(4_000_000),
            ..r.gpu_usage[0].clone()
        };
        r.gpu_usage[0].allocated_us = 9_000_000;
        r.gpu_usage.push(beta);
        r.validate().unwrap();

        r.gpu_usage[0].sm_us = Some(13_000_000);
        let errs = r.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("SM time on device GPU-0"), "{errs:?}");

        r.gpu_usage[1].sm_us = Some(60_000_000);
        let errs = r.validate().unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("gpu_usage[1].sm_us 60000000 exceeds")),
            "{errs:?}"
        );
    }

    #[test]
    fn negative_numbers_do_not_parse() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["gpu_usage"][0]["energy_mj"] = serde_json::json!(-5);
        assert!(serde_json::from_value::<Report>(v).is_err());
    }

    #[test]
    fn audit_records_keep_unknown_fields() {
        let line = format!(
            r#"{{"time_ms":5,"tenant":"acme","action":"throttle","resource":"gpu_memory","prev_sha256":"{GENESIS_SHA256}","sha256":"{GENESIS_SHA256}"}}"#
        );
        let a: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(a.rest["resource"], "gpu_memory");
        let again: AuditRecord = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(again, a);
    }

    /// schemathesis regression: an audit record's `hmac_sha256`, when
    /// present, is 64 hex digits like the hashes.
    #[test]
    fn a_malformed_audit_hmac_is_refused() {
        let mut r = sample();
        let mut a: AuditRecord = serde_json::from_value(serde_json::json!({
            "prev_sha256": GENESIS_SHA256, "sha256": GENESIS_SHA256, "hmac_sha256": ""
        }))
        .unwrap();
        r.audit = vec![a.clone()];
        let errs = r.validate().unwrap_err();
        assert_eq!(errs, ["audit[0].hmac_sha256 is not a hex HMAC-SHA256"]);
        a.rest["hmac_sha256"] = "ab".repeat(32).into();
        r.audit = vec![a];
        assert_eq!(r.validate(), Ok(()));
    }

    /// schemathesis regression (tests/e2e/tests/openapi.rs): integers the
    /// ledger cannot hold are refused, not stored as another number.
    #[test]
    fn integers_beyond_the_ledger_are_refused() {
        let mut r = sample();
        r.report_interval_ms = Some(1 << 63);
        r.gpu_usage[0].memory_byte_seconds = u64::MAX;
        let errs = r.validate().unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains("report_interval_ms is out of range"),
            "{errs:?}"
        );
        r.report_interval_ms = Some(i64::MAX as u64);
        r.gpu_usage[0].memory_byte_seconds = i64::MAX as u64;
        r.validate().unwrap();
    }

    /// Each problem names its field by path, in the order the fields are
    /// checked (the paths are formatted only for a problem).
    #[test]
    fn every_problem_names_its_field_path() {
        let mut r = sample();
        r.gpu_usage.push(r.gpu_usage[0].clone());
        r.gpu_usage[1].uuid = "GPU-1".into();
        r.gpu_usage[1].tenant = String::new();
        r.gpu_usage[1].mig_profile = Some("1g\t10gb".into());
        r.gpu_usage[1].memory_byte_seconds = u64::MAX;
        r.seq = u64::MAX;
        r.io_usage = vec![IoUsage {
            tenant: "x".repeat(MAX_NAME + 1),
            network_ingress_bytes: u64::MAX,
            network_dropped_packets: u64::MAX,
            ..Default::default()
        }];
        r.gpus = vec![GpuGauge {
            tenants: vec!["ok".into(), "\u{7}".into()],
            workloads: vec![HeldBy {
                tenant: "acme".into(),
                workload: String::new(),
            }],
            memory_total_bytes: u64::MAX,
            idle_since_ms: Some(u64::MAX),
            ..Default::default()
        }];
        r.report_interval_ms = Some(u64::MAX);
        r.tenant_quotas = vec![TenantQuota {
            tenant: "acme".into(),
            resource: "\n".into(),
            limit: 1.0,
            usage: None,
        }];
        assert_eq!(
            r.validate().unwrap_err(),
            [
                "seq is out of range",
                "gpu_usage[1].tenant must be 1..=256 bytes",
                "gpu_usage[1].mig_profile contains a control character",
                "io_usage[0].tenant must be 1..=256 bytes",
                "io_usage[0].network_ingress_bytes is out of range",
                "gpus[0].tenants[1] contains a control character",
                "gpus[0].workloads[0].workload must be 1..=256 bytes",
                "report_interval_ms is out of range",
                "gpu_usage[1].memory_byte_seconds is out of range",
                "io_usage[0].network_dropped_packets is out of range",
                "gpus[0].memory_total_bytes is out of range",
                "gpus[0].idle_since_ms is out of range",
                "tenant_quotas[0].resource contains a control character",
            ]
        );
    }

    /// Fuzz regression (tests/fuzz `report`): two usages of one device whose
    /// allocated times each fit a ~285,000-year interval overflowed the
    /// per-device sum (a panic in debug builds, a wrapped sum that passed
    /// validation in release builds).
    #[test]
    fn per_device_sums_do_not_overflow() {
        let json = r#"{"version": 1, "node": "n0", "boot_id": "b", "seq": 0, "interval_start_ms": 0, "interval_end_ms": 9007199254740992, "gpu_usage": [{"tenant": "acme", "gpu": "0", "uuid": "GPU-0e1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", "model": "NVIDIA H100 80GB HBM3", "slice_fraction": 1.0, "allocated_us": 9500000000000000000, "sm_us": 5000000, "memory_byte_seconds": 85899345920, "energy_mj": 3500000}, {"tenant": "acme", "gpu": "m0", "uuid": "GPU-0e1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", "model": "NVIDIA H100 80GB HBM3", "slice_fraction": 1.0, "allocated_us": 9000000000000000000, "sm_us": 5000000, "memory_byte_seconds": 85899345920, "energy_mj": 3500000}]}"#;
        let r: Report = serde_json::from_str(json).unwrap();
        let errs = r.validate().unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("more than the interval")),
            "{errs:?}"
        );
    }

    /// Fuzz regression (tests/fuzz `report`): without serde_json's
    /// `float_roundtrip`, a 17-digit float was parsed one ULP off, so a
    /// report re-encoded by the aggregator differed from the agent's
    /// (`slice_fraction` 1.4285714285707145 came back as …7143).
    #[test]
    fn floats_decode_to_the_exact_value_encoded() {
        for x in [
            1.4285714285707145_f64,
            3.0 / 7.0,
            2.0 / 7.0,
            0.1 + 0.2,
            1e-300,
        ] {
            let text = serde_json::to_string(&x).unwrap();
            assert_eq!(serde_json::from_str::<f64>(&text).unwrap(), x, "{text}");
        }
    }
}
