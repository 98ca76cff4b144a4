//! The invariants a config parser's fuzz target checks beyond "no panic":
//! parsing is deterministic; a rejected file has at least one problem and
//! each names a key of the file, a known section the file lacks, or the
//! whole file; an accepted file, written back out by `toml` and parsed
//! again, gives the same config (the validated config does not depend on
//! layout). Included by each config target with `#[path]`.

use std::{fmt::Debug, path::Path};

use tally_contract::config::Problems;

/// Checks the invariants on `text` with `parse`; `known` lists the
/// top-level sections a problem may name although the file lacks them.
/// Returns the accepted config, for checks of the target's own.
pub fn check<C: Debug>(
    text: &str,
    known: &[&str],
    parse: impl Fn(&str, &Path) -> Result<C, Problems>,
) -> Option<C> {
    let origin = Path::new("fuzz.toml");
    let first = parse(text, origin);
    let second = parse(text, origin);
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
                        p.key.is_empty() || table.contains_key(top) || known.contains(&top),
                        "problem {p:?} names no key of the file"
                    );
                }
            }
            None
        }
        Ok(config) => {
            let table: toml::Table = text.parse().expect("accepted text is TOML");
            if let Ok(again) = toml::to_string(&table) {
                let back = parse(&again, origin)
                    .unwrap_or_else(|p| panic!("re-serialized config is refused: {p}\n{again}"));
                assert_eq!(format!("{config:?}"), format!("{back:?}"));
            }
            Some(config)
        }
    }
}
