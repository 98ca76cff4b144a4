//! Time on the aggregator: its clock, and the two ways times travel in
//! the API (RFC 3339 text, Unix seconds).

use std::time::{SystemTime, UNIX_EPOCH};

/// The aggregator's clock, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Parses a time: RFC 3339 (`2026-11-23T15:00:00Z`) or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| format!("`{s}` is out of range"));
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time or Unix seconds: {e}"))
        .and_then(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .map_err(|_| format!("`{s}` is before 1970"))
        })
}

/// Unix milliseconds as RFC 3339 text, to the second.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
