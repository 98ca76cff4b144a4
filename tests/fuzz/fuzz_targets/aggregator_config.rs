//! `tally_aggregator::AggregatorConfig::parse`: the aggregator's config.
//!
//! Same invariants as `agent_config`: deterministic; every problem names a
//! key of the file; an accepted file written back out parses the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tally_aggregator::AggregatorConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz.toml");
    let first = AggregatorConfig::parse(text, origin);
    let second = AggregatorConfig::parse(text, origin);
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "parsing is not deterministic"
    );
    match first {
        Err(problems) => {
            assert!(!problems.problems.is_empty(), "rejected without a problem");
            if let Ok(table) = text.parse::<toml::Table>() {
                for p in &problems.problems {
                    let top = p.key.split(['.', '[']).next().unwrap_or("");
                    assert!(
                        p.key.is_empty() || table.contains_key(top) || tally_aggregator::config::KNOWN.contains(&top),
                        "problem {p:?} names no key of the file"
                    );
                }
            }
        }
        Ok(config) => {
            assert!(config.server.max_body_bytes() > 0 || config.server.max_body.trim().starts_with('0'));
            let table: toml::Table = text.parse().expect("accepted text is TOML");
            if let Ok(again) = toml::to_string(&table) {
                let back = AggregatorConfig::parse(&again, origin)
                    .unwrap_or_else(|p| panic!("re-serialized config is refused: {p}\n{again}"));
                assert_eq!(format!("{config:?}"), format!("{back:?}"));
            }
        }
    }
});
