//! Per-CPU map reads: every entry of a per-CPU hash map keyed by cgroup id,
//! its values summed over the CPUs.

use aya::{
    Pod,
    maps::{MapData, PerCpuHashMap},
};
use tally_ebpf::{NetValue, PcieValue};

/// A per-CPU value that adds up across CPUs.
pub(super) trait Sum: Pod + Default {
    fn add(&mut self, other: &Self);
}

impl Sum for NetValue {
    fn add(&mut self, other: &Self) {
        NetValue::add(self, other);
    }
}

impl Sum for PcieValue {
    fn add(&mut self, other: &Self) {
        PcieValue::add(self, other);
    }
}

/// A map of cgroup id → per-CPU counters, as the probes pin them.
pub(super) type CgroupCounters<V> = PerCpuHashMap<MapData, u64, V>;

/// Every entry of `map` with its values summed over the CPUs; entries that
/// cannot be read are skipped.
pub(super) fn sum_per_cpu<V: Sum>(map: &CgroupCounters<V>) -> Vec<(u64, V)> {
    map.iter()
        .flatten()
        .map(|(id, per_cpu)| {
            let mut sum = V::default();
            per_cpu.iter().for_each(|v| sum.add(v));
            (id, sum)
        })
        .collect()
}

/// Deletes the entries of `ids`; an entry already gone is no error.
pub(super) fn remove<V: Pod>(map: &mut CgroupCounters<V>, ids: &[u64]) {
    for id in ids {
        let _ = map.remove(id);
    }
}
