//! The doctor's trial: every probe loaded and attached for real, in a
//! throwaway pin directory, then removed again.

use super::{PROBE_NAMES, Probes, ProbesConfig};
use crate::snapshot::ProbeStatus;

/// Loads and attaches every probe for real, as the agent would, but with
/// maps in a throwaway pin directory beside `[probes] pin_dir` (a running
/// agent's maps and counters are left alone); detaches and removes it all
/// before returning. For `tally doctor`.
pub fn trial(config: &ProbesConfig) -> Vec<(&'static str, ProbeStatus)> {
    let mut name = config
        .pin_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!("-doctor-{}", std::process::id()));
    let pin_dir = config.pin_dir.with_file_name(name);
    let state_dir = std::env::temp_dir().join(format!("tally-doctor-{}", std::process::id()));
    let trial_config = ProbesConfig {
        pin_dir: pin_dir.clone(),
        ..config.clone()
    };
    let statuses = Probes::start(&trial_config, &state_dir).statuses();
    if let Ok(entries) = std::fs::read_dir(&pin_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(&pin_dir);
    let _ = std::fs::remove_dir_all(&state_dir);
    PROBE_NAMES
        .iter()
        .zip(statuses)
        .map(|(name, status)| (*name, status))
        .collect()
}
