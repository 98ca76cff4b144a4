//! Limits the kernel enforces, kept in line with the quotas: tenant
//! cgroups with their cpu / memory / pids limits, device programs and
//! their allow-lists, and the network probe's token buckets; the last two
//! also on every cgroup the tenant rules attribute to the tenant. Each
//! change of a limit's outcome is audited once.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::json;
use tracing::{debug, warn};

use super::{
    attributed::{self, Attributed},
    cgroup::{Layout, TenantTree},
    devices::{self, CapsSource, TenantDevices},
    network,
    quota::Quota,
    record::Recorder,
};
use crate::snapshot::Snapshot;

/// Whether this node runs under Kubernetes, where the kubelet owns cpu,
/// memory and pids limits and Tally leaves them alone.
pub fn under_kubernetes() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// The tenant cgroups and what has been written into and attached to them.
#[derive(Debug)]
pub(crate) struct Limits {
    tree: Option<TenantTree>,
    /// Not under Kubernetes, where the kubelet owns cpu, memory and pids.
    manage_limits: bool,
    devices: BTreeMap<String, TenantDevices>,
    caps: CapsSource,
    caps_major: Option<u32>,
    /// Last outcome of each limit write, to audit changes only.
    outcomes: BTreeMap<(String, &'static str), String>,
    /// Token buckets of network rate quotas (pinned by the network probe).
    buckets: network::Buckets,
    /// Last reason the buckets could not be written, audited once.
    bucket_error: Option<String>,
}

impl Limits {
    /// Tenant cgroups on `layout` beneath `cgroup_parent`, buckets pinned in
    /// `pin_dir`; nothing is written yet.
    pub(crate) fn new(
        layout: Option<Layout>,
        cgroup_parent: Option<&str>,
        pin_dir: &Path,
    ) -> Limits {
        let caps = CapsSource::default();
        let caps_major = caps.caps_major();
        Limits {
            tree: layout.map(|l| TenantTree::new(l, cgroup_parent.map(str::to_owned))),
            manage_limits: !under_kubernetes(),
            devices: BTreeMap::new(),
            caps,
            caps_major,
            outcomes: BTreeMap::new(),
            buckets: network::Buckets::new(pin_dir),
            bucket_error: None,
        }
    }

    /// The host's cgroup layout, when there are tenant cgroups.
    pub(crate) fn layout(&self) -> Option<&Layout> {
        self.tree.as_ref().map(|t| &t.layout)
    }

    /// Current memory, task count and CPU seconds of a tenant's cgroup.
    pub(crate) fn usage(&self, tenant: &str) -> BTreeMap<&'static str, f64> {
        self.tree
            .as_ref()
            .map(|t| t.usage(tenant))
            .unwrap_or_default()
    }

    /// Creates `tally/<tenant>` and writes cpu / memory / pids limits
    /// (not under Kubernetes); audits every change of outcome.
    pub(crate) fn apply_cgroups(&mut self, quotas: &BTreeMap<String, Quota>, rec: &Recorder) {
        let Some(tree) = &self.tree else { return };
        for (tenant, quota) in quotas {
            if let Err(e) = tree.ensure_tenant(tenant) {
                let key = (tenant.clone(), "cgroup");
                let msg = e.to_string();
                if self.outcomes.get(&key) != Some(&msg) {
                    rec.record(tenant, "cgroup", "limit_error", json!({ "error": msg }));
                    self.outcomes.insert(key, msg);
                }
                continue;
            }
            tree.remove_empty_jobs(tenant);
            if !self.manage_limits {
                continue;
            }
            for (resource, result) in tree.apply_limits(tenant, quota) {
                let outcome = match &result {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => e.to_string(),
                };
                let key = (tenant.clone(), resource);
                if self.outcomes.get(&key) == Some(&outcome) {
                    continue;
                }
                let limit = match resource {
                    "cpu_cores" => json!(quota.cpu_cores),
                    "memory" => json!(quota.memory),
                    _ => json!(quota.pids),
                };
                match result {
                    Ok(()) => {
                        rec.record(tenant, resource, "limit_applied", json!({ "limit": limit }))
                    }
                    Err(e) => rec.record(
                        tenant,
                        resource,
                        "limit_error",
                        json!({ "limit": limit, "error": e.to_string() }),
                    ),
                }
                self.outcomes.insert(key, outcome);
            }
        }
    }

    /// Attaches a device program to each tenant with a `gpus` list, with
    /// nothing allowed until a snapshot names the devices.
    pub(crate) fn attach_devices(&mut self, quotas: &BTreeMap<String, Quota>, rec: &Recorder) {
        let Some(tree) = &self.tree else { return };
        for (tenant, quota) in quotas {
            if quota.gpus.is_none() || self.devices.contains_key(tenant) {
                continue;
            }
            let Some(dir) = tree.tenant_v2_dir(tenant) else {
                rec.record(
                    tenant,
                    "gpus",
                    "limit_error",
                    json!({ "error": "no cgroup v2 hierarchy to attach the device program to" }),
                );
                continue;
            };
            match TenantDevices::attach(&dir, self.caps_major) {
                Ok(d) => {
                    rec.record(
                        tenant,
                        "gpus",
                        "devices_attached",
                        json!({ "cgroup": dir.display().to_string(), "allowed": [] }),
                    );
                    self.devices.insert(tenant.clone(), d);
                }
                Err(e) => rec.record(
                    tenant,
                    "gpus",
                    "limit_error",
                    json!({ "cgroup": dir.display().to_string(), "error": e.to_string() }),
                ),
            }
        }
    }

    /// The cgroups the tenant rules attribute to tenants with a `gpus` or
    /// network quota, plus each such tenant's `tally/<tenant>`: walked on
    /// the v2 hierarchy each cycle (see `attributed`).
    pub(crate) fn attributed(
        &self,
        quotas: &BTreeMap<String, Quota>,
        tenant_of: &dyn Fn(&str) -> Option<String>,
    ) -> Attributed {
        let Some(tree) = &self.tree else {
            return Attributed::new();
        };
        let Some(h) = tree.layout.unified.as_ref() else {
            return Attributed::new();
        };
        let ebpf = |q: &Quota| q.gpus.is_some() || network::rated(q);
        if !quotas.values().any(ebpf) {
            return Attributed::new();
        }
        let fixed: BTreeMap<String, String> = quotas
            .iter()
            .filter(|(_, q)| ebpf(q))
            .map(|(t, _)| (tree.tenant_path(h, t), t.clone()))
            .collect();
        let wanted = |t: &str| quotas.get(t).is_some_and(ebpf);
        attributed::walk(h, &fixed, &wanted, tenant_of)
    }

    /// Writes the token buckets of network rate quotas into the network
    /// probe's pinned maps (once they exist), with every attributed cgroup
    /// of their tenants; audits every change of a bucket.
    pub(crate) fn sync_buckets(
        &mut self,
        quotas: &BTreeMap<String, Quota>,
        cgroups: &Attributed,
        rec: &Recorder,
    ) {
        let Some(tree) = &self.tree else { return };
        if !quotas.values().any(network::rated) {
            return;
        }
        let members = match tree.layout.unified.as_ref() {
            Some(h) => network::members(h, cgroups, quotas),
            None => network::Members::new(),
        };
        match self.buckets.sync(&network::wanted(quotas), &members) {
            Ok(changes) => {
                self.bucket_error = None;
                for (tenant, dir, rate) in changes {
                    match rate {
                        Some(rate) => rec.record(
                            &tenant,
                            dir.resource(),
                            "limit_applied",
                            json!({
                                "rate_bytes_per_second": rate,
                                "burst_bytes": network::burst_for(rate),
                            }),
                        ),
                        None => rec.record(&tenant, dir.resource(), "limit_removed", json!({})),
                    }
                }
            }
            Err(e) => {
                let msg = format!("token buckets not written: {e}");
                if self.bucket_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    for (tenant, _) in quotas.iter().filter(|(_, q)| network::rated(q)) {
                        rec.record(tenant, "network", "limit_error", json!({ "error": msg }));
                    }
                    self.bucket_error = Some(msg);
                }
            }
        }
    }

    /// Attaches each tenant's device program to the cgroups attributed to
    /// it, and detaches it from those that went.
    pub(crate) fn sync_device_cgroups(&mut self, cgroups: &Attributed) {
        let Some(h) = self.tree.as_ref().and_then(|t| t.layout.unified.as_ref()) else {
            return;
        };
        for (tenant, dev) in &mut self.devices {
            let want: BTreeSet<PathBuf> = cgroups
                .iter()
                .filter(|(_, t)| *t == tenant)
                .map(|(p, _)| h.dir(p))
                .collect();
            let gone: Vec<PathBuf> = dev
                .also()
                .filter(|p| !want.contains(*p))
                .map(Path::to_path_buf)
                .collect();
            for dir in gone {
                if let Err(e) = dev.detach_also(&dir) {
                    debug!(
                        tenant,
                        "detaching the device program from {}: {e}",
                        dir.display()
                    );
                }
            }
            for dir in want {
                if dir == dev.cgroup() || dev.also().any(|p| p == dir) {
                    continue;
                }
                match dev.attach_also(&dir) {
                    Ok(()) => debug!(tenant, "device program attached to {}", dir.display()),
                    // Removed since the walk, or refused: tried again next cycle.
                    Err(e) => debug!(
                        tenant,
                        "cannot attach the device program to {}: {e}",
                        dir.display()
                    ),
                }
            }
        }
    }

    /// Device opens denied so far, per tenant with a device program.
    pub(crate) fn device_denials(&self) -> Vec<(String, u64)> {
        self.devices
            .iter()
            .filter_map(|(t, d)| Some((t.clone(), d.denied().ok()?)))
            .collect()
    }

    /// Updates device allow-lists from the snapshot's UUID → index map.
    pub(crate) fn update_devices(
        &mut self,
        quotas: &BTreeMap<String, Quota>,
        snap: &Snapshot,
        rec: &Recorder,
    ) {
        if !snap.nvml.up {
            return;
        }
        for (tenant, dev) in &mut self.devices {
            let Some(gpus) = quotas.get(tenant).and_then(|q| q.gpus.as_ref()) else {
                continue;
            };
            let (want, unknown) =
                devices::allowed_devices(gpus, &snap.gpus, &self.caps, self.caps_major);
            match dev.set_allowed(&want) {
                Ok(false) => {}
                Ok(true) => rec.record(
                    tenant,
                    "gpus",
                    "devices_allowed",
                    json!({
                        "allowed": want.iter().map(|(a, b)| format!("{a}:{b}")).collect::<Vec<_>>(),
                        "unknown_uuids": unknown,
                    }),
                ),
                Err(e) => warn!(tenant, "cannot update the device allow-list: {e}"),
            }
        }
    }
}
