//! `tally_aggregator::AggregatorConfig::parse`: the aggregator's config,
//! with the invariants of `common/config_invariants.rs`, and a body limit
//! that is positive unless the file asks for zero.
#![no_main]

#[path = "common/config_invariants.rs"]
mod config_invariants;

use libfuzzer_sys::fuzz_target;
use tally_aggregator::{AggregatorConfig, config::KNOWN};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(config) = config_invariants::check(text, KNOWN, AggregatorConfig::parse) {
        assert!(
            config.server.max_body_bytes() > 0 || config.server.max_body.trim().starts_with('0')
        );
    }
});
