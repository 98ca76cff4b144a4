//! Agent → aggregator: the versioned report, its sender and the on-disk
//! spool. (Filled in by the aggregator issue.)

use serde::Deserialize;

/// `[report]`: where and how often the agent reports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {}
