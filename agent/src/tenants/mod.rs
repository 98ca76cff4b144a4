//! Attribution of processes and cgroups to tenants.
//!
//! pid → cgroup v2 path (the `0::` line of `/proc/PID/cgroup`) → tenant, by
//! the first `[[tenant.rule]]` that matches; no match gives
//! [`TENANT_UNATTRIBUTED`]. The eBPF probes map cgroup ids to paths and use
//! the same [`Resolver::tenant_for_cgroup`], so GPU, network and PCIe usage
//! of one workload land on one tenant.

use std::{collections::HashMap, io};

pub mod rules;

use self::rules::TenantRule;
use crate::{cgroupfs::cgroup_of, paths, snapshot::TENANT_UNATTRIBUTED};

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
    pub tenant: String,
    pub cgroup: Option<String>,
    /// Kubernetes namespace/pod/container, when workload series are on.
    pub workload: Option<crate::snapshot::Workload>,
}

/// Applies the tenant rules; caches user names (a passwd lookup per
/// process per sample would dominate the sampling cycle).
#[derive(Debug)]
pub struct Resolver {
    rules: Vec<TenantRule>,
    users: HashMap<u32, String>,
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
            rules,
            users: HashMap::new(),
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
        let namespace_rules = self
            .rules
            .iter()
            .any(|r| matches!(r, TenantRule::Kubernetes { .. }));
        let (lookup, refresher) = crate::kubernetes::start(config, namespace_rules)?;
        self.kubernetes = Some(lookup);
        Some(refresher)
    }

    /// A Kubernetes lookup set by hand (tests).
    #[cfg(test)]
    pub(crate) fn set_kubernetes(&mut self, lookup: crate::kubernetes::Lookup) {
        self.kubernetes = Some(lookup);
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
        self.rules.iter().find_map(|rule| match rule {
            TenantRule::Cgroup { pattern, fixed } => cgroup_rule(pattern, fixed, cgroup),
            TenantRule::User => None,
            TenantRule::Kubernetes {
                namespaces,
                unmapped,
            } => {
                let id = self.kubernetes.as_ref()?.identify_cgroup(cgroup)?;
                crate::kubernetes::tenant_of(&id.namespace, namespaces, *unmapped)
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
        let cgroup = cgroup_of(pid)
            .ok()
            .or_else(|| self.exited.as_mut()?.cgroup_of_exited(pid));
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
            .and_then(crate::kubernetes::Identity::workload);
        for rule in &self.rules {
            let tenant = match rule {
                TenantRule::Cgroup { pattern, fixed } => cgroup
                    .as_deref()
                    .and_then(|cg| cgroup_rule(pattern, fixed, cg)),
                TenantRule::User => uid_of(pid).ok().map(|uid| {
                    self.users
                        .entry(uid)
                        .or_insert_with(|| user_name(uid))
                        .clone()
                }),
                TenantRule::Kubernetes {
                    namespaces,
                    unmapped,
                } => identity.as_ref().and_then(|id| {
                    crate::kubernetes::tenant_of(&id.namespace, namespaces, *unmapped)
                }),
            };
            if let Some(tenant) = tenant {
                return Attribution {
                    tenant,
                    cgroup,
                    workload,
                };
            }
        }
        Attribution {
            tenant: TENANT_UNATTRIBUTED.to_owned(),
            cgroup,
            workload,
        }
    }
}

fn cgroup_rule(pattern: &regex::Regex, fixed: &Option<String>, cgroup: &str) -> Option<String> {
    let caps = pattern.captures(cgroup)?;
    match caps.name("tenant") {
        Some(m) if !m.as_str().is_empty() => Some(m.as_str().to_owned()),
        Some(_) => None,
        None => fixed.clone(),
    }
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
        assert_eq!(a.tenant, expected);
    }

    #[test]
    fn no_rule_means_unattributed() {
        let mut r = resolver("");
        assert_eq!(r.attribute(std::process::id()).tenant, TENANT_UNATTRIBUTED);
        // A pid that cannot exist has no cgroup, and no tenant.
        let gone = r.attribute(u32::MAX - 1);
        assert_eq!(gone.tenant, TENANT_UNATTRIBUTED);
        assert_eq!(gone.cgroup, None);
    }
}
