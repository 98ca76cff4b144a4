//! Every on-disk path the agent knows about, in one place.

use std::path::{Path, PathBuf};

/// Where the kernel exposes cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup v2 hierarchy on hybrid hosts (v1 controllers + a v2 tree).
pub const CGROUP_UNIFIED_HYBRID: &str = "/sys/fs/cgroup/unified";
/// bpffs mount point, and the directory Tally pins its maps under.
pub const BPFFS: &str = "/sys/fs/bpf";
pub const BPF_PIN_DIR: &str = "/sys/fs/bpf/tally";
/// Kernel BTF, needed by CO-RE programs.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Default config file of the agent and the aggregator.
pub const DEFAULT_CONFIG: &str = "/etc/tally/tally.toml";
/// Default state directory (spool, audit log).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tally";
/// The NVIDIA driver's management library, as the loader finds it.
pub const DEFAULT_NVML_LIB: &str = "libnvidia-ml.so.1";
/// The kernel's boot id: changes on every boot, names report sequences.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Character/block device majors by driver name (`nvidia-caps`).
pub const PROC_DEVICES: &str = "/proc/devices";
/// The NVIDIA driver's capability files (MIG `DeviceFileMinor`s).
pub const NVIDIA_CAPABILITIES: &str = "/proc/driver/nvidia/capabilities";
/// The enforcement audit log, in the state directory.
pub fn audit_log(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.log")
}
/// The node's audit key (HMAC of every audit line), in the state
/// directory: made 0600 on first start when absent, or provisioned.
pub fn audit_key(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.key")
}
/// The report sender's state (next sequence number, reported counters),
/// in the state directory.
pub const REPORT_STATE_FILE: &str = "report-state.json";
/// Reports waiting for the aggregator, in the state directory.
pub const SPOOL_DIR: &str = "spool";
/// The lock that keeps a second agent off the state directory (holds the
/// holder's pid), in the state directory.
pub const STATE_LOCK_FILE: &str = "agent.lock";
/// This process's mounts (cgroup hierarchies) and cgroups.
pub const PROC_SELF_MOUNTINFO: &str = "/proc/self/mountinfo";
pub const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";
/// The quotas last applied, to audit changes across restarts.
pub fn applied_quotas(state_dir: &Path) -> PathBuf {
    state_dir.join("quotas.json")
}

/// The kubelet pod-resources API's unix socket (`v1.PodResourcesLister`).
pub const KUBELET_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// The kubelet's pod log directories: `<namespace>_<pod>_<uid>/`.
pub const KUBERNETES_POD_LOGS_DIR: &str = "/var/log/pods";
/// The kubelet's container log links: `<pod>_<namespace>_<container>-<id>.log`.
pub const KUBERNETES_CONTAINER_LOGS_DIR: &str = "/var/log/containers";

/// `/proc/<pid>/cgroup`.
pub fn proc_cgroup(pid: u32) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join("cgroup")
}

/// `/proc/<pid>`.
pub fn proc_dir(pid: u32) -> PathBuf {
    Path::new("/proc").join(pid.to_string())
}

/// Writes `/proc/<pid>/stat` into `out` (cleared first): the sampler reads
/// it for every GPU process each cycle, so the path's buffer is reused.
pub fn proc_stat_into(out: &mut String, pid: u32) {
    proc_file_into(out, pid, "stat");
}

/// Writes `/proc/<pid>/cgroup` into `out` (cleared first), as
/// [`proc_stat_into`] does for the process cache's periodic re-reads.
pub fn proc_cgroup_into(out: &mut String, pid: u32) {
    proc_file_into(out, pid, "cgroup");
}

fn proc_file_into(out: &mut String, pid: u32, file: &str) {
    use std::fmt::Write as _;
    out.clear();
    // Writing into a String cannot fail.
    let _ = write!(out, "/proc/{pid}/{file}");
}
