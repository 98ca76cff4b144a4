//! Bearer-token files: the agent's, and the readers' of `tally report`.

use std::path::Path;

/// The first non-empty line of a token file that is not a `#` comment.
pub fn read_token(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| format!("{} holds no token", file.display()))
}
