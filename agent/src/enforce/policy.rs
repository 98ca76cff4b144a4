//! When to act on a GPU quota breach: pure decisions from usage, limit,
//! the time and what this breach has already done.
//!
//! Nothing here reads the system, signals or spawns: [`Breaches::decide`]
//! says what to do and `actions` does it. The rules: a breach is acted on
//! once it has lasted `grace`; an alert or the start of a throttle happens
//! once per breach; a throttle follows the tenant's current processes while
//! it runs; terminate signals each process once per breach, newcomers
//! included; going back under the limit ends the breach, and is audited
//! when something was done about it.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use super::quota::Action;

/// GPU quotas that no cgroup controller covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuResource {
    Memory,
    Time,
}

impl GpuResource {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuResource::Memory => "gpu_memory",
            GpuResource::Time => "gpu_seconds_per_hour",
        }
    }
}

/// A process as the policy tells processes apart: `(pid, start time)`, so
/// that a reused pid is a different process.
pub(crate) type ProcessKey = (u32, u64);

/// One quota's state of the world at one sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observation<'a> {
    pub(crate) usage: f64,
    pub(crate) limit: f64,
    pub(crate) action: Action,
    pub(crate) grace: Duration,
    /// When the sample was taken (ms since the epoch).
    pub(crate) now_ms: u64,
    /// Whether a throttle runs for this quota now.
    pub(crate) throttling: bool,
    /// The tenant's GPU processes that can be acted on.
    pub(crate) processes: &'a [ProcessKey],
}

/// What to do about one quota after one sample.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Nothing: within the limit, within grace, or already acted.
    Nothing,
    /// Back under the limit while throttled: stop the throttle.
    EndThrottle,
    /// Back under the limit after an alert or terminate.
    Resolved,
    /// Alert, once per breach; `breach` is how long it has lasted.
    Alert { breach: Duration },
    /// Start throttling the tenant's processes (or alert when none can be
    /// frozen), once per breach.
    StartThrottle { breach: Duration },
    /// Keep throttling, aimed at the processes of this sample.
    Retarget,
    /// SIGTERM these processes (none of them signalled in this breach yet),
    /// SIGKILL after `kill_timeout`.
    Terminate { processes: Vec<ProcessKey> },
}

/// A breach in progress.
#[derive(Debug)]
struct Breach {
    since_ms: u64,
    acted: bool,
    /// Processes already handled by terminate (signalled or skipped).
    handled: BTreeSet<ProcessKey>,
}

/// The breaches in progress, per tenant and GPU resource.
#[derive(Debug, Default)]
pub(crate) struct Breaches(HashMap<(String, GpuResource), Breach>);

impl Breaches {
    /// Starts, continues or ends the breach of `tenant`'s `resource` quota
    /// and says what to do about it.
    pub(crate) fn decide(
        &mut self,
        tenant: &str,
        resource: GpuResource,
        o: &Observation<'_>,
    ) -> Decision {
        let key = (tenant.to_owned(), resource);
        if o.usage <= o.limit {
            return match self.0.remove(&key) {
                Some(_) if o.throttling => Decision::EndThrottle,
                Some(b) if b.acted => Decision::Resolved,
                _ => Decision::Nothing,
            };
        }
        let breach = self.0.entry(key).or_insert_with(|| Breach {
            since_ms: o.now_ms,
            acted: false,
            handled: BTreeSet::new(),
        });
        let lasted = Duration::from_millis(o.now_ms.saturating_sub(breach.since_ms));
        if lasted < o.grace {
            return Decision::Nothing;
        }
        match o.action {
            Action::Alert if !breach.acted => {
                breach.acted = true;
                Decision::Alert { breach: lasted }
            }
            Action::Throttle if o.throttling => Decision::Retarget,
            Action::Throttle if !breach.acted => {
                breach.acted = true;
                Decision::StartThrottle { breach: lasted }
            }
            Action::Terminate => {
                breach.acted = true;
                let processes: Vec<ProcessKey> = o
                    .processes
                    .iter()
                    .copied()
                    .filter(|p| breach.handled.insert(*p))
                    .collect();
                if processes.is_empty() {
                    Decision::Nothing
                } else {
                    Decision::Terminate { processes }
                }
            }
            Action::Alert | Action::Throttle => Decision::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    /// A tenant "a" with a 10-unit GPU memory quota.
    struct Case {
        breaches: Breaches,
        action: Action,
        throttling: bool,
        processes: Vec<ProcessKey>,
    }

    impl Case {
        fn new(action: Action) -> Case {
            Case {
                breaches: Breaches::default(),
                action,
                throttling: false,
                processes: vec![(10, 1)],
            }
        }

        fn at(&mut self, now_ms: u64, usage: f64) -> Decision {
            let d = self.breaches.decide(
                "a",
                GpuResource::Memory,
                &Observation {
                    usage,
                    limit: 10.0,
                    action: self.action,
                    grace: GRACE,
                    now_ms,
                    throttling: self.throttling,
                    processes: &self.processes,
                },
            );
            // The executor starts and stops throttles as decided.
            match d {
                Decision::StartThrottle { .. } => self.throttling = true,
                Decision::EndThrottle => self.throttling = false,
                _ => {}
            }
            d
        }
    }

    #[test]
    fn nothing_happens_within_the_limit() {
        let mut c = Case::new(Action::Terminate);
        assert_eq!(c.at(1_000, 10.0), Decision::Nothing, "at the limit");
        assert_eq!(c.at(9_000, 3.0), Decision::Nothing);
    }

    #[test]
    fn grace_is_waited_out_from_the_first_sample_over() {
        let mut c = Case::new(Action::Alert);
        assert_eq!(c.at(1_000, 50.0), Decision::Nothing);
        assert_eq!(c.at(2_999, 50.0), Decision::Nothing, "1.999 s < grace");
        assert_eq!(
            c.at(3_000, 50.0),
            Decision::Alert {
                breach: Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn zero_grace_acts_on_the_first_sample() {
        let mut b = Breaches::default();
        let o = Observation {
            usage: 11.0,
            limit: 10.0,
            action: Action::Alert,
            grace: Duration::ZERO,
            now_ms: 5,
            throttling: false,
            processes: &[],
        };
        assert_eq!(
            b.decide("a", GpuResource::Time, &o),
            Decision::Alert {
                breach: Duration::ZERO
            }
        );
    }

    #[test]
    fn alert_fires_once_per_breach_and_resolves() {
        let mut c = Case::new(Action::Alert);
        c.at(1_000, 50.0);
        assert!(matches!(c.at(3_000, 50.0), Decision::Alert { .. }));
        assert_eq!(c.at(4_000, 50.0), Decision::Nothing, "once per breach");
        assert_eq!(c.at(9_000, 50.0), Decision::Nothing, "once per breach");
        assert_eq!(c.at(10_000, 5.0), Decision::Resolved);
        assert_eq!(c.at(11_000, 5.0), Decision::Nothing, "resolved once");
        // A new breach waits out grace again and alerts again.
        assert_eq!(c.at(12_000, 50.0), Decision::Nothing);
        assert!(matches!(c.at(14_000, 50.0), Decision::Alert { .. }));
    }

    #[test]
    fn a_breach_shorter_than_grace_resolves_silently() {
        let mut c = Case::new(Action::Alert);
        c.at(1_000, 50.0);
        assert_eq!(c.at(2_000, 5.0), Decision::Nothing);
        // The next breach starts its own grace.
        assert_eq!(c.at(3_500, 50.0), Decision::Nothing);
        assert_eq!(c.at(5_000, 50.0), Decision::Nothing);
        assert!(matches!(c.at(5_500, 50.0), Decision::Alert { .. }));
    }

    #[test]
    fn breaches_are_kept_per_tenant_and_resource() {
        let mut b = Breaches::default();
        let over = |now_ms| Observation {
            usage: 11.0,
            limit: 10.0,
            action: Action::Alert,
            grace: GRACE,
            now_ms,
            throttling: false,
            processes: &[],
        };
        b.decide("a", GpuResource::Memory, &over(0));
        b.decide("a", GpuResource::Time, &over(1_000));
        b.decide("b", GpuResource::Memory, &over(1_000));
        assert!(matches!(
            b.decide("a", GpuResource::Memory, &over(2_000)),
            Decision::Alert { .. }
        ));
        assert_eq!(
            b.decide("a", GpuResource::Time, &over(2_000)),
            Decision::Nothing
        );
        assert_eq!(
            b.decide("b", GpuResource::Memory, &over(2_000)),
            Decision::Nothing
        );
    }

    #[test]
    fn throttle_starts_once_follows_processes_and_ends() {
        let mut c = Case::new(Action::Throttle);
        assert_eq!(c.at(1_000, 50.0), Decision::Nothing);
        assert_eq!(
            c.at(3_500, 50.0),
            Decision::StartThrottle {
                breach: Duration::from_millis(2_500)
            }
        );
        assert_eq!(c.at(4_500, 50.0), Decision::Retarget);
        c.processes.push((11, 7));
        assert_eq!(c.at(5_500, 50.0), Decision::Retarget);
        assert_eq!(c.at(6_500, 5.0), Decision::EndThrottle);
        assert_eq!(c.at(7_500, 5.0), Decision::Nothing);
    }

    #[test]
    fn a_throttle_that_could_not_start_alerts_once_then_resolves() {
        let mut c = Case::new(Action::Throttle);
        c.at(1_000, 50.0);
        assert!(matches!(c.at(3_000, 50.0), Decision::StartThrottle { .. }));
        // Nothing could be frozen: the executor alerted instead.
        c.throttling = false;
        assert_eq!(c.at(4_000, 50.0), Decision::Nothing, "not retried");
        assert_eq!(c.at(5_000, 5.0), Decision::Resolved);
    }

    #[test]
    fn terminate_signals_each_process_once_per_breach() {
        let mut c = Case::new(Action::Terminate);
        c.at(1_000, 50.0);
        assert_eq!(
            c.at(3_000, 50.0),
            Decision::Terminate {
                processes: vec![(10, 1)]
            }
        );
        assert_eq!(c.at(4_000, 50.0), Decision::Nothing, "already signalled");
        // A newcomer, and a reused pid (new start time), are escalated to
        // as well; the process already signalled is not again.
        c.processes = vec![(10, 1), (10, 9), (12, 3)];
        assert_eq!(
            c.at(5_000, 50.0),
            Decision::Terminate {
                processes: vec![(10, 9), (12, 3)]
            }
        );
        assert_eq!(c.at(6_000, 5.0), Decision::Resolved);
        // A new breach may signal the same process again.
        c.processes = vec![(10, 1)];
        c.at(7_000, 50.0);
        assert_eq!(
            c.at(9_000, 50.0),
            Decision::Terminate {
                processes: vec![(10, 1)]
            }
        );
    }

    #[test]
    fn terminate_with_no_process_still_counts_as_acted() {
        let mut c = Case::new(Action::Terminate);
        c.processes.clear();
        c.at(1_000, 50.0);
        assert_eq!(c.at(3_000, 50.0), Decision::Nothing);
        assert_eq!(c.at(4_000, 5.0), Decision::Resolved);
    }
}
