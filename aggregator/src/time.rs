//! Time on the aggregator: its clock, the clocks of its agents, and the
//! two ways times travel in the API (RFC 3339 text, Unix seconds).

use std::time::{SystemTime, UNIX_EPOCH};

/// The aggregator's clock, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The instant `age` before `now_ms` (a retention's cutoff), without
/// overflow: an age beyond an `i64` of milliseconds counts as the
/// longest one, a cutoff before anything stored.
pub(crate) fn before(now_ms: i64, age: std::time::Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds per day.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// The start of `ms`'s UTC day.
pub(crate) fn day_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY_MS)
}

/// The first instant of `ms`'s UTC month, in ms (the month after a
/// month's first is `month_of(first + 32 * DAY_MS)`).
pub(crate) fn month_of(ms: i64) -> i64 {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.date().replace_day(1).ok())
        // Beyond year ±9999: a bucket per day, found the same way.
        .map_or_else(
            || day_of(ms),
            |d| d.midnight().assume_utc().unix_timestamp() * 1000,
        )
}

/// A node clock further than this from the aggregator's is skewed: its
/// reports are filed by the aggregator's clock. `Date` has whole seconds
/// and NTP keeps clocks within milliseconds, so this is far above noise and
/// far below what would move usage into another hour.
pub(crate) const MAX_CLOCK_SKEW_MS: i64 = 10_000;

/// How far ahead of the aggregator's clock (`received_ms`) the sender's
/// clock was, from the request's `Date` header (the agent's clock when it
/// sent; RFC 9110 §6.6.1). `None` without a readable `Date`.
pub(crate) fn clock_skew_ms(date: Option<&str>, received_ms: i64) -> Option<i64> {
    let sent = httpdate::parse_http_date(date?).ok()?;
    let sent_ms = match sent.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    // `Date` is truncated to the second: half a second is its mean error.
    Some(sent_ms + 500 - received_ms)
}

/// The report's interval moved onto the aggregator's clock when the node's
/// clock is skewed by more than [`MAX_CLOCK_SKEW_MS`]; `None` when it is
/// filed as sent.
pub(crate) fn refiled_interval(start_ms: u64, end_ms: u64, skew_ms: i64) -> Option<(u64, u64)> {
    if skew_ms.abs() <= MAX_CLOCK_SKEW_MS {
        return None;
    }
    let shift = |t: u64| {
        let moved = (i128::from(t) - i128::from(skew_ms)).clamp(0, i128::from(u64::MAX));
        u64::try_from(moved).unwrap_or(u64::MAX)
    };
    Some((shift(start_ms), shift(end_ms)))
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

    #[test]
    fn a_cutoff_is_the_age_before_now_and_saturates() {
        use std::time::Duration;
        assert_eq!(before(10_000, Duration::from_secs(3)), 7_000);
        assert_eq!(
            before(10_000, Duration::from_secs(u64::MAX)),
            10_000 - i64::MAX
        );
        assert_eq!(before(-10, Duration::from_secs(u64::MAX)), i64::MIN);
    }

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

    #[test]
    fn skew_is_read_from_the_date_header() {
        let received = 1_700_000_000_000;
        let date = |ms: i64| {
            httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_millis(ms as u64))
        };
        // In step: within the header's one-second resolution.
        let s = clock_skew_ms(Some(&date(received)), received).unwrap();
        assert!(s.abs() <= 1000, "{s}");
        let ahead = clock_skew_ms(Some(&date(received + 3_600_000)), received).unwrap();
        assert!((ahead - 3_600_000).abs() <= 1000, "{ahead}");
        let behind = clock_skew_ms(Some(&date(received - 3_600_000)), received).unwrap();
        assert!((behind + 3_600_000).abs() <= 1000, "{behind}");
        assert_eq!(clock_skew_ms(None, received), None);
        assert_eq!(clock_skew_ms(Some("yesterday"), received), None);
    }

    #[test]
    fn only_a_skewed_clock_is_refiled_and_by_its_skew() {
        let (start, end) = (1_700_000_000_000, 1_700_000_000_300);
        assert_eq!(refiled_interval(start, end, 0), None);
        assert_eq!(refiled_interval(start, end, MAX_CLOCK_SKEW_MS), None);
        assert_eq!(refiled_interval(start, end, -MAX_CLOCK_SKEW_MS), None);
        // An hour ahead: filed an hour earlier, the length kept.
        assert_eq!(
            refiled_interval(start, end, 3_600_000),
            Some((start - 3_600_000, end - 3_600_000))
        );
        assert_eq!(
            refiled_interval(start, end, -3_600_000),
            Some((start + 3_600_000, end + 3_600_000))
        );
        // A clock decades off cannot push a time out of range.
        assert_eq!(refiled_interval(5, 10, 60_000), Some((0, 0)));
        assert_eq!(
            refiled_interval(u64::MAX - 5, u64::MAX, -60_000),
            Some((u64::MAX, u64::MAX))
        );
    }

    /// schemathesis finding: formatting a time after year 9999 panicked.
    #[test]
    fn times_beyond_rfc3339_are_clamped_not_panicked() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
    }
}
