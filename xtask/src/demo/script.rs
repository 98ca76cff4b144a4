//! What the demo node runs: its GPUs, the agent's config, the tenants'
//! jobs, and the timeline that makes one GPU idle and one stuck.

use std::{path::Path, time::Duration};

/// The node the agent reports as, and a second name the scheduler is
/// asked about (no agent: it shows what "unknown" scores).
pub(crate) const NODE: &str = "demo-node";
pub(crate) const OTHER_NODE: &str = "cpu-node";

/// PCIe at full use is 100 MB/s per GPU (not 32 GB/s): what the fake
/// driver's copies do not explain is charged to `_unattributed`, and at
/// this scale it stays readable beside them.
pub(crate) const SCENARIO: &str = r#"# The demo node: two H100s, an L4, an A100 in MIG mode and a spare H100.
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
pcie_max_kbps = 100000

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
pcie_max_kbps = 100000

[[gpu]]
model = "NVIDIA L4"
memory_mib = 23034
power_idle_w = 16
power_max_w = 72
pcie_max_kbps = 100000

[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40960
power_idle_w = 50
power_max_w = 400
pcie_max_kbps = 100000
mig = ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
pcie_max_kbps = 100000
"#;

/// beta's GPU-memory quota: its two jobs hold 56 GiB, so it is throttled.
pub(crate) const BETA_GPU_MEMORY_GIB: u64 = 32;

/// The agent's config: tenants are the component under `<tree>/tally/`
/// (`tree`: the v2 path of the demo's cgroup parent, so that tenant
/// cgroups of anything else on the machine stay out of the demo), state
/// thresholds short enough to be seen within a minute, reports to the
/// aggregator every 2 s.
pub(crate) fn agent_config(
    state_dir: &Path,
    (tree, cgroup_parent): (&str, &str),
    aggregator: &str,
    token_file: &Path,
    pin_dir: &Path,
    cuda_lib: &Path,
) -> String {
    format!(
        r#"[agent]
state_dir = "{state}"

[report]
aggregator = "{aggregator}"
token_file = "{token}"
node = "{NODE}"
interval = "2s"

[states]
idle_after = "5s"
stuck_after = "5s"

[probes]
pin_dir = "{pin}"
cuda_libs = ["{cuda}"]

[tenant]
cgroup_parent = "{cgroup_parent}"

[[tenant.rule]]
cgroup = '^{tree}/tally/(?P<tenant>[^/]+)/'

[[tenant.rule]]
user = true

[tenant.quota.beta]
gpu_memory = "{BETA_GPU_MEMORY_GIB}GiB"
gpu_memory_action = "throttle"
grace = "3s"
"#,
        state = state_dir.display(),
        token = token_file.display(),
        pin = pin_dir.display(),
        cuda = cuda_lib.display(),
    )
}

/// What happens to a job's GPU during the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Works all along.
    Steady,
    /// Keeps its memory but stops computing from this time on.
    IdleFrom(Duration),
    /// Pins the GPU (99 %, above `stuck_utilization`) while its process
    /// makes no progress.
    StuckFrom(Duration),
}

/// One demo job: a process on a GPU, with host↔device copies and
/// network traffic of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub tenant: &'static str,
    pub name: &'static str,
    pub gpu: u32,
    pub mig: Option<u32>,
    pub memory_mib: u64,
    /// SM utilization it breathes around.
    pub sm: f64,
    /// Bytes copied to the device each second (and a quarter back).
    pub pcie_bytes: u64,
    /// UDP datagrams of 8 KiB sent each second.
    pub datagrams: u64,
    pub fate: Fate,
}

pub(crate) const JOBS: &[Job] = &[
    Job {
        tenant: "acme",
        name: "train-llm",
        gpu: 0,
        mig: None,
        memory_mib: 61_440,
        sm: 0.60,
        pcie_bytes: 64 << 20,
        datagrams: 64,
        fate: Fate::Steady,
    },
    Job {
        tenant: "acme",
        name: "eval",
        gpu: 3,
        mig: Some(0),
        memory_mib: 12_288,
        sm: 0.40,
        pcie_bytes: 8 << 20,
        datagrams: 8,
        fate: Fate::Steady,
    },
    Job {
        tenant: "beta",
        name: "notebook",
        gpu: 0,
        mig: None,
        // Time on a shared GPU is split by memory: at least its SM share,
        // so its SM seconds stay within its allocated seconds.
        memory_mib: 16_384,
        sm: 0.10,
        pcie_bytes: 1 << 20,
        datagrams: 4,
        fate: Fate::Steady,
    },
    Job {
        tenant: "beta",
        name: "finetune",
        gpu: 1,
        mig: None,
        memory_mib: 40_960,
        sm: 0.70,
        pcie_bytes: 32 << 20,
        datagrams: 32,
        fate: Fate::StuckFrom(Duration::from_secs(18)),
    },
    Job {
        tenant: "gamma",
        name: "inference",
        gpu: 3,
        mig: Some(2),
        memory_mib: 3_072,
        sm: 0.30,
        pcie_bytes: 4 << 20,
        datagrams: 128,
        fate: Fate::Steady,
    },
    Job {
        tenant: "gamma",
        name: "batch",
        gpu: 2,
        mig: None,
        memory_mib: 6_144,
        sm: 0.50,
        pcie_bytes: 16 << 20,
        datagrams: 16,
        fate: Fate::IdleFrom(Duration::from_secs(10)),
    },
];

impl Job {
    /// SM utilization `elapsed` into the demo (tick `i` of job `n`).
    pub(crate) fn sm_at(&self, elapsed: Duration, n: usize) -> f64 {
        match self.fate {
            Fate::IdleFrom(t) if elapsed >= t => return 0.0,
            Fate::StuckFrom(t) if elapsed >= t => return 0.99,
            _ => {}
        }
        // Breathes ±25 % so the numbers move, never to 0 (that is idle);
        // GPU 0's two jobs stay under the stuck threshold (0.95) together.
        let phase = (elapsed.as_secs_f64() / 5.0 + n as f64).sin();
        ((self.sm * (1.0 + 0.25 * phase)).clamp(0.01, 0.94) * 1000.0).round() / 1000.0
    }

    /// The shell loop that makes its I/O: copies through the fake libcuda
    /// (counted by the agent's uprobes) and datagrams to `sink`.
    pub(crate) fn io_loop(
        &self,
        cuda_copy: &Path,
        cuda_lib: &Path,
        netload: &Path,
        sink: u16,
    ) -> String {
        format!(
            "while :; do '{copy}' '{lib}' cuMemcpyHtoD_v2 {h2d} 1 cuMemcpyDtoH_v2 {d2h} 1 >/dev/null; \
             '{net}' udp-send 127.0.0.1 {sink} {n} 8192 >/dev/null; sleep 1; done",
            copy = cuda_copy.display(),
            lib = cuda_lib.display(),
            h2d = self.pcie_bytes,
            d2h = self.pcie_bytes / 4,
            net = netload.display(),
            n = self.datagrams,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_gives_one_idle_and_one_stuck_gpu_and_gpu_0_never_spins() {
        let late = Duration::from_secs(30);
        let idle: Vec<_> = JOBS.iter().filter(|j| j.sm_at(late, 0) == 0.0).collect();
        let stuck: Vec<_> = JOBS.iter().filter(|j| j.sm_at(late, 0) >= 0.95).collect();
        assert_eq!((idle.len(), stuck.len()), (1, 1));
        assert_ne!(idle[0].gpu, stuck[0].gpu);
        for t in 0..60 {
            let on_gpu0: f64 = JOBS
                .iter()
                .enumerate()
                .filter(|(_, j)| j.gpu == 0)
                .map(|(n, j)| j.sm_at(Duration::from_secs(t), n))
                .sum();
            assert!(on_gpu0 < 0.95, "GPU 0 at {on_gpu0} after {t} s");
        }
        let beta: u64 = JOBS
            .iter()
            .filter(|j| j.tenant == "beta")
            .map(|j| j.memory_mib)
            .sum();
        assert!(beta > BETA_GPU_MEMORY_GIB * 1024, "beta is over its quota");
    }
}
