//! The simulated node: a scenario for the NVML simulator and the state
//! directory through which processes are registered on its GPUs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::unique;

/// A simulated node: a scenario file and a state directory.
pub struct SimNode {
    pub dir: tempfile::TempDir,
    pub scenario: PathBuf,
    pub state: PathBuf,
}

impl SimNode {
    /// A node with the given scenario TOML (`[[gpu]]` tables).
    pub fn new(scenario_toml: &str) -> SimNode {
        SimNode::at(tempfile::tempdir().expect("tempdir"), scenario_toml)
    }

    /// A node in a new directory under `parent` (kept after the run when
    /// the caller says `node.dir.disable_cleanup(true)`).
    pub fn in_dir(parent: &Path, scenario_toml: &str) -> SimNode {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        let dir = tempfile::Builder::new()
            .prefix("node-")
            .tempdir_in(parent)
            .expect("tempdir");
        SimNode::at(dir, scenario_toml)
    }

    fn at(dir: tempfile::TempDir, scenario_toml: &str) -> SimNode {
        let scenario = dir.path().join("scenario.toml");
        fs::write(&scenario, scenario_toml).expect("write scenario");
        let state = dir.path().join("state");
        fs::create_dir_all(state.join("procs")).expect("state dir");
        SimNode {
            dir,
            scenario,
            state,
        }
    }

    /// Two H100s and an A100 in MIG mode (3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb).
    pub fn standard() -> SimNode {
        SimNode::new(STANDARD_SCENARIO)
    }

    /// Registers `pid` as a GPU process (`mig` selects a MIG instance).
    pub fn register(&self, pid: u32, gpu: u32, mig: Option<u32>, memory_mib: u64, sm: f64) {
        self.register_kind(pid, gpu, mig, memory_mib, sm, "compute");
    }

    /// Registers `pid` as a process of `kind` (`compute`, `graphics` or
    /// `mps`: the NVML call that lists it).
    pub fn register_kind(
        &self,
        pid: u32,
        gpu: u32,
        mig: Option<u32>,
        memory_mib: u64,
        sm: f64,
        kind: &str,
    ) {
        let mut text =
            format!("gpu = {gpu}\nmemory_mib = {memory_mib}\nsm = {sm}\nkind = \"{kind}\"\n");
        if let Some(m) = mig {
            text.push_str(&format!("mig = {m}\n"));
        }
        let procs = self.state.join("procs");
        let tmp = procs.join(format!(".{pid}.tmp"));
        fs::write(&tmp, text).expect("write registration");
        fs::rename(&tmp, procs.join(format!("{pid}.toml"))).expect("rename registration");
    }

    /// Removes a registration (the process stops using the GPU).
    pub fn unregister(&self, pid: u32) {
        let _ = fs::remove_file(self.state.join("procs").join(format!("{pid}.toml")));
    }

    /// Makes GPU `index` fall off the bus (or come back).
    pub fn set_lost(&self, index: u32, lost: bool) {
        let dir = self.state.join("lost");
        fs::create_dir_all(&dir).expect("lost dir");
        let f = dir.join(index.to_string());
        if lost {
            fs::write(f, "").expect("mark lost");
        } else {
            let _ = fs::remove_file(f);
        }
    }

    /// Makes the energy counter of GPU `index` restart from 0, as a driver
    /// reload does (the simulator consumes the marker).
    pub fn reset_energy(&self, index: u32) {
        let dir = self.state.join("reset");
        fs::create_dir_all(&dir).expect("reset dir");
        let tmp = dir.join(format!(".{index}.tmp"));
        fs::write(&tmp, "").expect("write reset marker");
        fs::rename(&tmp, dir.join(index.to_string())).expect("rename reset marker");
    }

    /// Whether the simulator has not yet consumed a reset of GPU `index`.
    pub fn reset_pending(&self, index: u32) -> bool {
        self.state.join("reset").join(index.to_string()).exists()
    }

    /// Sets what GPU `index` reports about its health (`health/<index>.toml`
    /// of the simulator: ECC counts, remapped rows, throttle reasons).
    pub fn set_health(&self, index: u32, health_toml: &str) {
        let dir = self.state.join("health");
        fs::create_dir_all(&dir).expect("health dir");
        let tmp = dir.join(format!(".{index}.tmp"));
        fs::write(&tmp, health_toml).expect("write health");
        fs::rename(&tmp, dir.join(format!("{index}.toml"))).expect("rename health");
    }

    /// Queues one XID event on GPU `index`.
    pub fn inject_xid(&self, index: u32, xid: u64) {
        let dir = self.state.join("xid");
        fs::create_dir_all(&dir).expect("xid dir");
        let name = unique("xid");
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, format!("gpu = {index}\nxid = {xid}\n")).expect("write xid");
        fs::rename(&tmp, dir.join(format!("{name}.toml"))).expect("rename xid");
    }

    /// Environment for anything that loads the simulator.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            ("TALLY_SIM_SCENARIO", self.scenario.clone()),
            ("TALLY_SIM_STATE", self.state.clone()),
        ]
    }
}

/// One H100 80GB as a scenario's `[[gpu]]` table; `H100.repeat(n)` is a
/// node of n of them.
pub const H100: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
"#;

/// The scenario most tests use.
pub const STANDARD_SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

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
