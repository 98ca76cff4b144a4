//! `tally_agent::config::Config::parse`: the agent's `tally.toml`, with the
//! invariants of `common/config_invariants.rs`.
#![no_main]

#[path = "common/config_invariants.rs"]
mod config_invariants;

use libfuzzer_sys::fuzz_target;
use tally_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let known = ["agent", "tenant", "probes", "report", "states"];
    config_invariants::check(text, &known, Config::parse);
});
