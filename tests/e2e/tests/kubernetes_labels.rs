//! Tenants from labels end to end (issue 17, item 3): a fake API server
//! answering list and watch for pods and namespaces, real processes in pod
//! cgroups shaped by both kubelet cgroup drivers (made beneath our own
//! cgroup), the NVML simulator, and the real `tally agent` with
//! `[tenant.kubernetes] tenant_label`.
//!
//! A pod's label wins over its namespace's, which wins over the namespace
//! name; a label change moves the pod within one watch event; an API-server
//! outage keeps the last answer.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::Duration;

use tally_e2e::{
    Agent, SimNode,
    kubernetes_support::{FakeApiServer, Kind, cgroupfs_besteffort_pod, systemd_burstable_pod},
    require_root, wait_for,
};

const GIB: f64 = (1u64 << 30) as f64;
const LABEL: &str = "tally.dev/tenant";
const NODE: &str = "gpu-node-1";

const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
uuid = "GPU-6b1d3c1e-0000-4a5b-9c8d-7e6f5a4b3c2d"
power_idle_w = 70
power_max_w = 700
"#;

fn memory(agent: &Agent, tenant: &str) -> f64 {
    agent
        .metrics()
        .value(
            "tally_tenant_gpu_memory_bytes",
            &[("tenant", tenant), ("gpu", "0")],
        )
        .unwrap_or(0.0)
}

fn wait_memory(agent: &Agent, tenant: &str, bytes: f64) {
    wait_for(
        &format!("{tenant} to hold {bytes} bytes on gpu 0"),
        Duration::from_secs(30),
        || (memory(agent, tenant) == bytes).then_some(()),
    );
}

fn count_lines(agent: &Agent, needle: &str) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// The tenant and workload of `pid` in the agent's snapshot.
fn process_tenant(agent: &Agent, pid: u32) -> (String, String) {
    let snap = agent.snapshot();
    let p = snap["gpus"][0]["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in the snapshot: {snap}"))
        .clone();
    (
        p["tenant"].as_str().unwrap_or_default().to_owned(),
        p["workload_id"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn labels_name_tenants_and_a_label_change_moves_a_pod() {
    if !require_root() {
        return;
    }
    let sim = SimNode::new(SCENARIO);
    let kubelet_dir = tempfile::tempdir().expect("tempdir");
    let mut api = FakeApiServer::start();
    api.add_namespace("research", &[]);
    api.add_namespace("team-b-dev", &[(LABEL, "team-b")]);

    // No label anywhere: the namespace name (cgroupfs driver).
    let notebook = cgroupfs_besteffort_pod();
    api.add_pod(
        NODE,
        "research",
        "notebook-0",
        &notebook.uid,
        &[("app", "jupyter")],
    );
    // The namespace's label wins over its name (systemd driver).
    let trainer = systemd_burstable_pod();
    api.add_pod(NODE, "team-b-dev", "trainer-0", &trainer.uid, &[]);
    // The pod's label wins over its namespace's.
    let eval = systemd_burstable_pod();
    api.add_pod(
        NODE,
        "team-b-dev",
        "eval-0",
        &eval.uid,
        &[(LABEL, "team-c")],
    );
    // A pod of another node is not watched (the `spec.nodeName` field
    // selector): its process here stays unnamed.
    let stranger = cgroupfs_besteffort_pod();
    api.add_pod(
        "gpu-node-2",
        "research",
        "elsewhere",
        &stranger.uid,
        &[(LABEL, "team-c")],
    );

    sim.register(notebook.proc.pid(), 0, None, 1024, 0.1);
    sim.register(trainer.proc.pid(), 0, None, 2048, 0.1);
    sim.register(eval.proc.pid(), 0, None, 4096, 0.1);
    sim.register(stranger.proc.pid(), 0, None, 8192, 0.1);

    // No kubelet and no log directories: the API server alone names pods.
    let config = format!(
        r#"
[[tenant.rule]]
kubernetes = true

[[tenant.rule]]
cgroup = '/kubepods'
tenant = "k8s-unknown"

[tenant.kubernetes]
pod_resources_socket = "{dir}/kubelet.sock"
pod_logs_dir = "{dir}/pods"
container_logs_dir = "{dir}/containers"
refresh_interval = "300ms"
tenant_label = "{LABEL}"
api_server = "{url}"
node_name = "{NODE}"
"#,
        dir = kubelet_dir.path().display(),
        url = api.url(),
    );
    let agent = Agent::start(&sim, &config, &["--sample-interval", "200ms"]);

    wait_memory(&agent, "research", GIB);
    wait_memory(&agent, "team-b", 2.0 * GIB);
    wait_memory(&agent, "team-c", 4.0 * GIB);
    wait_memory(&agent, "k8s-unknown", 8.0 * GIB);
    assert_eq!(
        memory(&agent, "team-b-dev"),
        0.0,
        "the namespace label wins"
    );
    assert_eq!(
        process_tenant(&agent, notebook.proc.pid()),
        ("research".to_owned(), "research/notebook-0".to_owned())
    );
    assert_eq!(
        process_tenant(&agent, eval.proc.pid()),
        ("team-c".to_owned(), "team-b-dev/eval-0".to_owned())
    );

    // The label goes on the notebook pod: one MODIFIED event, no relist.
    let lists = api.requests(Kind::Pods, false);
    assert_eq!(lists, 1, "one initial list of pods");
    api.set_pod_labels(&notebook.uid, &[("app", "jupyter"), (LABEL, "team-c")]);
    wait_memory(&agent, "team-c", 5.0 * GIB);
    assert_eq!(memory(&agent, "research"), 0.0);
    assert_eq!(
        process_tenant(&agent, notebook.proc.pid()).0,
        "team-c",
        "the pod's new usage is the new tenant's"
    );
    assert_eq!(
        api.requests(Kind::Pods, false),
        lists,
        "moved by the watch event, not by a new list"
    );

    // A pod of a Job: the Job is its workload.
    api.set_pod_controller(&eval.uid, "Job", "eval");
    wait_for(
        "the Job to name the workload",
        Duration::from_secs(30),
        || (process_tenant(&agent, eval.proc.pid()).1 == "team-b-dev/Job/eval").then_some(()),
    );

    // An outage: the last answer stays, with one line per watch.
    api.stop();
    wait_for("the outage to be logged", Duration::from_secs(30), || {
        (count_lines(&agent, "Kubernetes API unavailable: watch of pods") == 1).then_some(())
    });
    agent.wait_samples(10);
    assert_eq!(memory(&agent, "team-c"), 5.0 * GIB);
    assert_eq!(memory(&agent, "team-b"), 2.0 * GIB);
    assert_eq!(memory(&agent, "research"), 0.0);
    assert_eq!(
        count_lines(&agent, "Kubernetes API unavailable: watch of pods"),
        1,
        "{}",
        agent.log_text()
    );
    assert_eq!(count_lines(&agent, "Kubernetes API answering again"), 0);
}
