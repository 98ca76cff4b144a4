//! The report sender's spool and delivery counters: typed metrics the
//! sender owns and registers into the agent's registry when reporting is
//! on (no `tally_report_*` family is exported otherwise).

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};

/// Counters and gauges of the report sender; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct ReportStats {
    /// Reports in the spool now.
    pub spool_reports: Gauge,
    /// Bytes in the spool now.
    pub spool_bytes: Gauge,
    /// Reports the aggregator acknowledged (stored or duplicate).
    pub sent: Counter,
    /// Send attempts that failed (network, 5xx, 401/403).
    pub failures: Counter,
    /// Reports given up on: refused for good by the aggregator (moved to
    /// `spool/rejected/`), or not written because the spool failed.
    pub dropped: Counter,
    /// Intervals not cut because the spool was full: their usage stays in
    /// the counters and goes into the next report that fits.
    pub deferred: Counter,
    /// Unix time of the last acknowledged report, seconds.
    pub last_success_seconds: Gauge,
}

impl ReportStats {
    /// Registers the families under `tally_report_`. Help texts carry no
    /// final period: the registry appends one.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tally_report");
        r.register(
            "spool_reports",
            "Reports waiting in the spool for the aggregator",
            self.spool_reports.clone(),
        );
        r.register_with_unit(
            "spool",
            "Bytes of the reports waiting in the spool",
            Unit::Bytes,
            self.spool_bytes.clone(),
        );
        r.register(
            "sent_reports",
            "Reports the aggregator acknowledged",
            self.sent.clone(),
        );
        r.register(
            "send_failures",
            "Report deliveries that failed and will be retried",
            self.failures.clone(),
        );
        r.register(
            "spool_dropped_reports",
            "Reports given up on (refused for good by the aggregator, or not spooled)",
            self.dropped.clone(),
        );
        r.register(
            "spool_full_intervals",
            "Intervals not cut because the spool was at its bound; their usage waits in the \
             counters for the next report",
            self.deferred.clone(),
        );
        r.register_with_unit(
            "last_success_timestamp",
            "Unix time of the last report the aggregator acknowledged",
            Unit::Seconds,
            self.last_success_seconds.clone(),
        );
    }
}
