//! GPU use outside allocation, acted on: each pod found on a GPU the
//! kubelet did not allocate to it is logged and audited when it starts and
//! when it ends, and with `[tenant.kubernetes] enforce_allocation` its
//! cgroup gets a `cgroup/dev` program allowing only the GPUs it was
//! allocated.
//!
//! The program is attached through a BPF link, which the kernel always
//! treats as "allow multiple": it runs beside the container runtime's own
//! device program, and a device opens only when every program allows it.
//! It stays until the pod's cgroup is gone: the denied process leaves NVML's
//! list, and detaching then would hand the GPU straight back.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde_json::json;
use tracing::warn;

use super::{
    devices::{CapsSource, TenantDevices, allowed_devices},
    record::Recorder,
};
use crate::snapshot::{GpuSnapshot, UnallocatedGpuUse};

/// Audit `resource` of these records.
const RESOURCE: &str = "gpus";

/// Pods flagged so far, and the programs attached to them.
#[derive(Debug)]
pub(crate) struct Guard {
    enforce: bool,
    /// (namespace, pod, gpu) → the use, while it lasts.
    flagged: BTreeMap<(String, String, String), UnallocatedGpuUse>,
    /// Pod cgroup (v2 path) → its program.
    denied: BTreeMap<String, TenantDevices>,
    /// Pod cgroups whose attach failed: said once, not retried each cycle.
    failed: BTreeSet<String>,
    caps: CapsSource,
    /// Where cgroup v2 paths are rooted; `None` without a v2 hierarchy.
    root: Option<&'static Path>,
}

impl Guard {
    pub(crate) fn new(enforce: bool) -> Guard {
        Guard {
            enforce,
            flagged: BTreeMap::new(),
            denied: BTreeMap::new(),
            failed: BTreeSet::new(),
            caps: CapsSource::default(),
            root: crate::cgroupfs::unified_root(),
        }
    }

    /// Logs, audits and (when enforcing) denies the uses of one snapshot.
    pub(crate) fn observe(
        &mut self,
        uses: &[UnallocatedGpuUse],
        gpus: &[GpuSnapshot],
        rec: &Recorder,
    ) {
        let now: BTreeMap<_, _> = uses
            .iter()
            .map(|u| ((u.namespace.clone(), u.pod.clone(), u.gpu.clone()), u))
            .collect();
        for (key, u) in &now {
            if self.flagged.contains_key(key) {
                continue;
            }
            warn!(
                tenant = %u.tenant,
                "pod {}/{} uses GPU {} ({}) that the kubelet did not allocate to it (allocated: {:?})",
                u.namespace, u.pod, u.gpu, u.uuid, u.allocated
            );
            rec.record(&u.tenant, RESOURCE, "unallocated_use", detail(u));
            self.flagged.insert(key.clone(), (*u).clone());
        }
        for (_, u) in self.flagged.extract_if(.., |k, _| !now.contains_key(k)) {
            rec.record(&u.tenant, RESOURCE, "unallocated_use_ended", detail(&u));
        }
        if self.enforce {
            self.deny(uses, gpus, rec);
        }
        self.forget_gone_pods();
    }

    /// Attaches each flagged pod's program, allowing what it was allocated.
    fn deny(&mut self, uses: &[UnallocatedGpuUse], gpus: &[GpuSnapshot], rec: &Recorder) {
        let Some(root) = self.root else {
            return;
        };
        for u in uses {
            if self.denied.contains_key(&u.cgroup) || self.failed.contains(&u.cgroup) {
                continue;
            }
            let dir = root.join(u.cgroup.trim_start_matches('/'));
            let caps_major = self.caps.caps_major();
            let (allowed, _) = allowed_devices(&u.allocated, gpus, &self.caps, caps_major);
            match attach(&dir, caps_major, &allowed) {
                Ok(program) => {
                    let mut d = detail(u);
                    d["cgroup"] = json!(u.cgroup);
                    d["allowed"] = json!(names(&allowed));
                    rec.act(&u.tenant, RESOURCE, "unallocated_denied", d);
                    self.denied.insert(u.cgroup.clone(), program);
                }
                Err(e) => {
                    warn!(
                        "cannot deny pod {}/{} the GPUs it was not allocated ({}): {e}",
                        u.namespace,
                        u.pod,
                        dir.display()
                    );
                    let mut d = detail(u);
                    d["error"] = json!(e.to_string());
                    rec.record(&u.tenant, RESOURCE, "unallocated_deny_failed", d);
                    self.failed.insert(u.cgroup.clone());
                }
            }
        }
    }

    /// Drops the programs of pods whose cgroup was removed.
    fn forget_gone_pods(&mut self) {
        let Some(root) = self.root else {
            return;
        };
        let exists = |cg: &String| root.join(cg.trim_start_matches('/')).exists();
        self.denied.retain(|cg, _| exists(cg));
        self.failed.retain(exists);
    }
}

fn attach(
    dir: &Path,
    caps_major: Option<u32>,
    allowed: &BTreeSet<super::devices::Dev>,
) -> Result<TenantDevices, super::devices::DeviceError> {
    let mut program = TenantDevices::attach(dir, caps_major)?;
    program.set_allowed(allowed)?;
    Ok(program)
}

fn detail(u: &UnallocatedGpuUse) -> serde_json::Value {
    json!({
        "namespace": u.namespace,
        "pod": u.pod,
        "gpu": u.gpu,
        "uuid": u.uuid,
        "allocated": u.allocated,
    })
}

fn names(devs: &BTreeSet<super::devices::Dev>) -> Vec<String> {
    devs.iter().map(|(ma, mi)| format!("{ma}:{mi}")).collect()
}
