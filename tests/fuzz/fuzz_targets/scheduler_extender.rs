//! The scheduler-extender JSON (`/scheduler/filter`, `/scheduler/prioritize`
//! bodies from kube-scheduler): `ExtenderArgs` → the pod's GPU demand →
//! filtering against a cluster with no Tally nodes.
//!
//! Invariants: a pod's demand for a resource is at least any one
//! container's (sums never wrap); every node name asked about is answered
//! exactly once (passes, fails or unresolvable); a pod without GPU demand
//! passes everywhere.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tally_aggregator::{
    cluster::ClusterView,
    scheduler::{ExtenderArgs, GPU_RESOURCE, demand, filter_nodes, whole_quantity},
};

fuzz_target!(|data: &[u8]| {
    let Ok(args) = serde_json::from_slice::<ExtenderArgs>(data) else {
        return;
    };
    if let Some(pod) = &args.pod
        && let Ok(d) = demand(pod)
    {
        for c in pod.spec.containers.iter().chain(&pod.spec.init_containers) {
            for map in [&c.resources.limits, &c.resources.requests] {
                if let Some(n) = map.get(GPU_RESOURCE).and_then(whole_quantity) {
                    if c.resources.limits.contains_key(GPU_RESOURCE)
                        && !std::ptr::eq(map, &c.resources.limits)
                    {
                        continue; // limits win over requests
                    }
                    assert!(d.gpus >= n, "pod demand {} below a container's {n}", d.gpus);
                }
            }
        }
    }
    let view = ClusterView {
        generated_at: String::new(),
        generated_at_ms: 0,
        nodes: Vec::new(),
        tenants: Vec::new(),
    };
    let result = filter_nodes(&args, &view, 0);
    if let Some(names) = &args.node_names {
        let asked: BTreeSet<&String> = names.iter().collect();
        let mut answered: Vec<&String> = result.node_names.iter().flatten().collect();
        answered.extend(result.failed_nodes.keys());
        answered.extend(result.failed_and_unresolvable_nodes.keys());
        let answered_set: BTreeSet<&String> = answered.iter().copied().collect();
        if result.error.is_empty() {
            assert_eq!(answered_set, asked, "not every node answered once");
        }
    }
});
