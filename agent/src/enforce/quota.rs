//! `[tenant.quota.<name>]`: what one tenant may use on this node.
//!
//! Each tenant's table is parsed key by key (not with serde's
//! `deny_unknown_fields`, which stops at the first bad key) so that
//! `tally config check` names every problem, as `tenant.quota.acme.memory`.

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Deserialize, Serialize};

use tally_contract::{
    config::{Problems, parse_bytes},
    tenant::check_tenant_name,
};

/// What the agent does once a GPU memory or GPU time breach outlasts `grace`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Metric and audit record only.
    #[default]
    Alert,
    /// Freeze the offending processes' cgroups on a duty cycle until usage
    /// is back under quota.
    Throttle,
    /// SIGTERM the offending processes, SIGKILL after `kill_timeout`.
    Terminate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Throttle => "throttle",
            Action::Terminate => "terminate",
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "alert" => Ok(Action::Alert),
            "throttle" => Ok(Action::Throttle),
            "terminate" => Ok(Action::Terminate),
            other => Err(format!(
                "unknown action `{other}`; expected one of: alert, throttle, terminate"
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tenant's validated quota. `None` means "no limit".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    /// CPU cores (cgroup cpu quota over a 100 ms period).
    pub cpu_cores: Option<f64>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
    /// GPU and MIG UUIDs the tenant may open; `None` = all.
    pub gpus: Option<Vec<String>>,
    /// GPU memory in bytes, summed over the tenant's processes on the node.
    pub gpu_memory: Option<u64>,
    pub gpu_memory_action: Action,
    /// GPU seconds (allocated time, summed over devices) per sliding hour.
    pub gpu_seconds_per_hour: Option<f64>,
    pub gpu_time_action: Action,
    /// Rates in bytes per second.
    pub network_egress: Option<u64>,
    pub network_ingress: Option<u64>,
    /// How long a GPU memory or time breach may last before the action.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Time between SIGTERM and SIGKILL for `terminate`.
    #[serde(with = "humantime_serde")]
    pub kill_timeout: Duration,
}

/// Default `grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default `kill_timeout`.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Quota {
    fn default() -> Self {
        Self {
            cpu_cores: None,
            memory: None,
            pids: None,
            gpus: None,
            gpu_memory: None,
            gpu_memory_action: Action::Alert,
            gpu_seconds_per_hour: None,
            gpu_time_action: Action::Alert,
            network_egress: None,
            network_ingress: None,
            grace: DEFAULT_GRACE,
            kill_timeout: DEFAULT_KILL_TIMEOUT,
        }
    }
}

/// Every key a quota table may hold.
pub const QUOTA_KEYS: &[&str] = &[
    "cpu_cores",
    "memory",
    "pids",
    "gpus",
    "gpu_memory",
    "gpu_memory_action",
    "gpu_seconds_per_hour",
    "gpu_time_action",
    "network_egress",
    "network_ingress",
    "grace",
    "kill_timeout",
];

/// Parses `[tenant.quota]` (a table of tenant tables), recording every
/// problem under `tenant.quota.<tenant>.<key>`.
pub fn parse_quotas(value: toml::Value, problems: &mut Problems) -> BTreeMap<String, Quota> {
    let mut out = BTreeMap::new();
    let toml::Value::Table(tenants) = value else {
        problems.push(
            "tenant.quota",
            "must be a table of tenants ([tenant.quota.<name>])",
        );
        return out;
    };
    for (tenant, table) in tenants {
        let key = format!("tenant.quota.{tenant}");
        if let Err(msg) = check_tenant_name(&tenant) {
            problems.push(key.clone(), msg);
            continue;
        }
        if tenant.contains('/') || tenant == "." || tenant == ".." {
            problems.push(
                key.clone(),
                "a tenant with a quota names a cgroup directory: no `/`, `.` or `..`",
            );
            continue;
        }
        let toml::Value::Table(table) = table else {
            problems.push(key, "must be a table");
            continue;
        };
        if let Some(q) = parse_quota(table, &key, problems) {
            out.insert(tenant, q);
        }
    }
    out
}

/// Parses one tenant's quota table; `None` when any key is wrong.
pub fn parse_quota(table: toml::Table, prefix: &str, problems: &mut Problems) -> Option<Quota> {
    let before = problems.problems.len();
    let mut q = Quota::default();
    for (key, value) in table {
        let path = format!("{prefix}.{key}");
        let result: Result<(), String> = (|| {
            match key.as_str() {
                "cpu_cores" => {
                    let v = number(&value)?;
                    if !(v > 0.0 && v.is_finite()) {
                        return Err(format!("must be a positive number of cores, got {v}"));
                    }
                    q.cpu_cores = Some(v);
                }
                "memory" => q.memory = Some(positive(size(&value)?)?),
                "gpu_memory" => q.gpu_memory = Some(positive(size(&value)?)?),
                "pids" => {
                    let v = value
                        .as_integer()
                        .ok_or_else(|| format!("must be an integer, got {}", value.type_str()))?;
                    if v <= 0 {
                        return Err(format!("must be positive, got {v}"));
                    }
                    q.pids = Some(v as u64);
                }
                "gpus" => {
                    let items = value.as_array().ok_or_else(|| {
                        format!(
                            "must be an array of GPU/MIG UUIDs, got {}",
                            value.type_str()
                        )
                    })?;
                    let mut gpus = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let s = item
                            .as_str()
                            .ok_or_else(|| format!("[{i}]: must be a string UUID"))?;
                        if !(s.starts_with("GPU-") || s.starts_with("MIG-")) {
                            return Err(format!(
                                "[{i}]: `{s}` is not a GPU or MIG UUID (`GPU-…`, `MIG-…`)"
                            ));
                        }
                        gpus.push(s.to_owned());
                    }
                    q.gpus = Some(gpus);
                }
                "gpu_memory_action" => q.gpu_memory_action = Action::parse(string(&value)?)?,
                "gpu_time_action" => q.gpu_time_action = Action::parse(string(&value)?)?,
                "gpu_seconds_per_hour" => {
                    let v = number(&value)?;
                    if !(v > 0.0 && v <= 3600.0 * 1024.0) {
                        return Err(format!("must be a positive number of seconds, got {v}"));
                    }
                    q.gpu_seconds_per_hour = Some(v);
                }
                "network_egress" => q.network_egress = Some(parse_rate(string(&value)?)?),
                "network_ingress" => q.network_ingress = Some(parse_rate(string(&value)?)?),
                "grace" => q.grace = duration(&value)?,
                "kill_timeout" => q.kill_timeout = duration(&value)?,
                _ => {
                    return Err(format!(
                        "unknown key; expected one of: {}",
                        QUOTA_KEYS.join(", ")
                    ));
                }
            }
            Ok(())
        })();
        if let Err(msg) = result {
            problems.push(path, msg);
        }
    }
    (problems.problems.len() == before).then_some(q)
}

fn number(v: &toml::Value) -> Result<f64, String> {
    match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => Err(format!("must be a number, got {}", other.type_str())),
    }
}

fn string(v: &toml::Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("must be a string, got {}", v.type_str()))
}

fn size(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        toml::Value::String(s) => parse_bytes(s),
        other => Err(format!(
            "must be a size such as \"8GiB\", got {}",
            other.type_str()
        )),
    }
}

fn positive(v: u64) -> Result<u64, String> {
    if v == 0 {
        Err("must be greater than zero".into())
    } else {
        Ok(v)
    }
}

fn duration(v: &toml::Value) -> Result<Duration, String> {
    humantime::parse_duration(string(v)?).map_err(|e| format!("not a duration (e.g. \"30s\"): {e}"))
}

/// Parses a network rate into bytes per second: bit rates (`100Mbit`,
/// `1Gbit`, `500kbit`, `100Mbps`) and byte rates (`10MB/s`, `512KiB/s`).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let (value, unit) = tally_contract::config::split_quantity(text)
        .ok_or_else(|| format!("`{text}` is not a rate (e.g. \"100Mbit\", \"10MB/s\")"))?;
    let bits_per_unit: f64 = match unit {
        "bit" | "bps" => 1.0,
        "kbit" | "Kbit" | "kbps" | "Kbps" => 1e3,
        "Mbit" | "Mbps" => 1e6,
        "Gbit" | "Gbps" => 1e9,
        "Tbit" | "Tbps" => 1e12,
        _ => {
            let Some(bytes_unit) = unit.strip_suffix("/s") else {
                return Err(format!(
                    "`{text}`: unknown rate unit `{unit}` (use bit, kbit, Mbit, Gbit, or \
                     B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
                ));
            };
            let bytes = parse_bytes(&format!("1{bytes_unit}")).map_err(|_| {
                format!(
                    "`{text}`: unknown rate unit `{unit}` (use bit, kbit, Mbit, Gbit, or \
                     B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
                )
            })?;
            bytes as f64 * 8.0
        }
    };
    let bytes = (value * bits_per_unit / 8.0).round();
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!(
            "`{text}`: a rate must be at least 1 byte per second"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> (BTreeMap<String, Quota>, Vec<(String, String)>) {
        let mut problems = Problems::new(Path::new("t.toml"));
        let value: toml::Value = toml::Value::Table(text.parse().unwrap());
        let q = parse_quotas(value, &mut problems);
        let p = problems
            .problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect();
        (q, p)
    }

    #[test]
    fn issue_example_parses() {
        let (q, p) = parse(
            r#"
            [acme]
            cpu_cores = 2.0
            memory = "8GiB"
            pids = 512
            gpus = ["GPU-0000", "MIG-1111"]
            gpu_memory = "20GiB"
            gpu_memory_action = "terminate"
            network_egress = "100Mbit"
            network_ingress = "10MB/s"
            grace = "30s"
            gpu_seconds_per_hour = 1800
            gpu_time_action = "throttle"
            "#,
        );
        assert!(p.is_empty(), "{p:?}");
        let a = &q["acme"];
        assert_eq!(a.cpu_cores, Some(2.0));
        assert_eq!(a.memory, Some(8 << 30));
        assert_eq!(a.pids, Some(512));
        assert_eq!(a.gpus.as_ref().unwrap().len(), 2);
        assert_eq!(a.gpu_memory, Some(20 << 30));
        assert_eq!(a.gpu_memory_action, Action::Terminate);
        assert_eq!(a.network_egress, Some(12_500_000));
        assert_eq!(a.network_ingress, Some(10_000_000));
        assert_eq!(a.grace, Duration::from_secs(30));
        assert_eq!(a.gpu_seconds_per_hour, Some(1800.0));
        assert_eq!(a.gpu_time_action, Action::Throttle);
        assert_eq!(a.kill_timeout, DEFAULT_KILL_TIMEOUT);
    }

    #[test]
    fn every_bad_key_of_every_tenant_is_reported() {
        let (q, p) = parse(
            r#"
            [acme]
            memory = "8 gigs"
            gpu_memory_action = "explode"
            cpu_core = 2
            [beta]
            network_egress = "100Mbitz"
            grace = "soon"
            gpus = ["0"]
            pids = -1
            [ok]
            pids = 10
            "#,
        );
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tenant.quota.acme.cpu_core",
                "tenant.quota.acme.gpu_memory_action",
                "tenant.quota.acme.memory",
                "tenant.quota.beta.gpus",
                "tenant.quota.beta.grace",
                "tenant.quota.beta.network_egress",
                "tenant.quota.beta.pids",
            ],
            "{p:?}"
        );
        assert!(p[1].1.contains("alert, throttle, terminate"), "{p:?}");
        assert!(p[0].1.contains("unknown key"), "{p:?}");
        assert_eq!(q.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn reserved_or_path_like_tenant_names_are_refused() {
        let (_, p) = parse("[_idle]\npids = 1\n['a/b']\npids = 1\n");
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn config_file_carries_quotas_and_reports_their_keys() {
        let ok = crate::config::Config::parse(
            "[tenant]\ncgroup_parent = 'jobs'\n[tenant.quota.acme]\npids = 5\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(ok.tenant.quotas["acme"].pids, Some(5));
        assert_eq!(ok.tenant.cgroup_parent.as_deref(), Some("jobs"));
        let err = crate::config::Config::parse(
            "[tenant]\ncgroup_parent = '../up'\nquotas = 1\n[tenant.quota.acme]\nmemory = 'x'\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tenant.quota.acme.memory",
                "tenant.cgroup_parent",
                "tenant.quotas"
            ],
            "{err}"
        );
    }

    #[test]
    fn rates_parse_in_bits_and_bytes() {
        assert_eq!(parse_rate("100Mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("8Mbps").unwrap(), 1_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("500kbit").unwrap(), 62_500);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10_000_000);
        assert_eq!(parse_rate("1MiB/s").unwrap(), 1 << 20);
        assert_eq!(parse_rate("2.5 Mbit").unwrap(), 312_500);
        assert!(parse_rate("100").unwrap_err().contains("unknown rate unit"));
        assert!(parse_rate("100MB").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0Mbit").is_err());
    }
}
