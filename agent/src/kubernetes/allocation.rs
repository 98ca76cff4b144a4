//! GPU use outside allocation: pods whose processes run on a GPU the
//! kubelet did not allocate to them (a privileged pod, or
//! `NVIDIA_VISIBLE_DEVICES=all` set by hand).
//!
//! A pure comparison of one snapshot's GPU processes, already named by pod,
//! with the pods' device-plugin and DRA devices. It judges only what it can
//! know: a pod the kubelet's answer lists, from an answer fresh enough to
//! trust, holding no DRA device it cannot resolve to a UUID.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{PodName, podresources::Allocations};
use crate::snapshot::{GpuSnapshot, UnallocatedGpuUse};

/// The pod of a process cgroup, as far as the node knows it.
pub type PodOf<'a> = dyn FnMut(&str) -> Option<PodName> + 'a;

/// Every (pod, GPU) pair where a process of the pod runs on a GPU or MIG
/// device the pod was not allocated, once each, sorted. A MIG instance
/// counts as allocated when it or its parent GPU is.
pub fn unallocated_uses(
    gpus: &[GpuSnapshot],
    alloc: &Allocations,
    pod_of: &mut PodOf<'_>,
) -> Vec<UnallocatedGpuUse> {
    let mut allocated: HashMap<&PodName, BTreeSet<&str>> = HashMap::new();
    for (container, devices) in &alloc.containers {
        let set = allocated.entry(&container.pod).or_default();
        for (_, id) in devices {
            set.insert(super::podresources::physical_device_id(id));
        }
    }
    let mut out: BTreeMap<(String, String, String), UnallocatedGpuUse> = BTreeMap::new();
    for gpu in gpus {
        for p in &gpu.processes {
            let Some(cgroup) = p.cgroup.as_deref() else {
                continue;
            };
            let Some(pod) = pod_of(cgroup) else {
                continue;
            };
            if !alloc.pods.contains(&pod) || alloc.opaque_dra.contains(&pod) {
                continue;
            }
            let mine = allocated.get(&pod);
            let held = |uuid: &str| mine.is_some_and(|s| s.contains(uuid));
            if held(&gpu.uuid) || gpu.parent_uuid.as_deref().is_some_and(held) {
                continue;
            }
            let key = (pod.namespace.clone(), pod.pod.clone(), gpu.gpu.clone());
            out.entry(key).or_insert_with(|| UnallocatedGpuUse {
                tenant: p.tenant.to_string(),
                namespace: pod.namespace.clone(),
                pod: pod.pod.clone(),
                gpu: gpu.gpu.clone(),
                uuid: gpu.uuid.clone(),
                cgroup: super::cgroup::pod_dir(cgroup).unwrap_or_else(|| cgroup.to_owned()),
                allocated: mine
                    .map(|s| s.iter().map(|u| (*u).to_owned()).collect())
                    .unwrap_or_default(),
            });
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use super::*;
    use crate::{
        kubernetes::ContainerRef,
        snapshot::{GpuProcess, GpuSnapshot},
    };

    const POD_A: &str = "/kubepods.slice/kubepods-pode1465238_4518_4c21_832f_fd9f87033daa.slice/cri-containerd-1.scope";
    const POD_B: &str = "/kubepods/besteffort/pode1465238-4518-4c21-832f-fd9f87033dab/2";

    fn pod(name: &str) -> PodName {
        PodName {
            namespace: "ns".into(),
            pod: name.into(),
        }
    }

    fn gpu(label: &str, uuid: &str, parent: Option<&str>, cgroups: &[&str]) -> GpuSnapshot {
        GpuSnapshot {
            gpu: label.into(),
            uuid: uuid.into(),
            parent_uuid: parent.map(str::to_owned),
            processes: cgroups
                .iter()
                .enumerate()
                .map(|(i, cg)| GpuProcess {
                    pid: i as u32 + 1,
                    tenant: Arc::from("ns"),
                    cgroup: Some(Arc::from(*cg)),
                    memory_bytes: 1,
                    sm_ratio: None,
                    workload: None,
                    workload_id: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn alloc(held: &[(&str, &[&str])]) -> Allocations {
        let mut a = Allocations {
            fetched_at: Some(Instant::now()),
            ..Default::default()
        };
        for (name, devices) in held {
            a.pods.insert(pod(name));
            a.containers.push((
                ContainerRef {
                    pod: pod(name),
                    container: "c".into(),
                },
                devices
                    .iter()
                    .map(|d| ("nvidia.com/gpu".to_owned(), (*d).to_owned()))
                    .collect(),
            ));
        }
        a
    }

    fn pod_of(cgroup: &str) -> Option<PodName> {
        if cgroup == POD_A {
            Some(pod("a"))
        } else if cgroup == POD_B {
            Some(pod("b"))
        } else {
            None
        }
    }

    #[test]
    fn use_of_a_gpu_not_allocated_is_found_once() {
        let gpus = [
            gpu("0", "GPU-0", None, &[POD_A]),
            gpu("1", "GPU-1", None, &[POD_A, POD_A, POD_B, "/user.slice"]),
        ];
        let a = alloc(&[("a", &["GPU-0::1"]), ("b", &["GPU-1"])]);
        let uses = unallocated_uses(&gpus, &a, &mut pod_of);
        assert_eq!(uses.len(), 1, "{uses:?}");
        let u = &uses[0];
        assert_eq!((u.pod.as_str(), u.gpu.as_str()), ("a", "1"));
        assert_eq!(u.uuid, "GPU-1");
        assert_eq!(u.allocated, ["GPU-0"]);
        assert_eq!(
            u.cgroup,
            "/kubepods.slice/kubepods-pode1465238_4518_4c21_832f_fd9f87033daa.slice"
        );
    }

    #[test]
    fn a_mig_instance_of_an_allocated_gpu_is_allocated() {
        let gpus = [
            gpu("0/1/0", "MIG-x", Some("GPU-0"), &[POD_A]),
            gpu("0/2/0", "MIG-y", Some("GPU-0"), &[POD_B]),
        ];
        let a = alloc(&[("a", &["GPU-0"]), ("b", &["MIG-y"])]);
        assert!(unallocated_uses(&gpus, &a, &mut pod_of).is_empty());
    }

    #[test]
    fn pods_it_cannot_judge_are_left_alone() {
        let gpus = [gpu("0", "GPU-0", None, &[POD_A, POD_B])];
        // `a` is unknown to the kubelet; `b` holds a DRA device by index.
        let mut a = alloc(&[("b", &[])]);
        a.opaque_dra.insert(pod("b"));
        assert!(unallocated_uses(&gpus, &a, &mut pod_of).is_empty());
        // A pod the kubelet lists with no device at all is flagged.
        let a = alloc(&[("a", &[])]);
        assert_eq!(unallocated_uses(&gpus, &a, &mut pod_of).len(), 1);
    }
}
