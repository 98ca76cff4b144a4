//! eBPF probes: loading, attaching, pinning, and reading kernel maps.
//! (Filled in by the eBPF issue.)

use serde::Deserialize;

/// `[probes]`: which eBPF probes run and where they attach.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {}
