//! Kubernetes tenants on the node: which pod a process belongs to, and the
//! pod's namespace as its tenant.
//!
//! Three local sources, joined on the sampling thread without ever waiting:
//! - the process's cgroup path names its pod UID and container id
//!   ([`cgroup::parse`]);
//! - the kubelet's log directories (`/var/log/pods/<ns>_<pod>_<uid>`,
//!   `/var/log/containers/<pod>_<ns>_<container>-<id>.log`) name the pod of
//!   a UID and the container of an id, when mounted into the agent;
//! - the kubelet pod-resources API (`v1.PodResourcesLister/List`) says
//!   which container holds which GPU / MIG device, by namespace and name
//!   (not UID). A process on GPU `X` in pod UID `U` whose device list says
//!   `X` belongs to `ns/pod/container` identifies `U` as that pod; the
//!   association is remembered, so the pod's other processes and its
//!   network cgroups resolve too.
//!
//! With `tenant_label` set, the API server is a fourth source: a watch of
//! this node's pods and of namespaces ([`labels`]) names pods by UID and
//! gives the tenant a pod's or its namespace's label names.
//!
//! The refresher ([`podresources`]) and the watch run on their own thread;
//! the sampler reads their latest published view. See `docs/kubernetes.md`.

pub mod allocation;
pub mod cgroup;
pub mod labels;
pub mod podresources;

/// Messages and client generated from `agent/proto/podresources/v1`.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod proto {
    tonic::include_proto!("v1");
}

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Deserialize;

use tally_contract::config::Problems;

pub use self::podresources::Refresher;
use self::{
    labels::ApiLabels,
    podresources::{NodePods, Shared},
};
use crate::{
    paths,
    snapshot::{GpuSnapshot, UnallocatedGpuUse, Workload},
};

/// `[tenant.kubernetes]`: where the kubelet's answers are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The kubelet pod-resources socket. Default
    /// `/var/lib/kubelet/pod-resources/kubelet.sock`.
    pub pod_resources_socket: PathBuf,
    /// Time between two `List` calls. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Longest wait for one answer. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The kubelet's pod log directory (`<ns>_<pod>_<uid>` entries).
    /// Default `/var/log/pods`.
    pub pod_logs_dir: PathBuf,
    /// The container log links (`<pod>_<ns>_<container>-<id>.log`).
    /// Default `/var/log/containers`.
    pub container_logs_dir: PathBuf,
    /// Per-workload series: `namespace`, `pod` and `container` on each GPU
    /// process of the snapshot and `tally_workload_gpu_memory_bytes`.
    /// Default `false` (one series per pod and GPU is a cardinality choice).
    pub workload_series: bool,
    /// Deny a pod found using a GPU it was not allocated the device nodes
    /// of every GPU it was not allocated (a `cgroup/dev` program on the
    /// pod's cgroup, beside the runtime's own). Default `false`: flag only.
    pub enforce_allocation: bool,
    /// The pod label, then namespace label, naming a pod's tenant (e.g.
    /// `tally.dev/tenant`), read through a watch of this node's pods and
    /// of namespaces. Default: none (no API server is asked).
    pub tenant_label: Option<String>,
    /// The API server to watch, reached without credentials (a `kubectl
    /// proxy`, a test's fake). Default: in-cluster (the pod's service
    /// account token and CA, `KUBERNETES_SERVICE_HOST`), else kubeconfig.
    pub api_server: Option<String>,
    /// This node's name in Kubernetes (the pods watched are those with
    /// `spec.nodeName` equal to it). Default: `$NODE_NAME`, else the host
    /// name.
    pub node_name: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            pod_resources_socket: PathBuf::from(paths::KUBELET_POD_RESOURCES_SOCKET),
            refresh_interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            pod_logs_dir: PathBuf::from(paths::KUBERNETES_POD_LOGS_DIR),
            container_logs_dir: PathBuf::from(paths::KUBERNETES_CONTAINER_LOGS_DIR),
            workload_series: false,
            enforce_allocation: false,
            tenant_label: None,
            api_server: None,
            node_name: None,
        }
    }
}

impl KubernetesConfig {
    /// The device list is trusted for new pods this long after it arrived:
    /// two missed refreshes. Past that a GPU may have moved to another pod.
    pub fn stale_after(&self) -> Duration {
        self.refresh_interval * 2 + self.timeout
    }
}

/// Parses `[tenant.kubernetes]` (absent: defaults), recording problems.
pub fn parse_section(value: Option<toml::Value>, problems: &mut Problems) -> KubernetesConfig {
    let Some(value) = value else {
        return KubernetesConfig::default();
    };
    let config = match KubernetesConfig::deserialize(value) {
        Ok(c) => c,
        Err(e) => {
            problems.push("tenant.kubernetes", e.message().to_string());
            return KubernetesConfig::default();
        }
    };
    if config.refresh_interval < Duration::from_millis(100) {
        problems.push(
            "tenant.kubernetes.refresh_interval",
            "must be at least 100ms",
        );
    }
    if config.timeout < Duration::from_millis(10) {
        problems.push("tenant.kubernetes.timeout", "must be at least 10ms");
    }
    if !config.pod_resources_socket.is_absolute() {
        problems.push(
            "tenant.kubernetes.pod_resources_socket",
            "must be an absolute path",
        );
    }
    if let Some(label) = &config.tenant_label
        && let Err(why) = labels::check_label_key(label)
    {
        problems.push("tenant.kubernetes.tenant_label", why);
    }
    if let Some(url) = &config.api_server
        && let Err(why) = labels::check_api_server(url)
    {
        problems.push("tenant.kubernetes.api_server", why);
    }
    if config
        .node_name
        .as_deref()
        .is_some_and(|n| !labels::is_dns_subdomain(n))
    {
        problems.push(
            "tenant.kubernetes.node_name",
            "not a Kubernetes node name (lower-case letters, digits, `-` and `.`, at most 253)",
        );
    }
    config
}

/// What a `kubernetes = true` rule does with a namespace no `namespaces`
/// entry names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmapped {
    /// The namespace's name is the tenant.
    #[default]
    Namespace,
    /// The rule does not match; the next `[[tenant.rule]]` decides.
    NextRule,
}

/// The tenant a `kubernetes` rule gives a namespace.
pub fn tenant_of(
    namespace: &str,
    namespaces: &BTreeMap<String, String>,
    unmapped: Unmapped,
) -> Option<String> {
    match (namespaces.get(namespace), unmapped) {
        (Some(tenant), _) => Some(tenant.clone()),
        (None, Unmapped::Namespace) => Some(namespace.to_owned()),
        (None, Unmapped::NextRule) => None,
    }
}

/// RFC 1123 label: what a namespace name is.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodName {
    pub namespace: String,
    pub pod: String,
}

/// A container of a pod, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerRef {
    pub pod: PodName,
    pub container: String,
}

/// Who a process is, as far as the node can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    /// `None` when only the namespace is known (a time-sliced GPU shared by
    /// several pods of one namespace).
    pub pod: Option<String>,
    pub container: Option<String>,
    /// The tenant the pod's `tenant_label`, else its namespace's, names.
    pub label_tenant: Option<String>,
    /// `<kind>/<name>` of the pod's controller, when the label watch saw it.
    pub owner: Option<String>,
}

impl Identity {
    /// The tenant a `kubernetes` rule gives this process: its pod's or
    /// namespace's label, else [`tenant_of`] its namespace.
    pub fn tenant(
        &self,
        namespaces: &BTreeMap<String, String>,
        unmapped: Unmapped,
    ) -> Option<String> {
        self.label_tenant
            .clone()
            .or_else(|| tenant_of(&self.namespace, namespaces, unmapped))
    }

    /// Workload labels; `None` unless the pod is known.
    pub fn workload(&self) -> Option<Workload> {
        Some(Workload {
            namespace: self.namespace.clone(),
            pod: self.pod.clone()?,
            container: self.container.clone().unwrap_or_default(),
        })
    }
}

/// Learned associations are dropped past this many (a node runs at most a
/// few hundred pods; this only bounds a pathological churn).
const MAX_LEARNED: usize = 16_384;

/// The sampling thread's side: reads the refresher's latest view and
/// remembers the pods it identified by device.
#[derive(Debug)]
pub struct Lookup {
    shared: Shared,
    stale_after: Duration,
    workload_series: bool,
    /// Pod UID → pod, learned by device.
    learned_pods: HashMap<String, PodName>,
    /// Pod UID → the cgroup it was learned from, to tell a restarted pod
    /// (old cgroup gone) from two live pods claiming one device.
    learned_cgroups: HashMap<String, String>,
    /// Whether a cgroup still exists (a stat; swapped in tests).
    alive: fn(&str) -> bool,
    /// Container id → (pod UID, container name), learned by device.
    learned_containers: HashMap<String, (String, String)>,
    /// Pods whose device was seen used from two pod UIDs (a privileged pod
    /// that sees every GPU, say): not identified by device at all, rather
    /// than possibly wrongly.
    conflicted: HashSet<PodName>,
    /// The allocations last pruned against (pointer identity).
    pruned_for: Option<Arc<podresources::Allocations>>,
    /// What the API server's watch last said (`tenant_label` set).
    labels: Option<Arc<ApiLabels>>,
}

impl Lookup {
    /// A lookup over `shared` (which the refresher fills).
    pub fn new(shared: Shared, config: &KubernetesConfig) -> Lookup {
        Lookup {
            shared,
            stale_after: config.stale_after(),
            workload_series: config.workload_series,
            learned_pods: HashMap::new(),
            learned_cgroups: HashMap::new(),
            alive: cgroup_exists,
            learned_containers: HashMap::new(),
            conflicted: HashSet::new(),
            pruned_for: None,
            labels: None,
        }
    }

    /// Reads pods and tenant labels from the API server's watch too.
    pub fn with_labels(mut self, labels: Arc<ApiLabels>) -> Lookup {
        self.labels = Some(labels);
        self
    }

    /// Whether processes carry workload labels.
    pub fn workload_series(&self) -> bool {
        self.workload_series
    }

    fn view(&self) -> Arc<NodePods> {
        match self.shared.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Identity of a process in `cgroup`, running on GPU / MIG device
    /// `device` (its UUID) when known. `None` when the cgroup is not a
    /// pod's or nothing names the pod yet.
    pub fn identify(&mut self, cgroup: &str, device: Option<&str>) -> Option<Identity> {
        let pc = cgroup::parse(cgroup)?;
        let view = self.view();
        self.prune(&view);
        if let Some(id) = self.known(&view, &pc) {
            return Some(id);
        }
        let device = device?;
        let alloc = view.allocations.as_ref()?;
        let fresh = alloc
            .fetched_at
            .is_some_and(|t| t.elapsed() <= self.stale_after);
        if !fresh {
            return None;
        }
        let holders = alloc
            .by_device
            .get(podresources::physical_device_id(device))?;
        match holders.as_slice() {
            [] => None,
            [one] => {
                if self.conflicted.contains(&one.pod) {
                    return None;
                }
                let other_uid = self
                    .learned_pods
                    .iter()
                    .find(|(uid, pod)| **pod == one.pod && **uid != pc.pod_uid)
                    .map(|(uid, _)| uid.clone());
                if let Some(other_uid) = other_uid {
                    let other_alive = self
                        .learned_cgroups
                        .get(&other_uid)
                        .is_some_and(|cg| (self.alive)(cg));
                    self.learned_pods.remove(&other_uid);
                    self.learned_cgroups.remove(&other_uid);
                    self.learned_containers
                        .retain(|_, (uid, _)| *uid != other_uid);
                    if other_alive {
                        // One pod has one UID: two live cgroups claiming it
                        // means the device join cannot tell them apart.
                        self.conflicted.insert(one.pod.clone());
                        return None;
                    }
                    // Else the pod was recreated under its old name (a
                    // StatefulSet): the new UID takes over.
                }
                if self.learned_pods.len() >= MAX_LEARNED {
                    self.learned_pods.clear();
                    self.learned_cgroups.clear();
                    self.learned_containers.clear();
                }
                self.learned_pods
                    .insert(pc.pod_uid.clone(), one.pod.clone());
                self.learned_cgroups
                    .insert(pc.pod_uid.clone(), cgroup.to_owned());
                if let Some(cid) = &pc.container_id {
                    self.learned_containers
                        .insert(cid.clone(), (pc.pod_uid.clone(), one.container.clone()));
                }
                Some(Identity {
                    namespace: one.pod.namespace.clone(),
                    pod: Some(one.pod.pod.clone()),
                    container: Some(one.container.clone()),
                    label_tenant: self.label_tenant(&pc.pod_uid, &one.pod.namespace),
                    owner: self.owner(&pc.pod_uid),
                })
            }
            [first, rest @ ..] => {
                // Several pods share the device (time-slicing): the pod is
                // ambiguous, the namespace may not be.
                rest.iter()
                    .all(|c| c.pod.namespace == first.pod.namespace)
                    .then(|| Identity {
                        namespace: first.pod.namespace.clone(),
                        pod: None,
                        container: None,
                        label_tenant: self.label_tenant(&pc.pod_uid, &first.pod.namespace),
                        owner: None,
                    })
            }
        }
    }

    /// Pods of `gpus`' processes running on a GPU the kubelet did not
    /// allocate to them ([`allocation::unallocated_uses`]). Judged only
    /// from a fresh answer, and only for pods already named (log
    /// directories, or a device join on a GPU they hold): a pod seen only
    /// on another pod's GPU cannot be told from that pod by the node.
    pub fn unallocated(&self, gpus: &[GpuSnapshot]) -> Vec<UnallocatedGpuUse> {
        let view = self.view();
        let Some(alloc) = view.allocations.as_ref() else {
            return Vec::new();
        };
        if alloc
            .fetched_at
            .is_none_or(|t| t.elapsed() > self.stale_after)
        {
            return Vec::new();
        }
        allocation::unallocated_uses(gpus, alloc, &mut |cg: &str| {
            let pc = cgroup::parse(cg)?;
            let id = self.known(&view, &pc)?;
            Some(PodName {
                namespace: id.namespace,
                pod: id.pod?,
            })
        })
    }

    /// Identity of a cgroup from what is already known (no device): for
    /// the eBPF probes, which see cgroups, not GPUs.
    pub fn identify_cgroup(&self, cgroup: &str) -> Option<Identity> {
        let pc = cgroup::parse(cgroup)?;
        self.known(&self.view(), &pc)
    }

    fn known(&self, view: &NodePods, pc: &cgroup::PodCgroup) -> Option<Identity> {
        let from_api;
        let pod = match self
            .learned_pods
            .get(&pc.pod_uid)
            .or_else(|| view.uids.get(&pc.pod_uid))
        {
            Some(pod) => pod,
            None => {
                from_api = self.labels.as_ref()?.pod(&pc.pod_uid)?.pod;
                &from_api
            }
        };
        let container =
            pc.container_id
                .as_ref()
                .and_then(|cid| match self.learned_containers.get(cid) {
                    Some((_, name)) => Some(name.clone()),
                    None => view
                        .containers
                        .get(cid)
                        .filter(|c| c.pod == *pod)
                        .map(|c| c.container.clone()),
                });
        Some(Identity {
            namespace: pod.namespace.clone(),
            pod: Some(pod.pod.clone()),
            container,
            label_tenant: self.label_tenant(&pc.pod_uid, &pod.namespace),
            owner: self.owner(&pc.pod_uid),
        })
    }

    /// The controller of pod `uid`, as last watched.
    fn owner(&self, uid: &str) -> Option<String> {
        self.labels.as_ref()?.pod(uid)?.owner
    }

    /// The tenant label of pod `uid`, else of `namespace`, as last watched.
    fn label_tenant(&self, uid: &str, namespace: &str) -> Option<String> {
        let labels = self.labels.as_ref()?;
        labels
            .pod(uid)
            .and_then(|p| p.tenant)
            .or_else(|| labels.namespace_tenant(namespace))
    }

    /// Forgets pods that left the node, each time a new answer arrives.
    fn prune(&mut self, view: &NodePods) {
        let Some(alloc) = &view.allocations else {
            return;
        };
        if self
            .pruned_for
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, alloc))
        {
            return;
        }
        self.pruned_for = Some(alloc.clone());
        self.learned_pods.retain(|_, pod| alloc.pods.contains(pod));
        let pods = &self.learned_pods;
        self.learned_cgroups.retain(|uid, _| pods.contains_key(uid));
        self.conflicted.retain(|pod| alloc.pods.contains(pod));
        let pods = &self.learned_pods;
        self.learned_containers
            .retain(|_, (uid, _)| pods.contains_key(uid));
    }
}

/// Whether cgroup v2 path `cgroup` (as `/proc/PID/cgroup` shows it) still
/// exists on this host.
fn cgroup_exists(cgroup: &str) -> bool {
    crate::cgroupfs::unified_root()
        .is_some_and(|root| root.join(cgroup.trim_start_matches('/')).exists())
}

/// Starts the refresher and returns the lookup for the resolver plus the
/// thread's guard; `None` when the thread cannot start. The caller decides
/// whether Kubernetes is wanted (`tenants::kubernetes_wanted`).
pub fn start(config: &KubernetesConfig) -> Option<(Lookup, Refresher)> {
    let shared: Shared = Arc::new(RwLock::new(Arc::new(NodePods::default())));
    let labels = config
        .tenant_label
        .is_some()
        .then(|| Arc::new(ApiLabels::default()));
    match podresources::spawn(config.clone(), shared.clone(), labels.clone()) {
        Ok(refresher) => {
            tracing::info!(
                socket = %config.pod_resources_socket.display(),
                refresh = ?config.refresh_interval,
                timeout = ?config.timeout,
                "Kubernetes tenants: asking the kubelet which pod holds which GPU"
            );
            let lookup = Lookup::new(shared, config);
            let lookup = match labels {
                Some(labels) => lookup.with_labels(labels),
                None => lookup,
            };
            Some((lookup, refresher))
        }
        Err(e) => {
            tracing::warn!(
                "cannot start the kubelet pod-resources thread: {e}; Kubernetes tenants fall \
                 back to the next [[tenant.rule]]"
            );
            None
        }
    }
}

/// A lookup whose view is set by hand (tests).
#[cfg(test)]
pub(crate) fn lookup_with(view: NodePods, config: &KubernetesConfig) -> Lookup {
    Lookup::new(Arc::new(RwLock::new(Arc::new(view))), config)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{podresources::Allocations, *};
    use crate::kubernetes::proto::{
        ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources,
    };
    use crate::tenants::rules::TenantRule;

    const UID: &str = "2ca4a155-3599-498d-bb9d-4446693fa3ea";
    const CID: &str = "66be9b2efdf4d85288c319b8c1a2f50d2439b5617e36f45d9d0d0be1381113be";

    fn cgroup() -> String {
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        )
    }

    fn answer(ns: &str, pod: &str, devices: &[&str]) -> ListPodResourcesResponse {
        ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: pod.into(),
                namespace: ns.into(),
                containers: vec![ContainerResources {
                    name: "cuda".into(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/gpu".into(),
                        device_ids: devices.iter().map(|d| (*d).to_owned()).collect(),
                        topology: None,
                    }],
                    cpu_ids: vec![],
                    dynamic_resources: vec![],
                }],
            }],
        }
    }

    fn view(answer: ListPodResourcesResponse, at: Instant) -> NodePods {
        NodePods {
            allocations: Some(Arc::new(Allocations::from_answer(answer, at))),
            ..Default::default()
        }
    }

    #[test]
    fn device_identifies_the_pod_and_is_remembered() {
        let mut l = lookup_with(
            view(
                answer("team-a-prod", "trainer-0", &["GPU-aaaa"]),
                Instant::now(),
            ),
            &KubernetesConfig::default(),
        );
        assert_eq!(l.identify_cgroup(&cgroup()), None, "not learned yet");
        assert_eq!(l.identify(&cgroup(), Some("GPU-bbbb")), None, "other GPU");
        let id = l.identify(&cgroup(), Some("GPU-aaaa")).unwrap();
        assert_eq!(id.namespace, "team-a-prod");
        assert_eq!(
            id.workload(),
            Some(Workload {
                namespace: "team-a-prod".into(),
                pod: "trainer-0".into(),
                container: "cuda".into()
            })
        );
        // Now known by UID: without a device, and for the network probes.
        assert_eq!(
            l.identify(&cgroup(), None).unwrap().pod.as_deref(),
            Some("trainer-0")
        );
        assert_eq!(
            l.identify_cgroup(&cgroup()).unwrap().namespace,
            "team-a-prod"
        );
        // Not a pod at all.
        assert_eq!(l.identify("/user.slice", Some("GPU-aaaa")), None);
    }

    #[test]
    fn two_pods_claiming_one_device_identify_neither() {
        let mut l = lookup_with(
            view(answer("ns", "p", &["GPU-aaaa"]), Instant::now()),
            &KubernetesConfig::default(),
        );
        l.alive = |_| true;
        assert!(l.identify(&cgroup(), Some("GPU-aaaa")).is_some());
        // Another pod's process on the same GPU (e.g. a privileged pod).
        let other = "/kubepods/pod11111111-2222-3333-4444-555555555555";
        assert_eq!(l.identify(other, Some("GPU-aaaa")), None);
        assert_eq!(l.identify(&cgroup(), Some("GPU-aaaa")), None);
        assert_eq!(l.identify_cgroup(&cgroup()), None);
        assert_eq!(l.identify(other, Some("GPU-aaaa")), None);
    }

    #[test]
    fn a_recreated_pod_takes_over_its_name() {
        let mut l = lookup_with(
            view(answer("ns", "p", &["GPU-aaaa"]), Instant::now()),
            &KubernetesConfig::default(),
        );
        l.alive = |_| false;
        assert!(l.identify(&cgroup(), Some("GPU-aaaa")).is_some());
        // The old pod's cgroup is gone; same name, new UID.
        let new = "/kubepods/pod11111111-2222-3333-4444-555555555555";
        let id = l.identify(new, Some("GPU-aaaa")).unwrap();
        assert_eq!(id.pod.as_deref(), Some("p"));
        assert_eq!(l.identify_cgroup(&cgroup()), None, "old UID forgotten");
        assert!(l.identify_cgroup(new).is_some());
    }

    #[test]
    fn a_stale_device_list_identifies_no_new_pod() {
        let config = KubernetesConfig::default();
        let old = Instant::now()
            .checked_sub(config.stale_after() + Duration::from_secs(1))
            .expect("uptime");
        let mut l = lookup_with(view(answer("ns", "p", &["GPU-aaaa"]), old), &config);
        assert_eq!(l.identify(&cgroup(), Some("GPU-aaaa")), None);
    }

    #[test]
    fn pods_that_left_are_forgotten() {
        let config = KubernetesConfig::default();
        let shared: Shared = Arc::new(RwLock::new(Arc::new(view(
            answer("ns", "p", &["GPU-aaaa"]),
            Instant::now(),
        ))));
        let mut l = Lookup::new(shared.clone(), &config);
        assert!(l.identify(&cgroup(), Some("GPU-aaaa")).is_some());
        *shared.write().unwrap() = Arc::new(view(answer("ns", "other", &[]), Instant::now()));
        assert_eq!(l.identify(&cgroup(), None), None);
        assert!(l.learned_pods.is_empty() && l.learned_containers.is_empty());
    }

    #[test]
    fn time_sliced_gpu_gives_the_namespace_only_when_shared_within_it() {
        let two = |ns_b: &str| ListPodResourcesResponse {
            pod_resources: [("ns", "a", "GPU-x::0"), (ns_b, "b", "GPU-x::1")]
                .into_iter()
                .flat_map(|(ns, pod, dev)| answer(ns, pod, &[dev]).pod_resources)
                .collect(),
        };
        let config = KubernetesConfig::default();
        let mut l = lookup_with(view(two("ns"), Instant::now()), &config);
        let id = l.identify(&cgroup(), Some("GPU-x")).unwrap();
        assert_eq!((id.namespace.as_str(), id.pod.as_deref()), ("ns", None));
        assert_eq!(id.workload(), None);
        let mut l = lookup_with(view(two("other"), Instant::now()), &config);
        assert_eq!(l.identify(&cgroup(), Some("GPU-x")), None);
    }

    #[test]
    fn log_directories_name_pods_without_the_kubelet() {
        let mut v = NodePods::default();
        v.uids.insert(
            UID.into(),
            PodName {
                namespace: "research".into(),
                pod: "nb".into(),
            },
        );
        v.containers.insert(
            CID.into(),
            ContainerRef {
                pod: PodName {
                    namespace: "research".into(),
                    pod: "nb".into(),
                },
                container: "jupyter".into(),
            },
        );
        let mut l = lookup_with(v, &KubernetesConfig::default());
        let id = l.identify(&cgroup(), None).unwrap();
        assert_eq!(id.namespace, "research");
        assert_eq!(id.container.as_deref(), Some("jupyter"));
    }

    #[test]
    fn namespaces_map_to_tenants() {
        let map = BTreeMap::from([("team-a-prod".to_owned(), "team-a".to_owned())]);
        assert_eq!(
            tenant_of("team-a-prod", &map, Unmapped::Namespace).as_deref(),
            Some("team-a")
        );
        assert_eq!(
            tenant_of("research", &map, Unmapped::Namespace).as_deref(),
            Some("research")
        );
        assert_eq!(tenant_of("research", &map, Unmapped::NextRule), None);
        assert_eq!(
            tenant_of("team-a-prod", &map, Unmapped::NextRule).as_deref(),
            Some("team-a")
        );
    }

    fn parse(text: &str) -> Result<crate::config::Config, Problems> {
        crate::config::Config::parse(text, std::path::Path::new("t.toml"))
    }

    #[test]
    fn rules_and_section_parse() {
        let c = parse(
            r#"
            [[tenant.rule]]
            kubernetes = true
            namespaces = { "team-a-prod" = "team-a", "team-a-dev" = "team-a" }
            unmapped = "next-rule"
            [[tenant.rule]]
            kubernetes = true
            [[tenant.rule]]
            user = true
            [tenant.kubernetes]
            pod_resources_socket = "/run/kubelet/pod-resources/kubelet.sock"
            refresh_interval = "5s"
            timeout = "500ms"
            workload_series = true
            enforce_allocation = true
            "#,
        )
        .unwrap();
        let TenantRule::Kubernetes {
            namespaces,
            unmapped,
        } = &c.tenant.rules[0]
        else {
            panic!("{:?}", c.tenant.rules[0]);
        };
        assert_eq!(namespaces["team-a-dev"], "team-a");
        assert_eq!(*unmapped, Unmapped::NextRule);
        assert!(matches!(
            c.tenant.rules[1],
            TenantRule::Kubernetes {
                unmapped: Unmapped::Namespace,
                ..
            }
        ));
        let k = &c.tenant.kubernetes;
        assert_eq!(k.refresh_interval, Duration::from_secs(5));
        assert_eq!(k.timeout, Duration::from_millis(500));
        assert!(k.workload_series);
        assert!(k.enforce_allocation);
        assert_eq!(k.pod_logs_dir, PathBuf::from("/var/log/pods"));
        let d = parse("").unwrap().tenant.kubernetes;
        assert_eq!(d, KubernetesConfig::default());
        assert_eq!(
            d.pod_resources_socket,
            PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
    }

    #[test]
    fn every_kubernetes_problem_is_reported_with_its_key() {
        let err = parse(
            r#"
            [[tenant.rule]]
            kubernetes = true
            cgroup = '^/x'
            [[tenant.rule]]
            namespaces = { a = "b" }
            [[tenant.rule]]
            kubernetes = true
            namespaces = { "Team_A" = "_reserved" }
            [[tenant.rule]]
            kubernetes = false
            [[tenant.rule]]
            kubernetes = true
            unmapped = "drop"
            [tenant.kubernetes]
            refresh_interval = "1ms"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tenant.rule[0].cgroup",
                "tenant.rule[1].kubernetes",
                "tenant.rule[2].namespaces.Team_A",
                "tenant.rule[2].namespaces.Team_A",
                "tenant.rule[3].kubernetes",
                "tenant.rule[4]",
                "tenant.kubernetes.refresh_interval",
            ],
            "{err}"
        );
        let err = parse("[tenant.kubernetes]\nsocket = '/x'\n").unwrap_err();
        assert_eq!(err.problems[0].key, "tenant.kubernetes", "{err}");
        assert!(err.to_string().contains("socket"), "{err}");
    }

    #[test]
    fn resolver_names_known_pods_by_namespace_and_falls_through() {
        let c = parse(
            r#"
            [[tenant.rule]]
            kubernetes = true
            namespaces = { "team-a-prod" = "team-a" }
            unmapped = "next-rule"
            [[tenant.rule]]
            cgroup = '^/kubepods'
            tenant = "k8s-other"
            "#,
        )
        .unwrap();
        let mut v = NodePods::default();
        let uid2 = "11111111-2222-3333-4444-555555555555";
        for (uid, ns) in [(UID, "team-a-prod"), (uid2, "kube-system")] {
            v.uids.insert(
                uid.into(),
                PodName {
                    namespace: ns.into(),
                    pod: "p".into(),
                },
            );
        }
        let mut r = crate::tenants::Resolver::new(c.tenant.rules.clone());
        // Without the kubelet side attached, the rule matches nothing.
        assert_eq!(r.tenant_for_cgroup(&cgroup()).as_deref(), Some("k8s-other"));
        r.set_kubernetes(lookup_with(v, &c.tenant.kubernetes));
        assert_eq!(r.tenant_for_cgroup(&cgroup()).as_deref(), Some("team-a"));
        assert_eq!(
            r.tenant_for_cgroup(&format!("/kubepods/burstable/pod{uid2}/{CID}"))
                .as_deref(),
            Some("k8s-other"),
            "unmapped namespace goes to the next rule"
        );
        assert_eq!(r.tenant_for_cgroup("/system.slice/x.service"), None);

        // A known pod's process is charged to the workload
        // `<namespace>/<pod>`, whether or not workload series are on.
        let fake = crate::tenants::procs::fake::FakeProc::default();
        let mut r = crate::tenants::Resolver::new(c.tenant.rules.clone()).with_procs(
            crate::tenants::procs::ProcCache::new(Box::new(fake.clone())),
        );
        r.set_kubernetes(lookup_with(NodePods::default(), &c.tenant.kubernetes));
        fake.set(7, 1, &cgroup());
        let a = r.attribute_on(7, None);
        assert_eq!(&*a.tenant, "k8s-other", "pod not known yet");
        assert_eq!(a.workload_id, None);
        let mut v = NodePods::default();
        v.uids.insert(
            UID.into(),
            PodName {
                namespace: "team-a-prod".into(),
                pod: "trainer-0".into(),
            },
        );
        r.set_kubernetes(lookup_with(v, &c.tenant.kubernetes));
        let a = r.attribute_on(7, None);
        assert_eq!(&*a.tenant, "team-a");
        assert_eq!(a.workload_id.as_deref(), Some("team-a-prod/trainer-0"));
        assert_eq!(a.workload, None, "series stay off");
    }

    #[test]
    fn a_pod_label_wins_over_its_namespace_label_which_wins_over_the_name() {
        use labels::LabelledPod;

        let c = parse(
            r#"
            [[tenant.rule]]
            kubernetes = true
            namespaces = { "team-a-prod" = "team-a" }
            [tenant.kubernetes]
            tenant_label = "tally.dev/tenant"
            "#,
        )
        .unwrap();
        let uid2 = "11111111-2222-3333-4444-555555555555";
        let other = format!("/kubepods/burstable/pod{uid2}/{CID}");
        let api = Arc::new(ApiLabels::default());
        let set = |pod_label: Option<&str>, ns_label: Option<&str>| {
            let pod = |uid: &str, ns: &str, tenant: Option<&str>| {
                let pod = LabelledPod {
                    pod: PodName {
                        namespace: ns.into(),
                        pod: "p".into(),
                    },
                    tenant: tenant.map(str::to_owned),
                    owner: None,
                };
                (uid.to_owned(), pod)
            };
            api.set(
                HashMap::from([
                    pod(UID, "team-a-prod", pod_label),
                    pod(uid2, "research", None),
                ]),
                ns_label
                    .map(|t| ("team-a-prod".to_owned(), t.to_owned()))
                    .into_iter()
                    .collect(),
            );
        };
        let mut r = crate::tenants::Resolver::new(c.tenant.rules.clone());
        r.set_kubernetes(
            lookup_with(NodePods::default(), &c.tenant.kubernetes).with_labels(api.clone()),
        );
        // Named by the API server alone; no label: the `namespaces` map,
        // else the namespace's name.
        set(None, None);
        assert_eq!(r.tenant_for_cgroup(&cgroup()).as_deref(), Some("team-a"));
        assert_eq!(r.tenant_for_cgroup(&other).as_deref(), Some("research"));
        set(None, Some("ns-tenant"));
        assert_eq!(r.tenant_for_cgroup(&cgroup()).as_deref(), Some("ns-tenant"));
        assert_eq!(r.tenant_for_cgroup(&other).as_deref(), Some("research"));
        set(Some("pod-tenant"), Some("ns-tenant"));
        assert_eq!(
            r.tenant_for_cgroup(&cgroup()).as_deref(),
            Some("pod-tenant")
        );
        // GPU processes too, with the pod as workload.
        let fake = crate::tenants::procs::fake::FakeProc::default();
        let mut r = crate::tenants::Resolver::new(c.tenant.rules.clone()).with_procs(
            crate::tenants::procs::ProcCache::new(Box::new(fake.clone())),
        );
        r.set_kubernetes(
            lookup_with(NodePods::default(), &c.tenant.kubernetes).with_labels(api.clone()),
        );
        fake.set(7, 1, &cgroup());
        let a = r.attribute_on(7, None);
        assert_eq!(&*a.tenant, "pod-tenant");
        assert_eq!(a.workload_id.as_deref(), Some("team-a-prod/p"));
        // The label changes: the next attribution follows.
        set(Some("other-tenant"), None);
        assert_eq!(&*r.attribute_on(7, None).tenant, "other-tenant");
        // A pod of a Job: the Job is the workload.
        api.set(
            HashMap::from([(
                UID.to_owned(),
                LabelledPod {
                    pod: PodName {
                        namespace: "team-a-prod".into(),
                        pod: "train-x7k2p".into(),
                    },
                    tenant: None,
                    owner: Some("Job/train".into()),
                },
            )]),
            HashMap::new(),
        );
        let a = r.attribute_on(7, None);
        assert_eq!(a.workload_id.as_deref(), Some("team-a-prod/Job/train"));
    }

    #[test]
    fn label_watch_keys_parse_and_are_checked() {
        let c = parse(
            r#"
            [[tenant.rule]]
            kubernetes = true
            [tenant.kubernetes]
            tenant_label = "tally.dev/tenant"
            api_server = "http://127.0.0.1:8001"
            node_name = "gpu-node-1.example"
            "#,
        )
        .unwrap();
        let k = &c.tenant.kubernetes;
        assert_eq!(k.tenant_label.as_deref(), Some("tally.dev/tenant"));
        assert_eq!(k.api_server.as_deref(), Some("http://127.0.0.1:8001"));
        assert_eq!(labels::node_name(k), "gpu-node-1.example");
        let rule = "[[tenant.rule]]\nkubernetes = true\n";
        assert!(
            parse(&format!(
                "{rule}[tenant.kubernetes]\ntenant_label = 'tenant'\n"
            ))
            .is_ok()
        );
        // A label with nothing to name tenants through.
        let err = parse("[tenant.kubernetes]\ntenant_label = 'tenant'\n").unwrap_err();
        assert_eq!(err.problems[0].key, "tenant.kubernetes.tenant_label");
        assert!(err.to_string().contains("kubernetes = true"), "{err}");
        for (text, key, says) in [
            (
                "tenant_label = 'Tally.dev/tenant'",
                "tenant_label",
                "prefix",
            ),
            ("tenant_label = 'tally.dev/'", "tenant_label", "label name"),
            (
                "tenant_label = 'tally.dev/-x'",
                "tenant_label",
                "label name",
            ),
            ("api_server = '127.0.0.1:8001'", "api_server", "http"),
            ("api_server = 'ftp://h'", "api_server", "http"),
            ("node_name = 'GPU_1'", "node_name", "node name"),
        ] {
            let err = parse(&format!("{rule}[tenant.kubernetes]\n{text}\n")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{text}: {err}");
            assert_eq!(
                err.problems[0].key,
                format!("tenant.kubernetes.{key}"),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("team-a-prod"));
        assert!(is_dns_label("a1"));
        assert!(!is_dns_label("Team"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}
