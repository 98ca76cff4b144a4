//! The simulated node: a scenario for the NVML simulator and the state
//! directory through which processes are registered on its GPUs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nvml_sim::{ProcKind, Registration, XidFault, state};

use crate::unique;

/// A simulated node: a scenario file and a state directory.
pub struct SimNode {
    pub dir: tempfile::TempDir,
    pub scenario: PathBuf,
    pub state: PathBuf,
    /// Where an agent on this node pins its maps when its config names no
    /// `pin_dir` ([`crate::Agent::launch`] adds it), not the production
    /// default `/sys/fs/bpf/tally`, which an agent of the machine may hold;
    /// removed with the node.
    pub pin_dir: PathBuf,
}

impl Drop for SimNode {
    fn drop(&mut self) {
        // Gone already when no agent pinned anything.
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
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
        fs::create_dir_all(state::procs_dir(&state)).expect("state dir");
        SimNode {
            dir,
            scenario,
            state,
            pin_dir: Path::new("/sys/fs/bpf").join(unique("tally-e2e-node")),
        }
    }

    /// Gives the agent of `config` this node's [`SimNode::pin_dir`] when
    /// the config names none, as `[probes] pin_dir`: a test's agent must
    /// not take the machine's maps. [`crate::Agent::launch`] calls it; a test that
    /// spawns `tally agent` itself calls it on its config first.
    pub fn pin_here(&self, config: &Path) {
        let Ok(text) = fs::read_to_string(config) else {
            return;
        };
        // A config the agent would refuse is left for the agent to refuse.
        let Ok(mut table) = text.parse::<toml::Table>() else {
            return;
        };
        let probes = table
            .entry("probes")
            .or_insert_with(|| toml::Table::new().into());
        let Some(probes) = probes.as_table_mut() else {
            return;
        };
        if probes.contains_key("pin_dir") {
            return;
        }
        let dir = self.pin_dir.display().to_string();
        probes.insert("pin_dir".into(), dir.into());
        fs::write(config, table.to_string()).expect("write agent config");
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
        let kind = match kind {
            "compute" => ProcKind::Compute,
            "graphics" => ProcKind::Graphics,
            "mps" => ProcKind::Mps,
            _ => panic!("unknown process kind {kind:?} (compute, graphics or mps)"),
        };
        let reg = Registration {
            gpu,
            mig,
            memory_mib,
            sm,
            kind,
        };
        state::register(&self.state, pid, &reg)
            .unwrap_or_else(|e| panic!("register pid {pid}: {e}"));
    }

    /// Removes a registration (the process stops using the GPU).
    pub fn unregister(&self, pid: u32) {
        state::unregister(&self.state, pid).unwrap_or_else(|e| panic!("unregister pid {pid}: {e}"));
    }

    /// Makes GPU `index` fall off the bus (or come back).
    pub fn set_lost(&self, index: u32, lost: bool) {
        state::set_lost(&self.state, index, lost)
            .unwrap_or_else(|e| panic!("set_lost gpu {index}: {e}"));
    }

    /// Makes the energy counter of GPU `index` restart from 0, as a driver
    /// reload does (the simulator consumes the marker).
    pub fn reset_energy(&self, index: u32) {
        state::reset_energy(&self.state, index)
            .unwrap_or_else(|e| panic!("reset_energy gpu {index}: {e}"));
    }

    /// Whether the simulator has not yet consumed a reset of GPU `index`.
    pub fn reset_pending(&self, index: u32) -> bool {
        state::reset_file(&self.state, index).exists()
    }

    /// Sets what GPU `index` reports about its health (`health/<index>.toml`
    /// of the simulator: ECC counts, remapped rows, throttle reasons),
    /// checked as the simulator reads it.
    pub fn set_health(&self, index: u32, health_toml: &str) {
        let health = state::parse_health(health_toml)
            .unwrap_or_else(|e| panic!("health of gpu {index}: {e}"));
        state::set_health(&self.state, index, &health)
            .unwrap_or_else(|e| panic!("set_health gpu {index}: {e}"));
    }

    /// Queues one XID event on GPU `index`.
    pub fn inject_xid(&self, index: u32, xid: u64) {
        let fault = XidFault { gpu: index, xid };
        state::inject_xid(&self.state, &unique("xid"), &fault)
            .unwrap_or_else(|e| panic!("inject xid {xid} on gpu {index}: {e}"));
    }

    /// Environment for anything that loads the simulator.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            (state::SCENARIO_ENV, self.scenario.clone()),
            (state::STATE_ENV, self.state.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `config` as the agent reads it once the node has had its say.
    fn pinned(node: &SimNode, config: &str) -> PathBuf {
        let file = node.dir.path().join(unique("agent") + ".toml");
        fs::write(&file, config).unwrap();
        node.pin_here(&file);
        let parsed = tally_agent::config::Config::load(&file)
            .unwrap_or_else(|e| panic!("{e:?}\n{}", fs::read_to_string(&file).unwrap()));
        parsed.probes.pin_dir
    }

    #[test]
    fn an_agent_without_a_pin_dir_pins_on_its_node() {
        let node = SimNode::standard();
        assert!(
            node.pin_dir
                .to_string_lossy()
                .starts_with("/sys/fs/bpf/tally-e2e-node")
        );
        let rule = "[[tenant.rule]]\ncgroup = '/tally/(?P<tenant>[^/]+)/'\n";
        assert_eq!(pinned(&node, ""), node.pin_dir);
        assert_eq!(pinned(&node, rule), node.pin_dir);
        let probes = format!("[probes]\nnetwork = false\n\n{rule}");
        assert_eq!(pinned(&node, &probes), node.pin_dir);
        // Read as TOML, not as text: a comment naming the key, or the
        // table's keys written dotted.
        let comment = format!("# the default pin_dir is fine\n{rule}");
        assert_eq!(pinned(&node, &comment), node.pin_dir);
        assert_eq!(pinned(&node, "probes.network = false\n"), node.pin_dir);
        // A config that names its own keeps it.
        let own = "[probes]\npin_dir = \"/sys/fs/bpf/mine\"\n";
        assert_eq!(pinned(&node, own), Path::new("/sys/fs/bpf/mine"));
        assert_ne!(SimNode::standard().pin_dir, node.pin_dir);
    }
}
