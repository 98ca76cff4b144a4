//! The aggregator's report decoder, as `aggregator::server` ingests a body:
//! JSON → value → `Report` → `validate` → `digest`.
//!
//! Invariants: decoding straight from bytes agrees with decoding through a
//! value; a decoded report re-encodes to JSON that decodes to an equal
//! report with the same digest (so a retry is recognised as the same
//! report) and the same validation verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_contract::wire::Report;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(report) = serde_json::from_value::<Report>(value) else {
        return;
    };
    if let Ok(direct) = serde_json::from_slice::<Report>(data) {
        assert_eq!(direct, report, "bytes and value decode differently");
    }
    let verdict = report.validate();
    let digest = report.digest();
    let bytes = serde_json::to_vec(&report).expect("a report encodes");
    let back: Report = serde_json::from_slice(&bytes).expect("an encoded report decodes");
    assert_eq!(back, report, "re-encoded report differs");
    assert_eq!(back.digest(), digest, "digest is not stable");
    assert_eq!(back.validate(), verdict, "verdict changed");
});
