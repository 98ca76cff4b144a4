//! The sender's counters, shared with `/metrics` (which encodes them with
//! the snapshot's families at scrape time).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Counters and gauges of the report sender.
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Whether reporting is configured (no families are exported otherwise).
    pub enabled: AtomicBool,
    /// Reports in the spool now.
    pub spool_reports: AtomicU64,
    /// Bytes in the spool now.
    pub spool_bytes: AtomicU64,
    /// Reports the aggregator acknowledged (stored or duplicate).
    pub sent: AtomicU64,
    /// Send attempts that failed (network, 5xx, 401/403).
    pub failures: AtomicU64,
    /// Reports given up on: refused for good by the aggregator (moved to
    /// `spool/rejected/`), or not written because the spool failed.
    pub dropped: AtomicU64,
    /// Intervals not cut because the spool was full: their usage stays in
    /// the counters and goes into the next report that fits.
    pub deferred: AtomicU64,
    /// Unix time of the last acknowledged report, seconds.
    pub last_success_seconds: AtomicU64,
}

static STATS: ReportStats = ReportStats {
    enabled: AtomicBool::new(false),
    spool_reports: AtomicU64::new(0),
    spool_bytes: AtomicU64::new(0),
    sent: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    deferred: AtomicU64::new(0),
    last_success_seconds: AtomicU64::new(0),
};

/// The process's report counters.
pub fn stats() -> &'static ReportStats {
    &STATS
}

/// One exported value: name (without unit suffixes), help, unit, counter?, value.
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: Option<&'static str>,
    pub counter: bool,
    pub value: f64,
}

impl ReportStats {
    /// The values to export, empty when reporting is off.
    pub fn samples(&self) -> Vec<Sample> {
        if !self.enabled.load(Relaxed) {
            return Vec::new();
        }
        let v = |a: &AtomicU64| a.load(Relaxed) as f64;
        vec![
            Sample {
                name: "tally_report_spool_reports",
                help: "Reports waiting in the spool for the aggregator.",
                unit: None,
                counter: false,
                value: v(&self.spool_reports),
            },
            Sample {
                name: "tally_report_spool",
                help: "Bytes of the reports waiting in the spool.",
                unit: Some("bytes"),
                counter: false,
                value: v(&self.spool_bytes),
            },
            Sample {
                name: "tally_report_sent_reports",
                help: "Reports the aggregator acknowledged.",
                unit: None,
                counter: true,
                value: v(&self.sent),
            },
            Sample {
                name: "tally_report_send_failures",
                help: "Report deliveries that failed and will be retried.",
                unit: None,
                counter: true,
                value: v(&self.failures),
            },
            Sample {
                name: "tally_report_spool_dropped_reports",
                help: "Reports given up on (refused for good by the aggregator, or not spooled).",
                unit: None,
                counter: true,
                value: v(&self.dropped),
            },
            Sample {
                name: "tally_report_spool_full_intervals",
                help: "Intervals not cut because the spool was at its bound; their usage waits in \
                       the counters for the next report.",
                unit: None,
                counter: true,
                value: v(&self.deferred),
            },
            Sample {
                name: "tally_report_last_success_timestamp",
                help: "Unix time of the last report the aggregator acknowledged.",
                unit: Some("seconds"),
                counter: false,
                value: v(&self.last_success_seconds),
            },
        ]
    }
}
