//! The simulator's state files: `procs/<pid>.toml` registrations and
//! `xid/<name>.toml` faults, checked against a scenario with a MIG GPU.
//!
//! The first byte picks the file kind. Invariants: errors are one line (the
//! simulator reports each bad file on one stderr line); an accepted file is
//! in range for the scenario, and written back as `register`/`inject_xid`
//! write it, it reads back equal.
#![no_main]

use std::{path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use nvml_sim::{
    scenario::{self, Scenario},
    state,
};

const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40960
power_idle_w = 50
power_max_w = 400
mig = ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]
"#;

fn scenario() -> &'static Scenario {
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| scenario::parse(Path::new("fuzz.toml"), SCENARIO).expect("fixed scenario"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let s = scenario();
    if kind % 2 == 0 {
        match state::parse_registration(s, text) {
            Err(e) => assert!(!e.contains('\n'), "error spans lines: {e:?}"),
            Ok(reg) => {
                assert!(reg.validate().is_ok());
                let gpu = &s.gpus[reg.gpu as usize];
                match (&gpu.mig, reg.mig) {
                    (None, None) => {}
                    (Some(mig), Some(m)) => assert!((m as usize) < mig.len()),
                    other => panic!("MIG mode and `mig` disagree: {other:?}"),
                }
                let again = toml::to_string(&reg).expect("a registration serializes");
                assert_eq!(state::parse_registration(s, &again), Ok(reg));
            }
        }
    } else {
        match state::parse_xid(s, text) {
            Err(e) => assert!(!e.contains('\n'), "error spans lines: {e:?}"),
            Ok(fault) => {
                assert!((fault.gpu as usize) < s.gpus.len());
                let again = toml::to_string(&fault).expect("an XID serializes");
                assert_eq!(state::parse_xid(s, &again), Ok(fault));
            }
        }
    }
});
