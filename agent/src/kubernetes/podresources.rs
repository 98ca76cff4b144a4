//! The kubelet pod-resources client (`v1.PodResourcesLister/List` on a unix
//! socket) and the thread that refreshes the node's pod view from it.
//!
//! The sampler never waits for the kubelet: a thread of its own asks every
//! `refresh_interval`, bounded by `timeout`, and publishes a new immutable
//! [`NodePods`] by swapping an `Arc` (the sampler holds the lock only to
//! clone that pointer). A kubelet that is slow, answers garbage or is not
//! there is logged once, when it starts failing, and once when it answers
//! again; meanwhile the last good answer is kept with its age, and
//! [`super::Lookup`] stops trusting its device list once it is stale.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};
use tracing::{Instrument, debug, info, warn};

use super::{
    ContainerRef, KubernetesConfig, PodName,
    cgroup::{parse_container_log_link, parse_pod_log_dir},
    labels::ApiLabels,
    proto::{
        ClaimResource, ListPodResourcesRequest,
        pod_resources_lister_client::PodResourcesListerClient,
    },
};

/// Largest answer accepted: the kubelet's own client allows 16 MiB.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Why one `List` call gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    /// The socket file is not there: no kubelet on this node, or its
    /// `pod-resources` directory is not mounted into the agent's container.
    #[error(
        "{}: no such socket (no kubelet here, or /var/lib/kubelet/pod-resources is not mounted into the agent)",
        path.display()
    )]
    Missing { path: PathBuf },
    /// Connecting or speaking HTTP/2 failed.
    #[error("{}: cannot connect: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    /// No complete answer within the timeout.
    #[error("{}: no answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    /// The kubelet answered with an error status, or with bytes that do not
    /// decode as a `ListPodResourcesResponse`.
    #[error("{}: List failed: {}: {}", path.display(), status.code(), status.message())]
    Call {
        path: PathBuf,
        status: tonic::Status,
    },
}

/// One `List` call with a deadline. Connects afresh each time: a kubelet
/// restart replaces the socket, and one connection per refresh is cheap.
pub async fn list(
    socket: &Path,
    timeout: Duration,
) -> Result<crate::kubernetes::proto::ListPodResourcesResponse, PodResourcesError> {
    let path = socket.to_path_buf();
    if !socket.exists() {
        return Err(PodResourcesError::Missing { path });
    }
    let call = async {
        let connect_to = path.clone();
        // The URI is required by the API and unused: the connector dials
        // the unix socket.
        let channel = Endpoint::from_static("http://kubelet.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = connect_to.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|source| PodResourcesError::Connect {
                path: path.clone(),
                source,
            })?;
        let mut client =
            PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
        client
            .list(ListPodResourcesRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| PodResourcesError::Call {
                path: path.clone(),
                status,
            })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(PodResourcesError::Timeout {
            path: path.clone(),
            timeout,
        }),
    }
}

/// The node's pods as the refresher last saw them. Immutable once
/// published.
#[derive(Debug, Default)]
pub struct NodePods {
    /// The last good pod-resources answer, `None` until one arrived.
    pub allocations: Option<Arc<Allocations>>,
    /// Pod UID → pod, from the kubelet's pod log directories.
    pub uids: HashMap<String, PodName>,
    /// Container id → container, from `/var/log/containers` link names.
    pub containers: HashMap<String, ContainerRef>,
}

/// Which container holds which device, from one `List` answer.
#[derive(Debug, Default)]
pub struct Allocations {
    /// When the answer arrived.
    pub fetched_at: Option<Instant>,
    /// Device id → the containers it is assigned to (more than one when the
    /// device plugin time-slices a GPU: ids `GPU-…::0`, `GPU-…::1` are
    /// replicas of `GPU-…`, stored under the physical id).
    pub by_device: HashMap<String, Vec<ContainerRef>>,
    /// Every pod in the answer (with or without devices).
    pub pods: HashSet<PodName>,
    /// Every container's devices, for the snapshot and `tally doctor`:
    /// (resource name, device id); a DRA device's resource is its driver.
    pub containers: Vec<(ContainerRef, Vec<(String, String)>)>,
    /// Pods holding a DRA device whose CDI names carry no GPU or MIG UUID:
    /// which GPUs they may use is not known here.
    pub opaque_dra: HashSet<PodName>,
}

impl Allocations {
    /// Indexes one answer. Entries without a namespace or name are skipped
    /// (a kubelet never sends them).
    pub fn from_answer(
        answer: crate::kubernetes::proto::ListPodResourcesResponse,
        fetched_at: Instant,
    ) -> Allocations {
        let mut out = Allocations {
            fetched_at: Some(fetched_at),
            ..Default::default()
        };
        for pod in answer.pod_resources {
            if pod.namespace.is_empty() || pod.name.is_empty() {
                continue;
            }
            let name = PodName {
                namespace: pod.namespace,
                pod: pod.name,
            };
            for c in pod.containers {
                let container = ContainerRef {
                    pod: name.clone(),
                    container: c.name,
                };
                let mut devices = Vec::new();
                for d in c.devices {
                    for id in d.device_ids {
                        let physical = physical_device_id(&id).to_owned();
                        let holders = out.by_device.entry(physical).or_default();
                        if !holders.contains(&container) {
                            holders.push(container.clone());
                        }
                        devices.push((d.resource_name.clone(), id));
                    }
                }
                for claim in c.dynamic_resources.iter().flat_map(|d| &d.claim_resources) {
                    let Some(id) = dra_device_id(claim) else {
                        out.opaque_dra.insert(name.clone());
                        continue;
                    };
                    let holders = out.by_device.entry(id.clone()).or_default();
                    if !holders.contains(&container) {
                        holders.push(container.clone());
                    }
                    devices.push((claim.driver_name.clone(), id));
                }
                out.containers.push((container, devices));
            }
            out.pods.insert(name);
        }
        out
    }
}

/// The NVIDIA device plugin names time-sliced replicas `<uuid>::<n>`; NVML
/// knows only `<uuid>`.
pub fn physical_device_id(id: &str) -> &str {
    id.split_once("::").map_or(id, |(physical, _)| physical)
}

/// The GPU or MIG UUID a DRA device stands for, from its CDI device names
/// (`vendor.com/class=name`: NVIDIA's specs name devices `GPU-<uuid>` or
/// `MIG-<uuid>`, sometimes behind a claim prefix) or else its device name.
/// `None` when neither carries one: a DRA driver naming devices by index
/// (`gpu-0`) needs the API server's ResourceSlices to resolve, which the
/// node-local join does not ask.
pub fn dra_device_id(claim: &ClaimResource) -> Option<String> {
    claim
        .cdi_devices
        .iter()
        .filter_map(|d| d.name.split_once('=').map(|(_, name)| name))
        .chain(std::iter::once(claim.device_name.as_str()))
        .find_map(gpu_uuid_in)
}

/// The `GPU-…`/`MIG-…` UUID that `name` ends with, if any.
fn gpu_uuid_in(name: &str) -> Option<String> {
    let start = ["GPU-", "MIG-"]
        .iter()
        .filter_map(|prefix| name.find(prefix))
        .min()?;
    let uuid = &name[start..];
    let body = &uuid[4..];
    let ok = !body.is_empty() && body.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then(|| uuid.to_owned())
}

/// Pods and containers named by the kubelet's log directories. Missing
/// directories give empty maps (not every node has them mounted).
pub fn scan_log_dirs(
    pod_logs: &Path,
    container_logs: &Path,
) -> (HashMap<String, PodName>, HashMap<String, ContainerRef>) {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let uids = names(pod_logs)
        .iter()
        .filter_map(|n| parse_pod_log_dir(n))
        .map(|(namespace, pod, uid)| (uid, PodName { namespace, pod }))
        .collect();
    let containers = names(container_logs)
        .iter()
        .filter_map(|n| parse_container_log_link(n))
        .map(|(pod, namespace, container, id)| {
            (
                id,
                ContainerRef {
                    pod: PodName { namespace, pod },
                    container,
                },
            )
        })
        .collect();
    (uids, containers)
}

/// The published view, swapped whole by the refresher.
pub type Shared = Arc<RwLock<Arc<NodePods>>>;

/// Health of the kubelet connection, to log transitions only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Unknown,
    Answering,
    Failing,
}

/// The refresher thread; stops (and is joined) on drop.
#[derive(Debug)]
pub struct Refresher {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("the kubelet pod-resources thread panicked");
        }
    }
}

/// Starts the thread that keeps `shared` current, and `labels` when given
/// (the API server's watch, [`super::labels`]).
pub fn spawn(
    config: KubernetesConfig,
    shared: Shared,
    labels: Option<Arc<ApiLabels>>,
) -> std::io::Result<Refresher> {
    let stop = CancellationToken::new();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tally-kubelet".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!("cannot start the kubelet pod-resources client: {e}; Kubernetes tenants fall back to the next [[tenant.rule]]");
                        return;
                    }
                };
                let watch = labels.map(|labels| {
                    super::labels::watch(config.clone(), labels, stop.clone())
                        .instrument(tracing::info_span!("kube_api"))
                });
                let kubelet =
                    refresh_loop(config, shared, stop).instrument(tracing::info_span!("kubelet"));
                runtime.block_on(async move {
                    match watch {
                        Some(watch) => {
                            tokio::join!(kubelet, watch);
                        }
                        None => kubelet.await,
                    }
                });
            })?
    };
    Ok(Refresher {
        stop,
        thread: Some(thread),
    })
}

async fn refresh_loop(config: KubernetesConfig, shared: Shared, stop: CancellationToken) {
    let mut health = Health::Unknown;
    let mut last_good: Option<Arc<Allocations>> = None;
    loop {
        let (uids, containers) = scan_log_dirs(&config.pod_logs_dir, &config.container_logs_dir);
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            a = list(&config.pod_resources_socket, config.timeout) => a,
        };
        match answer {
            Ok(answer) => {
                let allocations = Allocations::from_answer(answer, Instant::now());
                if health != Health::Answering {
                    info!(
                        socket = %config.pod_resources_socket.display(),
                        pods = allocations.pods.len(),
                        "kubelet pod-resources answering: Kubernetes tenants by namespace"
                    );
                }
                health = Health::Answering;
                last_good = Some(Arc::new(allocations));
            }
            Err(e) => {
                if health != Health::Failing {
                    // One line per outage, not one per refresh.
                    warn!(
                        "kubelet pod-resources unavailable: {e}; pods are named from {} where \
                         it has them, else their processes fall back to the next \
                         [[tenant.rule]]; retrying every {:?}",
                        config.pod_logs_dir.display(),
                        config.refresh_interval
                    );
                } else {
                    debug!("kubelet pod-resources still unavailable: {e}");
                }
                health = Health::Failing;
            }
        }
        let view = NodePods {
            allocations: last_good.clone(),
            uids,
            containers,
        };
        match shared.write() {
            Ok(mut slot) => *slot = Arc::new(view),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(view),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.refresh_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::proto::{
        CdiDevice, ContainerDevices, ContainerResources, DynamicResource, ListPodResourcesResponse,
        PodResources,
    };

    fn claim(driver: &str, device: &str, cdi: &[&str]) -> ClaimResource {
        ClaimResource {
            cdi_devices: cdi
                .iter()
                .map(|n| CdiDevice {
                    name: (*n).to_owned(),
                })
                .collect(),
            driver_name: driver.into(),
            pool_name: "node-1".into(),
            device_name: device.into(),
            share_id: None,
        }
    }

    #[test]
    fn dra_devices_are_indexed_like_plugin_devices() {
        let answer = ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "infer".into(),
                    namespace: "team-b".into(),
                    containers: vec![ContainerResources {
                        name: "server".into(),
                        devices: vec![],
                        cpu_ids: vec![],
                        dynamic_resources: vec![DynamicResource {
                            claim_name: "gpus".into(),
                            claim_namespace: "team-b".into(),
                            claim_resources: vec![
                                claim("gpu.nvidia.com", "gpu-0", &["nvidia.com/gpu=GPU-aaaa"]),
                                claim(
                                    "gpu.nvidia.com",
                                    "mig-1",
                                    &["k8s.gpu.nvidia.com/claim=1234-MIG-cccc"],
                                ),
                            ],
                        }],
                    }],
                },
                PodResources {
                    name: "by-index".into(),
                    namespace: "team-c".into(),
                    containers: vec![ContainerResources {
                        name: "c".into(),
                        devices: vec![],
                        cpu_ids: vec![],
                        dynamic_resources: vec![DynamicResource {
                            claim_name: "gpu".into(),
                            claim_namespace: "team-c".into(),
                            claim_resources: vec![claim(
                                "gpu.nvidia.com",
                                "gpu-1",
                                &["k8s.gpu.nvidia.com/claim=5678-gpu-1"],
                            )],
                        }],
                    }],
                },
            ],
        };
        let a = Allocations::from_answer(answer, Instant::now());
        assert_eq!(a.by_device["GPU-aaaa"][0].pod.pod, "infer");
        assert_eq!(a.by_device["MIG-cccc"][0].container, "server");
        assert_eq!(a.by_device.len(), 2, "{:?}", a.by_device);
        let (_, devices) = &a.containers[0];
        assert_eq!(
            devices[0],
            ("gpu.nvidia.com".to_owned(), "GPU-aaaa".to_owned())
        );
        assert!(a.opaque_dra.iter().any(|p| p.pod == "by-index"));
        assert!(!a.opaque_dra.iter().any(|p| p.pod == "infer"));
    }

    #[test]
    fn uuids_are_found_in_cdi_names_or_device_names() {
        assert_eq!(
            dra_device_id(&claim("d", "x", &["nvidia.com/gpu=GPU-12ab-cd"])).as_deref(),
            Some("GPU-12ab-cd")
        );
        assert_eq!(
            dra_device_id(&claim("d", "MIG-9f", &[])).as_deref(),
            Some("MIG-9f")
        );
        assert_eq!(
            dra_device_id(&claim("d", "gpu-0", &["nvidia.com/gpu=0"])),
            None
        );
        assert_eq!(
            dra_device_id(&claim("d", "GPU-", &["no-equals-GPU-1"])),
            None
        );
        assert_eq!(dra_device_id(&claim("d", "GPU-zz", &[])), None);
    }

    fn answer() -> ListPodResourcesResponse {
        ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "trainer-0".into(),
                    namespace: "team-a-prod".into(),
                    containers: vec![ContainerResources {
                        name: "cuda".into(),
                        devices: vec![ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-aaaa".into(), "GPU-bbbb".into()],
                            topology: None,
                        }],
                        cpu_ids: vec![],
                        dynamic_resources: vec![],
                    }],
                },
                PodResources {
                    name: "notebook".into(),
                    namespace: "research".into(),
                    containers: vec![ContainerResources {
                        name: "jupyter".into(),
                        devices: vec![ContainerDevices {
                            resource_name: "nvidia.com/mig-1g.10gb".into(),
                            device_ids: vec!["MIG-cccc".into()],
                            topology: None,
                        }],
                        cpu_ids: vec![],
                        dynamic_resources: vec![],
                    }],
                },
                // Time-sliced replicas of one GPU in two pods.
                PodResources {
                    name: "a".into(),
                    namespace: "shared".into(),
                    containers: vec![ContainerResources {
                        name: "c".into(),
                        devices: vec![ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-dddd::0".into()],
                            topology: None,
                        }],
                        cpu_ids: vec![],
                        dynamic_resources: vec![],
                    }],
                },
                PodResources {
                    name: "b".into(),
                    namespace: "shared".into(),
                    containers: vec![ContainerResources {
                        name: "c".into(),
                        devices: vec![ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-dddd::1".into()],
                            topology: None,
                        }],
                        cpu_ids: vec![],
                        dynamic_resources: vec![],
                    }],
                },
                PodResources {
                    name: String::new(),
                    namespace: "broken".into(),
                    containers: vec![],
                },
            ],
        }
    }

    #[test]
    fn answer_is_indexed_by_device() {
        let a = Allocations::from_answer(answer(), Instant::now());
        assert_eq!(a.pods.len(), 4);
        let holder = &a.by_device["GPU-bbbb"][0];
        assert_eq!(holder.pod.namespace, "team-a-prod");
        assert_eq!(holder.container, "cuda");
        assert_eq!(a.by_device["MIG-cccc"][0].pod.pod, "notebook");
        assert_eq!(a.by_device["GPU-dddd"].len(), 2, "replicas share a GPU");
        assert!(!a.by_device.contains_key("GPU-dddd::0"));
    }

    #[test]
    fn log_directories_name_pods_and_containers() {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let containers = dir.path().join("containers");
        std::fs::create_dir_all(
            pods.join("team-a-prod_trainer-0_2ca4a155-3599-498d-bb9d-4446693fa3ea/cuda"),
        )
        .unwrap();
        std::fs::create_dir_all(pods.join("not-a-pod")).unwrap();
        std::fs::create_dir_all(&containers).unwrap();
        let id = "66be9b2efdf4d85288c319b8c1a2f50d2439b5617e36f45d9d0d0be1381113be";
        std::fs::write(
            containers.join(format!("trainer-0_team-a-prod_cuda-{id}.log")),
            "",
        )
        .unwrap();
        let (uids, cs) = scan_log_dirs(&pods, &containers);
        assert_eq!(uids.len(), 1);
        assert_eq!(
            uids["2ca4a155-3599-498d-bb9d-4446693fa3ea"].namespace,
            "team-a-prod"
        );
        assert_eq!(cs[id].container, "cuda");
        let (uids, cs) = scan_log_dirs(&dir.path().join("nope"), &dir.path().join("nope"));
        assert!(uids.is_empty() && cs.is_empty());
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = list(&dir.path().join("kubelet.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PodResourcesError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("no such socket"), "{err}");
    }

    #[tokio::test]
    async fn a_socket_nobody_answers_on_times_out() {
        // A listener that accepts and never speaks HTTP/2.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubelet.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let err = list(&path, Duration::from_millis(300)).await.unwrap_err();
        assert!(
            matches!(
                err,
                PodResourcesError::Timeout { .. } | PodResourcesError::Connect { .. }
            ),
            "{err}"
        );
    }
}
