//! `tally_agent::config::Config::parse`: the agent's `tally.toml`.
//!
//! Invariants beyond "no panic": parsing is deterministic; a rejected file
//! has at least one problem and each names a key of the file, a section the
//! file lacks, or the whole file; an accepted file, written back out by `toml` and parsed again,
//! gives the same config (the validated config does not depend on layout).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tally_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz.toml");
    let first = Config::parse(text, origin);
    let second = Config::parse(text, origin);
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
                        p.key.is_empty() || table.contains_key(top) || ["agent", "tenant", "probes", "report", "states"].contains(&top),
                        "problem {p:?} names no key of the file"
                    );
                }
            }
        }
        Ok(config) => {
            let table: toml::Table = text.parse().expect("accepted text is TOML");
            if let Ok(again) = toml::to_string(&table) {
                let back = Config::parse(&again, origin)
                    .unwrap_or_else(|p| panic!("re-serialized config is refused: {p}\n{again}"));
                assert_eq!(format!("{config:?}"), format!("{back:?}"));
            }
        }
    }
});
