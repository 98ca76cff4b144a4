//! The sender task: every `[report] interval` it cuts a report from the
//! latest snapshot, persists the state, spools the report, and delivers
//! the spool oldest-first. On shutdown it cuts the final partial interval
//! and tries once more to deliver within a short grace period; whatever is
//! not delivered stays in the spool for the next start.
//!
//! The file work (a few KiB, fsync'd once per interval) runs on the async
//! runtime: it is small and infrequent next to a network round trip.

use std::{
    io::{Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use tally_contract::wire::AuditRecord;

use super::{
    ReportConfig,
    spool::{Entry, Spool},
    state::{self, Identity, State},
    stats::ReportStats,
};
use tally_contract::token::read_token;

use crate::snapshot::Latest;

/// Most audit records carried by one report; the rest go in the next.
const MAX_AUDIT_PER_REPORT: usize = 5_000;
/// Most audit-log bytes read for one report.
const MAX_AUDIT_BYTES: u64 = 4 << 20;
/// Time given to the last delivery attempt at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The longest `Retry-After` obeyed: a misconfigured aggregator asking for
/// hours would otherwise hold every report back that long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A `Retry-After` value (RFC 9110: whole seconds, or an HTTP date) as a
/// wait from `now`, at most [`MAX_RETRY_AFTER`]; `None` when unreadable.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the sender when `[report] aggregator` is set; it counts into
/// `stats` (registered by the caller). Reports name `[report] node`, else
/// `node`; the spool and the sender's state live in `state_dir`.
pub fn spawn(
    cfg: &ReportConfig,
    node: &str,
    state_dir: &Path,
    latest: Latest,
    stats: ReportStats,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let cfg = cfg.clone();
    let Some(url) = cfg.aggregator.clone() else {
        info!("reporting is off: no [report] aggregator");
        return Ok(None);
    };
    let node = cfg.node.clone().unwrap_or_else(|| node.to_owned());
    let mut sender = Sender::new(cfg, &url, node, state_dir)?;
    sender.stats = stats;
    let span = info_span!("report", aggregator = %url);
    Ok(Some(tokio::spawn(
        async move { sender.run(latest, shutdown).await }.instrument(span),
    )))
}

/// What one delivery attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// Try again later (network, 5xx, 401/403, 404, 429), not before the
    /// aggregator's `Retry-After` when it sent one.
    Retry(String, Option<Duration>),
    /// The aggregator refused the report for good.
    Refused(String),
}

struct Sender {
    cfg: ReportConfig,
    endpoint: String,
    id: Identity,
    state: State,
    state_file: PathBuf,
    audit_log: PathBuf,
    spool: Spool,
    client: reqwest::Client,
    /// When this process started, on the monotonic clock: interval ends
    /// are `started_ms` plus monotonic time, the clock the sampler
    /// integrates GPU time on, so a wall-clock step can never make a
    /// report's usage look longer than its interval.
    started: Instant,
    /// A report cut but not yet spooled (the spool write failed).
    unspooled: Option<(u64, Vec<u8>)>,
    /// Whether the last attempt failed (to log a failure streak once).
    failing: bool,
    /// No delivery before this: the aggregator's `Retry-After` (a token
    /// over its rate limit, an aggregator shedding load). Reports are
    /// still cut into the spool meanwhile.
    not_before: Option<Instant>,
    full_streak: u64,
    stats: ReportStats,
}

impl Sender {
    fn new(cfg: ReportConfig, url: &str, node: String, state_dir: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let started_ms = unix_ms();
        let boot_id = std::fs::read_to_string(crate::paths::BOOT_ID)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| {
                warn!(error = %e, path = crate::paths::BOOT_ID, "cannot read the boot id; using \"unknown\"");
                "unknown".into()
            });
        let id = Identity {
            node,
            boot_id,
            instance: format!("{}-{started_ms}", std::process::id()),
            started_ms,
            report_interval_ms: cfg.interval.as_millis() as u64,
            cluster: cfg.cluster.clone(),
        };
        let state_file = state::state_file(state_dir);
        let loaded = match state::load(&state_file) {
            Ok(s) => s,
            Err(e) => {
                // Starting over is safe: sequence numbers restart from the
                // clock, above any the old state handed out.
                let aside = state_file.with_extension("json.corrupt");
                error!(error = %e, moved_to = %aside.display(), "report state unreadable; starting a new one");
                let _ = std::fs::rename(&state_file, &aside);
                State::default()
            }
        };
        let state = loaded.adopt(&id, started_ms);
        let spool = Spool::open(state_dir, cfg.spool_max_reports, cfg.spool_max_bytes())?;
        let client = super::client_builder(cfg.timeout, cfg.ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("[report] ca_file: {e}"))?
            .user_agent(concat!("tally-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut sender = Self {
            endpoint: format!("{}/api/v1/reports", url.trim_end_matches('/')),
            cfg,
            id,
            state,
            state_file,
            audit_log: crate::paths::audit_log(state_dir),
            spool,
            client,
            started,
            unspooled: None,
            failing: false,
            not_before: None,
            full_streak: 0,
            stats: ReportStats::default(),
        };
        // The last report cut before a crash may not have reached the
        // spool: spool it again (the aggregator acknowledges a duplicate).
        if let Some(last) = sender.state.last.clone()
            && !sender.spool.contains(last.seq)
        {
            sender.unspooled = Some((last.seq, serde_json::to_vec(&last)?));
        }
        state::save(&sender.state_file, &sender.state)?;
        Ok(sender)
    }

    async fn run(&mut self, latest: Latest, shutdown: CancellationToken) {
        info!(node = %self.id.node, boot_id = %self.id.boot_id, next_seq = self.state.next_seq,
              interval = ?self.cfg.interval, "reporting");
        self.retry_unspooled();
        self.update_gauges();
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.produce(&latest);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.drain() => {}
            }
        }
        // The final partial interval, then one bounded delivery attempt.
        self.produce(&latest);
        if tokio::time::timeout(SHUTDOWN_GRACE, self.drain())
            .await
            .is_err()
        {
            warn!("shutdown: delivery did not finish in time; the rest stays spooled");
        }
        self.update_gauges();
        info!(
            spooled = self.stats.spool_reports.get(),
            "report sender stopped"
        );
    }

    fn retry_unspooled(&mut self) {
        if let Some((seq, body)) = self.unspooled.take()
            && let Err(e) = self.spool.put(seq, &body)
        {
            error!(error = %e, seq, "cannot spool report; will retry");
            self.unspooled = Some((seq, body));
        }
    }

    /// Cuts one report from the latest snapshot into the spool.
    fn produce(&mut self, latest: &Latest) {
        self.retry_unspooled();
        if self.unspooled.is_some() {
            // The spool is failing: keep the usage in the counters.
            self.stats.deferred.inc();
            return;
        }
        let snap = latest.borrow().clone();
        if snap.samples == 0 {
            return;
        }
        let entries = self.spool.entries().unwrap_or_default();
        let estimate = entries.last().map(|e| e.bytes).unwrap_or(4096);
        if self.spool.is_full(&entries, estimate) {
            self.stats.deferred.inc();
            if self.full_streak.is_multiple_of(60) {
                error!(
                    reports = entries.len(),
                    max_reports = self.cfg.spool_max_reports,
                    max_bytes = %self.cfg.spool_max_bytes,
                    dir = %self.spool.dir().display(),
                    "REPORT SPOOL FULL: the aggregator has not taken reports for a long time; new \
                     intervals are held in the counters (lost if the agent restarts) until it does"
                );
            }
            self.full_streak += 1;
            return;
        }
        if self.full_streak > 0 {
            info!(
                intervals = self.full_streak,
                "report spool has room again; the held usage goes in the next report"
            );
            self.full_streak = 0;
        }
        let before = self.state.clone();
        let audit = self.read_audit();
        let end = state::interval_end(
            self.id.started_ms,
            self.started,
            snap.sampled_at,
            Instant::now(),
        );
        let report = self.state.cut(&self.id, &snap, audit, end);
        let body = match serde_json::to_vec(&report) {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "cannot encode report");
                self.state = before;
                return;
            }
        };
        // State first: once it is on disk the interval belongs to report
        // `seq` (kept in `last` until the next cut) and is never cut again.
        if let Err(e) = state::save(&self.state_file, &self.state) {
            error!(error = %e, "cannot persist the report state; holding the interval for the next report");
            self.state = before;
            return;
        }
        if let Err(e) = self.spool.put(report.seq, &body) {
            error!(error = %e, seq = report.seq, "cannot spool report; will retry");
            self.unspooled = Some((report.seq, body));
        }
        self.update_gauges();
    }

    /// New complete lines of the audit log since the last report.
    fn read_audit(&mut self) -> Vec<AuditRecord> {
        let Ok(mut file) = std::fs::File::open(&self.audit_log) else {
            return Vec::new();
        };
        let Ok(meta) = file.metadata() else {
            return Vec::new();
        };
        if meta.ino() != self.state.audit_inode || meta.len() < self.state.audit_offset {
            // A new or truncated log: read it from the start.
            self.state.audit_inode = meta.ino();
            self.state.audit_offset = 0;
        }
        if file.seek(SeekFrom::Start(self.state.audit_offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if file.take(MAX_AUDIT_BYTES).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut consumed = 0usize;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") || out.len() >= MAX_AUDIT_PER_REPORT {
                break;
            }
            consumed += line.len();
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<AuditRecord>(text) {
                Ok(r) => out.push(r),
                Err(e) => warn!(error = %e, offset = self.state.audit_offset + consumed as u64,
                                "audit log line is not a record; not reported"),
            }
        }
        self.state.audit_offset += consumed as u64;
        out
    }

    /// Delivers the spool oldest-first until it is empty or a delivery fails.
    async fn drain(&mut self) {
        let entries = match self.spool.entries() {
            Ok(e) => e,
            Err(e) => {
                error!(error = %e, "cannot list the spool");
                return;
            }
        };
        if entries.is_empty() {
            return;
        }
        if self.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.not_before = None;
        let token = match &self.cfg.token_file {
            None => None,
            Some(f) => match read_token(f) {
                Ok(t) => Some(t),
                Err(e) => {
                    error!(error = %e, "cannot read the report token; sending without one");
                    None
                }
            },
        };
        for entry in entries {
            match self.deliver(&entry, token.as_deref()).await {
                Outcome::Delivered => {
                    if let Err(e) = self.spool.remove(&entry) {
                        error!(error = %e, "cannot remove a delivered report from the spool");
                    }
                    self.stats.sent.inc();
                    self.stats
                        .last_success_seconds
                        .set((unix_ms() / 1000) as i64);
                    if self.failing {
                        info!("aggregator takes reports again");
                        self.failing = false;
                    }
                }
                Outcome::Refused(why) => {
                    self.stats.dropped.inc();
                    match self.spool.reject(&entry, &why) {
                        Ok(to) => error!(seq = entry.seq, reason = %why, kept_in = %to.display(),
                                         "REPORT DROPPED: the aggregator refused it for good"),
                        Err(e) => error!(seq = entry.seq, reason = %why, error = %e,
                                         "REPORT DROPPED: refused, and cannot be moved aside"),
                    }
                }
                Outcome::Retry(why, retry_after) => {
                    self.stats.failures.inc();
                    if let Some(wait) = retry_after {
                        self.not_before = Some(Instant::now() + wait);
                        warn!(seq = entry.seq, reason = %why, wait = ?wait,
                              "the aggregator asks to wait (Retry-After); reports stay in the spool until then");
                        self.failing = true;
                    } else if !self.failing {
                        warn!(seq = entry.seq, reason = %why, "cannot deliver report; it stays in the spool and is retried each interval");
                        self.failing = true;
                    }
                    break;
                }
            }
            self.update_gauges();
        }
        self.update_gauges();
    }

    async fn deliver(&self, entry: &Entry, token: Option<&str>) -> Outcome {
        let body = match std::fs::read(&entry.path) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Retry(format!("cannot read {}: {e}", entry.path.display()), None);
            }
        };
        let mut req = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            // The agent's clock at sending: the aggregator measures the
            // node's clock skew from it (docs/aggregator.md).
            .header(
                reqwest::header::DATE,
                httpdate::fmt_http_date(SystemTime::now()),
            )
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Err(e) => Outcome::Retry(e.to_string(), None),
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    return Outcome::Delivered;
                }
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, SystemTime::now()));
                let text = resp.text().await.unwrap_or_default();
                let why = format!("{status}: {}", text.trim());
                match status {
                    StatusCode::BAD_REQUEST
                    | StatusCode::CONFLICT
                    | StatusCode::PAYLOAD_TOO_LARGE
                    | StatusCode::UNPROCESSABLE_ENTITY => Outcome::Refused(why),
                    _ => Outcome::Retry(why, retry_after),
                }
            }
        }
    }

    fn update_gauges(&self) {
        let entries = self.spool.entries().unwrap_or_default();
        self.stats
            .spool_reports
            .set(entries.len() as i64 + i64::from(self.unspooled.is_some()));
        self.stats
            .spool_bytes
            .set(entries.iter().map(|e| e.bytes).sum::<u64>() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-3", now), None);
    }
}
