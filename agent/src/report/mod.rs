//! Agent → aggregator: the versioned report ([`wire`]), how reports are cut
//! from the cumulative counters ([`state`]), the on-disk spool ([`spool`])
//! and the sender task ([`sender`]).
//!
//! Every report is written to the spool (fsync + atomic rename) before it
//! is sent, and the cumulative counters it was cut at (its base) and the
//! next sequence number are persisted before that, so neither an
//! aggregator outage nor an agent restart loses or double-counts usage.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use tally_contract::config::Problems;

pub mod sender;
pub mod spool;
pub mod state;
pub mod stats;
pub use tally_contract::wire;

pub use sender::spawn;
pub use stats::ReportStats;
pub use wire::{Report, SCHEMA_VERSION};

/// `[report]`: where and how often the agent reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Base URL of the aggregator (`https://tally-aggregator:9478`). No
    /// URL: the agent does not report (and spools nothing).
    pub aggregator: Option<String>,
    /// File holding the bearer token (first non-empty line).
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the aggregator's certificate, for an
    /// `https://` aggregator with a private CA (public roots are built in).
    pub ca_file: Option<PathBuf>,
    /// Node name in reports. Default: `[agent] node`, else the host name.
    pub node: Option<String>,
    /// The cluster this node belongs to, in every report, so one
    /// aggregator serves several clusters. Default `default`.
    pub cluster: String,
    /// Time between reports. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Timeout of one POST. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most reports kept in the spool. Default 8640 (a day at 10 s).
    pub spool_max_reports: usize,
    /// Most bytes kept in the spool. Default `256MiB`.
    pub spool_max_bytes: String,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            aggregator: None,
            token_file: None,
            ca_file: None,
            node: None,
            cluster: wire::DEFAULT_CLUSTER.into(),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            spool_max_reports: 8640,
            spool_max_bytes: "256MiB".into(),
        }
    }
}

impl ReportConfig {
    /// The spool bound in bytes (the default when the text is bad, which
    /// [`ReportConfig::check`] reports).
    pub fn spool_max_bytes(&self) -> u64 {
        tally_contract::config::parse_bytes(&self.spool_max_bytes).unwrap_or(256 << 20)
    }

    /// Adds every problem of the section to `problems`.
    pub fn check(&self, problems: &mut Problems) {
        if self.interval < Duration::from_millis(100) {
            problems.push("report.interval", "must be at least 100ms");
        }
        if self.timeout < Duration::from_millis(100) {
            problems.push("report.timeout", "must be at least 100ms");
        }
        if self.spool_max_reports == 0 {
            problems.push("report.spool_max_reports", "must be at least 1");
        }
        if let Err(e) = tally_contract::config::parse_bytes(&self.spool_max_bytes) {
            problems.push("report.spool_max_bytes", e);
        }
        if let Some(url) = &self.aggregator {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => problems.push(
                    "report.aggregator",
                    format!("scheme `{}` is not http or https", u.scheme()),
                ),
                Err(e) => problems.push("report.aggregator", format!("not a URL: {e}")),
            }
        }
        if let Some(node) = &self.node
            && (node.is_empty() || node.len() > wire::MAX_NAME || node.contains(char::is_control))
        {
            problems.push("report.node", "must be 1..=256 printable characters");
        }
        if self.cluster.is_empty()
            || self.cluster.len() > wire::MAX_NAME
            || self.cluster.contains(char::is_control)
        {
            problems.push("report.cluster", "must be 1..=256 printable characters");
        }
        if let Some(file) = &self.ca_file
            && let Err(e) = read_ca(file)
        {
            problems.push("report.ca_file", e);
        }
        if let Some(file) = &self.token_file {
            if self.aggregator.is_none() {
                problems.push("report.token_file", "set, but `report.aggregator` is not");
            }
            if let Err(e) = tally_contract::token::read_token(file) {
                problems.push("report.token_file", e);
            }
        }
    }
}

/// Reads a PEM CA certificate for the aggregator's TLS.
pub fn read_ca(file: &std::path::Path) -> Result<reqwest::Certificate, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    reqwest::Certificate::from_pem(&pem)
        .map_err(|e| format!("{}: not a PEM certificate: {e}", file.display()))
}

/// An HTTP client builder with `timeout` that also trusts `ca_file`.
pub fn client_builder(
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder().timeout(timeout);
    Ok(match ca {
        Some(file) => builder.add_root_certificate(read_ca(file)?),
        None => builder,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_and_problems() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.report.interval, Duration::from_secs(10));
        assert!(c.report.aggregator.is_none());
        assert_eq!(c.report.cluster, "default");

        let p = Config::parse(
            "[report]\naggregator = \"ftp://x\"\ninterval = \"1ms\"\ncluster = \"\"\nspool_max_bytes = \"lots\"\nca_file = \"/nonexistent/ca.pem\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        let keys: Vec<_> = p.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "report.interval",
                "report.spool_max_bytes",
                "report.aggregator",
                "report.cluster",
                "report.ca_file"
            ]
        );
    }
}
