//! The node's own checks: NVML, privileges, cgroups, BTF, bpffs and a
//! real load of every eBPF probe.

use std::path::Path;

use super::{Check, Verdict};
use crate::{gpu, paths};

/// One check per eBPF probe: loaded and attached for real, or why not.
pub fn probe_checks(config: &crate::probes::ProbesConfig) -> Vec<Check> {
    crate::probes::trial(config)
        .into_iter()
        .map(|(name, status)| Check {
            name,
            verdict: match status.error {
                None => Verdict::Ok("loads and attaches".into()),
                // No libcuda is not a broken probe on a node without GPUs.
                Some(e) if e.starts_with("no CUDA driver library") => Verdict::Warn(e),
                Some(e) if e.starts_with("disabled in the config") => Verdict::Warn(e),
                Some(e) => Verdict::Fail(e),
            },
        })
        .collect()
}

/// Every node check, in the order they are printed, each run when the
/// iterator reaches it (so a report can print it as it finishes).
pub fn checks_lazy(nvml_lib: &Path) -> impl Iterator<Item = Check> + '_ {
    NODE_CHECKS.into_iter().map(move |(name, check)| Check {
        name,
        verdict: check(nvml_lib),
    })
}

/// One node check, given the NVML library path.
type NodeCheck = fn(&Path) -> Verdict;

/// The node checks by name, in the order they are printed (each given the
/// NVML library path, which only `nvml` reads).
const NODE_CHECKS: [(&str, NodeCheck); 5] = [
    ("nvml", nvml),
    ("privileges", |_| privileges()),
    ("cgroups", |_| cgroups()),
    ("btf", |_| btf()),
    ("bpffs", |_| bpffs()),
];

fn nvml(lib: &Path) -> Verdict {
    let shown = gpu::describe_library(lib);
    match gpu::open(lib) {
        Err(e) => Verdict::Fail(format!(
            "cannot open {shown}: {e}; install the NVIDIA driver, or pass --nvml-lib PATH"
        )),
        Ok(nvml) => {
            let driver = nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
            match nvml.device_count() {
                Ok(n) => Verdict::Ok(format!("{shown}: driver {driver}, {n} GPU(s)")),
                Err(e) => Verdict::Fail(format!("{shown} opened but cannot count GPUs: {e}")),
            }
        }
    }
}

/// Effective capabilities of this process, from `/proc/self/status`.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn privileges() -> Verdict {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, n)| n)
    .collect();
    if missing.is_empty() {
        Verdict::Ok("CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN present (eBPF and cgroups work)".into())
    } else {
        Verdict::Fail(format!(
            "missing {}: eBPF probes and enforcement are off; run as root or grant them \
             (DaemonSet securityContext.capabilities.add, systemd AmbientCapabilities=)",
            missing.join(", ")
        ))
    }
}

fn cgroups() -> Verdict {
    let pure = Path::new(paths::CGROUP_ROOT)
        .join("cgroup.controllers")
        .exists();
    match crate::cgroupfs::unified_root() {
        Some(root) if pure => Verdict::Ok(format!("cgroup v2 at {}", root.display())),
        Some(root) => Verdict::Ok(format!(
            "hybrid: v1 controllers under {}, cgroup v2 at {} (network probes attach there)",
            paths::CGROUP_ROOT,
            root.display()
        )),
        None => Verdict::Fail(format!(
            "no cgroup v2 hierarchy at {} or {}: tenants by cgroup and network probes need it; \
             mount one (`mount -t cgroup2 none {}`)",
            paths::CGROUP_ROOT,
            paths::CGROUP_UNIFIED_HYBRID,
            paths::CGROUP_UNIFIED_HYBRID
        )),
    }
}

fn btf() -> Verdict {
    if Path::new(paths::KERNEL_BTF).exists() {
        Verdict::Ok(format!("{} present", paths::KERNEL_BTF))
    } else {
        Verdict::Fail(format!(
            "{} missing: the kernel was built without CONFIG_DEBUG_INFO_BTF; BTF tracepoints are off",
            paths::KERNEL_BTF
        ))
    }
}

fn bpffs() -> Verdict {
    let mounted = crate::cgroupfs::is_mounted("bpf");
    if mounted {
        Verdict::Ok(format!(
            "bpffs mounted; maps pin under {}",
            paths::BPF_PIN_DIR
        ))
    } else {
        Verdict::Warn(format!(
            "bpffs not mounted: the agent mounts it at {} on start (needs CAP_SYS_ADMIN); \
             without it counters reset on agent restart",
            paths::BPFFS
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_fails_with_the_fix() {
        let v = nvml(Path::new("/nonexistent/libnvidia-ml.so.1"));
        let Verdict::Fail(text) = v else {
            panic!("{v:?}")
        };
        assert!(text.contains("/nonexistent/libnvidia-ml.so.1"), "{text}");
        assert!(text.contains("--nvml-lib"), "{text}");
    }

    #[test]
    fn every_check_runs() {
        let names: Vec<_> = checks_lazy(Path::new("/nonexistent"))
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["nvml", "privileges", "cgroups", "btf", "bpffs"]);
    }
}
