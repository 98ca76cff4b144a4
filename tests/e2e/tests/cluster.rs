//! The cluster view and the Kubernetes scheduler extender end to end: a
//! real `tally aggregator` and three real `tally agent`s on the NVML
//! simulator, as three nodes of a small cluster:
//!
//! - `gpu-a`: two H100s and an A100 in MIG mode; tenant beta busy on
//!   GPU 0, tenant acme holding the 3g.20gb instance;
//! - `gpu-b`: two H100s; GPU 0 stuck (held by a stopped process pinned at
//!   100 %), tenant acme, with a GPU memory quota;
//! - `gpu-c`: one H100, reporting every 300 ms; its agent is stopped, so
//!   it goes stale (the others report every 2 s: stale only after 6 s).
//!
//! The extender gets the JSON kube-scheduler sends (`ExtenderArgs` with a
//! full `v1.Pod` and a `v1.NodeList`, or `NodeNames` when
//! `nodeCacheCapable`), field names as in k8s.io/kube-scheduler/extender/v1.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{path::Path, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};
use tally_e2e::{
    Agent, Cgroup, H100, SimNode,
    aggregator_support::{
        ACME_TOKEN, ADMIN_TOKEN, AGENT_TOKEN, Aggregator, Backend, agent_config, postgres, sqlite,
        subdir,
    },
    enforce_support::TenantEnv,
    http_request, require_root, skip, unique,
};

const LONG: Duration = Duration::from_secs(60);

const RULES: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'

[states]
idle_after = "1h"
stuck_after = "1s"
"#;

/// An agent config reporting every `interval` as `node`.
fn config(agg: &Aggregator, node: &str, state: &Path, interval: &str, extra: &str) -> String {
    agent_config(
        &agg.url(),
        node,
        state,
        &agg.dir,
        &format!("{RULES}{extra}"),
    )
    .replace(
        "interval = \"300ms\"",
        &format!("interval = \"{interval}\""),
    )
}

fn cluster(agg: &Aggregator, token: Option<&str>) -> (u16, Value) {
    let (status, body) = agg.get("/api/v1/cluster", token);
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

/// Polls the admin cluster view until `f` accepts it; panics with the
/// last view seen.
fn wait_view(agg: &Aggregator, what: &str, mut f: impl FnMut(&Value) -> Option<()>) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (status, v) = cluster(agg, Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "GET /api/v1/cluster: {v}");
        if f(&v).is_some() {
            return v;
        }
        assert!(
            start.elapsed() < LONG,
            "timed out waiting for {what}; last view:\n{v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node<'a>(view: &'a Value, name: &str) -> Option<&'a Value> {
    view["nodes"].as_array()?.iter().find(|n| n["node"] == name)
}

fn gpu<'a>(node: &'a Value, label: &str) -> Option<&'a Value> {
    node["gpus"].as_array()?.iter().find(|g| g["gpu"] == label)
}

fn post(agg: &Aggregator, verb: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (status, text) = http_request(
        agg.addr,
        "POST",
        &format!("/scheduler/{verb}"),
        &headers,
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("POST /scheduler/{verb}: {e}"));
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// [`post`] without a token, for the answer alone.
fn ask(agg: &Aggregator, verb: &str, body: &Value) -> Value {
    post(agg, verb, body, None).1
}

/// A pod as kube-scheduler marshals a `v1.Pod` (a Job's pod on GPUs).
fn pod(limits: Value) -> Value {
    let mut requests = limits.clone();
    requests["cpu"] = json!("4");
    requests["memory"] = json!("32Gi");
    json!({
        "metadata": {
            "name": "train-7f9c4",
            "generateName": "train-",
            "namespace": "ml-team",
            "uid": "5d0f3c2e-8a51-4c1e-9b1e-0f6d7e2a1b3c",
            "resourceVersion": "184467",
            "creationTimestamp": "2026-11-23T15:40:00Z",
            "labels": {"batch.kubernetes.io/job-name": "train", "app": "train"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "train",
                                 "uid": "0b7e4a52-3c1d-4e8f-9a6b-2d5c7e9f1a3b",
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-4xq2z", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}],
                "defaultMode": 420}}],
            "initContainers": [{
                "name": "fetch-data", "image": "busybox:1.36",
                "command": ["sh", "-c", "true"],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
            }],
            "containers": [{
                "name": "trainer",
                "image": "nvcr.io/nvidia/pytorch:24.05-py3",
                "command": ["python", "train.py"],
                "resources": {"limits": limits, "requests": requests},
                "volumeMounts": [{"name": "kube-api-access-4xq2z", "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    })
}

/// A `v1.Node` as kube-scheduler marshals it.
fn k8s_node(name: &str, gpus: u32) -> Value {
    json!({
        "metadata": {
            "name": name,
            "uid": format!("{name}-uid"),
            "resourceVersion": "183002",
            "creationTimestamp": "2026-11-01T08:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "nvidia.com/gpu.present": if gpus > 0 { "true" } else { "false" }},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "capacity": {"cpu": "64", "memory": "528Gi", "pods": "110",
                         "nvidia.com/gpu": gpus.to_string()},
            "allocatable": {"cpu": "63500m", "memory": "520Gi", "pods": "110",
                            "nvidia.com/gpu": gpus.to_string()},
            "conditions": [{"type": "Ready", "status": "True",
                            "lastHeartbeatTime": "2026-11-23T15:39:00Z",
                            "lastTransitionTime": "2026-11-01T08:01:00Z",
                            "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
            "nodeInfo": {"kubeletVersion": "v1.31.2", "containerRuntimeVersion": "containerd://1.7.22",
                         "architecture": "amd64", "operatingSystem": "linux"}
        }
    })
}

const NODES: [(&str, u32); 4] = [("gpu-a", 2), ("gpu-b", 2), ("gpu-c", 1), ("cpu-1", 0)];

/// `ExtenderArgs` without `nodeCacheCapable`: the whole `v1.NodeList`.
fn args_nodes(limits: Value) -> Value {
    json!({
        "Pod": pod(limits),
        "Nodes": {"metadata": {}, "items": NODES.iter().map(|(n, g)| k8s_node(n, *g)).collect::<Vec<_>>()},
        "NodeNames": null
    })
}

/// `ExtenderArgs` with `nodeCacheCapable`: names only.
fn args_names(limits: Value) -> Value {
    json!({
        "Pod": pod(limits),
        "Nodes": null,
        "NodeNames": NODES.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    })
}

fn names_of(result: &Value) -> Vec<String> {
    if let Some(names) = result["NodeNames"].as_array() {
        return names
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect();
    }
    result["Nodes"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no Nodes.items in {result}"))
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn reason<'a>(result: &'a Value, map: &str, node: &str) -> &'a str {
    result[map][node]
        .as_str()
        .unwrap_or_else(|| panic!("{node} is not in {map}: {result}"))
}

fn scores(result: &Value) -> Vec<(String, i64)> {
    result
        .as_array()
        .unwrap_or_else(|| panic!("not a HostPriorityList: {result}"))
        .iter()
        .map(|h| {
            (
                h["Host"].as_str().unwrap().to_owned(),
                h["Score"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_a_mig_gpu_a_stuck_gpu_and_a_stale_node_on_sqlite() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    small_cluster(&sqlite(dir.path()), dir.path());
}

#[test]
fn two_nodes_a_mig_gpu_a_stuck_gpu_and_a_stale_node_on_postgres() {
    if !require_root() {
        return;
    }
    let Some(backend) = postgres() else {
        skip("TALLY_TEST_POSTGRES_URL not set (cargo xtask test starts a PostgreSQL)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    small_cluster(&backend, dir.path());
}

fn small_cluster(backend: &Backend, dir: &Path) {
    let agg = Aggregator::start(
        &subdir(dir, "agg"),
        backend,
        "[scheduler]\npolicy = \"binpack\"\n",
    );
    let base = unique("e2e-cluster");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job"));

    // gpu-a: beta busy on GPU 0, acme on MIG instance 0 of GPU 2.
    let sim_a = SimNode::standard();
    let state_a = subdir(dir, "state-a");
    let agent_a = Agent::start(
        &sim_a,
        &config(&agg, "gpu-a", &state_a, "2s", ""),
        &["--sample-interval", "200ms"],
    );
    let beta_job = beta.spawn("sleep", &["600"]);
    sim_a.register(beta_job.pid(), 0, None, 2048, 0.6);
    let acme_mig = acme.spawn("sleep", &["600"]);
    sim_a.register(acme_mig.pid(), 2, Some(0), 1024, 0.5);

    // gpu-b: GPU 0 held by a stopped process pinned at 100 %: stuck. Its
    // quota makes the enforcer's tenant cgroups: beneath a parent of this
    // test's own, removed when `quota_tree` drops (after the agents).
    let quota_tree = TenantEnv::named("e2e-cluster-quota");
    let sim_b = SimNode::new(&H100.repeat(2));
    let state_b = subdir(dir, "state-b");
    let agent_b = Agent::start(
        &sim_b,
        &config(
            &agg,
            "gpu-b",
            &state_b,
            "2s",
            &quota_tree.tenant_section("[tenant.quota.acme]\ngpu_memory = \"8GiB\"\n"),
        ),
        &["--sample-interval", "200ms"],
    );
    let stuck = acme.spawn("sleep", &["600"]);
    kill(Pid::from_raw(stuck.pid() as i32), Signal::SIGSTOP).unwrap();
    sim_b.register(stuck.pid(), 0, None, 4096, 1.0);

    // gpu-c: reports every 300 ms until its agent stops.
    let sim_c = SimNode::new(H100);
    let state_c = subdir(dir, "state-c");
    let agent_c = Agent::start(
        &sim_c,
        &config(&agg, "gpu-c", &state_c, "300ms", ""),
        &["--sample-interval", "200ms"],
    );

    // Everything has reached the ledger.
    let view = wait_view(&agg, "the three nodes in their states", |v| {
        let a = node(v, "gpu-a")?;
        let b = node(v, "gpu-b")?;
        node(v, "gpu-c")?;
        let held = a["gpus"]
            .as_array()?
            .iter()
            .any(|g| g["mig_profile"] == "3g.20gb" && g["tenants"] == json!(["acme"]));
        (gpu(a, "0")?["state"] == "busy"
            && held
            && gpu(b, "0")?["state"] == "stuck"
            && b["quotas"]
                .as_array()?
                .iter()
                .any(|q| q["usage"].is_number()))
        .then_some(())
    });
    let a = node(&view, "gpu-a").unwrap();
    let a0 = gpu(a, "0").unwrap();
    assert_eq!(a0["model"], "NVIDIA H100 80GB HBM3");
    assert_eq!(a0["tenants"], json!(["beta"]));
    assert_eq!(a0["memory_total_bytes"], 81559_i64 << 20);
    assert!(a0["utilization_ratio"].as_f64().unwrap() > 0.0, "{a0}");
    assert_eq!(
        a0["memory_free_bytes"].as_i64().unwrap(),
        a0["memory_total_bytes"].as_i64().unwrap() - a0["memory_used_bytes"].as_i64().unwrap()
    );
    assert_eq!(gpu(a, "1").unwrap()["state"], "free");
    let parent = gpu(a, "2").unwrap();
    assert_eq!(parent["mig_mode"], true);
    let instances: Vec<&Value> = a["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["parent_uuid"] == parent["uuid"])
        .collect();
    assert_eq!(instances.len(), 4, "{a}");
    assert!(
        instances
            .iter()
            .all(|g| g["gpu"].as_str().unwrap().starts_with("2/"))
    );
    assert_eq!(a["report_interval_ms"], 2000);
    assert_eq!(a["stale_after_ms"], 6000);
    assert_eq!(
        a["capacity"],
        json!({
            "gpus": 2, "healthy_gpus": 2, "free_gpus": 1,
            "mig": {"3g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2},
            "free_mig": {"3g.20gb": 0, "2g.10gb": 1, "1g.5gb": 2},
            "free_memory_bytes": a["capacity"]["free_memory_bytes"],
            "idle": 0,
            "unhealthy_gpus": []
        })
    );
    let b = node(&view, "gpu-b").unwrap();
    assert_eq!(gpu(b, "0").unwrap()["tenants"], json!(["acme"]));
    assert_eq!(b["capacity"]["unhealthy_gpus"], json!(["0"]));
    assert_eq!(
        (
            b["capacity"]["healthy_gpus"].as_i64(),
            b["capacity"]["free_gpus"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let quota = b["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["tenant"] == "acme" && q["resource"] == "gpu_memory")
        .unwrap_or_else(|| panic!("acme's gpu_memory quota on gpu-b: {b}"));
    assert_eq!(quota["limit"].as_f64(), Some((8_u64 << 30) as f64));
    assert_eq!(quota["usage"].as_f64(), Some((4096_u64 << 20) as f64));
    let acme_view = view["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .unwrap();
    assert_eq!(
        acme_view["devices"].as_array().unwrap().len(),
        2,
        "{acme_view}"
    );
    assert_eq!(acme_view["quotas"][0]["ratio"].as_f64(), Some(0.5));

    // gpu-c stops reporting: stale after three of its intervals.
    assert_eq!(node(&view, "gpu-c").unwrap()["stale"], false);
    agent_c.stop();
    let view = wait_view(&agg, "gpu-c to go stale", |v| {
        (node(v, "gpu-c")?["stale"] == true).then_some(())
    });
    assert_eq!(node(&view, "gpu-a").unwrap()["stale"], false);
    assert_eq!(node(&view, "gpu-b").unwrap()["stale"], false);
    assert_eq!(node(&view, "gpu-c").unwrap()["report_interval_ms"], 300);

    // Who may read the cluster view.
    assert_eq!(cluster(&agg, None).0, 401);
    assert_eq!(cluster(&agg, Some("not-a-token-at-all-0123")).0, 401);
    assert_eq!(cluster(&agg, Some(AGENT_TOKEN)).0, 403);
    let (status, mine) = cluster(&agg, Some(ACME_TOKEN));
    assert_eq!(status, 200, "{mine}");
    assert!(!mine.to_string().contains("beta"), "acme sees beta: {mine}");
    let a0 = gpu(node(&mine, "gpu-a").unwrap(), "0").unwrap();
    assert_eq!(
        (a0["tenants"].clone(), a0["other_tenants"].clone()),
        (json!([]), json!(1))
    );
    assert_eq!(
        gpu(node(&mine, "gpu-b").unwrap(), "0").unwrap()["tenants"],
        json!(["acme"])
    );
    assert_eq!(mine["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(
        node(&mine, "gpu-a").unwrap()["capacity"],
        node(&view, "gpu-a").unwrap()["capacity"]
    );

    // One whole GPU, without nodeCacheCapable: the NodeList comes back
    // with the same node objects.
    let one = json!({"nvidia.com/gpu": "1"});
    let (status, r) = post(&agg, "filter", &args_nodes(one.clone()), None);
    assert_eq!(status, 200, "{r}");
    assert_eq!(names_of(&r), ["gpu-a", "gpu-b"], "{r}");
    assert!(r["NodeNames"].is_null(), "{r}");
    assert_eq!(r["Error"], "");
    assert_eq!(r["Nodes"]["items"][0], k8s_node("gpu-a", 2));
    assert!(reason(&r, "FailedAndUnresolvableNodes", "gpu-c").contains("stale"));
    assert!(reason(&r, "FailedAndUnresolvableNodes", "cpu-1").contains("no Tally agent"));
    // Prioritize: binpack fills gpu-a's last free H100 first; gpu-b has a
    // stuck GPU and ranks below it.
    let (status, p) = post(&agg, "prioritize", &args_nodes(one.clone()), None);
    assert_eq!(status, 200, "{p}");
    let s = scores(&p);
    assert_eq!(
        s.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(),
        ["gpu-a", "gpu-b", "gpu-c", "cpu-1"]
    );
    assert_eq!(s[0].1, 10, "{p}");
    assert!(s[1].1 < s[0].1 && s[1].1 <= 4, "{p}");
    assert_eq!((s[2].1, s[3].1), (0, 0), "{p}");

    // Two whole GPUs, nodeCacheCapable: nobody has two free.
    let (status, r) = post(
        &agg,
        "filter",
        &args_names(json!({"nvidia.com/gpu": "2"})),
        None,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["NodeNames"], json!([]), "{r}");
    assert!(r["Nodes"].is_null());
    assert_eq!(
        reason(&r, "FailedNodes", "gpu-a"),
        "tally: needs 2 free nvidia.com/gpu, 1 of 2 healthy whole GPUs are free"
    );
    assert_eq!(
        reason(&r, "FailedAndUnresolvableNodes", "gpu-b"),
        "tally: needs 2 nvidia.com/gpu, node has 1 healthy whole GPUs (GPU 0 stuck or lost)"
    );

    // MIG: two free 1g.5gb only on gpu-a; the 3g.20gb is held by acme.
    let r = ask(
        &agg,
        "filter",
        &args_names(json!({"nvidia.com/mig-1g.5gb": "2"})),
    );
    assert_eq!(names_of(&r), ["gpu-a"], "{r}");
    assert!(reason(&r, "FailedAndUnresolvableNodes", "gpu-b").contains("0 healthy 1g.5gb"));
    let r = ask(
        &agg,
        "filter",
        &args_nodes(json!({"nvidia.com/mig-3g.20gb": "1"})),
    );
    assert_eq!(names_of(&r), Vec::<String>::new(), "{r}");
    assert_eq!(
        reason(&r, "FailedNodes", "gpu-a"),
        "tally: needs 1 free nvidia.com/mig-3g.20gb, 0 of 1 are free"
    );
    let p = ask(
        &agg,
        "prioritize",
        &args_names(json!({"nvidia.com/mig-1g.5gb": "1"})),
    );
    assert_eq!(scores(&p)[0], ("gpu-a".to_owned(), 8), "{p}");

    // A pod without GPUs is none of Tally's business: every node passes.
    let r = ask(&agg, "filter", &args_names(json!({"cpu": "2"})));
    assert_eq!(names_of(&r).len(), 4, "{r}");

    // Auth of the extender: no token is fine by default, an admin token
    // too, a tenant's is not; garbage is a 400.
    assert_eq!(
        post(&agg, "filter", &args_names(one.clone()), Some(ADMIN_TOKEN)).0,
        200
    );
    assert_eq!(
        post(&agg, "filter", &args_names(one.clone()), Some(ACME_TOKEN)).0,
        403
    );
    assert_eq!(post(&agg, "filter", &json!("not args"), None).0, 400);

    // The stuck GPU recovers: gpu-b is no longer down-ranked.
    kill(Pid::from_raw(stuck.pid() as i32), Signal::SIGCONT).unwrap();
    sim_b.unregister(stuck.pid());
    wait_view(&agg, "gpu-b's GPU 0 free again", |v| {
        (gpu(node(v, "gpu-b")?, "0")?["state"] == "free").then_some(())
    });
    let p = ask(&agg, "prioritize", &args_names(one));
    let s = scores(&p);
    assert!(
        s[1].1 >= 5,
        "a healthy gpu-b scores in the healthy band: {p}"
    );
    drop((agent_a, agent_b));
}

#[test]
fn aggregator_replicas_on_one_postgres_answer_alike() {
    let Some(backend) = postgres() else {
        skip("TALLY_TEST_POSTGRES_URL not set (cargo xtask test starts a PostgreSQL)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let one = Aggregator::start(&subdir(dir.path(), "agg1"), &backend, "");
    let two = Aggregator::start(
        &subdir(dir.path(), "agg2"),
        &backend,
        "[scheduler]\npolicy = \"spread\"\n",
    );
    let sim = SimNode::new(&H100.repeat(2));
    let state = subdir(dir.path(), "state");
    let _agent = Agent::start(
        &sim,
        &agent_config(&one.url(), "gpu-pg", &state, &one.dir, ""),
        &["--sample-interval", "200ms"],
    );
    // Reported to one replica, read from the other.
    let view = wait_view(&two, "gpu-pg through the second replica", |v| {
        (node(v, "gpu-pg")?["gpus"].as_array()?.len() == 2).then_some(())
    });
    let n = node(&view, "gpu-pg").unwrap();
    assert_eq!(n["capacity"]["free_gpus"], 2, "{n}");
    let (status, r) = post(
        &two,
        "filter",
        &json!({"Pod": pod(json!({"nvidia.com/gpu": "2"})), "NodeNames": ["gpu-pg", "gpu-x"]}),
        None,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(names_of(&r), ["gpu-pg"], "{r}");
    // Each replica scores by its own policy from the same data: taking
    // both GPUs leaves nothing free, best for binpack (replica one, the
    // default policy), worst for spread (replica two).
    let args = json!({"Pod": pod(json!({"nvidia.com/gpu": "2"})), "NodeNames": ["gpu-pg"]});
    let p1 = ask(&one, "prioritize", &args);
    let p2 = ask(&two, "prioritize", &args);
    assert_eq!(scores(&p1), [("gpu-pg".to_owned(), 10)], "{p1}");
    assert_eq!(scores(&p2), [("gpu-pg".to_owned(), 5)], "{p2}");
}
