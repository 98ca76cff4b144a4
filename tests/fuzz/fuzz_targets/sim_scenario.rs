//! `nvml_sim::scenario::parse`: the simulator's scenario file (a public
//! contract others write against).
//!
//! Invariants: errors are one line (the simulator prints exactly one); an
//! accepted scenario is physically coherent — indices in order, unique
//! UUIDs (handle lookup by UUID relies on it), idle ≤ max power and
//! temperature, MIG instances within the GPU's 7 compute slices and its
//! memory, instance ids as documented.
#![no_main]

use std::{collections::HashSet, path::Path};

use libfuzzer_sys::fuzz_target;
use nvml_sim::scenario::{self, COMPUTE_SLICES, MEMORY_SLICES};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let s = match scenario::parse(Path::new("fuzz.toml"), text) {
        Ok(s) => s,
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "error spans lines: {line:?}");
            return;
        }
    };
    assert!(s.sample_period_ms >= 1);
    let mut uuids = HashSet::new();
    for (i, g) in s.gpus.iter().enumerate() {
        assert_eq!(g.index as usize, i);
        assert!(!g.model.trim().is_empty());
        assert!(g.memory_mib > 0);
        assert!(g.power_max_mw > 0 && g.power_idle_mw <= g.power_max_mw);
        assert!(g.temperature_idle_c <= g.temperature_max_c);
        assert!(g.uuid.starts_with("GPU-"), "{}", g.uuid);
        assert!(uuids.insert(g.uuid.clone()), "duplicate UUID {}", g.uuid);
        if let Some(mig) = &g.mig {
            let compute: u32 = mig.iter().map(|m| m.compute_slices).sum();
            let memory: u32 = mig.iter().map(|m| m.memory_slices).sum();
            let mib: u64 = mig.iter().map(|m| m.memory_mib).sum();
            assert!(compute <= COMPUTE_SLICES && memory <= MEMORY_SLICES);
            assert!(mib <= g.memory_mib, "MIG memory {mib} > GPU {}", g.memory_mib);
            for (j, m) in mig.iter().enumerate() {
                assert_eq!(m.index as usize, j);
                assert_eq!(m.gpu_instance_id, m.index + 1);
                assert!(m.compute_slices >= 1);
                assert!(m.uuid.starts_with("MIG-"));
                assert!(uuids.insert(m.uuid.clone()), "duplicate UUID {}", m.uuid);
                assert_eq!(scenario::parse_profile(&m.profile).map(|p| p.0), Some(m.compute_slices));
            }
        }
    }
});
