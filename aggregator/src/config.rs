//! The aggregator's config file, checked whole like the agent's:
//!
//! ```toml
//! [aggregator]
//! listen = "0.0.0.0:9478"        # --listen overrides
//! max_body = "8MiB"              # larger report bodies get 413
//! metrics_refresh = "10s"        # how often /metrics re-reads ledger totals
//!
//! [ledger]
//! url = "sqlite:///var/lib/tally/ledger.db"   # or postgres://user@host/db
//! max_connections = 8             # per pool; on PostgreSQL, ingest has a pool of its own this size
//! raw_retention = "35d"          # raw usage rows and report claims older than this are removed
//! rollup_retention = "400d"      # hourly rollups likewise; unset: kept forever
//! audit_retention = "400d"       # audit records likewise, by their time; unset: kept forever
//!
//! [prices]
//! currency = "USD"
//! decimals = 2                   # minor unit of the currency (JPY: 0)
//! gpu_hour = { "NVIDIA H100 80GB HBM3" = 2.49, default = 1.00 }
//! network_gib = 0.01             # ingress + egress
//! energy_kwh = 0.12               # or by local time of day (config/energy.rs):
//!                                # { default = 0.12, "22:00-06:00" = 0.07 }
//! timezone = "UTC"               # IANA zone of energy_kwh's windows
//! pcie_gib = 0.0
//! billing_account = "tally"      # FOCUS BillingAccountId
//! billing_account_name = "Tally GPU cluster"
//! provider = "Tally"             # FOCUS ProviderName
//! publisher = "Tally"            # FOCUS PublisherName
//! invoice_issuer = "Tally"       # FOCUS InvoiceIssuerName
//!
//! [auth]                         # token files are reread on SIGHUP and on change
//! rate_limit = "50/s"            # per token (N/s, N/m, N/h); unset: no limit
//! burst = 100                    # default: the rate's count
//! [[auth.token]]
//! token_file = "/etc/tally/tokens/agents"
//! role = "agent"                 # agent | admin | tenant
//! [[auth.token]]
//! token_file = "/etc/tally/tokens/acme"
//! role = "tenant"
//! tenant = "acme"
//!
//! [audit]
//! node_keys = "/etc/tally/audit-keys"   # <node>.key per node: each a copy of
//!                                # the node's <state_dir>/audit.key
//!
//! [scheduler]                    # GET /api/v1/cluster, /scheduler/* (issue 6)
//! policy = "binpack"             # binpack | spread
//! allow_unauthenticated = true   # kube-scheduler sends no bearer token
//! enforce_budgets = false        # filter refuses pods of a tenant over budget
//! tenant_label = "tally.dev/tenant"  # a pod's tenant: this label, else its namespace
//!
//! [[budget]]                     # see config/budget.rs
//! tenant = "acme"
//! period = "month"               # day | week | month (UTC)
//! amount = 12000.0               # or gpu_hours = 5000
//! ```

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tally_contract::config::{Problems, load_with, parse_bytes, parse_with, read_table, section};

mod auth;
mod budget;
mod energy;

use auth::{AuditSection, auth_section};
pub(crate) use auth::{RateLimit, Role, TokenDigest, TokenSpec, reread, token_digest};
pub(crate) use budget::{Budget, Limit, Period};
pub(crate) use energy::TimeOfUse;

use crate::audit_keys::NodeKeys;

/// Default ledger: one SQLite file.
pub(crate) const DEFAULT_LEDGER_URL: &str = "sqlite:///var/lib/tally/ledger.db";
/// Top-level keys of the aggregator's config file.
pub const KNOWN: &[&str] = &[
    "aggregator",
    "ledger",
    "prices",
    "auth",
    "audit",
    "scheduler",
    "budget",
];

/// The aggregator's whole configuration.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    pub server: ServerSection,
    pub(crate) ledger: LedgerSection,
    pub(crate) prices: Prices,
    pub(crate) tokens: Vec<TokenSpec>,
    /// `[auth] rate_limit` and `burst`; `None`: no limit.
    pub(crate) rate_limit: Option<RateLimit>,
    /// The keys read from `[audit] node_keys`.
    pub(crate) node_keys: NodeKeys,
    pub(crate) scheduler: SchedulerSection,
    /// `[[budget]]`: per-tenant spending limits per period.
    pub(crate) budgets: Vec<Budget>,
}

/// How the scheduler extender ranks nodes that fit (`[scheduler] policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Fullest node first: keeps whole nodes free for large jobs.
    Binpack,
    /// Emptiest node first: spreads load and failure domains.
    Spread,
}

impl Policy {
    /// `binpack` or `spread`.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "binpack" => Some(Self::Binpack),
            "spread" => Some(Self::Spread),
            _ => None,
        }
    }
}

/// `[scheduler]`: the Kubernetes scheduler extender.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SchedulerSection {
    /// `binpack` (default): fill the fullest node that fits, keeping whole
    /// nodes free for large jobs; `spread`: the emptiest node first.
    pub policy: String,
    /// Whether `/scheduler/filter` and `/scheduler/prioritize` answer
    /// requests without a bearer token (kube-scheduler's extender client
    /// has no token setting). A request that does carry a token must carry
    /// an admin token either way. Default true.
    pub allow_unauthenticated: bool,
    /// Whether `/scheduler/filter` refuses every node to a pod whose
    /// tenant is over a `[[budget]]` (the reason in `failedNodes`).
    pub enforce_budgets: bool,
    /// The pod label naming its tenant; a pod without it belongs to the
    /// tenant named like its namespace. Default `tally.dev/tenant`.
    pub tenant_label: String,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            policy: "binpack".into(),
            allow_unauthenticated: true,
            enforce_budgets: false,
            tenant_label: "tally.dev/tenant".into(),
        }
    }
}

/// `[aggregator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Default `0.0.0.0:9478`.
    pub listen: SocketAddr,
    /// Largest accepted request body. Default `8MiB`.
    pub max_body: String,
    /// How often the `/metrics` totals are re-read from the ledger.
    #[serde(with = "humantime_serde")]
    pub(crate) metrics_refresh: Duration,
    /// PEM certificate chain: with `tls_key`, the aggregator speaks HTTPS
    /// only (agents set `[report] ca_file` for a private CA).
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub(crate) tls_key: Option<PathBuf>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9478)),
            max_body: "8MiB".into(),
            metrics_refresh: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ServerSection {
    pub fn max_body_bytes(&self) -> u64 {
        parse_bytes(&self.max_body).unwrap_or(8 << 20)
    }
}

/// `[ledger]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LedgerSection {
    /// `sqlite://PATH` or `postgres://…`.
    pub url: String,
    /// Connections of the ledger's pool; on PostgreSQL ingest has a pool
    /// of its own of this size too (its inserts bind arrays, which sqlx's
    /// `Any` pool cannot).
    pub max_connections: u32,
    /// Raw usage rows older than this are removed; chargeback reaching
    /// further back is read from the hourly rollups.
    #[serde(with = "humantime_serde")]
    pub raw_retention: Duration,
    /// Rollup rows older than this are removed; `None`: kept forever.
    #[serde(with = "humantime_serde")]
    pub rollup_retention: Option<Duration>,
    /// Audit records older than this (by their own time) are removed;
    /// `None`: kept forever.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Option<Duration>,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            url: DEFAULT_LEDGER_URL.into(),
            max_connections: 8,
            raw_retention: DEFAULT_RAW_RETENTION,
            rollup_retention: None,
            audit_retention: None,
        }
    }
}

/// `[ledger] raw_retention` by default: a month's bill can still be
/// re-read from raw rows for a few days after the month ends.
pub(crate) const DEFAULT_RAW_RETENTION: Duration = Duration::from_secs(35 * 86_400);

/// `[prices]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Prices {
    /// ISO 4217 code.
    pub currency: String,
    /// Digits of the currency's minor unit: costs are rounded to it.
    pub decimals: u32,
    /// Price of one GPU-hour by model name; `default` for other models.
    /// A MIG instance costs its slice fraction of its GPU's price.
    pub gpu_hour: BTreeMap<String, f64>,
    /// Per GiB of network traffic (ingress + egress).
    pub network_gib: f64,
    /// Per kWh of GPU energy; with [`Self::energy_tou`], the `default`
    /// price outside its windows.
    pub energy_kwh: f64,
    /// IANA time zone of `energy_kwh`'s windows. Default `UTC`.
    pub timezone: String,
    /// `energy_kwh` written as a table of prices by local time of day.
    #[serde(skip)]
    pub energy_tou: Option<TimeOfUse>,
    /// Per GiB of host↔device copies.
    pub pcie_gib: f64,
    /// FOCUS `BillingAccountId`: the account the usage is billed to.
    pub billing_account: String,
    /// FOCUS `BillingAccountName`.
    pub billing_account_name: String,
    /// FOCUS `ProviderName`: who makes the GPUs available.
    pub provider: String,
    /// FOCUS `PublisherName`: who produces the service.
    pub publisher: String,
    /// FOCUS `InvoiceIssuerName`: who invoices the tenants.
    pub invoice_issuer: String,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            decimals: 2,
            gpu_hour: BTreeMap::new(),
            network_gib: 0.0,
            energy_kwh: 0.0,
            timezone: "UTC".into(),
            energy_tou: None,
            pcie_gib: 0.0,
            billing_account: "tally".into(),
            billing_account_name: "Tally GPU cluster".into(),
            provider: "Tally".into(),
            publisher: "Tally".into(),
            invoice_issuer: "Tally".into(),
        }
    }
}

impl Prices {
    /// GPU-hour price of `model` (its own, else `default`, else 0).
    pub(crate) fn gpu_hour(&self, model: &str) -> f64 {
        self.gpu_hour
            .get(model)
            .or_else(|| self.gpu_hour.get("default"))
            .copied()
            .unwrap_or(0.0)
    }

    /// Price of a kWh drawn by reports whose interval ends at `ms`: with a
    /// time-of-use table, the price in force when that UTC hour began
    /// (the ledger's hourly rollups keep no finer time).
    pub(crate) fn energy_kwh_at(&self, ms: i64) -> f64 {
        let hour = ms - ms.rem_euclid(3_600_000);
        self.energy_tou
            .as_ref()
            .and_then(|t| t.price_at(hour))
            .unwrap_or(self.energy_kwh)
    }
}

impl AggregatorConfig {
    /// Loads and validates `file`, reporting every problem at once.
    pub fn load(file: &Path) -> Result<Self, Problems> {
        load_with(file, KNOWN, Self::from_table)
    }

    /// Parses TOML text (tests).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, Problems> {
        parse_with(text, origin, KNOWN, Self::from_table)
    }

    fn from_table(table: &mut toml::Table, problems: &mut Problems) -> Self {
        let server: ServerSection = section(table, "aggregator", problems);
        if let Err(e) = parse_bytes(&server.max_body) {
            problems.push("aggregator.max_body", e);
        } else if server.max_body_bytes() < 1024 {
            problems.push("aggregator.max_body", "must be at least 1KiB");
        }
        if server.metrics_refresh < Duration::from_millis(100) {
            problems.push("aggregator.metrics_refresh", "must be at least 100ms");
        }
        match (&server.tls_cert, &server.tls_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::http::tls_acceptor(cert, key) {
                    problems.push("aggregator.tls_cert", e);
                }
            }
            (Some(_), None) => problems.push("aggregator.tls_key", "tls_cert needs tls_key"),
            (None, Some(_)) => problems.push("aggregator.tls_cert", "tls_key needs tls_cert"),
        }
        let ledger: LedgerSection = section(table, "ledger", problems);
        if !(ledger.url.starts_with("sqlite:")
            || ledger.url.starts_with("postgres://")
            || ledger.url.starts_with("postgresql://"))
        {
            problems.push(
                "ledger.url",
                "must start with `sqlite:` (e.g. sqlite:///var/lib/tally/ledger.db) or `postgres://`",
            );
        }
        if ledger.max_connections == 0 {
            problems.push("ledger.max_connections", "must be at least 1");
        }
        // Raw rows must outlive the partial hours chargeback reads from
        // them, rollups the raw rows they stand in for, and an audit
        // record the usage it explains.
        if ledger.raw_retention < Duration::from_secs(2 * 3600) {
            problems.push("ledger.raw_retention", "must be at least 2h");
        }
        for (key, retention) in [
            ("ledger.rollup_retention", ledger.rollup_retention),
            ("ledger.audit_retention", ledger.audit_retention),
        ] {
            if let Some(r) = retention
                && r < ledger.raw_retention
            {
                problems.push(
                    key,
                    format!(
                        "must not be shorter than raw_retention ({})",
                        humantime::format_duration(ledger.raw_retention)
                    ),
                );
            }
        }
        // A table of energy prices is read apart: serde's "a number or a
        // table" would lose the key of a bad window.
        let energy_table = table
            .get_mut("prices")
            .and_then(toml::Value::as_table_mut)
            .filter(|p| p.get("energy_kwh").is_some_and(toml::Value::is_table))
            .and_then(|p| p.remove("energy_kwh"));
        let mut prices: Prices = section(table, "prices", problems);
        check_prices(&prices, problems);
        // With a bad zone the windows are still checked (in UTC), so that
        // every problem is told at once.
        let zone = energy::zone(&prices.timezone).unwrap_or_else(|e| {
            problems.push("prices.timezone", e);
            jiff::tz::TimeZone::UTC
        });
        if let Some(t) = energy_table.as_ref().and_then(toml::Value::as_table)
            && let Some((default, tou)) = energy::time_of_use(t, zone, problems)
        {
            prices.energy_kwh = default;
            prices.energy_tou = Some(tou);
        }
        let (tokens, rate_limit) = auth_section(table, problems);
        let audit: AuditSection = section(table, "audit", problems);
        let node_keys = match &audit.node_keys {
            None => NodeKeys::default(),
            Some(dir) => NodeKeys::load(dir).unwrap_or_else(|errs| {
                for e in errs {
                    problems.push("audit.node_keys", e);
                }
                NodeKeys::default()
            }),
        };
        let scheduler: SchedulerSection = section(table, "scheduler", problems);
        if Policy::parse(&scheduler.policy).is_none() {
            problems.push(
                "scheduler.policy",
                format!(
                    "`{}` is not a policy; use binpack or spread",
                    scheduler.policy
                ),
            );
        }
        let budgets = budget::budget_section(table, problems);
        if scheduler.enforce_budgets && budgets.is_empty() {
            problems.push(
                "scheduler.enforce_budgets",
                "is true but no [[budget]] is configured: nothing would be enforced",
            );
        }
        Self {
            server,
            ledger,
            prices,
            tokens,
            rate_limit,
            node_keys,
            scheduler,
            budgets,
        }
    }
}

fn check_prices(p: &Prices, problems: &mut Problems) {
    if p.currency.len() != 3 || !p.currency.chars().all(|c| c.is_ascii_uppercase()) {
        problems.push(
            "prices.currency",
            "must be an ISO 4217 code such as \"USD\"",
        );
    }
    if p.decimals > 6 {
        problems.push("prices.decimals", "must be 0..=6");
    }
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    for (model, v) in &p.gpu_hour {
        if !ok(*v) {
            problems.push(
                format!("prices.gpu_hour.\"{model}\""),
                "must be a price ≥ 0",
            );
        }
    }
    for (key, v) in [
        ("prices.network_gib", p.network_gib),
        ("prices.energy_kwh", p.energy_kwh),
        ("prices.pcie_gib", p.pcie_gib),
    ] {
        if !ok(v) {
            problems.push(key, "must be a price ≥ 0");
        }
    }
    for (key, v) in [
        ("prices.billing_account", &p.billing_account),
        ("prices.billing_account_name", &p.billing_account_name),
        ("prices.provider", &p.provider),
        ("prices.publisher", &p.publisher),
        ("prices.invoice_issuer", &p.invoice_issuer),
    ] {
        // FOCUS requires each of them on every row.
        if v.trim().is_empty() {
            problems.push(key, "must not be empty");
        }
    }
}

/// Whether a parsed config file looks like an aggregator's rather than an
/// agent's (`tally config check` picks the checker by this).
pub fn looks_like_aggregator(file: &Path) -> bool {
    let Ok(table) = read_table(file) else {
        return false;
    };
    KNOWN.iter().any(|k| table.contains_key(*k))
        && !["agent", "tenant", "probes", "report"]
            .iter()
            .any(|k| table.contains_key(*k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_example_parses_and_all_problems_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::write(&agents, "# agents\nabcdefghijklmnopqrstuvwxyz\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let text = format!(
            r#"
            [prices]
            currency = "USD"
            gpu_hour = {{ "NVIDIA H100 80GB HBM3" = 2.49, default = 1.00 }}
            network_gib = 0.01
            energy_kwh = 0.12
            [[auth.token]]
            token_file = "{}"
            role = "agent"
            "#,
            agents.display()
        );
        let c = AggregatorConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(c.ledger.url, DEFAULT_LEDGER_URL);
        assert_eq!(c.prices.gpu_hour("NVIDIA H100 80GB HBM3"), 2.49);
        assert_eq!(c.prices.gpu_hour("Tesla T4"), 1.0);
        assert_eq!(c.tokens[0].role, Role::Agent);
        assert_eq!(c.server.listen.port(), 9478);

        let bad = format!(
            r#"
            colour = 1
            [ledger]
            url = "mysql://x"
            [prices]
            currency = "dollars"
            energy_kwh = -1
            [[auth.token]]
            token_file = "{}"
            role = "tenant"
            [[auth.token]]
            token_file = "{}"
            role = "root"
            [[auth.token]]
            token_file = "/nonexistent"
            role = "admin"
            "#,
            agents.display(),
            short.display()
        );
        let err = AggregatorConfig::parse(&bad, Path::new("a.toml")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "ledger.url",
                "prices.currency",
                "prices.energy_kwh",
                "auth.token[0].tenant",
                "auth.token[1].role",
                "auth.token[2].token_file",
                "colour"
            ],
            "{err}"
        );
    }

    #[test]
    fn energy_may_be_priced_by_local_time_of_day() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::write(&agents, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let with = |prices: &str| {
            format!(
                "[prices]\n{prices}\n[[auth.token]]\ntoken_file = \"{}\"\nrole = \"agent\"\n",
                agents.display()
            )
        };
        // The plain number: one price at every hour.
        let c = AggregatorConfig::parse(&with("energy_kwh = 0.12"), Path::new("a.toml")).unwrap();
        assert!(c.prices.energy_tou.is_none());
        assert_eq!(c.prices.timezone, "UTC");
        assert_eq!(c.prices.energy_kwh_at(1_800_000_000_000), 0.12);
        // The issue's table: 2026-11-30T21:30Z is 22:30 in Paris.
        let c = AggregatorConfig::parse(
            &with(
                "energy_kwh = { default = 0.12, \"22:00-06:00\" = 0.07 }\n\
                 timezone = \"Europe/Paris\"",
            ),
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.prices.energy_kwh, 0.12, "the default");
        let paris_2230 = 1_796_074_200_000;
        assert_eq!(c.prices.energy_kwh_at(paris_2230), 0.07);
        assert_eq!(c.prices.energy_kwh_at(paris_2230 - 3_600_000), 0.12);
        // Every problem at once, each under its key.
        let err = AggregatorConfig::parse(
            &with(
                "energy_kwh = { default = -1, \"22:00-06:00\" = 0.07, \"23:00-01:00\" = 0.05 }\n\
                 timezone = \"Europe/Pariss\"",
            ),
            Path::new("a.toml"),
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "prices.timezone",
                "prices.energy_kwh.\"23:00-01:00\"",
                "prices.energy_kwh.default"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("Europe/Pariss"), "{err}");
        let err = AggregatorConfig::parse(&with("energy_kwh = \"cheap\""), Path::new("a.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("prices"), "{err}");
    }

    #[test]
    fn retention_defaults_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::write(&agents, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let with = |ledger: &str| {
            format!(
                "[ledger]\n{ledger}\n[[auth.token]]\ntoken_file = \"{}\"\nrole = \"agent\"\n",
                agents.display()
            )
        };
        let c = AggregatorConfig::parse(&with(""), Path::new("a.toml")).unwrap();
        assert_eq!(c.ledger.raw_retention, Duration::from_secs(35 * 86_400));
        assert_eq!(c.ledger.rollup_retention, None);
        assert_eq!(c.ledger.audit_retention, None);
        let c = AggregatorConfig::parse(
            &with("raw_retention = \"7d\"\nrollup_retention = \"400d\"\naudit_retention = \"7d\""),
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.ledger.raw_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(
            c.ledger.rollup_retention,
            Some(Duration::from_secs(400 * 86_400))
        );
        assert_eq!(
            c.ledger.audit_retention,
            Some(Duration::from_secs(7 * 86_400))
        );
        for (text, key) in [
            ("raw_retention = \"1h\"", "ledger.raw_retention"),
            ("rollup_retention = \"30d\"", "ledger.rollup_retention"),
            ("audit_retention = \"30d\"", "ledger.audit_retention"),
            ("audit_retention = \"a year\"", "ledger"),
            ("raw_retention = \"soon\"", "ledger"),
        ] {
            let err = AggregatorConfig::parse(&with(text), Path::new("a.toml")).unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key.starts_with(key)),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn focus_billing_names_default_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::write(&agents, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let with = |prices: &str| {
            format!(
                "[prices]\n{prices}\n[[auth.token]]\ntoken_file = \"{}\"\nrole = \"agent\"\n",
                agents.display()
            )
        };
        let c = AggregatorConfig::parse(&with(""), Path::new("a.toml")).unwrap();
        assert_eq!(c.prices.billing_account, "tally");
        assert_eq!(c.prices.provider, "Tally");
        let c = AggregatorConfig::parse(
            &with("billing_account = \"acct-7\"\nbilling_account_name = \"Research\"\nprovider = \"Lab IT\"\npublisher = \"Lab IT\"\ninvoice_issuer = \"Finance\""),
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            [
                c.prices.billing_account.as_str(),
                &c.prices.billing_account_name,
                &c.prices.provider,
                &c.prices.publisher,
                &c.prices.invoice_issuer
            ],
            ["acct-7", "Research", "Lab IT", "Lab IT", "Finance"]
        );
        let err =
            AggregatorConfig::parse(&with("provider = \" \""), Path::new("a.toml")).unwrap_err();
        assert_eq!(err.problems[0].key, "prices.provider", "{err}");
        let err = AggregatorConfig::parse(&with("billing_acount = \"x\""), Path::new("a.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("billing_acount"), "{err}");
    }

    #[test]
    fn audit_node_keys_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::write(&agents, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::write(keys.join("n1.key"), "ab".repeat(32)).unwrap();
        let with = |audit: &str| {
            format!(
                "{audit}\n[[auth.token]]\ntoken_file = \"{}\"\nrole = \"agent\"\n",
                agents.display()
            )
        };
        let text = with(&format!("[audit]\nnode_keys = \"{}\"", keys.display()));
        let c = AggregatorConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(c.node_keys.len(), 1);
        assert_eq!(
            AggregatorConfig::parse(&with(""), Path::new("a.toml"))
                .unwrap()
                .node_keys
                .len(),
            0
        );
        std::fs::write(keys.join("n2.key"), "not a key").unwrap();
        let err = AggregatorConfig::parse(&text, Path::new("a.toml")).unwrap_err();
        assert_eq!(err.problems[0].key, "audit.node_keys", "{err}");
        assert!(err.to_string().contains("n2.key"), "{err}");
        let err = AggregatorConfig::parse(&with("[audit]\nnode_key = \"x\""), Path::new("a.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("node_key"), "{err}");
    }
}
