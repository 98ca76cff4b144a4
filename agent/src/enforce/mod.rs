//! Local quota enforcement: tenant cgroups, device access, GPU memory and
//! time actions, and the hash-chained audit log.
//!
//! The sampling thread hands each fresh [`Snapshot`] to
//! [`Enforcer::observe`], which compares usage with `[tenant.quota.*]`,
//! acts after `grace`, records every decision in the audit log, and writes
//! limits, usage and action counts back into the snapshot for `/metrics`.
//! Nothing in `observe` waits: the throttle duty cycle and the
//! SIGTERM→SIGKILL wait run on their own threads.

pub mod cgroup;
pub mod devices;
pub mod network;
pub mod quota;
pub mod run;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::json;
use tracing::{info, warn};

use tally_contract::audit::AuditLog;

use self::{
    cgroup::{Freezer, Layout, TenantTree},
    devices::{CapsSource, TenantDevices},
    quota::{Action, Quota},
};
use crate::{
    cgroupfs::Cgroups,
    paths,
    snapshot::{EnforcementActionCount, GpuProcess, Snapshot, TenantQuotaStatus},
};

/// Period of the throttle duty cycle.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(1000);
/// Part of each period a throttled cgroup spends frozen.
pub const THROTTLE_FROZEN: Duration = Duration::from_millis(750);
/// Sampling cycles between two re-applications of cgroup limits.
const REAPPLY_EVERY: u64 = 10;
/// The GPU time budget's window.
const HOUR_MS: u64 = 3_600_000;

/// GPU quotas that no cgroup controller covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuResource {
    Memory,
    Time,
}

impl GpuResource {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuResource::Memory => "gpu_memory",
            GpuResource::Time => "gpu_seconds_per_hour",
        }
    }
}

/// Whether this node runs under Kubernetes, where the kubelet owns cpu,
/// memory and pids limits and Tally leaves them alone.
pub fn under_kubernetes() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Action counters, shared with the action threads.
type Counts = Arc<Mutex<BTreeMap<(String, String, String), u64>>>;
/// The audit log, shared with the action threads; `None` if it cannot open.
type SharedAudit = Arc<Mutex<Option<AuditLog>>>;

#[derive(Debug, Clone)]
struct Recorder {
    audit: SharedAudit,
    counts: Counts,
}

impl Recorder {
    /// Appends an audit record (a failure is logged, never fatal).
    fn record(&self, tenant: &str, resource: &str, action: &str, detail: serde_json::Value) {
        info!(tenant, resource, action, %detail, "enforcement");
        let mut guard = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = guard.as_mut()
            && let Err(e) = log.append(tenant, resource, action, detail)
        {
            warn!("cannot write the audit log: {e}");
        }
    }

    /// Counts an action in `tally_enforcement_actions_total` and audits it.
    fn act(&self, tenant: &str, resource: &str, action: &str, detail: serde_json::Value) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant.to_owned(), resource.to_owned(), action.to_owned()))
            .or_default() += 1;
        self.record(tenant, resource, action, detail);
    }
}

/// A breach in progress.
#[derive(Debug)]
struct Breach {
    since_ms: u64,
    acted: bool,
    /// Processes already sent SIGTERM: `(pid, start time)`.
    terminated: BTreeSet<(u32, u64)>,
    /// Processes already audited as skipped, to audit each once.
    skipped: BTreeSet<(u32, u64)>,
}

/// A running freezer duty cycle.
#[derive(Debug)]
struct Throttle {
    stop: Arc<AtomicBool>,
    targets: Arc<Mutex<BTreeSet<Freezer>>>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(targets: BTreeSet<Freezer>) -> Throttle {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let thread = {
            let (stop, targets) = (stop.clone(), targets.clone());
            std::thread::Builder::new()
                .name("tally-throttle".into())
                .spawn(move || duty_cycle(&stop, &targets))
                .ok()
        };
        Throttle {
            stop,
            targets,
            thread,
        }
    }

    fn set_targets(&self, new: BTreeSet<Freezer>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        // Thaw cgroups that are no longer targets before forgetting them.
        for gone in t.difference(&new) {
            let _ = gone.set(false);
        }
        *t = new;
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Freezes the targets for [`THROTTLE_FROZEN`] of every [`THROTTLE_PERIOD`]
/// until `stop`, then thaws them. A target whose cgroup vanished only fails
/// its writes.
fn duty_cycle(stop: &AtomicBool, targets: &Mutex<BTreeSet<Freezer>>) {
    let set_all = |frozen: bool| {
        for f in targets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = f.set(frozen);
        }
    };
    let sleep = |d: Duration| {
        let end = Instant::now() + d;
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        set_all(true);
        sleep(THROTTLE_FROZEN);
        set_all(false);
        sleep(THROTTLE_PERIOD.saturating_sub(THROTTLE_FROZEN));
    }
    set_all(false);
}

/// A process as the enforcer knows it: pid, start time (clock ticks since
/// boot, from `/proc/<pid>/stat`) and the cgroup the snapshot saw it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    pub start: u64,
    pub cgroup: Option<String>,
}

/// Start time of a live, non-zombie process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    (stat.state != 'Z' && stat.state != 'X').then_some(stat.starttime)
}

impl Target {
    /// Checks, right before acting, that `pid` is still this process: same
    /// start time and same cgroup v2 path. `Err` says why not.
    pub fn verify(&self) -> Result<(), String> {
        match start_time(self.pid) {
            None => return Err("process exited".into()),
            Some(s) if s != self.start => {
                return Err(format!(
                    "pid {} was reused (start time {s}, expected {})",
                    self.pid, self.start
                ));
            }
            Some(_) => {}
        }
        if let Some(expected) = &self.cgroup {
            match crate::cgroupfs::cgroup_of(self.pid) {
                Ok(now) if &now == expected => {}
                Ok(now) => return Err(format!("process moved from {expected} to {now}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Sends `signal` after [`Target::verify`].
    pub fn signal(&self, signal: Signal) -> Result<(), String> {
        self.verify()?;
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal).map_err(|e| e.to_string())
    }
}

/// Compares usage with quotas and acts. Owned by the sampling thread.
#[derive(Debug)]
pub struct Enforcer {
    quotas: BTreeMap<String, Quota>,
    tree: Option<TenantTree>,
    manage_limits: bool,
    own_cgroup: Cgroups,
    rec: Recorder,
    breaches: HashMap<(String, GpuResource), Breach>,
    throttles: HashMap<(String, GpuResource), Throttle>,
    /// Per tenant: `(taken_at_ms, allocated GPU seconds total)`.
    gpu_time: HashMap<String, VecDeque<(u64, f64)>>,
    /// Start times of processes, as first seen after a snapshot.
    starts: HashMap<u32, u64>,
    devices: BTreeMap<String, TenantDevices>,
    caps: CapsSource,
    caps_major: Option<u32>,
    /// Last outcome of each limit write, to audit changes only.
    limits: BTreeMap<(String, &'static str), String>,
    /// Per tenant: `(taken_at_ms, ingress bytes, egress bytes)` and rates.
    net: HashMap<String, (u64, u64, u64)>,
    net_rate: HashMap<String, (f64, f64)>,
    /// Per tenant: `(taken_at_ms, cumulative CPU seconds)`.
    cpu: HashMap<String, (u64, f64)>,
    /// Token buckets of network rate quotas (pinned by the network probe).
    buckets: network::Buckets,
    /// Last reason the buckets could not be written, audited once.
    bucket_error: Option<String>,
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
}

/// The outcome of one enforcement pass, published with the snapshot.
#[derive(Debug, Default)]
pub struct Enforcement {
    /// Limit and usage of every quota (`tally_tenant_quota_*`).
    pub quotas: Vec<TenantQuotaStatus>,
    /// Actions taken so far, counted (`tally_enforcement_actions_total`).
    pub actions: Vec<EnforcementActionCount>,
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
        let state_dir = settings.state_dir;
        let audit = if settings.quotas.is_empty() && !paths::audit_log(state_dir).exists() {
            None
        } else {
            match AuditLog::open(&paths::audit_log(state_dir), settings.node) {
                Ok(log) => Some(log),
                Err(e) => {
                    warn!("enforcement actions will not be audited: {e}");
                    None
                }
            }
        };
        let rec = Recorder {
            audit: Arc::new(Mutex::new(audit)),
            counts: Arc::default(),
        };
        let quotas = settings.quotas.clone();
        audit_quota_changes(&rec, state_dir, &quotas);

        let tree = layout.map(|l| TenantTree::new(l, settings.cgroup_parent.map(str::to_owned)));
        let caps = CapsSource::default();
        let caps_major = caps.caps_major();
        let mut me = Enforcer {
            quotas,
            tree,
            manage_limits: !under_kubernetes(),
            own_cgroup: Cgroups::own().unwrap_or_default(),
            rec,
            breaches: HashMap::new(),
            throttles: HashMap::new(),
            gpu_time: HashMap::new(),
            starts: HashMap::new(),
            devices: BTreeMap::new(),
            caps,
            caps_major,
            limits: BTreeMap::new(),
            net: HashMap::new(),
            net_rate: HashMap::new(),
            cpu: HashMap::new(),
            buckets: network::Buckets::new(settings.pin_dir),
            bucket_error: None,
            cycles: 0,
        };
        me.apply_cgroups();
        me.attach_devices();
        me
    }

    /// Creates `tally/<tenant>` and writes cpu / memory / pids limits
    /// (not under Kubernetes); audits every change of outcome.
    fn apply_cgroups(&mut self) {
        let Some(tree) = &self.tree else { return };
        for (tenant, quota) in &self.quotas {
            if let Err(e) = tree.ensure_tenant(tenant) {
                let key = (tenant.clone(), "cgroup");
                let msg = e.to_string();
                if self.limits.get(&key) != Some(&msg) {
                    self.rec
                        .record(tenant, "cgroup", "limit_error", json!({ "error": msg }));
                    self.limits.insert(key, msg);
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
                if self.limits.get(&key) == Some(&outcome) {
                    continue;
                }
                let limit = match resource {
                    "cpu_cores" => json!(quota.cpu_cores),
                    "memory" => json!(quota.memory),
                    _ => json!(quota.pids),
                };
                match result {
                    Ok(()) => self.rec.record(
                        tenant,
                        resource,
                        "limit_applied",
                        json!({ "limit": limit }),
                    ),
                    Err(e) => self.rec.record(
                        tenant,
                        resource,
                        "limit_error",
                        json!({ "limit": limit, "error": e.to_string() }),
                    ),
                }
                self.limits.insert(key, outcome);
            }
        }
    }

    /// Attaches a device program to each tenant with a `gpus` list, with
    /// nothing allowed until a snapshot names the devices.
    fn attach_devices(&mut self) {
        let Some(tree) = &self.tree else { return };
        for (tenant, quota) in &self.quotas {
            if quota.gpus.is_none() || self.devices.contains_key(tenant) {
                continue;
            }
            let Some(dir) = tree.tenant_v2_dir(tenant) else {
                self.rec.record(
                    tenant,
                    "gpus",
                    "limit_error",
                    json!({ "error": "no cgroup v2 hierarchy to attach the device program to" }),
                );
                continue;
            };
            match TenantDevices::attach(&dir, self.caps_major) {
                Ok(d) => {
                    self.rec.record(
                        tenant,
                        "gpus",
                        "devices_attached",
                        json!({ "cgroup": dir.display().to_string(), "allowed": [] }),
                    );
                    self.devices.insert(tenant.clone(), d);
                }
                Err(e) => self.rec.record(
                    tenant,
                    "gpus",
                    "limit_error",
                    json!({ "cgroup": dir.display().to_string(), "error": e.to_string() }),
                ),
            }
        }
    }

    /// Writes the token buckets of network rate quotas into the network
    /// probe's pinned maps (once they exist); audits every change.
    fn sync_buckets(&mut self) {
        let Some(tree) = &self.tree else { return };
        if !self
            .quotas
            .values()
            .any(|q| q.network_egress.is_some() || q.network_ingress.is_some())
        {
            return;
        }
        let (want, level) = network::wanted(tree, &self.quotas);
        match self.buckets.sync(&want, level) {
            Ok(changes) => {
                self.bucket_error = None;
                for (tenant, dir, rate) in changes {
                    match rate {
                        Some(rate) => self.rec.record(
                            &tenant,
                            dir.resource(),
                            "limit_applied",
                            json!({
                                "rate_bytes_per_second": rate,
                                "burst_bytes": network::burst_for(rate),
                            }),
                        ),
                        None => {
                            self.rec
                                .record(&tenant, dir.resource(), "limit_removed", json!({}))
                        }
                    }
                }
            }
            Err(e) => {
                let msg = format!("token buckets not written (is the network probe loaded?): {e}");
                if self.bucket_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    for (tenant, _) in self
                        .quotas
                        .iter()
                        .filter(|(_, q)| q.network_egress.is_some() || q.network_ingress.is_some())
                    {
                        self.rec
                            .record(tenant, "network", "limit_error", json!({ "error": msg }));
                    }
                    self.bucket_error = Some(msg);
                }
            }
        }
    }

    /// Updates device allow-lists from the snapshot's UUID → index map.
    fn update_devices(&mut self, snap: &Snapshot) {
        if !snap.nvml.up {
            return;
        }
        for (tenant, dev) in &mut self.devices {
            let Some(gpus) = self.quotas.get(tenant).and_then(|q| q.gpus.as_ref()) else {
                continue;
            };
            let (want, unknown) =
                devices::allowed_devices(gpus, &snap.gpus, &self.caps, self.caps_major);
            match dev.set_allowed(&want) {
                Ok(false) => {}
                Ok(true) => self.rec.record(
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

    /// Enforces against one snapshot; returns the quota and action series
    /// to publish with it.
    pub fn observe(&mut self, snap: &Snapshot) -> Enforcement {
        self.cycles += 1;
        if self.quotas.is_empty() {
            return Enforcement::default();
        }
        if self.cycles.is_multiple_of(REAPPLY_EVERY) {
            self.apply_cgroups();
            self.attach_devices();
        }
        self.update_devices(snap);
        self.sync_buckets();
        let now = snap.taken_at_ms;

        // Start times of every process seen, read right after the sample.
        let live: BTreeSet<u32> = snap
            .gpus
            .iter()
            .flat_map(|g| g.processes.iter().map(|p| p.pid))
            .collect();
        self.starts.retain(|pid, _| live.contains(pid));
        for pid in &live {
            if !self.starts.contains_key(pid)
                && let Some(s) = start_time(*pid)
            {
                self.starts.insert(*pid, s);
            }
        }

        let mut status = Vec::new();
        let tenants: Vec<(String, Quota)> = self
            .quotas
            .iter()
            .map(|(t, q)| (t.clone(), q.clone()))
            .collect();
        for (tenant, quota) in &tenants {
            let procs = tenant_processes(snap, tenant);
            let gpu_memory: u64 = procs.iter().map(|p| p.memory_bytes).sum();
            let gpu_seconds = self.gpu_seconds_last_hour(snap, tenant, now);
            if let Some(limit) = quota.gpu_memory {
                status.push(row(
                    tenant,
                    "gpu_memory",
                    limit as f64,
                    Some(gpu_memory as f64),
                ));
                self.evaluate(
                    tenant,
                    GpuResource::Memory,
                    gpu_memory as f64,
                    limit as f64,
                    quota.gpu_memory_action,
                    quota,
                    &procs,
                    now,
                );
            }
            if let Some(limit) = quota.gpu_seconds_per_hour {
                status.push(row(
                    tenant,
                    "gpu_seconds_per_hour",
                    limit,
                    Some(gpu_seconds),
                ));
                self.evaluate(
                    tenant,
                    GpuResource::Time,
                    gpu_seconds,
                    limit,
                    quota.gpu_time_action,
                    quota,
                    &procs,
                    now,
                );
            }
            self.cgroup_status(snap, tenant, quota, &procs, &mut status);
        }
        let actions = self
            .rec
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((tenant, resource, action), n)| EnforcementActionCount {
                tenant: tenant.clone(),
                resource: resource.clone(),
                action: action.clone(),
                total: *n,
            })
            .collect();
        Enforcement {
            quotas: status,
            actions,
        }
    }

    /// Limits and usage of the cgroup-enforced and network quotas.
    fn cgroup_status(
        &mut self,
        snap: &Snapshot,
        tenant: &str,
        quota: &Quota,
        procs: &[GpuProcess],
        status: &mut Vec<TenantQuotaStatus>,
    ) {
        let usage = self
            .tree
            .as_ref()
            .map(|t| t.usage(tenant))
            .unwrap_or_default();
        if let Some(c) = quota.cpu_cores {
            let cores = usage.get("cpu_seconds").and_then(|&secs| {
                let now = snap.taken_at_ms;
                let prev = self.cpu.insert(tenant.to_owned(), (now, secs))?;
                (now > prev.0).then(|| (secs - prev.1).max(0.0) / ((now - prev.0) as f64 / 1e3))
            });
            status.push(row(tenant, "cpu_cores", c, cores));
        }
        if let Some(m) = quota.memory {
            status.push(row(
                tenant,
                "memory",
                m as f64,
                usage.get("memory").copied(),
            ));
        }
        if let Some(p) = quota.pids {
            status.push(row(tenant, "pids", p as f64, usage.get("pids").copied()));
        }
        if let Some(g) = &quota.gpus {
            let held: BTreeSet<&str> = snap
                .gpus
                .iter()
                .filter(|g| g.processes.iter().any(|p| p.tenant == tenant))
                .map(|g| g.uuid.as_str())
                .collect();
            let _ = procs;
            status.push(row(tenant, "gpus", g.len() as f64, Some(held.len() as f64)));
        }
        if quota.network_egress.is_some() || quota.network_ingress.is_some() {
            if let Some(io) = snap.tenant_io.iter().find(|r| r.tenant == tenant) {
                let cur = (
                    snap.taken_at_ms,
                    io.network_ingress_bytes_total,
                    io.network_egress_bytes_total,
                );
                if let Some(prev) = self.net.insert(tenant.to_owned(), cur)
                    && cur.0 > prev.0
                {
                    let secs = (cur.0 - prev.0) as f64 / 1000.0;
                    self.net_rate.insert(
                        tenant.to_owned(),
                        (
                            cur.1.saturating_sub(prev.1) as f64 / secs,
                            cur.2.saturating_sub(prev.2) as f64 / secs,
                        ),
                    );
                }
            }
            let rate = self.net_rate.get(tenant).copied();
            if let Some(l) = quota.network_ingress {
                status.push(row(tenant, "network_ingress", l as f64, rate.map(|r| r.0)));
            }
            if let Some(l) = quota.network_egress {
                status.push(row(tenant, "network_egress", l as f64, rate.map(|r| r.1)));
            }
        }
    }

    /// Allocated GPU seconds of `tenant` in the last hour (since start when
    /// the agent has run for less).
    fn gpu_seconds_last_hour(&mut self, snap: &Snapshot, tenant: &str, now: u64) -> f64 {
        let total: f64 = snap
            .tenant_gpu
            .iter()
            .filter(|r| r.tenant == tenant)
            .map(|r| r.allocated_seconds_total)
            .sum();
        let q = self.gpu_time.entry(tenant.to_owned()).or_default();
        q.push_back((now, total));
        while q.len() > 1 && q[1].0 + HOUR_MS <= now {
            q.pop_front();
        }
        (total - q.front().map_or(total, |f| f.1)).max(0.0)
    }

    /// One quota against one usage: start, continue or end a breach.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        tenant: &str,
        resource: GpuResource,
        usage: f64,
        limit: f64,
        action: Action,
        quota: &Quota,
        procs: &[GpuProcess],
        now: u64,
    ) {
        let key = (tenant.to_owned(), resource);
        let res = resource.as_str();
        if usage <= limit {
            if let Some(b) = self.breaches.remove(&key) {
                if let Some(t) = self.throttles.remove(&key) {
                    t.stop();
                    self.rec.record(
                        tenant,
                        res,
                        "throttle_end",
                        json!({ "usage": usage, "limit": limit }),
                    );
                } else if b.acted {
                    self.rec.record(
                        tenant,
                        res,
                        "resolved",
                        json!({ "usage": usage, "limit": limit }),
                    );
                }
            }
            return;
        }
        let breach = self.breaches.entry(key.clone()).or_insert(Breach {
            since_ms: now,
            acted: false,
            terminated: BTreeSet::new(),
            skipped: BTreeSet::new(),
        });
        let lasted = Duration::from_millis(now.saturating_sub(breach.since_ms));
        if lasted < quota.grace {
            return;
        }
        let targets: Vec<Target> = procs
            .iter()
            .filter_map(|p| {
                Some(Target {
                    pid: p.pid,
                    start: *self.starts.get(&p.pid)?,
                    cgroup: p.cgroup.clone(),
                })
            })
            .collect();
        let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
        let detail = json!({
            "usage": usage,
            "limit": limit,
            "grace_s": quota.grace.as_secs_f64(),
            "breach_s": lasted.as_secs_f64(),
            "pids": pids,
        });
        match action {
            Action::Alert => {
                if !breach.acted {
                    breach.acted = true;
                    self.rec.act(tenant, res, "alert", detail);
                }
            }
            Action::Throttle => {
                let mut freezers = BTreeSet::new();
                let layout = self.tree.as_ref().map(|t| &t.layout);
                for t in &targets {
                    if t.verify().is_err() {
                        continue;
                    }
                    let Ok(groups) = Cgroups::of(t.pid) else {
                        continue;
                    };
                    if let Some(f) = layout.and_then(|l| l.freezer_for(&groups, &self.own_cgroup)) {
                        freezers.insert(f);
                    }
                }
                if let Some(t) = self.throttles.get(&key) {
                    t.set_targets(freezers);
                } else if !breach.acted {
                    breach.acted = true;
                    let cgroups: Vec<String> = freezers
                        .iter()
                        .map(|f| f.dir().display().to_string())
                        .collect();
                    let mut detail = detail;
                    detail["cgroups"] = json!(cgroups);
                    if freezers.is_empty() {
                        detail["error"] = json!("no freezable cgroup: alert only");
                        self.rec.act(tenant, res, "alert", detail);
                    } else {
                        self.rec.act(tenant, res, "throttle", detail);
                        self.throttles.insert(key, Throttle::start(freezers));
                    }
                }
            }
            Action::Terminate => {
                breach.acted = true;
                for t in targets {
                    let id = (t.pid, t.start);
                    if breach.terminated.contains(&id) || breach.skipped.contains(&id) {
                        continue;
                    }
                    match t.signal(Signal::SIGTERM) {
                        Ok(()) => {
                            breach.terminated.insert(id);
                            self.rec.act(
                                tenant,
                                res,
                                "terminate",
                                json!({
                                    "usage": usage, "limit": limit, "pid": t.pid,
                                    "signal": "SIGTERM", "cgroup": t.cgroup,
                                }),
                            );
                            spawn_killer(self.rec.clone(), tenant, res, t, quota.kill_timeout);
                        }
                        Err(reason) => {
                            breach.skipped.insert(id);
                            self.rec.record(
                                tenant,
                                res,
                                "skip",
                                json!({ "pid": t.pid, "reason": reason }),
                            );
                        }
                    }
                }
            }
        }
    }

    /// The audit log's path, when it is open.
    pub fn audit_path(&self) -> Option<PathBuf> {
        let guard = self.rec.audit.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|l| l.path().to_path_buf())
    }
}

/// After `timeout`, SIGKILLs the target if it is still the same process.
fn spawn_killer(rec: Recorder, tenant: &str, resource: &str, t: Target, timeout: Duration) {
    let (tenant, resource) = (tenant.to_owned(), resource.to_owned());
    let _ = std::thread::Builder::new()
        .name("tally-terminate".into())
        .spawn(move || {
            let end = Instant::now() + timeout;
            while Instant::now() < end {
                if t.verify().is_err() {
                    return; // exited (or its pid is someone else's now)
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match t.signal(Signal::SIGKILL) {
                Ok(()) => rec.act(
                    &tenant,
                    &resource,
                    "kill",
                    json!({ "pid": t.pid, "signal": "SIGKILL", "after_s": timeout.as_secs_f64() }),
                ),
                Err(reason) => rec.record(
                    &tenant,
                    &resource,
                    "skip",
                    json!({ "pid": t.pid, "signal": "SIGKILL", "reason": reason }),
                ),
            }
        });
}

/// The tenant's GPU processes in a snapshot, one per pid (memory summed
/// over devices).
fn tenant_processes(snap: &Snapshot, tenant: &str) -> Vec<GpuProcess> {
    let mut by_pid: BTreeMap<u32, GpuProcess> = BTreeMap::new();
    for p in snap.gpus.iter().flat_map(|g| &g.processes) {
        if p.tenant != tenant {
            continue;
        }
        by_pid
            .entry(p.pid)
            .and_modify(|e| e.memory_bytes += p.memory_bytes)
            .or_insert_with(|| p.clone());
    }
    by_pid.into_values().collect()
}

fn row(tenant: &str, resource: &str, limit: f64, usage: Option<f64>) -> TenantQuotaStatus {
    TenantQuotaStatus {
        tenant: tenant.to_owned(),
        resource: resource.to_owned(),
        limit,
        usage,
    }
}

/// Audits quotas that appeared, changed or went away since the quotas last
/// applied (`<state_dir>/quotas.json`), then remembers the current ones.
fn audit_quota_changes(rec: &Recorder, state_dir: &Path, quotas: &BTreeMap<String, Quota>) {
    let file = paths::applied_quotas(state_dir);
    let old: BTreeMap<String, Quota> = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for (tenant, q) in quotas {
        match old.get(tenant) {
            None => rec.record(tenant, "quota", "quota_set", json!({ "quota": q })),
            Some(o) if o != q => rec.record(
                tenant,
                "quota",
                "quota_change",
                json!({ "old": o, "new": q }),
            ),
            Some(_) => {}
        }
    }
    for (tenant, o) in &old {
        if !quotas.contains_key(tenant) {
            rec.record(tenant, "quota", "quota_removed", json!({ "old": o }));
        }
    }
    if quotas.is_empty() && old.is_empty() {
        return;
    }
    let _ = std::fs::create_dir_all(state_dir);
    if let Err(e) = std::fs::write(&file, serde_json::to_vec_pretty(quotas).unwrap_or_default()) {
        warn!(
            "cannot remember the applied quotas in {}: {e}",
            file.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use tally_contract::audit;

    use super::*;
    use crate::config::Config;
    use crate::snapshot::{GpuSnapshot, TenantGpuUsage};

    fn proc(pid: u32, tenant: &str, mib: u64) -> GpuProcess {
        GpuProcess {
            pid,
            tenant: tenant.into(),
            cgroup: None,
            memory_bytes: mib << 20,
            sm_ratio: None,
            workload: None,
        }
    }

    #[test]
    fn tenant_processes_sum_memory_per_pid() {
        let snap = Snapshot {
            gpus: vec![
                GpuSnapshot {
                    processes: vec![proc(1, "a", 10), proc(2, "b", 5)],
                    ..Default::default()
                },
                GpuSnapshot {
                    processes: vec![proc(1, "a", 20)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let p = tenant_processes(&snap, "a");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].memory_bytes, 30 << 20);
    }

    fn enforcer(dir: &Path, quotas: &str) -> Enforcer {
        let text = format!("[agent]\nstate_dir = '{}'\n{quotas}", dir.display());
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        // Unit tests never touch real cgroups.
        Enforcer::with_layout(&config.enforce_settings("n1"), None)
    }

    #[test]
    fn gpu_time_counts_the_last_hour_only() {
        let d = tempfile::tempdir().unwrap();
        let mut e = enforcer(d.path(), "[tenant.quota.a]\ngpu_seconds_per_hour = 10\n");
        let snap = |total: f64| Snapshot {
            tenant_gpu: vec![TenantGpuUsage {
                tenant: "a".into(),
                allocated_seconds_total: total,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(e.gpu_seconds_last_hour(&snap(100.0), "a", 1_000), 0.0);
        assert_eq!(e.gpu_seconds_last_hour(&snap(130.0), "a", 1_800_000), 30.0);
        // An hour after the first sample, the first one leaves the window.
        assert_eq!(
            e.gpu_seconds_last_hour(&snap(140.0), "a", HOUR_MS + 1_000),
            40.0
        );
        assert_eq!(
            e.gpu_seconds_last_hour(&snap(150.0), "a", HOUR_MS + 1_800_000),
            20.0
        );
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

    #[test]
    fn a_target_whose_start_time_differs_is_refused() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        let ok = Target {
            pid: me,
            start,
            cgroup: crate::cgroupfs::cgroup_of(me).ok(),
        };
        assert_eq!(ok.verify(), Ok(()));
        let reused = Target {
            start: start + 1,
            ..ok.clone()
        };
        assert!(reused.verify().unwrap_err().contains("reused"));
        let moved = Target {
            cgroup: Some("/elsewhere".into()),
            ..ok
        };
        assert!(moved.verify().unwrap_err().contains("moved"));
        let gone = Target {
            pid: u32::MAX - 1,
            start: 1,
            cgroup: None,
        };
        assert_eq!(gone.verify(), Err("process exited".into()));
        // A refused target is never signalled.
        assert!(reused.signal(Signal::SIGTERM).is_err());
    }
}
