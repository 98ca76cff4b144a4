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

/// Parses a time: RFC 3339 (`2026-11-23T15:00:00Z`, any offset, either
/// case) or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| format!("`{s}` is out of range"));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time or Unix seconds: {e}"))?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    if ms < 0 {
        return Err(format!("`{s}` is before 1970"));
    }
    Ok(ms as i64)
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z).
pub(crate) const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// Unix milliseconds as RFC 3339 text, to the second.
pub(crate) fn rfc3339(ms: i64) -> String {
    // humantime's Display fails beyond year 9999, and `to_string` panics.
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, MAX_RFC3339_MS) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// schemathesis finding: RFC 3339 times with a numeric offset or in
    /// lower case were refused as "not an RFC 3339 time".
    #[test]
    fn rfc3339_offsets_and_lower_case_are_read() {
        let utc = parse_time("2026-11-23T15:00:00Z").unwrap();
        assert_eq!(parse_time("2026-11-23T16:30:00+01:30").unwrap(), utc);
        assert_eq!(parse_time("2026-11-23T10:00:00-05:00").unwrap(), utc);
        assert_eq!(parse_time("2026-11-23t15:00:00z").unwrap(), utc);
        assert_eq!(
            parse_time("2026-11-23T15:00:00.250+00:00").unwrap(),
            utc + 250
        );
        assert!(parse_time("2026-11-23T15:00:00+24:00").is_err());
        assert!(parse_time("2026-11-23").is_err());
    }

    /// schemathesis finding: formatting a time after year 9999 panicked.
    #[test]
    fn times_beyond_rfc3339_are_clamped_not_panicked() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
    }
}
