//! `[[budget]]`: what each tenant may spend per calendar period (priced
//! by [`crate::budgets`]).

use serde::Deserialize;
use tally_contract::{config::Problems, tenant::check_tenant_name};
use time::{Duration, OffsetDateTime, Time};

use crate::time::{DAY_MS, month_of};

/// A calendar period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            "month" => Some(Self::Month),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }

    /// The period holding `now_ms`: `(start, end)` in Unix ms, end
    /// exclusive.
    pub(crate) fn bounds(self, now_ms: i64) -> (i64, i64) {
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let midnight = now.replace_time(Time::MIDNIGHT);
        let (start, end) = match self {
            Self::Day => (midnight, midnight + Duration::days(1)),
            Self::Week => {
                let monday =
                    midnight - Duration::days(i64::from(now.weekday().number_days_from_monday()));
                (monday, monday + Duration::weeks(1))
            }
            Self::Month => {
                let first = month_of(now_ms);
                return (first, month_of(first + 32 * DAY_MS));
            }
        };
        let ms = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
        (ms(start), ms(end))
    }
}

/// What a budget limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Limit {
    /// Cost in the `[prices]` currency.
    Amount(f64),
    /// Slice-weighted GPU-hours.
    GpuHours(f64),
}

/// One `[[budget]]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Budget {
    pub tenant: String,
    pub period: Period,
    pub limit: Limit,
}

/// `[[budget]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetEntry {
    tenant: String,
    period: String,
    amount: Option<f64>,
    gpu_hours: Option<f64>,
}

/// Reads every `[[budget]]`, recording each problem.
pub(crate) fn budget_section(table: &mut toml::Table, problems: &mut Problems) -> Vec<Budget> {
    let mut out: Vec<Budget> = Vec::new();
    // Where each kept budget was written, to name it in a duplicate's error.
    let mut written_at: Vec<usize> = Vec::new();
    let items = match table.remove("budget") {
        None => return out,
        Some(toml::Value::Array(items)) => items,
        Some(_) => {
            problems.push("budget", "must be an array of tables ([[budget]])");
            return out;
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let key = format!("budget[{i}]");
        let e = match BudgetEntry::deserialize(item) {
            Ok(e) => e,
            Err(e) => {
                problems.push(key, e.message().to_string());
                continue;
            }
        };
        let mut ok = true;
        if let Err(why) = check_tenant_name(&e.tenant) {
            problems.push(format!("{key}.tenant"), why);
            ok = false;
        }
        let period = Period::parse(&e.period);
        if period.is_none() {
            problems.push(
                format!("{key}.period"),
                format!("`{}` is not a period; use day, week or month", e.period),
            );
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let limit = match (e.amount, e.gpu_hours) {
            (Some(a), None) if positive(a) => Some(Limit::Amount(a)),
            (None, Some(h)) if positive(h) => Some(Limit::GpuHours(h)),
            (Some(_), None) => {
                problems.push(format!("{key}.amount"), "must be above 0");
                None
            }
            (None, Some(_)) => {
                problems.push(format!("{key}.gpu_hours"), "must be above 0");
                None
            }
            (Some(_), Some(_)) => {
                problems.push(
                    key.clone(),
                    "give amount or gpu_hours, not both (two budgets for two limits)",
                );
                None
            }
            (None, None) => {
                problems.push(key.clone(), "needs amount (currency) or gpu_hours");
                None
            }
        };
        if let (true, Some(period), Some(limit)) = (ok, period, limit) {
            let unit = |l: &Limit| std::mem::discriminant(l);
            if let Some(j) = out.iter().position(|b| {
                b.tenant == e.tenant && b.period == period && unit(&b.limit) == unit(&limit)
            }) {
                problems.push(
                    key,
                    format!(
                        "budget[{}] already limits this tenant's {}",
                        written_at[j],
                        period.as_str()
                    ),
                );
                continue;
            }
            written_at.push(i);
            out.push(Budget {
                tenant: e.tenant,
                period,
                limit,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AggregatorConfig;

    fn ms(rfc3339: &str) -> i64 {
        crate::time::parse_time(rfc3339).unwrap()
    }

    #[test]
    fn periods_are_utc_calendar_days_weeks_and_months() {
        let now = ms("2026-11-30T17:45:00Z"); // a Monday
        assert_eq!(
            Period::Day.bounds(now),
            (ms("2026-11-30T00:00:00Z"), ms("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(now),
            (ms("2026-11-30T00:00:00Z"), ms("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(ms("2026-12-06T23:59:59Z")),
            (ms("2026-11-30T00:00:00Z"), ms("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(now),
            (ms("2026-11-01T00:00:00Z"), ms("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(ms("2026-12-31T23:00:00Z")),
            (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(ms("2028-02-29T12:00:00Z")),
            (ms("2028-02-01T00:00:00Z"), ms("2028-03-01T00:00:00Z"))
        );
    }

    fn parse(budgets: &str) -> Result<AggregatorConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("agents");
        std::fs::write(&tokens, "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let text = format!(
            "[[auth.token]]\ntoken_file = \"{}\"\nrole = \"agent\"\n{budgets}",
            tokens.display()
        );
        AggregatorConfig::parse(&text, Path::new("a.toml")).map_err(|p| p.to_string())
    }

    #[test]
    fn the_issue_example_parses_and_every_mistake_is_named() {
        let c = parse(
            "[[budget]]\ntenant = \"acme\"\nperiod = \"month\"\namount = 12000.0\n\
             [[budget]]\ntenant = \"acme\"\nperiod = \"month\"\ngpu_hours = 5000\n",
        )
        .unwrap();
        assert_eq!(
            c.budgets,
            vec![
                Budget {
                    tenant: "acme".into(),
                    period: Period::Month,
                    limit: Limit::Amount(12000.0),
                },
                Budget {
                    tenant: "acme".into(),
                    period: Period::Month,
                    limit: Limit::GpuHours(5000.0),
                },
            ]
        );
        let e = parse(
            "[[budget]]\ntenant = \"_acme\"\nperiod = \"fortnight\"\namount = 1.0\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"day\"\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"day\"\namount = 1.0\ngpu_hours = 1.0\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"week\"\namount = -5.0\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"week\"\namount = 5.0\ncolour = 1\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"week\"\namount = 5.0\n\
             [[budget]]\ntenant = \"beta\"\nperiod = \"week\"\namount = 6.0\n",
        )
        .unwrap_err();
        for want in [
            "budget[0].tenant",
            "`fortnight` is not a period",
            "budget[1]`: needs amount (currency) or gpu_hours",
            "budget[2]`: give amount or gpu_hours, not both",
            "budget[3].amount`: must be above 0",
            "budget[4]`: unknown field `colour`",
            "budget[6]`: budget[5] already limits this tenant's week",
        ] {
            assert!(e.contains(want), "{want:?} missing from:\n{e}");
        }
    }
}
