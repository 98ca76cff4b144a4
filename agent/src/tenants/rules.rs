//! `[[tenant.rule]]`: how a process's cgroup, owner or pod names its
//! tenant, as written in the file and validated.

use std::{collections::BTreeMap, path::PathBuf};

use regex::Regex;
use serde::Deserialize;
use tally_contract::{config::Problems, tenant::check_tenant_name};

use crate::kubernetes::Unmapped;

/// One `[[tenant.rule]]` as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRuleSpec {
    /// Regex on the cgroup v2 path; the named group `tenant` (or, when
    /// absent, the `tenant` key) gives the tenant.
    pub cgroup: Option<String>,
    /// Match on the process owner's user name: the tenant is that name.
    pub user: Option<bool>,
    /// Fixed tenant for a `cgroup` rule without a `tenant` capture group.
    pub tenant: Option<String>,
    /// Kubernetes pods: the tenant is the pod's namespace
    /// (`crate::kubernetes`).
    pub kubernetes: Option<bool>,
    /// `kubernetes` rule: namespace → tenant, for namespaces whose name is
    /// not the tenant's.
    pub namespaces: Option<BTreeMap<String, String>>,
    /// `kubernetes` rule: what a namespace not in `namespaces` gives:
    /// `"namespace"` (its name, the default) or `"next-rule"`.
    pub unmapped: Option<Unmapped>,
    /// Slurm jobs: the tenant is the job's account (`super::slurm`).
    pub slurm: Option<bool>,
    /// `slurm` rule: where the prolog records jobs; default
    /// `<agent.state_dir>/slurm-jobs`.
    pub jobs_dir: Option<PathBuf>,
}

/// A validated tenant rule.
#[derive(Debug, Clone)]
pub enum TenantRule {
    /// Regex on the cgroup v2 path.
    Cgroup {
        pattern: Regex,
        /// Used when the regex has no `tenant` group.
        fixed: Option<String>,
    },
    /// The process owner's user name.
    User,
    /// A Slurm job's account, from the prolog's record in `jobs_dir`.
    Slurm { jobs_dir: PathBuf },
    /// A Kubernetes pod's namespace (through `namespaces` when listed).
    Kubernetes {
        namespaces: BTreeMap<String, String>,
        unmapped: Unmapped,
    },
}

/// Validates one `[[tenant.rule]]` (`key` names it in problems).
pub(crate) fn validate(
    spec: TenantRuleSpec,
    key: &str,
    problems: &mut Problems,
) -> Option<TenantRule> {
    if spec.kubernetes.is_some() || spec.namespaces.is_some() || spec.unmapped.is_some() {
        return validate_kubernetes(spec, key, problems);
    }
    if spec.slurm.is_some() || spec.jobs_dir.is_some() {
        return validate_slurm(spec, key, problems);
    }
    match (spec.cgroup, spec.user) {
        (Some(_), Some(_)) => {
            problems.push(key, "a rule has either `cgroup` or `user`, not both");
            None
        }
        (Some(pattern), None) => {
            let regex = match Regex::new(&pattern) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("{key}.cgroup"), format!("not a valid regex: {e}"));
                    return None;
                }
            };
            let has_group = regex.capture_names().flatten().any(|n| n == "tenant");
            if !has_group && spec.tenant.is_none() {
                problems.push(
                    format!("{key}.cgroup"),
                    "needs a named group `(?P<tenant>…)` or a `tenant = \"…\"` key",
                );
                return None;
            }
            if let Some(Err(msg)) = spec.tenant.as_deref().map(check_tenant_name) {
                problems.push(format!("{key}.tenant"), msg);
                return None;
            }
            Some(TenantRule::Cgroup {
                pattern: regex,
                fixed: spec.tenant,
            })
        }
        (None, Some(true)) => {
            if spec.tenant.is_some() {
                problems.push(format!("{key}.tenant"), "a `user` rule takes no `tenant`");
                return None;
            }
            Some(TenantRule::User)
        }
        (None, Some(false)) => {
            problems.push(
                format!("{key}.user"),
                "`user = false` matches nothing; remove the rule",
            );
            None
        }
        (None, None) => {
            problems.push(
                key,
                "a rule needs `cgroup = '<regex>'`, `user = true`, `kubernetes = true` or \
                 `slurm = true`",
            );
            None
        }
    }
}

/// For rules that find the tenant themselves: a problem (`why`) for each
/// of `cgroup`, `user` and `tenant` given; whether none was.
fn no_own_tenant_keys(
    spec: &TenantRuleSpec,
    key: &str,
    why: &str,
    problems: &mut Problems,
) -> bool {
    let mut ok = true;
    for (present, name) in [
        (spec.cgroup.is_some(), "cgroup"),
        (spec.user.is_some(), "user"),
        (spec.tenant.is_some(), "tenant"),
    ] {
        if present {
            problems.push(format!("{key}.{name}"), why);
            ok = false;
        }
    }
    ok
}

/// Validates a `[[tenant.rule]]` that has any of the Slurm keys. An empty
/// `jobs_dir` is filled in from the state directory by the caller.
fn validate_slurm(spec: TenantRuleSpec, key: &str, problems: &mut Problems) -> Option<TenantRule> {
    let mut ok = no_own_tenant_keys(
        &spec,
        key,
        "a `slurm` rule takes no `cgroup`, `user` or `tenant`: the job's account is the tenant",
        problems,
    );
    if spec.slurm != Some(true) {
        problems.push(
            format!("{key}.slurm"),
            "`jobs_dir` belongs to a `slurm = true` rule (`slurm = false` matches nothing)",
        );
        ok = false;
    }
    if let Some(dir) = &spec.jobs_dir
        && !dir.is_absolute()
    {
        problems.push(format!("{key}.jobs_dir"), "must be an absolute path");
        ok = false;
    }
    ok.then(|| TenantRule::Slurm {
        jobs_dir: spec.jobs_dir.unwrap_or_default(),
    })
}

/// Validates a `[[tenant.rule]]` that has any of the Kubernetes keys.
fn validate_kubernetes(
    spec: TenantRuleSpec,
    key: &str,
    problems: &mut Problems,
) -> Option<TenantRule> {
    let mut ok = no_own_tenant_keys(
        &spec,
        key,
        "a `kubernetes` rule takes no `cgroup`, `user` or `tenant`: the namespace (or its \
         `namespaces` entry) is the tenant",
        problems,
    );
    match spec.kubernetes {
        Some(true) => {}
        Some(false) => {
            problems.push(
                format!("{key}.kubernetes"),
                "`kubernetes = false` matches nothing; remove the rule",
            );
            ok = false;
        }
        None => {
            problems.push(
                format!("{key}.kubernetes"),
                "`namespaces` and `unmapped` belong to a `kubernetes = true` rule",
            );
            ok = false;
        }
    }
    let namespaces = spec.namespaces.unwrap_or_default();
    for (ns, tenant) in &namespaces {
        if !crate::kubernetes::is_dns_label(ns) {
            problems.push(
                format!("{key}.namespaces.{ns}"),
                "not a Kubernetes namespace name (lower-case letters, digits and `-`, at most 63)",
            );
            ok = false;
        }
        if let Err(msg) = check_tenant_name(tenant) {
            problems.push(format!("{key}.namespaces.{ns}"), msg);
            ok = false;
        }
    }
    ok.then(|| TenantRule::Kubernetes {
        namespaces,
        unmapped: spec.unmapped.unwrap_or_default(),
    })
}
