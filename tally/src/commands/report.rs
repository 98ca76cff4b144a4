//! `tally report`: a chargeback from an aggregator, as a table, JSON,
//! CSV or FOCUS.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{ArgGroup, Args, ValueEnum};
use tally_agent::report::client_builder;
use tally_aggregator::chargeback::Chargeback;
use tally_contract::{config::EX_USAGE, token::read_token};

use crate::runtime;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("period").required(true).args(["from", "last", "month"])))]
pub(crate) struct ReportArgs {
    /// Base URL of the aggregator (`http://tally-aggregator:9478`).
    #[arg(long, env = "TALLY_AGGREGATOR")]
    pub(crate) aggregator: String,
    /// Start of the period: RFC 3339 (`2026-11-01T00:00:00Z`) or Unix seconds.
    #[arg(long, requires = "to")]
    pub(crate) from: Option<String>,
    /// End of the period (exclusive), same forms.
    #[arg(long, requires = "from", conflicts_with_all = ["last", "month"])]
    pub(crate) to: Option<String>,
    /// The period that ends now (`30d`, `12h`, `1week`).
    #[arg(long, value_parser = parse_last)]
    pub(crate) last: Option<Duration>,
    /// A calendar month in UTC (`2026-11`).
    #[arg(long, value_parser = parse_month)]
    pub(crate) month: Option<Month>,
    /// How lines are grouped.
    #[arg(long, value_enum, default_value_t = GroupBy::Tenant)]
    pub(crate) group_by: GroupBy,
    /// What is printed.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub(crate) format: Format,
    /// What GPU time is charged.
    #[arg(long, value_enum, default_value_t = Basis::Allocated)]
    pub(crate) basis: Basis,
    /// Only this tenant's lines.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Only this cluster's usage (`[report] cluster` of its agents).
    #[arg(long)]
    pub(crate) cluster: Option<String>,
    /// File holding a reader token (admin or tenant).
    #[arg(long, env = "TALLY_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an `https://` aggregator (a private CA).
    #[arg(long, env = "TALLY_CA_FILE")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Give up on the aggregator after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// A plain text table.
    Table,
    /// The aggregator's JSON answer.
    Json,
    /// One row per line.
    Csv,
    /// FinOps FOCUS 1.2 CSV, one row per priced item.
    Focus,
}

/// `--group-by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum GroupBy {
    /// One line per tenant.
    Tenant,
    /// Per tenant and GPU model.
    // Aliases: the spellings the aggregator took when this was free text.
    #[value(name = "tenant,gpu_model", aliases = ["tenant,model", "tenant, gpu_model", "tenant, model"])]
    TenantGpuModel,
    /// Per tenant and node.
    #[value(name = "tenant,node", alias = "tenant, node")]
    TenantNode,
    /// Per tenant and workload (job, pod); a tenant's workload lines sum
    /// to its tenant line.
    #[value(name = "tenant,workload", alias = "tenant, workload")]
    TenantWorkload,
    /// Per cluster and tenant.
    #[value(name = "cluster,tenant", alias = "cluster, tenant")]
    ClusterTenant,
    /// Per cluster, tenant and workload.
    #[value(name = "cluster,tenant,workload", alias = "cluster, tenant, workload")]
    ClusterTenantWorkload,
}

/// `--basis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Basis {
    /// Time a tenant held a device.
    Allocated,
    /// SM-weighted time; the unused remainder goes to `_idle`.
    Used,
}

/// The wire name of a value enum: what `--help` lists.
fn wire(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_owned()
}

/// A calendar month, `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Month {
    year: u32,
    month: u32,
}

fn parse_last(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 30d, 12h)"))?;
    if d.is_zero() {
        return Err("the period must be longer than zero".into());
    }
    Ok(d)
}

fn parse_month(s: &str) -> Result<Month, String> {
    let bad = || format!("`{s}` is not a month such as 2026-11");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let year: u32 = y.parse().map_err(|_| bad())?;
    let month: u32 = m.parse().map_err(|_| bad())?;
    if !(1970..=9998).contains(&year) || !(1..=12).contains(&month) {
        return Err(bad());
    }
    Ok(Month { year, month })
}

impl Month {
    /// `[first day 00:00Z, first day of the next month 00:00Z)`, RFC 3339.
    fn bounds(self) -> (String, String) {
        let (ny, nm) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        (
            format!("{:04}-{:02}-01T00:00:00Z", self.year, self.month),
            format!("{ny:04}-{nm:02}-01T00:00:00Z"),
        )
    }
}

/// The `from` and `to` sent to the aggregator; clap has already made sure
/// exactly one of `--from/--to`, `--last`, `--month` was given.
fn period(args: &ReportArgs, now: SystemTime) -> (String, String) {
    if let Some(m) = args.month {
        return m.bounds();
    }
    if let Some(d) = args.last {
        let to = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        return (to.saturating_sub(d.as_secs()).to_string(), to.to_string());
    }
    (
        args.from.clone().unwrap_or_default(),
        args.to.clone().unwrap_or_default(),
    )
}

/// `tally report`.
pub(crate) fn run(args: ReportArgs) -> ExitCode {
    let token = match &args.token_file {
        None => None,
        Some(f) => match read_token(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("--token-file: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    let client = match client_builder(args.timeout, args.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("--ca-file: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let wire_format = match args.format {
        Format::Table => "json".to_owned(),
        f => wire(f),
    };
    let url = format!(
        "{}/api/v1/chargeback",
        args.aggregator.trim_end_matches('/')
    );
    let (from, to) = period(&args, SystemTime::now());
    let mut query = vec![
        ("from", from),
        ("to", to),
        ("group_by", wire(args.group_by)),
        ("basis", wire(args.basis)),
        ("format", wire_format),
    ];
    if let Some(t) = &args.tenant {
        query.push(("tenant", t.clone()));
    }
    if let Some(c) = &args.cluster {
        query.push(("cluster", c.clone()));
    }
    let timeout = args.timeout;
    let Some(result) = runtime::block_on(async {
        let client = client.build().map_err(|e| format!("HTTP client: {e}"))?;
        let mut req = client.get(&url).query(&query);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                format!(
                    "{url}: no answer within {} (--timeout)",
                    humantime::format_duration(timeout)
                )
            } else {
                format!("{url}: {e}")
            }
        };
        let resp = req.send().await.map_err(failed)?;
        let status = resp.status();
        let body = resp.text().await.map_err(failed)?;
        if !status.is_success() {
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            return Err(format!("{url}: {status}: {reason}"));
        }
        Ok(body)
    }) else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(body) if args.format == Format::Table => {
            match serde_json::from_str::<Chargeback>(&body) {
                Ok(c) => {
                    print!("{}", c.to_table());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("the aggregator's answer is not a chargeback: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Ok(body) => {
            print!("{body}");
            if !body.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally report: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        report: ReportArgs,
    }

    fn parse(args: &[&str]) -> Result<ReportArgs, clap::Error> {
        Cli::try_parse_from(
            ["report", "--aggregator", "http://a"]
                .iter()
                .chain(args)
                .copied(),
        )
        .map(|c| c.report)
    }

    #[test]
    fn months_are_calendar_months_in_utc() {
        let m = |s| parse_month(s).map(Month::bounds);
        assert_eq!(
            m("2026-11").unwrap(),
            ("2026-11-01T00:00:00Z".into(), "2026-12-01T00:00:00Z".into())
        );
        assert_eq!(
            m("2026-12").unwrap(),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        for bad in [
            "2026-13", "2026-00", "2026-1", "26-11", "2026/11", "november", "",
        ] {
            assert!(m(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn last_ends_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = parse(&["--last", "30d"]).unwrap();
        assert_eq!(
            period(&a, now),
            ("1797408000".to_owned(), "1800000000".to_owned())
        );
        let a = parse(&["--last", "12h"]).unwrap();
        assert_eq!(period(&a, now).0, "1799956800");
        assert!(parse(&["--last", "0s"]).is_err());
        assert!(parse(&["--last", "30 parsecs"]).is_err());
    }

    #[test]
    fn exactly_one_period_form() {
        let a = parse(&["--from", "0", "--to", "10"]).unwrap();
        assert_eq!(
            period(&a, SystemTime::now()),
            ("0".to_owned(), "10".to_owned())
        );
        let a = parse(&["--month", "2026-02"]).unwrap();
        assert_eq!(period(&a, SystemTime::now()).1, "2026-03-01T00:00:00Z");
        for bad in [
            &[][..],
            &["--from", "0"],
            &["--to", "10"],
            &["--last", "1d", "--month", "2026-11"],
            &["--last", "1d", "--from", "0", "--to", "10"],
            &["--month", "2026-11", "--to", "10"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn enums_are_checked_here_and_sent_by_their_wire_names() {
        let a = parse(&["--last", "1d"]).unwrap();
        assert_eq!(
            (a.format, a.group_by, a.basis, a.timeout),
            (
                Format::Table,
                GroupBy::Tenant,
                Basis::Allocated,
                Duration::from_secs(30)
            )
        );
        let a = parse(&[
            "--last",
            "1d",
            "--group-by",
            "tenant,model",
            "--basis",
            "used",
            "--format",
            "focus",
        ])
        .unwrap();
        assert_eq!(wire(a.group_by), "tenant,gpu_model");
        assert_eq!(wire(a.basis), "used");
        assert_eq!(wire(a.format), "focus");
        assert_eq!(wire(GroupBy::TenantNode), "tenant,node");
        assert_eq!(wire(GroupBy::TenantWorkload), "tenant,workload");
        assert_eq!(wire(GroupBy::ClusterTenant), "cluster,tenant");
        assert_eq!(
            wire(GroupBy::ClusterTenantWorkload),
            "cluster,tenant,workload"
        );
        for bad in [
            &["--format", "jsno"][..],
            &["--group-by", "node"],
            &["--basis", "idle"],
            &["--timeout", "soon"],
        ] {
            let args: Vec<&str> = ["--last", "1d"].iter().chain(bad).copied().collect();
            assert!(parse(&args).is_err(), "{bad:?}");
        }
    }
}
