//! Tenant budgets (`[[budget]]`, read by [`crate::config`]): how much of
//! each is spent, and where the period will end at the current pace. The
//! aggregator's background refresh prices the period so far from the
//! ledger ([`crate::chargeback`]); `/metrics` exports the result and the
//! scheduler extender refuses pods of a tenant over budget
//! (`[scheduler] enforce_budgets`).

use crate::{
    chargeback::{Chargeback, GroupBy},
    config::{Budget, Limit, Period},
};

/// Where one budget stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BudgetStatus {
    pub tenant: String,
    pub period: Period,
    /// The currency code, or `gpu_hours`.
    pub unit: String,
    pub limit: f64,
    /// Spent since the period started.
    pub used: f64,
    /// Spent by the period's end at the pace so far (linear).
    pub projected: f64,
}

impl BudgetStatus {
    /// The part of the budget spent, capped at 1 (all of it): a ratio
    /// stays within 0..1; `used` and `limit` tell how far over.
    pub(crate) fn used_ratio(&self) -> f64 {
        (self.used / self.limit).clamp(0.0, 1.0)
    }

    pub(crate) fn is_over(&self) -> bool {
        self.used >= self.limit
    }

    /// Why a pod of this tenant is refused, for the extender's answer.
    pub(crate) fn refusal(&self) -> String {
        format!(
            "tally: tenant {} is over its {} budget ({:.2} of {} {})",
            self.tenant,
            self.period.as_str(),
            self.used,
            self.limit,
            self.unit
        )
    }
}

/// The statuses of `budgets` of one `period`, from that period's
/// chargeback so far (grouped by tenant), at `now_ms` within `bounds`.
pub(crate) fn statuses(
    budgets: &[Budget],
    period: Period,
    spent: &Chargeback,
    currency: &str,
    bounds: (i64, i64),
    now_ms: i64,
) -> Vec<BudgetStatus> {
    let (start, end) = bounds;
    let elapsed = (now_ms - start).max(1) as f64;
    let pace = (end - start) as f64 / elapsed;
    budgets
        .iter()
        .filter(|b| b.period == period)
        .map(|b| {
            let line = spent.lines.iter().find(|l| l.tenant == b.tenant);
            let (unit, limit, used) = match b.limit {
                Limit::Amount(a) => (
                    currency.to_owned(),
                    a,
                    line.map_or(0.0, |l| minor_to_amount(l.cost_minor, spent.decimals)),
                ),
                Limit::GpuHours(h) => {
                    ("gpu_hours".to_owned(), h, line.map_or(0.0, |l| l.gpu_hours))
                }
            };
            BudgetStatus {
                tenant: b.tenant.clone(),
                period,
                unit,
                limit,
                used,
                projected: used * pace,
            }
        })
        .collect()
}

/// Minor units (cents) back to an amount of the currency.
fn minor_to_amount(minor: i64, decimals: u32) -> f64 {
    minor as f64 / 10f64.powi(decimals as i32)
}

/// The group a budget's chargeback is computed by.
pub(crate) const GROUP_BY: GroupBy = GroupBy::Tenant;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        crate::time::parse_time(rfc3339).unwrap()
    }

    #[test]
    fn spend_is_projected_to_the_period_end_at_the_pace_so_far() {
        let budgets = vec![
            Budget {
                tenant: "acme".into(),
                period: Period::Day,
                limit: Limit::Amount(100.0),
            },
            Budget {
                tenant: "acme".into(),
                period: Period::Day,
                limit: Limit::GpuHours(10.0),
            },
            Budget {
                tenant: "idle".into(),
                period: Period::Day,
                limit: Limit::Amount(5.0),
            },
            Budget {
                tenant: "acme".into(),
                period: Period::Month,
                limit: Limit::Amount(1.0),
            },
        ];
        // Six hours of an H100 at 2.50 an hour.
        let prices = crate::config::Prices {
            gpu_hour: [("default".to_owned(), 2.5)].into(),
            ..Default::default()
        };
        let gpu = [crate::ledger::chargeback::GpuGroup {
            tenant: "acme".into(),
            node: "n1".into(),
            cluster: "default".into(),
            workload: String::new(),
            model: "H100".into(),
            slice_fraction: 1.0,
            allocated_us: 6 * 3_600_000_000,
            used_us: 0,
            energy_mj: 0,
            memory_byte_seconds: 0.0,
            idle_us: 0,
        }];
        let spent = crate::chargeback::compute(
            &prices,
            &gpu,
            &[],
            None,
            GROUP_BY,
            crate::chargeback::Basis::Allocated,
            String::new(),
            String::new(),
        );
        let (cost, hours) = (15.0, 6.0);
        let bounds = Period::Day.bounds(ms("2026-11-30T06:00:00Z"));
        let s = statuses(
            &budgets,
            Period::Day,
            &spent,
            "USD",
            bounds,
            ms("2026-11-30T06:00:00Z"),
        );
        assert_eq!(s.len(), 3, "only the day's budgets: {s:?}");
        assert_eq!((s[0].unit.as_str(), s[0].used), ("USD", cost));
        assert!(
            (s[0].projected - cost * 4.0).abs() < 1e-9,
            "a quarter of the day gone"
        );
        assert_eq!((s[1].unit.as_str(), s[1].used), ("gpu_hours", hours));
        assert_eq!(s[1].used_ratio(), hours / 10.0);
        assert_eq!(
            (s[2].used, s[2].is_over()),
            (0.0, false),
            "no usage, no spend"
        );
        assert!(
            s[0].refusal()
                .contains("tenant acme is over its day budget")
        );
    }
}
