//! Local quota enforcement: tenant cgroups, device access, GPU memory and
//! time actions, and the hash-chained audit log.
//!
//! The sampling thread hands each fresh [`Snapshot`] to
//! [`Enforcer::observe`], which measures usage against `[tenant.quota.*]`
//! (`usage`), decides what a GPU breach calls for (`policy`, pure), does it
//! (`actions`), keeps the kernel-enforced limits in line (`limits`) and
//! audits and counts every decision (`record`). It returns the limits,
//! usage and action counts for `/metrics`, and never waits: the throttle
//! duty cycle and the SIGTERM→SIGKILL wait run on their own threads.

mod actions;
mod allocation;
mod attributed;
pub mod cgroup;
pub mod devices;
mod limits;
pub mod network;
mod policy;
pub mod quota;
mod record;
pub mod run;
mod usage;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use tracing::warn;

use self::{
    actions::{Actions, Case},
    cgroup::Layout,
    limits::Limits,
    policy::{Breaches, Observation, ProcessKey},
    quota::Quota,
    record::Recorder,
    usage::{Meter, row, tenant_processes},
};
pub use self::{
    actions::{THROTTLE_FROZEN, THROTTLE_PERIOD, Target, start_time},
    limits::under_kubernetes,
    policy::GpuResource,
};
use crate::snapshot::{
    EnforcementActionCount, GpuProcess, Snapshot, TenantDeviceDenials, TenantQuotaStatus,
};

/// Sampling cycles between two re-applications of cgroup limits.
const REAPPLY_EVERY: u64 = 10;

/// Compares usage with quotas and acts. Owned by the sampling thread.
#[derive(Debug)]
pub struct Enforcer {
    quotas: BTreeMap<String, Quota>,
    rec: Recorder,
    limits: Limits,
    meter: Meter,
    breaches: Breaches,
    actions: Actions,
    allocation: allocation::Guard,
    /// Cgroups the rules attribute to tenants with eBPF quotas, as of the
    /// last [`Enforcer::attribute_cgroups`].
    attributed: attributed::Attributed,
    /// When the last walk started and how long it took (see
    /// [`attributed::WALK_SHARE`]).
    walked: Option<(std::time::Instant, std::time::Duration)>,
    cycles: u64,
}

/// What the enforcer is given: the `[tenant]` quotas and where it keeps
/// its cgroups, audit log and network buckets.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub quotas: &'a BTreeMap<String, Quota>,
    /// `[tenant] cgroup_parent`: where `tally/<tenant>` cgroups are made.
    pub cgroup_parent: Option<&'a str>,
    /// `[agent] state_dir`: the audit log and the last applied quotas.
    pub state_dir: &'a Path,
    /// `[probes] pin_dir`: the network probe's pinned token buckets.
    pub pin_dir: &'a Path,
    pub node: &'a str,
    /// Kubernetes is on: GPU use outside allocation is audited, so without
    /// quotas the audit log opens at its first record.
    pub kubernetes: bool,
    /// `[tenant.kubernetes] enforce_allocation`.
    pub enforce_allocation: bool,
}

/// The outcome of one enforcement pass, published with the snapshot.
#[derive(Debug, Default)]
pub struct Enforcement {
    /// Limit and usage of every quota (`tally_tenant_quota_*`).
    pub quotas: Vec<TenantQuotaStatus>,
    /// Actions taken so far, counted (`tally_enforcement_actions_total`).
    pub actions: Vec<EnforcementActionCount>,
    /// Device opens denied so far (`tally_tenant_gpu_device_denied_total`).
    pub device_denials: Vec<TenantDeviceDenials>,
}

impl Enforcer {
    /// Sets up enforcement for `config`: opens the audit log, records quota
    /// changes since the last run, creates tenant cgroups with their limits
    /// and attaches device programs. Problems are logged and audited; the
    /// agent runs on without the parts that failed.
    pub fn new(settings: &Settings<'_>) -> Enforcer {
        let layout = if settings.quotas.is_empty() {
            None
        } else {
            match Layout::detect() {
                Ok(layout) => Some(layout),
                Err(e) => {
                    warn!("no tenant cgroups: {e}");
                    None
                }
            }
        };
        Self::with_layout(settings, layout)
    }

    /// [`Enforcer::new`] on a given cgroup layout; `None`: no cgroups at
    /// all (GPU actions other than throttle still work).
    pub fn with_layout(settings: &Settings<'_>, layout: Option<Layout>) -> Enforcer {
        let rec = Recorder::open(
            settings.state_dir,
            settings.node,
            settings.quotas.is_empty(),
            settings.kubernetes,
        );
        let quotas = settings.quotas.clone();
        record::audit_quota_changes(&rec, settings.state_dir, &quotas);
        let mut me = Enforcer {
            limits: Limits::new(layout, settings.cgroup_parent, settings.pin_dir),
            quotas,
            rec,
            meter: Meter::default(),
            breaches: Breaches::default(),
            actions: Actions::new(),
            allocation: allocation::Guard::new(settings.enforce_allocation),
            attributed: attributed::Attributed::new(),
            walked: None,
            cycles: 0,
        };
        me.limits.apply_cgroups(&me.quotas, &me.rec);
        me.limits.attach_devices(&me.quotas, &me.rec);
        me
    }

    /// Finds the cgroups the tenant rules (`tenant_of`, by cgroup v2 path)
    /// attribute to tenants with a `gpus` or network quota, for the next
    /// [`Enforcer::observe`] to attach to: pods, Slurm jobs and any
    /// rule-matched cgroup get their tenant's device and network quotas.
    /// On a host whose tree takes long to walk, walks are spaced so that
    /// they cost at most [`attributed::WALK_SHARE`] of the time.
    pub fn attribute_cgroups(&mut self, tenant_of: &dyn Fn(&str) -> Option<String>) {
        let now = std::time::Instant::now();
        if let Some((at, took)) = self.walked
            && now.duration_since(at) < took * attributed::WALK_SHARE
        {
            return;
        }
        self.attributed = self.limits.attributed(&self.quotas, tenant_of);
        self.walked = Some((now, now.elapsed()));
    }

    /// Enforces against one snapshot; returns the quota and action series
    /// to publish with it.
    pub fn observe(&mut self, snap: &Snapshot) -> Enforcement {
        self.cycles += 1;
        self.allocation
            .observe(&snap.unallocated_gpu_use, &snap.gpus, &self.rec);
        if self.quotas.is_empty() {
            return Enforcement {
                quotas: Vec::new(),
                actions: self.rec.counts(),
                device_denials: Vec::new(),
            };
        }
        if self.cycles.is_multiple_of(REAPPLY_EVERY) {
            self.limits.apply_cgroups(&self.quotas, &self.rec);
            self.limits.attach_devices(&self.quotas, &self.rec);
        }
        self.limits.update_devices(&self.quotas, snap, &self.rec);
        self.limits.sync_device_cgroups(&self.attributed);
        self.limits
            .sync_buckets(&self.quotas, &self.attributed, &self.rec);
        let now = snap.taken_at_ms;

        let live: BTreeSet<u32> = snap
            .gpus
            .iter()
            .flat_map(|g| g.processes.iter().map(|p| p.pid))
            .collect();
        self.actions.see(&live);

        let mut status = Vec::new();
        let quotas = std::mem::take(&mut self.quotas);
        for (tenant, quota) in &quotas {
            let procs = tenant_processes(snap, tenant);
            let gpu_memory: u64 = procs.iter().map(|p| p.memory_bytes).sum();
            let gpu_seconds = self.meter.gpu_seconds_last_hour(snap, tenant, now);
            if let Some(limit) = quota.gpu_memory {
                status.push(row(
                    tenant,
                    "gpu_memory",
                    limit as f64,
                    Some(gpu_memory as f64),
                ));
                let usage = (gpu_memory as f64, limit as f64);
                self.enforce_gpu(tenant, quota, GpuResource::Memory, usage, &procs, now);
            }
            if let Some(limit) = quota.gpu_seconds_per_hour {
                status.push(row(
                    tenant,
                    "gpu_seconds_per_hour",
                    limit,
                    Some(gpu_seconds),
                ));
                self.enforce_gpu(
                    tenant,
                    quota,
                    GpuResource::Time,
                    (gpu_seconds, limit),
                    &procs,
                    now,
                );
            }
            let cgroup_usage = self.limits.usage(tenant);
            self.meter
                .cgroup_status(snap, tenant, quota, &cgroup_usage, &mut status);
        }
        self.quotas = quotas;
        Enforcement {
            quotas: status,
            actions: self.rec.counts(),
            device_denials: self
                .limits
                .device_denials()
                .into_iter()
                .map(|(tenant, total)| TenantDeviceDenials { tenant, total })
                .collect(),
        }
    }

    /// One GPU quota, `(usage, limit)`: decide, then carry it out.
    fn enforce_gpu(
        &mut self,
        tenant: &str,
        quota: &Quota,
        resource: GpuResource,
        (usage, limit): (f64, f64),
        procs: &[GpuProcess],
        now: u64,
    ) {
        let action = match resource {
            GpuResource::Memory => quota.gpu_memory_action,
            GpuResource::Time => quota.gpu_time_action,
        };
        let targets = self.actions.targets(procs);
        let processes: Vec<ProcessKey> = targets.iter().map(|t| (t.pid, t.start)).collect();
        let decision = self.breaches.decide(
            tenant,
            resource,
            &Observation {
                usage,
                limit,
                action,
                grace: quota.grace,
                now_ms: now,
                throttling: self.actions.throttling(tenant, resource),
                processes: &processes,
            },
        );
        let case = Case {
            tenant,
            resource,
            usage,
            limit,
            quota,
            targets: &targets,
        };
        self.actions
            .carry_out(&self.rec, self.limits.layout(), &case, decision);
    }

    /// The audit log's path, when it is open.
    pub fn audit_path(&self) -> Option<PathBuf> {
        self.rec.audit_path()
    }
}

#[cfg(test)]
mod tests {
    use tally_contract::audit;

    use super::{usage::tests::proc, *};
    use crate::{config::Config, snapshot::GpuSnapshot};

    fn enforcer(dir: &Path, quotas: &str) -> Enforcer {
        let text = format!("[agent]\nstate_dir = '{}'\n{quotas}", dir.display());
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        // Unit tests never touch real cgroups.
        Enforcer::with_layout(&config.enforce_settings("n1"), None)
    }

    #[test]
    fn alert_waits_for_grace_and_fires_once() {
        let d = tempfile::tempdir().unwrap();
        let mut e = enforcer(
            d.path(),
            "[tenant.quota.a]\ngpu_memory = '10MiB'\ngrace = '2s'\n",
        );
        let me = std::process::id();
        let mut snap = |at: u64, mib: u64| {
            let mut s = Snapshot {
                taken_at_ms: at,
                gpus: vec![GpuSnapshot {
                    processes: vec![proc(me, "a", mib)],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let out = e.observe(&s);
            s.tenant_quotas = out.quotas;
            s.enforcement_actions = out.actions;
            s
        };
        snap(1_000, 50);
        let s = snap(2_500, 50);
        assert!(s.enforcement_actions.is_empty(), "within grace");
        let s = snap(3_000, 50);
        assert_eq!(s.enforcement_actions[0].action, "alert");
        assert_eq!(s.enforcement_actions[0].total, 1);
        let s = snap(9_000, 50);
        assert_eq!(s.enforcement_actions[0].total, 1, "once per breach");
        let s = snap(10_000, 5);
        let q = &s.tenant_quotas[0];
        assert_eq!(
            (q.resource.as_str(), q.usage),
            ("gpu_memory", Some((5 << 20) as f64))
        );
        let log = std::fs::read_to_string(d.path().join("audit.log")).unwrap();
        let actions: Vec<String> = log
            .lines()
            .map(|l| serde_json::from_str::<audit::Record>(l).unwrap().action)
            .collect();
        assert_eq!(actions, ["quota_set", "alert", "resolved"]);
        assert_eq!(audit::verify(&d.path().join("audit.log")).unwrap(), Ok(3));
    }

    #[test]
    fn quota_changes_are_audited_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        drop(enforcer(
            d.path(),
            "[tenant.quota.a]\npids = 5\n[tenant.quota.b]\npids = 1\n",
        ));
        drop(enforcer(d.path(), "[tenant.quota.a]\npids = 6\n"));
        drop(enforcer(d.path(), "[tenant.quota.a]\npids = 6\n"));
        let log = std::fs::read_to_string(d.path().join("audit.log")).unwrap();
        let actions: Vec<(String, String)> = log
            .lines()
            .map(|l| {
                let r: audit::Record = serde_json::from_str(l).unwrap();
                (r.tenant, r.action)
            })
            .collect();
        assert_eq!(
            actions,
            [
                ("a".into(), "quota_set".into()),
                ("b".into(), "quota_set".into()),
                ("a".into(), "quota_change".into()),
                ("b".into(), "quota_removed".into()),
            ]
        );
    }
}
