//! The agent's config file (`tally.toml`): typed, strict, and checked whole.
//!
//! Each section is deserialized on its own (with `deny_unknown_fields`) and
//! then validated, so that one run of `tally config check` reports every
//! problem in the file at once, each with its key (the primitives are
//! `tally_contract::config`'s, which the aggregator's file uses too).
//!
//! Each section's type belongs to the module that uses it; this file only
//! puts them together.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
pub use tally_contract::config::{EX_USAGE, Problems};
use tally_contract::config::{load_with, parse_with, reject_unknown, section};

use crate::{paths, tenants::rules};

/// The agent's whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub agent: AgentSection,
    pub tenant: TenantSection,
    pub probes: crate::probes::ProbesConfig,
    pub report: crate::report::ReportConfig,
    pub states: crate::states::StatesConfig,
}

/// Top-level keys of the agent's config file.
const KNOWN: &[&str] = &["agent", "tenant", "probes", "report", "states"];

/// `[agent]`: how the agent runs. Command-line flags override these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Address of `/metrics` and the JSON API. Default `0.0.0.0:9477`.
    pub listen: SocketAddr,
    /// Time between two samples. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// NVML library to open. Default: the system `libnvidia-ml.so.1`.
    pub nvml_lib: PathBuf,
    /// How long one GPU's NVML calls may take per cycle before the GPU is
    /// marked (state `lost`, error "timed out"). Default `5s`.
    #[serde(with = "humantime_serde")]
    pub nvml_timeout: Duration,
    /// Where the spool and the audit log live. Default `/var/lib/tally`.
    pub state_dir: PathBuf,
    /// Node name. Default: the host name.
    pub node: Option<String>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9477)),
            sample_interval: Duration::from_secs(1),
            nvml_lib: PathBuf::from(paths::DEFAULT_NVML_LIB),
            nvml_timeout: crate::gpu::DEFAULT_NVML_TIMEOUT,
            state_dir: PathBuf::from(paths::DEFAULT_STATE_DIR),
            node: None,
        }
    }
}

/// `[tenant]`: how processes map to tenants.
#[derive(Debug, Clone, Default)]
pub struct TenantSection {
    /// `[[tenant.rule]]`, first match wins.
    pub rules: Vec<rules::TenantRule>,
    /// `[tenant.quota.<name>]`: local quotas, enforced by `crate::enforce`.
    pub quotas: BTreeMap<String, crate::enforce::quota::Quota>,
    /// `[tenant] cgroup_parent`: the cgroup under which Tally makes
    /// `tally/<tenant>/<job>`, on every hierarchy: an absolute path names a
    /// delegated cgroup (which must exist), a relative one is made beneath
    /// the process's own cgroup on each hierarchy. Default: the own cgroup.
    pub cgroup_parent: Option<String>,
    /// `[tenant.kubernetes]`: how to reach the kubelet (`kubernetes` rules).
    pub kubernetes: crate::kubernetes::KubernetesConfig,
}

impl Config {
    /// What the enforcer needs of this config, on node `node`.
    pub fn enforce_settings<'a>(&'a self, node: &'a str) -> crate::enforce::Settings<'a> {
        crate::enforce::Settings {
            quotas: &self.tenant.quotas,
            cgroup_parent: self.tenant.cgroup_parent.as_deref(),
            state_dir: &self.agent.state_dir,
            pin_dir: &self.probes.pin_dir,
            node,
            kubernetes: crate::tenants::kubernetes_wanted(
                &self.tenant.kubernetes,
                &self.tenant.rules,
            ),
            enforce_allocation: self.tenant.kubernetes.enforce_allocation,
        }
    }

    /// Loads and validates `file`, reporting every problem at once.
    pub fn load(file: &Path) -> Result<Config, Problems> {
        load_with(file, KNOWN, Self::from_table)
    }

    /// Parses a config from TOML text (for tests and defaults).
    pub fn parse(text: &str, origin: &Path) -> Result<Config, Problems> {
        parse_with(text, origin, KNOWN, Self::from_table)
    }

    fn from_table(table: &mut toml::Table, problems: &mut Problems) -> Config {
        let agent: AgentSection = section(table, "agent", problems);
        if agent.sample_interval < Duration::from_millis(100) {
            problems.push(
                "agent.sample_interval",
                "must be at least 100ms (NVML calls take tens of milliseconds)",
            );
        }
        let mut tenant = tenant_section(table, problems);
        for rule in &mut tenant.rules {
            if let rules::TenantRule::Slurm { jobs_dir } = rule
                && jobs_dir.as_os_str().is_empty()
            {
                *jobs_dir = agent.state_dir.join(crate::tenants::slurm::JOBS_DIR);
            }
        }
        let probes = section(table, "probes", problems);
        let report: crate::report::ReportConfig = section(table, "report", problems);
        report.check(problems);
        let states: crate::states::StatesConfig = section(table, "states", problems);
        for (key, message) in states.problems() {
            problems.push(key, message);
        }
        Config {
            agent,
            tenant,
            probes,
            report,
            states,
        }
    }
}

fn tenant_section(table: &mut toml::Table, problems: &mut Problems) -> TenantSection {
    let Some(value) = table.remove("tenant") else {
        return TenantSection::default();
    };
    let toml::Value::Table(mut tenant) = value else {
        problems.push("tenant", "must be a table");
        return TenantSection::default();
    };
    let mut rules = Vec::new();
    match tenant.remove("rule") {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("tenant.rule[{i}]");
                match rules::TenantRuleSpec::deserialize(item) {
                    Ok(spec) => {
                        if let Some(rule) = rules::validate(spec, &key, problems) {
                            rules.push(rule);
                        }
                    }
                    Err(e) => problems.push(key, e.message().to_string()),
                }
            }
        }
        Some(_) => problems.push(
            "tenant.rule",
            "must be an array of tables ([[tenant.rule]])",
        ),
    }
    let quotas = match tenant.remove("quota") {
        None => BTreeMap::new(),
        Some(value) => crate::enforce::quota::parse_quotas(value, problems),
    };
    let cgroup_parent = match tenant.remove("cgroup_parent") {
        None => None,
        Some(toml::Value::String(p))
            if !p.is_empty() && !p.split('/').any(|c| c == ".." || c == ".") =>
        {
            Some(p)
        }
        Some(_) => {
            problems.push(
                "tenant.cgroup_parent",
                "must be a cgroup path without `.` or `..`: absolute for a delegated cgroup \
                 (\"/tally.slice\"), or relative to the process's own cgroup",
            );
            None
        }
    };
    let kubernetes = crate::kubernetes::parse_section(tenant.remove("kubernetes"), problems);
    if kubernetes.tenant_label.is_some()
        && !rules
            .iter()
            .any(|r| matches!(r, rules::TenantRule::Kubernetes { .. }))
    {
        problems.push(
            "tenant.kubernetes.tenant_label",
            "names tenants only through a `kubernetes = true` [[tenant.rule]]; add one",
        );
    }
    reject_unknown(
        &tenant,
        "tenant",
        &["rule", "quota", "cgroup_parent", "kubernetes"],
        problems,
    );
    TenantSection {
        rules,
        quotas,
        cgroup_parent,
        kubernetes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::rules::TenantRule;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.agent.listen.to_string(), "0.0.0.0:9477");
        assert_eq!(c.agent.sample_interval, Duration::from_secs(1));
        assert!(c.tenant.rules.is_empty());
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(
            r#"
            [[tenant.rule]]
            cgroup = '^/tally/(?P<tenant>[^/]+)'
            [[tenant.rule]]
            user = true
            "#,
        )
        .unwrap();
        assert_eq!(c.tenant.rules.len(), 2);
        assert!(matches!(c.tenant.rules[1], TenantRule::User));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse(
            r#"
            colour = "blue"
            [agent]
            sample_interval = "fast"
            [[tenant.rule]]
            cgroup = '^/tally/([^/]+'
            [[tenant.rule]]
            cgroup = '^/x'
            [[tenant.rule]]
            user = true
            cgroup = 'a'
            [[tenant.rule]]
            uesr = true
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "agent",
                "tenant.rule[0].cgroup",
                "tenant.rule[1].cgroup",
                "tenant.rule[2]",
                "tenant.rule[3]",
                "colour"
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("test.toml: 6 problems"), "{text}");
        assert!(text.contains("uesr"), "{text}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let err = parse("[agent\n").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.to_string().contains("not valid TOML"), "{err}");
    }
}
