//! Config-file primitives both roles use: every problem of a file at once,
//! each with its key, and the quantities (`8GiB`) the files are written in.
//!
//! The agent's `tally.toml` and the aggregator's config are built from these:
//! each section is deserialized on its own (`deny_unknown_fields`) and then
//! validated, so that `tally config check` reports every problem at once.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

/// Exit code for a bad config or command line (`EX_USAGE`).
pub const EX_USAGE: u8 = 64;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path (`tenant.rule[1].cgroup`), empty for the whole file.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct Problems {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.key.is_empty() {
                write!(f, "\n  {}: {}", self.file.display(), p.message)?;
            } else {
                write!(
                    f,
                    "\n  {}: key `{}`: {}",
                    self.file.display(),
                    p.key,
                    p.message
                )?;
            }
        }
        Ok(())
    }
}

impl Problems {
    pub fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            problems: Vec::new(),
        }
    }

    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(value)` when nothing was found, else every problem.
    pub fn finish<T>(self, value: T) -> Result<T, Problems> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// Reads a TOML file into a table, or says why it cannot.
pub fn read_table(file: &Path) -> Result<toml::Table, Problems> {
    match std::fs::read_to_string(file) {
        Ok(text) => parse_table(&text, file),
        Err(e) => {
            let mut problems = Problems::new(file);
            problems.push("", format!("cannot read the file: {e}"));
            Err(problems)
        }
    }
}

/// Parses TOML text into a table, or says why it cannot.
fn parse_table(text: &str, origin: &Path) -> Result<toml::Table, Problems> {
    text.parse::<toml::Table>().map_err(|e| {
        let mut problems = Problems::new(origin);
        problems.push("", format!("not valid TOML: {}", e.to_string().trim()));
        problems
    })
}

/// A whole config file from its table: `build` takes the sections it knows
/// (recording their problems); every key left over is unknown.
pub fn from_table_with<T>(
    mut table: toml::Table,
    origin: &Path,
    known: &[&str],
    build: impl FnOnce(&mut toml::Table, &mut Problems) -> T,
) -> Result<T, Problems> {
    let mut problems = Problems::new(origin);
    let value = build(&mut table, &mut problems);
    reject_unknown(&table, "", known, &mut problems);
    problems.finish(value)
}

/// [`from_table_with`] on the file `file`.
pub fn load_with<T>(
    file: &Path,
    known: &[&str],
    build: impl FnOnce(&mut toml::Table, &mut Problems) -> T,
) -> Result<T, Problems> {
    from_table_with(read_table(file)?, file, known, build)
}

/// [`from_table_with`] on TOML text (tests, defaults).
pub fn parse_with<T>(
    text: &str,
    origin: &Path,
    known: &[&str],
    build: impl FnOnce(&mut toml::Table, &mut Problems) -> T,
) -> Result<T, Problems> {
    from_table_with(parse_table(text, origin)?, origin, known, build)
}

/// Takes `key` out of `table` and deserializes it, recording a problem (and
/// returning the default) when it does not fit. Absent keys give the default.
pub fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    key: &str,
    problems: &mut Problems,
) -> T {
    match table.remove(key) {
        None => T::default(),
        Some(value) => match T::deserialize(value) {
            Ok(v) => v,
            Err(e) => {
                problems.push(key, e.message().to_string());
                T::default()
            }
        },
    }
}

/// Flags every key left in `table` as unknown.
pub fn reject_unknown(table: &toml::Table, prefix: &str, known: &[&str], problems: &mut Problems) {
    for key in table.keys() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        problems.push(
            path,
            format!("unknown key; expected one of: {}", known.join(", ")),
        );
    }
}

/// Splits a quantity such as `8GiB` or `100 Mbit` into its number and
/// its (trimmed) unit; `None` when it does not start with a number.
pub fn split_quantity(text: &str) -> Option<(f64, &str)> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    Some((num.parse().ok()?, unit.trim()))
}

/// Parses a size such as `8GiB`, `512MiB`, `20GB` or `1024` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (value, unit) = split_quantity(text)
        .ok_or_else(|| format!("`{text}` is not a size (e.g. `8GiB`, `512MiB`)"))?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    Ok((value * mult).round() as u64)
}

/// Helper for sections that are maps keyed by name (`[tenant.quota.X]`).
pub type Named<T> = BTreeMap<String, T>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("20GB").unwrap(), 20_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("8 gigs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
    }
}
