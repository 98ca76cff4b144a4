//! Query strings of the aggregator's read endpoints: `percent_decode` and
//! `parse_time` (the `from`/`to` of a chargeback or audit range).
//!
//! Invariants: text without `%` or `+` decodes to itself; Unix seconds
//! parse to milliseconds exactly or are refused as out of range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_aggregator::server::{parse_time, percent_decode};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = percent_decode(s);
    if !s.contains(['%', '+']) {
        assert_eq!(decoded, s);
    }
    let t = parse_time(s);
    if let Ok(secs) = s.parse::<i64>() {
        assert_eq!(t.ok(), secs.checked_mul(1000));
    }
    let _ = parse_time(&decoded);
});
