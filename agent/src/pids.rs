//! Maps keyed by pid, for the sampling cycle's hot path: each GPU process
//! is looked up several times a cycle (process cache, kept `stat` files,
//! state machine, SM samples), and std's SipHash was about a tenth of a
//! cycle's instructions (callgrind). foldhash costs a fraction of that and
//! is still seeded per process.

use std::collections::HashMap;

/// A `HashMap` keyed by pid, hashed with foldhash; make one with
/// `PidMap::default()`.
pub type PidMap<V> = HashMap<u32, V, foldhash::fast::RandomState>;
