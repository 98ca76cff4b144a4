//! The Kubernetes scheduler extender: `POST /scheduler/filter` and
//! `POST /scheduler/prioritize`, speaking kube-scheduler's extender
//! protocol (`k8s.io/kube-scheduler/extender/v1`: `ExtenderArgs` in,
//! `ExtenderFilterResult` / `HostPriorityList` out). The Go types have no
//! JSON tags, so their fields travel under their Go names (`Pod`, `Nodes`,
//! `NodeNames`, `FailedNodes`, `Host`, `Score`, …); they are mirrored here
//! exactly.
//!
//! A pod's demand is its `nvidia.com/gpu` and `nvidia.com/mig-<profile>`
//! limits, combined over containers the way kube-scheduler combines
//! requests ([`demand`]). Filtering and scoring are pure functions of the
//! demand and the cluster view ([`crate::cluster`]), which the server
//! reads from the ledger on every call (the HTTP side is in `server`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{
    cluster::{self, ClusterView, NodeView},
    config::Policy,
};

/// Highest score an extender may give (`extenderv1.MaxExtenderPriority`).
pub(crate) const MAX_EXTENDER_PRIORITY: i64 = 10;
/// Whole GPUs, as the NVIDIA device plugin names them.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// MIG instances of a profile (`nvidia.com/mig-1g.5gb`, mixed strategy).
pub(crate) const MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";

// ------------------------------------------------------------ wire types

/// A JSON `null` reads as the type's default (Go marshals nil slices and
/// maps as `null`).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `extenderv1.ExtenderArgs`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ExtenderArgs {
    /// The pod being scheduled (`*v1.Pod`).
    #[serde(rename = "Pod", alias = "pod", default)]
    pub pod: Option<Pod>,
    /// Candidate nodes (`*v1.NodeList`) when the extender is not
    /// `nodeCacheCapable`. Kept as JSON: the filter answers with the same
    /// node objects it was given.
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub(crate) nodes: Option<Value>,
    /// Candidate node names when the extender is `nodeCacheCapable`.
    #[serde(
        rename = "NodeNames",
        alias = "nodeNames",
        alias = "nodenames",
        default
    )]
    pub node_names: Option<Vec<String>>,
}

/// `extenderv1.ExtenderFilterResult`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ExtenderFilterResult {
    /// Nodes that fit, when the request carried `Nodes`.
    #[serde(rename = "Nodes")]
    pub(crate) nodes: Option<Value>,
    /// Names of nodes that fit, when the request carried `NodeNames`.
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    /// Nodes that do not fit now, and why (preemption may help).
    #[serde(rename = "FailedNodes", deserialize_with = "nullable", default)]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes that do not fit and preemption would not change that.
    #[serde(
        rename = "FailedAndUnresolvableNodes",
        deserialize_with = "nullable",
        default
    )]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// Why the whole call failed, when it did.
    #[serde(rename = "Error", default)]
    pub error: String,
}

/// `extenderv1.HostPriority`; a `HostPriorityList` is a JSON array of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    /// `0..=MAX_EXTENDER_PRIORITY`.
    #[serde(rename = "Score")]
    pub score: i64,
}

/// The parts of a `v1.Pod` the extender reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Pod {
    #[serde(deserialize_with = "nullable")]
    pub(crate) metadata: ObjectMeta,
    #[serde(deserialize_with = "nullable")]
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct ObjectMeta {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub namespace: String,
    #[serde(deserialize_with = "nullable")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Pod {
    /// The pod's tenant: its `label`, else its namespace's name (as the
    /// agent's `kubernetes` tenant rule names it by default).
    pub(crate) fn tenant(&self, label: &str) -> Option<&str> {
        self.metadata
            .labels
            .get(label)
            .map(String::as_str)
            .or(Some(self.metadata.namespace.as_str()))
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(deserialize_with = "nullable")]
    pub containers: Vec<Container>,
    #[serde(deserialize_with = "nullable")]
    pub init_containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    #[serde(deserialize_with = "nullable")]
    pub(crate) name: String,
    #[serde(deserialize_with = "nullable")]
    pub resources: Resources,
    /// `Always` on an init container makes it a sidecar.
    pub(crate) restart_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Resources {
    #[serde(deserialize_with = "nullable")]
    pub limits: BTreeMap<String, Value>,
    #[serde(deserialize_with = "nullable")]
    pub requests: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------- demand

/// GPU devices a pod needs on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demand {
    /// Whole GPUs (`nvidia.com/gpu`).
    pub gpus: u64,
    /// MIG instances by profile (`nvidia.com/mig-<profile>`).
    pub(crate) mig: BTreeMap<String, u64>,
}

impl Demand {
    pub(crate) fn is_empty(&self) -> bool {
        self.gpus == 0 && self.mig.values().all(|n| *n == 0)
    }
}

/// Why a pod's demand cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemandError {
    /// A GPU resource quantity that is not a whole number of devices.
    #[error("container {container}: {resource} = {value} is not a whole number of devices")]
    BadQuantity {
        container: String,
        resource: String,
        value: String,
    },
}

/// Parses a Kubernetes quantity that must be a whole count (extended
/// resources cannot be fractional): `2`, `"2"`, `"2000m"`, `"1k"`, `"1Ki"`.
pub fn whole_quantity(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let scaled = |mul: u64| n.checked_mul(mul);
    match suffix {
        "" => Some(n),
        "m" => n.is_multiple_of(1000).then_some(n / 1000),
        "k" => scaled(1_000),
        "M" => scaled(1_000_000),
        "G" => scaled(1_000_000_000),
        "Ki" => scaled(1 << 10),
        "Mi" => scaled(1 << 20),
        "Gi" => scaled(1 << 30),
        _ => None,
    }
}

/// The GPU resources of one container: limits, else requests (the API
/// server requires limits for extended resources and defaults requests to
/// them, so either reads the same).
fn container_demand(c: &Container) -> Result<BTreeMap<String, u64>, DemandError> {
    let mut out = BTreeMap::new();
    let mut take = |map: &BTreeMap<String, Value>| -> Result<(), DemandError> {
        for (name, v) in map {
            if name != GPU_RESOURCE && !name.starts_with(MIG_RESOURCE_PREFIX) {
                continue;
            }
            if out.contains_key(name) {
                continue;
            }
            let n = whole_quantity(v).ok_or_else(|| DemandError::BadQuantity {
                container: c.name.clone(),
                resource: name.clone(),
                value: v.to_string(),
            })?;
            out.insert(name.clone(), n);
        }
        Ok(())
    };
    take(&c.resources.limits)?;
    take(&c.resources.requests)?;
    Ok(out)
}

fn add(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn max_into(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        *e = (*e).max(*v);
    }
}

/// A pod's GPU demand, as kube-scheduler computes a pod's requests: the
/// sum over its containers plus its sidecars (init containers with
/// `restartPolicy: Always`, which keep running), or, if larger, what any
/// one init container needs while it runs (itself plus the sidecars
/// started before it) — per resource.
pub fn demand(pod: &Pod) -> Result<Demand, DemandError> {
    let mut total = BTreeMap::new();
    for c in &pod.spec.containers {
        add(&mut total, &container_demand(c)?);
    }
    let mut sidecars = BTreeMap::new();
    let mut init_peak = BTreeMap::new();
    for c in &pod.spec.init_containers {
        let d = container_demand(c)?;
        if c.restart_policy.as_deref() == Some("Always") {
            add(&mut sidecars, &d);
            max_into(&mut init_peak, &sidecars);
        } else {
            let mut running = sidecars.clone();
            add(&mut running, &d);
            max_into(&mut init_peak, &running);
        }
    }
    add(&mut total, &sidecars);
    max_into(&mut total, &init_peak);
    let mut out = Demand::default();
    for (name, n) in total {
        if name == GPU_RESOURCE {
            out.gpus = n;
        } else if let Some(profile) = name.strip_prefix(MIG_RESOURCE_PREFIX)
            && n > 0
        {
            out.mig.insert(profile.to_owned(), n);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------- filter, score

/// Whether a pod fits a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Fits,
    /// Not now; preemption could free what it needs.
    Fails(String),
    /// Not at all: unknown or stale node, or fewer healthy devices than
    /// the pod needs even if every one were free.
    Unresolvable(String),
}

fn names(list: &[String]) -> String {
    if list.is_empty() {
        String::new()
    } else {
        format!(" (GPU {} stuck or lost)", list.join(", "))
    }
}

/// Decides whether `demand` fits `node` (`None`: no Tally agent reports
/// from it).
pub(crate) fn check(node: Option<&NodeView>, demand: &Demand, now_ms: i64) -> Verdict {
    if demand.is_empty() {
        return Verdict::Fits;
    }
    let Some(node) = node else {
        return Verdict::Unresolvable(
            "tally: no Tally agent reports from this node, so its GPUs are unknown".into(),
        );
    };
    if node.stale {
        return Verdict::Unresolvable(format!(
            "tally: node data is stale: last report {}s ago, over {} report intervals ({}s)",
            now_ms.saturating_sub(node.last_report_ms) / 1000,
            cluster::STALE_INTERVALS,
            node.stale_after_ms as f64 / 1000.0
        ));
    }
    let c = &node.capacity;
    let mut unresolvable = Vec::new();
    let mut fails = Vec::new();
    if demand.gpus > 0 {
        if c.healthy_gpus < demand.gpus {
            unresolvable.push(format!(
                "needs {} {GPU_RESOURCE}, node has {} healthy whole GPUs{}",
                demand.gpus,
                c.healthy_gpus,
                names(&c.unhealthy_gpus)
            ));
        } else if c.free_gpus < demand.gpus {
            fails.push(format!(
                "needs {} free {GPU_RESOURCE}, {} of {} healthy whole GPUs are free",
                demand.gpus, c.free_gpus, c.healthy_gpus
            ));
        }
    }
    for (profile, need) in &demand.mig {
        let total = c.mig.get(profile).copied().unwrap_or(0);
        let free = c.free_mig.get(profile).copied().unwrap_or(0);
        if total < *need {
            unresolvable.push(format!(
                "needs {need} {MIG_RESOURCE_PREFIX}{profile}, node has {total} healthy {profile} MIG instances"
            ));
        } else if free < *need {
            fails.push(format!(
                "needs {need} free {MIG_RESOURCE_PREFIX}{profile}, {free} of {total} are free"
            ));
        }
    }
    if !unresolvable.is_empty() {
        unresolvable.extend(fails);
        Verdict::Unresolvable(format!("tally: {}", unresolvable.join("; ")))
    } else if !fails.is_empty() {
        Verdict::Fails(format!("tally: {}", fails.join("; ")))
    } else {
        Verdict::Fits
    }
}

/// Scores `node` for `demand`, `0..=MAX_EXTENDER_PRIORITY`.
///
/// `b` is the share of the demanded devices left free after placing the
/// pod (averaged over the demanded resources); `binpack` ranks low `b`
/// high, `spread` high `b`. A healthy node scores 5..=10; a node with a
/// stuck or lost GPU 0..=4, so it ranks below every healthy node that
/// fits. A pod without GPU demand, and a node that does not fit, scores 0.
pub(crate) fn score(node: Option<&NodeView>, demand: &Demand, policy: Policy, now_ms: i64) -> i64 {
    let Some(n) = node else { return 0 };
    if demand.is_empty() || check(Some(n), demand, now_ms) != Verdict::Fits {
        return 0;
    }
    let c = &n.capacity;
    let mut shares = Vec::new();
    if demand.gpus > 0 {
        shares.push((c.free_gpus - demand.gpus) as f64 / c.healthy_gpus.max(1) as f64);
    }
    for (profile, need) in &demand.mig {
        let total = c.mig.get(profile).copied().unwrap_or(0).max(1);
        let free = c.free_mig.get(profile).copied().unwrap_or(0);
        shares.push(free.saturating_sub(*need) as f64 / total as f64);
    }
    let left = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    let b = match policy {
        Policy::Binpack => 1.0 - left,
        Policy::Spread => left,
    }
    .clamp(0.0, 1.0);
    let s = if c.unhealthy_gpus.is_empty() {
        5 + (5.0 * b).round() as i64
    } else {
        (4.0 * b).round() as i64
    };
    s.clamp(0, MAX_EXTENDER_PRIORITY)
}

/// Node names of the request, in its order.
fn candidates(args: &ExtenderArgs) -> Option<Vec<String>> {
    if let Some(names) = &args.node_names {
        return Some(names.clone());
    }
    let items = args.nodes.as_ref()?.get("items")?;
    if items.is_null() {
        return Some(Vec::new());
    }
    Some(
        items
            .as_array()?
            .iter()
            .map(|n| {
                n.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect(),
    )
}

/// The filter answer for `args` against `view`.
pub fn filter_nodes(args: &ExtenderArgs, view: &ClusterView, now_ms: i64) -> ExtenderFilterResult {
    let mut out = ExtenderFilterResult::default();
    let Some(names) = candidates(args) else {
        out.error = "tally: ExtenderArgs has neither Nodes.items nor NodeNames".into();
        return out;
    };
    let demand = match args.pod.as_ref().map(demand).transpose() {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            out.error = format!("tally: {e}");
            return out;
        }
    };
    let mut fit = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let node = view.nodes.iter().find(|n| &n.node == name);
        match check(node, &demand, now_ms) {
            Verdict::Fits => fit.push(i),
            Verdict::Fails(why) => {
                out.failed_nodes.insert(name.clone(), why);
            }
            Verdict::Unresolvable(why) => {
                out.failed_and_unresolvable_nodes.insert(name.clone(), why);
            }
        }
    }
    if args.node_names.is_some() {
        out.node_names = Some(fit.iter().map(|i| names[*i].clone()).collect());
    } else if let Some(list) = &args.nodes {
        // The same NodeList, with only the nodes that fit: kube-scheduler
        // uses the node objects it gets back.
        let items: Vec<Value> = list
            .get("items")
            .and_then(Value::as_array)
            .map(|all| fit.iter().filter_map(|i| all.get(*i).cloned()).collect())
            .unwrap_or_default();
        let mut list = list.clone();
        if let Some(obj) = list.as_object_mut() {
            obj.insert("items".into(), Value::Array(items));
        }
        out.nodes = Some(list);
    }
    out
}

/// `result` with every candidate node refused for `why` (a tenant over
/// budget fits nowhere, however free the node).
pub(crate) fn refuse_all(
    args: &ExtenderArgs,
    mut result: ExtenderFilterResult,
    why: &str,
) -> ExtenderFilterResult {
    for name in candidates(args).unwrap_or_default() {
        if !result.failed_and_unresolvable_nodes.contains_key(&name) {
            result.failed_nodes.insert(name, why.to_owned());
        }
    }
    if let Some(names) = result.node_names.as_mut() {
        names.clear();
    }
    if let Some(obj) = result.nodes.as_mut().and_then(Value::as_object_mut) {
        obj.insert("items".into(), Value::Array(Vec::new()));
    }
    result
}

/// The prioritize answer for `args` against `view`.
pub(crate) fn prioritize_nodes(
    args: &ExtenderArgs,
    view: &ClusterView,
    policy: Policy,
    now_ms: i64,
) -> Result<Vec<HostPriority>, String> {
    let names = candidates(args)
        .ok_or_else(|| "tally: ExtenderArgs has neither Nodes.items nor NodeNames".to_owned())?;
    let demand = args
        .pod
        .as_ref()
        .map(demand)
        .transpose()
        .map_err(|e| format!("tally: {e}"))?
        .unwrap_or_default();
    Ok(names
        .into_iter()
        .map(|host| {
            let node = view.nodes.iter().find(|n| n.node == host);
            HostPriority {
                score: score(node, &demand, policy, now_ms),
                host,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::{
        cluster::{
            Capacity,
            tests::{gpu, mig},
        },
        config::AggregatorConfig,
    };

    fn pod(containers: Value, init: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "train-0", "namespace": "ml", "uid": "7c1b"},
            "spec": {"containers": containers, "initContainers": init}
        }))
        .unwrap()
    }

    fn limits(name: &str, l: Value) -> Value {
        json!({"name": name, "image": "cuda:12", "resources": {"limits": l}})
    }

    #[test]
    fn demand_sums_containers_and_takes_the_init_peak() {
        let p = pod(
            json!([
                limits("a", json!({"nvidia.com/gpu": "1", "cpu": "500m"})),
                limits(
                    "b",
                    json!({"nvidia.com/gpu": "2", "nvidia.com/mig-1g.5gb": "1"})
                ),
            ]),
            json!([limits("init", json!({"nvidia.com/gpu": "4"}))]),
        );
        let d = demand(&p).unwrap();
        assert_eq!(d.gpus, 4, "the init container needs more than the sum");
        assert_eq!(d.mig, BTreeMap::from([("1g.5gb".into(), 1)]));

        // A sidecar keeps running: it adds to the containers and to every
        // init container after it.
        let mut sidecar = limits("proxy", json!({"nvidia.com/mig-1g.5gb": "1"}));
        sidecar["restartPolicy"] = json!("Always");
        let p = pod(
            json!([limits("main", json!({"nvidia.com/mig-1g.5gb": 1}))]),
            json!([
                sidecar,
                limits("warm", json!({"nvidia.com/mig-1g.5gb": "2"}))
            ]),
        );
        assert_eq!(demand(&p).unwrap().mig["1g.5gb"], 3);

        // Requests when there are no limits; nulls as Go sends them.
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x"},
            "spec": {"initContainers": null, "containers": [
                {"name": "c", "resources": {"limits": null, "requests": {"nvidia.com/gpu": "1000m"}}}
            ]}
        }))
        .unwrap();
        assert_eq!(demand(&p).unwrap().gpus, 1);
        assert!(
            demand(&pod(json!([limits("c", json!({"cpu": "1"}))]), json!(null)))
                .unwrap()
                .is_empty()
        );

        let bad = pod(
            json!([limits("c", json!({"nvidia.com/gpu": "500m"}))]),
            json!([]),
        );
        assert_eq!(
            demand(&bad).unwrap_err().to_string(),
            "container c: nvidia.com/gpu = \"500m\" is not a whole number of devices"
        );
        assert_eq!(whole_quantity(&json!("1Ki")), Some(1024));
        assert_eq!(whole_quantity(&json!("1.5")), None);
    }

    fn node(name: &str, gpus: Vec<cluster::GpuView>) -> NodeView {
        NodeView {
            node: name.into(),
            last_report: String::new(),
            last_report_ms: 100_000,
            last_interval_end_ms: 100_000,
            report_interval_ms: Some(1000),
            stale_after_ms: 3000,
            stale: false,
            reports: 10,
            capacity: cluster::capacity(&gpus),
            gpus,
            quotas: vec![],
        }
    }

    fn view() -> ClusterView {
        let mut parent = gpu("1", "busy", &[]);
        parent.mig_mode = true;
        let mut stale = node("gpu-c", vec![gpu("0", "free", &[]), gpu("1", "free", &[])]);
        stale.stale = true;
        ClusterView {
            generated_at: String::new(),
            generated_at_ms: 100_000,
            nodes: vec![
                // gpu-a: one free H100, a MIG A100 with two free 1g.5gb.
                node(
                    "gpu-a",
                    vec![
                        gpu("0", "free", &[]),
                        parent,
                        mig("1/1/0", "3g.20gb", "busy"),
                        mig("1/2/0", "1g.5gb", "free"),
                        mig("1/3/0", "1g.5gb", "free"),
                    ],
                ),
                // gpu-b: one stuck, two free.
                node(
                    "gpu-b",
                    vec![
                        gpu("0", "stuck", &["acme"]),
                        gpu("1", "free", &[]),
                        gpu("2", "free", &[]),
                    ],
                ),
                stale,
                // gpu-d: four free, healthy.
                node(
                    "gpu-d",
                    (0..4).map(|i| gpu(&i.to_string(), "free", &[])).collect(),
                ),
            ],
            tenants: vec![],
            reclaimable: vec![],
        }
    }

    fn args(gpu_limits: Value, cache: bool) -> ExtenderArgs {
        let names = ["gpu-a", "gpu-b", "gpu-c", "gpu-d", "cpu-1"];
        let mut v = json!({
            "Pod": {"metadata": {"name": "p", "namespace": "ml"},
                    "spec": {"containers": [limits("c", gpu_limits)]}},
            "Nodes": null, "NodeNames": null
        });
        if cache {
            v["NodeNames"] = json!(names);
        } else {
            v["Nodes"] = json!({"metadata": {}, "items": names.iter().map(|n| json!({
                "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}},
                "status": {"allocatable": {"nvidia.com/gpu": "4"}}
            })).collect::<Vec<_>>()});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn filter_keeps_nodes_with_enough_free_healthy_devices() {
        let v = view();
        let r = filter_nodes(&args(json!({"nvidia.com/gpu": "2"}), true), &v, 100_500);
        assert_eq!(
            r.node_names.as_deref(),
            Some(&["gpu-b".into(), "gpu-d".into()][..])
        );
        assert!(r.nodes.is_none() && r.error.is_empty());
        assert_eq!(
            r.failed_and_unresolvable_nodes["gpu-a"],
            "tally: needs 2 nvidia.com/gpu, node has 1 healthy whole GPUs"
        );
        assert!(r.failed_and_unresolvable_nodes["gpu-c"].contains("stale"));
        assert!(r.failed_and_unresolvable_nodes["cpu-1"].contains("no Tally agent"));

        let r = filter_nodes(&args(json!({"nvidia.com/gpu": "3"}), false), &v, 100_500);
        let items = r.nodes.as_ref().unwrap()["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "gpu-d");
        assert_eq!(items[0]["status"]["allocatable"]["nvidia.com/gpu"], "4");
        assert!(r.node_names.is_none());
        assert_eq!(
            r.failed_and_unresolvable_nodes["gpu-b"],
            "tally: needs 3 nvidia.com/gpu, node has 2 healthy whole GPUs (GPU 0 stuck or lost)"
        );

        let r = filter_nodes(
            &args(json!({"nvidia.com/mig-1g.5gb": "2"}), true),
            &v,
            100_500,
        );
        assert_eq!(r.node_names.as_deref(), Some(&["gpu-a".into()][..]));
        let r = filter_nodes(
            &args(json!({"nvidia.com/mig-3g.20gb": "1"}), true),
            &v,
            100_500,
        );
        assert_eq!(
            r.failed_nodes["gpu-a"],
            "tally: needs 1 free nvidia.com/mig-3g.20gb, 0 of 1 are free"
        );

        // No GPU demand: every node passes, known or not.
        let r = filter_nodes(&args(json!({"cpu": "2"}), true), &v, 100_500);
        assert_eq!(r.node_names.unwrap().len(), 5);

        // The wire names are the Go field names.
        let text = serde_json::to_value(filter_nodes(&args(json!({}), true), &v, 0)).unwrap();
        let keys: Vec<&String> = text.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "Error",
                "FailedAndUnresolvableNodes",
                "FailedNodes",
                "NodeNames",
                "Nodes"
            ]
        );
    }

    #[test]
    fn scores_follow_the_policy_and_sink_unhealthy_nodes() {
        let v = view();
        let scores = |policy, lim: Value| -> BTreeMap<String, i64> {
            prioritize_nodes(&args(lim, true), &v, policy, 100_500)
                .unwrap()
                .into_iter()
                .map(|h| (h.host, h.score))
                .collect()
        };
        let b = scores(Policy::Binpack, json!({"nvidia.com/gpu": "1"}));
        // gpu-a: 0 of 1 left → 10; gpu-d: 3 of 4 left → 5 + 1; gpu-b has
        // a stuck GPU: at most 4 whatever its fill.
        assert_eq!(b["gpu-a"], 10);
        assert_eq!(b["gpu-d"], 6);
        assert_eq!(b["gpu-b"], 2);
        assert_eq!((b["gpu-c"], b["cpu-1"]), (0, 0));
        let s = scores(Policy::Spread, json!({"nvidia.com/gpu": "1"}));
        assert_eq!((s["gpu-a"], s["gpu-d"], s["gpu-b"]), (5, 9, 2));
        assert!(s.values().all(|v| (0..=MAX_EXTENDER_PRIORITY).contains(v)));
        let m = scores(Policy::Binpack, json!({"nvidia.com/mig-1g.5gb": "1"}));
        assert_eq!((m["gpu-a"], m["gpu-d"]), (8, 0));

        let h: Vec<HostPriority> =
            prioritize_nodes(&args(json!({}), false), &v, Policy::Spread, 0).unwrap();
        assert_eq!(
            serde_json::to_value(&h[0]).unwrap(),
            json!({"Host": "gpu-a", "Score": 0})
        );
    }

    #[test]
    fn a_capacity_without_gpus_fails_cleanly() {
        let n = NodeView {
            capacity: Capacity::default(),
            ..node("empty", vec![])
        };
        let d = Demand {
            gpus: 1,
            mig: BTreeMap::new(),
        };
        assert!(matches!(check(Some(&n), &d, 0), Verdict::Unresolvable(_)));
        assert_eq!(score(Some(&n), &d, Policy::Binpack, 0), 0);
    }

    #[test]
    fn policy_is_checked_in_the_config() {
        let err = AggregatorConfig::parse(
            "[scheduler]\npolicy = \"random\"\nallow_unauthenticated = false\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "scheduler.policy" && p.message.contains("binpack or spread")),
            "{err}"
        );
        let err =
            AggregatorConfig::parse("[scheduler]\ncolour = 1\n", Path::new("a.toml")).unwrap_err();
        assert!(err.problems.iter().any(|p| p.key == "scheduler"), "{err}");
    }
}
