//! Attribution of processes and cgroups to tenants.
//!
//! pid → cgroup v2 path (the `0::` line of `/proc/PID/cgroup`) → tenant, by
//! the first `[[tenant.rule]]` that matches; no match gives
//! [`TENANT_UNATTRIBUTED`]. The eBPF probes map cgroup ids to paths and use
//! the same [`Resolver::tenant_for_cgroup`], so GPU, network and PCIe usage
//! of one workload land on one tenant. What a process was attributed from
//! is cached across cycles ([`procs`]).

use std::{collections::HashMap, io, sync::Arc};

pub mod procs;
pub mod rules;
pub mod slurm;

use self::{procs::ProcCache, rules::TenantRule};
use crate::{paths, snapshot::TENANT_UNATTRIBUTED, states::ProcObs};

/// The uid that owns a process (the owner of its `/proc` directory).
pub fn uid_of(pid: u32) -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(paths::proc_dir(pid))?.uid())
}

/// User name of a uid from `/etc/passwd`; the number as text when unknown.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// A process's tenant and the facts it was derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub tenant: Arc<str>,
    pub cgroup: Option<Arc<str>>,
    /// Kubernetes namespace/pod/container, when workload series are on.
    pub workload: Option<Box<crate::snapshot::Workload>>,
    /// The workload the tenant's usage is charged to, by the rule that
    /// named the tenant: a `cgroup` rule's `workload` capture, a Slurm
    /// job id, a pod as `<namespace>/<pod>`. `None`: the tenant's usage
    /// outside any named workload.
    pub workload_id: Option<Arc<str>>,
}

impl Attribution {
    /// This attribution without its workload: the names shared, the
    /// workload (three `String`s when set) neither copied nor kept.
    pub fn without_workload(&self) -> Self {
        Self {
            tenant: self.tenant.clone(),
            cgroup: self.cgroup.clone(),
            workload: None,
            workload_id: self.workload_id.clone(),
        }
    }
}

/// Whether the config asks for Kubernetes: a `kubernetes` tenant rule,
/// workload series, or allocation enforcement.
pub fn kubernetes_wanted(
    config: &crate::kubernetes::KubernetesConfig,
    rules: &[TenantRule],
) -> bool {
    config.workload_series
        || config.enforce_allocation
        || rules
            .iter()
            .any(|r| matches!(r, TenantRule::Kubernetes { .. }))
}

/// Applies the tenant rules; caches user names (a passwd lookup per
/// process per sample would dominate the sampling cycle).
#[derive(Debug)]
pub struct Resolver {
    rules: Vec<TenantRule>,
    /// Per rule, the job records a `slurm` rule read lately (unused by
    /// other rules).
    slurm_jobs: Vec<slurm::Jobs>,
    users: HashMap<u32, Arc<str>>,
    procs: ProcCache,
    /// The cgroup of processes whose `/proc` entry is gone (eBPF probes).
    exited: Option<Box<dyn ExitedCgroups>>,
    /// Which pod a cgroup is (`kubernetes` rules, workload series).
    kubernetes: Option<crate::kubernetes::Lookup>,
}

/// Where the cgroup of a process that already exited can be found: the
/// eBPF process-lifecycle probes (`crate::probes::ExitedProcs`).
pub trait ExitedCgroups: Send + std::fmt::Debug {
    /// The cgroup v2 path `pid` was in when it exited, if recorded.
    fn cgroup_of_exited(&mut self, pid: u32) -> Option<String>;
}

impl Resolver {
    pub fn new(rules: Vec<TenantRule>) -> Self {
        Self {
            slurm_jobs: rules.iter().map(|_| slurm::Jobs::default()).collect(),
            rules,
            users: HashMap::new(),
            procs: ProcCache::default(),
            exited: None,
            kubernetes: None,
        }
    }

    /// Names pods for `kubernetes` rules and workload series: starts
    /// asking the kubelet when either is configured. Keep the returned
    /// guard for as long as the resolver runs.
    pub fn attach_kubernetes(
        &mut self,
        config: &crate::kubernetes::KubernetesConfig,
    ) -> Option<crate::kubernetes::Refresher> {
        if !kubernetes_wanted(config, &self.rules) {
            return None;
        }
        let (lookup, refresher) = crate::kubernetes::start(config)?;
        self.kubernetes = Some(lookup);
        Some(refresher)
    }

    /// Pods using a GPU the kubelet did not allocate to them; empty
    /// without Kubernetes.
    pub fn unallocated_gpu_use(
        &self,
        gpus: &[crate::snapshot::GpuSnapshot],
    ) -> Vec<crate::snapshot::UnallocatedGpuUse> {
        self.kubernetes
            .as_ref()
            .map(|k| k.unallocated(gpus))
            .unwrap_or_default()
    }

    /// A Kubernetes lookup set by hand (tests).
    #[cfg(test)]
    pub(crate) fn set_kubernetes(&mut self, lookup: crate::kubernetes::Lookup) {
        self.kubernetes = Some(lookup);
    }

    /// A process cache over another `/proc` (tests).
    #[cfg(test)]
    pub(crate) fn with_procs(mut self, procs: ProcCache) -> Self {
        self.procs = procs;
        self
    }

    /// Starts a sampling cycle: every process's `stat` is read afresh.
    pub fn begin_cycle(&mut self) {
        self.procs.begin_cycle();
    }

    /// Ends a sampling cycle: processes it did not see are forgotten.
    pub fn end_cycle(&mut self) {
        self.procs.end_cycle();
    }

    /// The kernel's view of `pid` this cycle, for the GPU state machine
    /// (read with, not besides, the attribution's `stat`).
    pub fn proc_obs(&mut self, pid: u32) -> ProcObs {
        self.procs.obs(pid)
    }

    /// How many processes the cache holds.
    #[cfg(test)]
    fn cached_processes(&self) -> usize {
        self.procs.len()
    }

    /// Reads processes' `stat` through `source` (the task iterator) instead
    /// of `/proc`; set before the first cycle, as the cache starts empty.
    pub fn set_proc_source(&mut self, source: Box<dyn procs::ProcSource>) {
        self.procs = ProcCache::new(source);
    }

    /// Consults `exited` for processes whose `/proc/PID/cgroup` is gone, so
    /// a process that ended between two samples keeps its tenant.
    pub fn set_exited(&mut self, exited: Box<dyn ExitedCgroups>) {
        self.exited = Some(exited);
    }

    /// Tenant of a cgroup v2 path by the `cgroup` rules, and `kubernetes`
    /// rules for pods already known (the eBPF probes see cgroups, not
    /// processes or GPUs). `None` when no rule matches.
    pub fn tenant_for_cgroup(&self, cgroup: &str) -> Option<String> {
        self.rules
            .iter()
            .zip(&self.slurm_jobs)
            .find_map(|(rule, jobs)| match rule {
                TenantRule::Cgroup { pattern, fixed } => {
                    cgroup_rule(pattern, fixed, cgroup).map(|(tenant, _)| tenant)
                }
                TenantRule::User => None,
                TenantRule::Slurm { jobs_dir } => {
                    jobs.tenant(jobs_dir, cgroup).as_deref().map(str::to_owned)
                }
                TenantRule::Kubernetes {
                    namespaces,
                    unmapped,
                } => {
                    let id = self.kubernetes.as_ref()?.identify_cgroup(cgroup)?;
                    id.tenant(namespaces, *unmapped)
                }
            })
    }

    /// Tenant of a live process: every rule in order, first match wins.
    pub fn attribute(&mut self, pid: u32) -> Attribution {
        self.attribute_on(pid, None)
    }

    /// [`Self::attribute`] for a process seen on GPU or MIG device
    /// `device` (its UUID): `kubernetes` rules match it against the
    /// kubelet's device assignments.
    pub fn attribute_on(&mut self, pid: u32, device: Option<&str>) -> Attribution {
        let cached = self.procs.cached(pid);
        // `kubernetes` rules and workloads also depend on the device and on
        // what the kubelet said lately: only the cgroup is reused for them.
        if self.kubernetes.is_none()
            && let Some(attribution) = cached
        {
            return attribution;
        }
        let cgroup: Option<Arc<str>> = match cached {
            Some(attribution) => attribution.cgroup,
            None => self
                .procs
                .source
                .cgroup(pid)
                .or_else(|| self.exited.as_mut()?.cgroup_of_exited(pid))
                .map(Arc::from),
        };
        let attribution = self.attribute_from(pid, cgroup, device);
        self.procs.store(pid, &attribution);
        attribution
    }

    /// The rules applied to a process whose cgroup is known.
    fn attribute_from(
        &mut self,
        pid: u32,
        cgroup: Option<Arc<str>>,
        device: Option<&str>,
    ) -> Attribution {
        let identity = match (self.kubernetes.as_mut(), cgroup.as_deref()) {
            (Some(k), Some(cg)) => k.identify(cg, device),
            _ => None,
        };
        let workload = identity
            .as_ref()
            .filter(|_| {
                self.kubernetes
                    .as_ref()
                    .is_some_and(|k| k.workload_series())
            })
            .and_then(crate::kubernetes::Identity::workload)
            .map(Box::new);
        for (rule, jobs) in self.rules.iter().zip(&self.slurm_jobs) {
            let (tenant, workload_id): (Option<Arc<str>>, Option<Arc<str>>) = match rule {
                TenantRule::Cgroup { pattern, fixed } => cgroup
                    .as_deref()
                    .and_then(|cg| cgroup_rule(pattern, fixed, cg))
                    .map_or((None, None), |(t, w)| {
                        (Some(Arc::from(t)), w.map(Arc::from))
                    }),
                TenantRule::User => (
                    uid_of(pid).ok().map(|uid| {
                        self.users
                            .entry(uid)
                            .or_insert_with(|| user_name(uid).into())
                            .clone()
                    }),
                    None,
                ),
                TenantRule::Slurm { jobs_dir } => cgroup
                    .as_deref()
                    .and_then(|cg| Some((jobs.tenant(jobs_dir, cg)?, slurm::job_id(cg)?)))
                    .map_or((None, None), |(t, job)| {
                        (Some(t), Some(Arc::from(job.to_string())))
                    }),
                TenantRule::Kubernetes {
                    namespaces,
                    unmapped,
                } => identity
                    .as_ref()
                    .and_then(|id| {
                        let tenant = id.tenant(namespaces, *unmapped)?;
                        // A controller's pods are one workload (a Job's
                        // retries, a StatefulSet's replicas); a bare pod
                        // is its own.
                        let pod = id
                            .owner
                            .as_ref()
                            .or(id.pod.as_ref())
                            .filter(|_| id.pod.is_some())
                            .map(|p| format!("{}/{p}", id.namespace))
                            .filter(|w| is_workload_name(w));
                        Some((Some(Arc::from(tenant)), pod.map(Arc::from)))
                    })
                    .unwrap_or((None, None)),
            };
            if let Some(tenant) = tenant {
                return Attribution {
                    tenant,
                    cgroup,
                    workload,
                    workload_id,
                };
            }
        }
        Attribution {
            tenant: TENANT_UNATTRIBUTED.into(),
            cgroup,
            workload,
            workload_id: None,
        }
    }
}

/// The tenant a `cgroup` rule gives `cgroup`, and the workload its
/// `workload` group captured (none when empty or absent).
fn cgroup_rule(
    pattern: &regex::Regex,
    fixed: &Option<String>,
    cgroup: &str,
) -> Option<(String, Option<String>)> {
    let caps = pattern.captures(cgroup)?;
    let tenant = match caps.name("tenant") {
        Some(m) if !m.as_str().is_empty() => m.as_str().to_owned(),
        Some(_) => return None,
        None => fixed.clone()?,
    };
    let workload = caps
        .name("workload")
        .map(|m| m.as_str())
        .filter(|w| is_workload_name(w))
        .map(str::to_owned);
    Some((tenant, workload))
}

/// Whether `w` can name a workload in a report (1..=256 bytes, no control
/// characters): one that cannot is charged to the tenant alone rather than
/// have the aggregator refuse the whole report.
fn is_workload_name(w: &str) -> bool {
    !w.is_empty() && w.len() <= tally_contract::wire::MAX_NAME && !w.contains(char::is_control)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn resolver(text: &str) -> Resolver {
        Resolver::new(
            Config::parse(text, Path::new("t.toml"))
                .unwrap()
                .tenant
                .rules,
        )
    }

    #[test]
    fn first_matching_cgroup_rule_wins() {
        let r = resolver(
            r#"
            [[tenant.rule]]
            cgroup = '^/kubepods/.*/ns-(?P<tenant>[a-z]+)/'
            [[tenant.rule]]
            cgroup = '^/tally/(?P<tenant>[^/]+)'
            [[tenant.rule]]
            cgroup = '^/system\.slice/slurmstepd'
            tenant = "hpc"
            "#,
        );
        assert_eq!(
            r.tenant_for_cgroup("/tally/acme/job1").as_deref(),
            Some("acme")
        );
        assert_eq!(
            r.tenant_for_cgroup("/kubepods/x/ns-beta/c").as_deref(),
            Some("beta")
        );
        assert_eq!(
            r.tenant_for_cgroup("/system.slice/slurmstepd.scope/job_7")
                .as_deref(),
            Some("hpc")
        );
        assert_eq!(r.tenant_for_cgroup("/user.slice"), None);
    }

    #[test]
    fn own_process_falls_through_to_user_rule() {
        let mut r = resolver(
            r#"
            [[tenant.rule]]
            cgroup = '^/never-matches/(?P<tenant>.+)'
            [[tenant.rule]]
            user = true
            "#,
        );
        let me = std::process::id();
        let a = r.attribute(me);
        let expected = user_name(nix::unistd::getuid().as_raw());
        assert_eq!(&*a.tenant, expected);
    }

    #[test]
    fn no_rule_means_unattributed() {
        let mut r = resolver("");
        assert_eq!(
            &*r.attribute(std::process::id()).tenant,
            TENANT_UNATTRIBUTED
        );
        // A pid that cannot exist has no cgroup, and no tenant.
        let gone = r.attribute(u32::MAX - 1);
        assert_eq!(&*gone.tenant, TENANT_UNATTRIBUTED);
        assert_eq!(gone.cgroup, None);
    }

    /// A resolver with `cgroup = '^/tally/(?P<tenant>[^/]+)'` over a fake
    /// `/proc`.
    fn cached_resolver() -> (Resolver, procs::fake::FakeProc) {
        let fake = procs::fake::FakeProc::default();
        let r = resolver(
            r#"
            [[tenant.rule]]
            cgroup = '^/tally/(?P<tenant>[^/]+)'
            "#,
        )
        .with_procs(ProcCache::new(Box::new(fake.clone())));
        (r, fake)
    }

    /// One sampling cycle over `pids`: their tenants.
    fn cycle(r: &mut Resolver, pids: &[u32]) -> Vec<String> {
        r.begin_cycle();
        let tenants = pids
            .iter()
            .map(|&pid| {
                let a = r.attribute_on(pid, Some("GPU-0"));
                // The state machine's read of the same cycle is free.
                r.proc_obs(pid);
                a.tenant.to_string()
            })
            .collect();
        r.end_cycle();
        tenants
    }

    /// A `cgroup` rule's `workload` group names the workload, kept with
    /// the cached attribution; a `slurm` rule's is the job id; a rule
    /// without one, or an empty capture, names none.
    #[test]
    fn rules_name_the_workload_they_match() {
        let fake = procs::fake::FakeProc::default();
        let jobs = tempfile::tempdir().unwrap();
        std::fs::write(jobs.path().join("4242"), "account = \"physics\"\n").unwrap();
        let mut r = resolver(&format!(
            r#"
            [[tenant.rule]]
            cgroup = '^/tally/(?P<tenant>[^/]+)/(?P<workload>[^/]*)'
            [[tenant.rule]]
            slurm = true
            jobs_dir = "{}"
            [[tenant.rule]]
            cgroup = '^/team/(?P<tenant>[^/]+)'
            "#,
            jobs.path().display()
        ))
        .with_procs(ProcCache::new(Box::new(fake.clone())));
        fake.set(1, 10, "/tally/acme/train-1/x");
        fake.set(
            2,
            10,
            "/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0",
        );
        fake.set(3, 10, "/team/beta/whatever");
        fake.set(4, 10, "/tally/acme//x");
        let mut workloads = || {
            r.begin_cycle();
            let w: Vec<(String, Option<String>)> = [1, 2, 3, 4]
                .iter()
                .map(|&pid| {
                    let a = r.attribute_on(pid, None);
                    (a.tenant.to_string(), a.workload_id.map(|w| w.to_string()))
                })
                .collect();
            r.end_cycle();
            w
        };
        let expected = vec![
            ("acme".to_owned(), Some("train-1".to_owned())),
            ("physics".to_owned(), Some("4242".to_owned())),
            ("beta".to_owned(), None),
            ("acme".to_owned(), None),
        ];
        assert_eq!(workloads(), expected);
        assert_eq!(workloads(), expected, "from the cache");
    }

    #[test]
    fn a_known_process_costs_one_stat_read_per_cycle() {
        let (mut r, fake) = cached_resolver();
        fake.set(10, 500, "/tally/acme/job1");
        fake.set(11, 501, "/tally/beta/job1");
        assert_eq!(cycle(&mut r, &[10, 11]), ["acme", "beta"]);
        assert_eq!(fake.reads(), (2, 2));
        // Two more cycles that are not due for a re-read (pid 10 is due
        // when (cycle + 10) % 16 == 0, i.e. at cycle 6).
        assert_eq!(cycle(&mut r, &[10, 11]), ["acme", "beta"]);
        assert_eq!(cycle(&mut r, &[10, 11]), ["acme", "beta"]);
        assert_eq!(fake.reads(), (6, 2), "no cgroup read on the steady path");
    }

    #[test]
    fn a_reused_pid_is_attributed_afresh() {
        let (mut r, fake) = cached_resolver();
        fake.set(10, 500, "/tally/acme/job1");
        assert_eq!(cycle(&mut r, &[10]), ["acme"]);
        // The process exits and another one gets its pid: a new start time.
        fake.set(10, 900, "/tally/beta/job7");
        assert_eq!(cycle(&mut r, &[10]), ["beta"]);
        assert_eq!(fake.reads().1, 2);
    }

    #[test]
    fn a_moved_process_is_seen_within_the_revalidation_period() {
        let (mut r, fake) = cached_resolver();
        fake.set(10, 500, "/tally/acme/job1");
        assert_eq!(cycle(&mut r, &[10]), ["acme"]);
        // Same pid, same start time, another cgroup.
        fake.set(10, 500, "/tally/beta/job1");
        let seen: Vec<String> = (0..procs::REVALIDATE_EVERY)
            .map(|_| cycle(&mut r, &[10]).remove(0))
            .collect();
        let moved_at = seen.iter().position(|t| t == "beta").unwrap_or_else(|| {
            panic!(
                "the move was not seen in {} cycles",
                procs::REVALIDATE_EVERY
            )
        });
        assert!(seen[..moved_at].iter().all(|t| t == "acme"));
        assert!(seen[moved_at..].iter().all(|t| t == "beta"));
        // One re-read in the period, besides the first read.
        assert_eq!(fake.reads().1, 2);
    }

    /// Where the source says where a process is (the task iterator), a
    /// move is seen the cycle it happens, and a process that stays is not
    /// read again however many cycles pass.
    #[test]
    fn a_placed_process_is_read_again_only_when_it_moves() {
        let (mut r, fake) = cached_resolver();
        fake.place(10, 500, "/tally/acme/job1", 7);
        assert_eq!(cycle(&mut r, &[10]), ["acme"]);
        for _ in 0..2 * procs::REVALIDATE_EVERY {
            assert_eq!(cycle(&mut r, &[10]), ["acme"]);
        }
        assert_eq!(fake.reads().1, 1, "no periodic re-read");
        fake.place(10, 500, "/tally/beta/job1", 8);
        assert_eq!(cycle(&mut r, &[10]), ["beta"], "seen the next cycle");
        assert_eq!(fake.reads().1, 2);
        // A change of user is a move too.
        fake.0.lock().unwrap().procs.get_mut(&10).unwrap().placement = Some(procs::Placement {
            cgroup_id: 8,
            euid: 1000,
        });
        cycle(&mut r, &[10]);
        assert_eq!(fake.reads().1, 3);
    }

    #[test]
    fn pids_no_longer_reported_are_evicted() {
        let (mut r, fake) = cached_resolver();
        fake.set(10, 500, "/tally/acme/job1");
        fake.set(11, 501, "/tally/beta/job1");
        cycle(&mut r, &[10, 11]);
        assert_eq!(r.cached_processes(), 2);
        cycle(&mut r, &[11]);
        assert_eq!(r.cached_processes(), 1);
        // Back again: read afresh, not taken from a stale entry.
        fake.set(10, 500, "/tally/gamma/job1");
        assert_eq!(cycle(&mut r, &[10, 11]), ["gamma", "beta"]);
    }

    #[test]
    fn a_process_that_ended_keeps_its_tenant_until_evicted() {
        let (mut r, fake) = cached_resolver();
        fake.set(10, 500, "/tally/acme/job1");
        cycle(&mut r, &[10]);
        fake.0.lock().unwrap().procs.remove(&10);
        // NVML still reports the pid (the driver holds its context).
        assert_eq!(cycle(&mut r, &[10]), ["acme"]);
        r.begin_cycle();
        assert_eq!(r.proc_obs(10).state, crate::states::ProcState::Gone);
    }
}
