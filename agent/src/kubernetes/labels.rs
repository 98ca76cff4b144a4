//! Tenants from labels: a watch of this node's pods and of namespaces on
//! the API server, kept as pod UID → (pod, tenant label) and namespace →
//! tenant label for the sampler to read without waiting.
//!
//! The watch runs beside the kubelet refresher, off the sampling thread.
//! A relist replaces a map whole only once it is complete; an API server
//! that stops answering is logged once per watch, and the last known
//! labels stay in force until it answers again. See `docs/kubernetes.md`.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    pin::pin,
    sync::{Arc, RwLock},
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tally_contract::tenant::check_tenant_name;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{KubernetesConfig, PodName};

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    /// No `api_server` is configured and the agent is not in a pod (no
    /// service account token, no `KUBERNETES_SERVICE_HOST`) nor has a
    /// kubeconfig.
    #[error("no Kubernetes API server to ask: {source}")]
    Infer {
        source: kube::config::InferConfigError,
    },
    /// The client could not be built from the config (TLS, CA bundle).
    #[error("cannot build the Kubernetes API client: {source}")]
    Client { source: kube::Error },
    /// `api_server` is not a URL (checked by `tally config check` too).
    #[error("api_server {url:?} is not a URL: {reason}")]
    Url { url: String, reason: String },
}

/// A pod of this node as the API server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledPod {
    pub pod: PodName,
    /// Its `tenant_label` value, when set and a valid tenant name.
    pub tenant: Option<String>,
    /// `<kind>/<name>` of its controller (a Job, a ReplicaSet, a
    /// StatefulSet…): its pods' usage is one workload.
    pub owner: Option<String>,
}

/// What the watch last saw. Each lock is held only for one map operation
/// (or the swap of a whole map after a relist), so the sampler never waits
/// on the network.
#[derive(Debug, Default)]
pub struct ApiLabels {
    /// Pod UID → pod, for this node's pods.
    pods: RwLock<HashMap<String, LabelledPod>>,
    /// Namespace → tenant, for namespaces carrying the label only.
    namespaces: RwLock<HashMap<String, String>>,
}

impl ApiLabels {
    /// The pod with UID `uid`, if the API server named it.
    pub fn pod(&self, uid: &str) -> Option<LabelledPod> {
        read(&self.pods).get(uid).cloned()
    }

    /// The tenant namespace `namespace`'s label names.
    pub fn namespace_tenant(&self, namespace: &str) -> Option<String> {
        read(&self.namespaces).get(namespace).cloned()
    }

    /// Sets what the watch would have seen (tests).
    #[cfg(test)]
    pub(crate) fn set(&self, pods: HashMap<String, LabelledPod>, ns: HashMap<String, String>) {
        *write(&self.pods) = pods;
        *write(&self.namespaces) = ns;
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// The Kubernetes node this agent runs on: `node_name`, else `$NODE_NAME`
/// (the DaemonSet sets it from `spec.nodeName`), else the host name (the
/// kubelet's own default).
pub fn node_name(config: &KubernetesConfig) -> String {
    config
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_lowercase())
                .unwrap_or_default()
        })
}

/// A Kubernetes label key: `[prefix/]name`, the prefix a DNS subdomain,
/// the name 1..=63 of `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub(crate) fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Err(format!(
            "label prefix {p:?} is not a DNS subdomain (lower-case letters, digits, `-` and `.`)"
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label name {name:?} must be 1..=63 letters, digits, `-`, `_` or `.`, starting and \
             ending with a letter or digit"
        ))
    }
}

/// RFC 1123 subdomain: what a label prefix and a node name are.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// `api_server`: an `http` or `https` URL with a host.
pub(crate) fn check_api_server(url: &str) -> Result<(), String> {
    let uri = url
        .parse::<hyper::Uri>()
        .map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(format!(
            "{url:?} must be an http:// or https:// URL with a host"
        )),
    }
}

/// A client for `api_server` (without credentials), else as kube's
/// `Config::infer` finds one: in a pod, its service account token and CA
/// with `KUBERNETES_SERVICE_HOST`.
async fn client(config: &KubernetesConfig) -> Result<Client, LabelsError> {
    let kube_config = match &config.api_server {
        Some(url) => {
            let uri = url.parse::<hyper::Uri>().map_err(|e| LabelsError::Url {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| LabelsError::Infer { source })?,
    };
    Client::try_from(kube_config).map_err(|source| LabelsError::Client { source })
}

/// Keeps `labels` current until `stop`. Returns at once, with one log
/// line, when no API server can be asked: tenants then come from
/// namespace names, as without `tenant_label`.
pub async fn watch(config: KubernetesConfig, labels: Arc<ApiLabels>, stop: CancellationToken) {
    let Some(label) = config.tenant_label.clone() else {
        return;
    };
    let client = match client(&config).await {
        Ok(c) => c,
        Err(e) => {
            warn!("tenant labels unavailable: {e}; tenants come from namespace names");
            return;
        }
    };
    let node = node_name(&config);
    info!(%node, %label, "tenant labels: watching this node's pods and namespaces");
    let pods = follow(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        &labels.pods,
        "pods",
        |pod, warned| pod_entry(pod, &label, warned),
    );
    let namespaces = follow(
        Api::<Namespace>::all(client),
        watcher::Config::default(),
        &labels.namespaces,
        "namespaces",
        |ns, warned| namespace_entry(ns, &label, warned),
    );
    tokio::select! {
        () = stop.cancelled() => {}
        () = pods => {}
        () = namespaces => {}
    }
}

/// A pod's entry: its UID → its name and tenant label. `None` without a
/// UID, namespace or name (the API server always sends them).
fn pod_entry(pod: Pod, label: &str, warned: &mut Warned) -> Option<(String, Option<LabelledPod>)> {
    let tenant = tenant_label(&pod.metadata, label, warned);
    let meta = pod.metadata;
    let owner = controller(meta.owner_references.as_deref().unwrap_or_default());
    let pod = PodName {
        namespace: meta.namespace?,
        pod: meta.name?,
    };
    Some((meta.uid?, Some(LabelledPod { pod, tenant, owner })))
}

/// `<kind>/<name>` of the owner that controls a pod (at most one has
/// `controller: true`); `None` for a bare pod.
fn controller(owners: &[OwnerReference]) -> Option<String> {
    owners
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| format!("{}/{}", o.kind, o.name))
}

/// A namespace's entry: its name → its tenant label (`None`: not kept).
fn namespace_entry(
    ns: Namespace,
    label: &str,
    warned: &mut Warned,
) -> Option<(String, Option<String>)> {
    let tenant = tenant_label(&ns.metadata, label, warned);
    Some((ns.metadata.name?, tenant))
}

/// The tenant `label` names on an object: unset or empty gives none, and
/// so does a value that is not a tenant name (logged once per value).
fn tenant_label(meta: &ObjectMeta, label: &str, warned: &mut Warned) -> Option<String> {
    let value = meta.labels.as_ref()?.get(label)?;
    if value.is_empty() {
        return None;
    }
    match check_tenant_name(value) {
        Ok(()) => Some(value.clone()),
        Err(why) => {
            warned.once(value, || {
                warn!(
                    "label {label}={value} on {} is not a tenant name ({why}); ignored",
                    meta.name.as_deref().unwrap_or("?")
                )
            });
            None
        }
    }
}

/// Label values already warned about, bounded: an object updated often
/// (every pod status change is an event) must not repeat its line.
#[derive(Default)]
struct Warned(HashSet<String>);

impl Warned {
    fn once(&mut self, value: &str, log: impl FnOnce()) {
        if self.0.len() < 1024 && self.0.insert(value.to_owned()) {
            log();
        }
    }
}

/// Applies one watch's events to `map`: `entry` gives an object's key and
/// value (`None`: not kept, e.g. a namespace without the label). The
/// watcher retries with backoff on its own; failures and recoveries are
/// logged once each.
async fn follow<K, V>(
    api: Api<K>,
    config: watcher::Config,
    map: &RwLock<HashMap<String, V>>,
    what: &str,
    mut entry: impl FnMut(K, &mut Warned) -> Option<(String, Option<V>)>,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut events = pin!(watcher(api, config).default_backoff());
    let mut mirror = Mirror::new(map);
    // `None` until the first complete list: logged once, then only changes.
    let mut answering: Option<bool> = None;
    let mut warned = Warned::default();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if answering != Some(false) {
                    warn!(
                        "Kubernetes API unavailable: watch of {what} failed: {e}; the last \
                         known tenant labels stay in force, retrying"
                    );
                    answering = Some(false);
                }
                continue;
            }
        };
        if answering == Some(false) && !matches!(event, watcher::Event::Init) {
            // A resumed watch (no relist needed) or a relist's first page.
            info!("Kubernetes API answering again: watching {what}");
            answering = Some(true);
        }
        if let Some(n) = mirror.apply(event, |k| entry(k, &mut warned))
            && answering.is_none()
        {
            info!("Kubernetes API answering: watching {what} ({n} kept)");
            answering = Some(true);
        }
    }
}

/// A watched map and the relist being gathered for it.
struct Mirror<'a, V> {
    map: &'a RwLock<HashMap<String, V>>,
    relist: Option<HashMap<String, V>>,
}

impl<'a, V> Mirror<'a, V> {
    fn new(map: &'a RwLock<HashMap<String, V>>) -> Self {
        Mirror { map, relist: None }
    }

    /// Applies one event; at the end of a relist, the map is replaced
    /// whole (objects gone meanwhile with it) and its size returned.
    fn apply<K>(
        &mut self,
        event: watcher::Event<K>,
        mut entry: impl FnMut(K) -> Option<(String, Option<V>)>,
    ) -> Option<usize> {
        match event {
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(obj) => {
                if let (Some(buf), Some((key, Some(v)))) = (self.relist.as_mut(), entry(obj)) {
                    buf.insert(key, v);
                }
            }
            watcher::Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let n = fresh.len();
                *write(self.map) = fresh;
                return Some(n);
            }
            watcher::Event::Apply(obj) => match entry(obj) {
                Some((key, Some(v))) => {
                    write(self.map).insert(key, v);
                }
                Some((key, None)) => {
                    write(self.map).remove(&key);
                }
                None => {}
            },
            watcher::Event::Delete(obj) => {
                if let Some((key, _)) = entry(obj) {
                    write(self.map).remove(&key);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_controlling_owner_names_the_workload() {
        let owner = |kind: &str, name: &str, controller: Option<bool>| OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller,
            ..Default::default()
        };
        assert_eq!(
            controller(&[
                owner("ConfigMap", "c", None),
                owner("Job", "train", Some(true))
            ]),
            Some("Job/train".into())
        );
        assert_eq!(controller(&[owner("ReplicaSet", "r", Some(false))]), None);
        assert_eq!(controller(&[]), None);
    }

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: meta(name, labels),
            ..Default::default()
        }
    }

    const L: &str = "tally.dev/tenant";

    #[test]
    fn the_label_names_the_tenant_when_it_can() {
        let mut w = Warned::default();
        assert_eq!(
            tenant_label(&meta("a", &[(L, "team-b")]), L, &mut w).as_deref(),
            Some("team-b")
        );
        assert_eq!(tenant_label(&meta("a", &[("other", "x")]), L, &mut w), None);
        assert_eq!(tenant_label(&meta("a", &[(L, "")]), L, &mut w), None);
        // Tally's own names are not a label's to give.
        assert_eq!(tenant_label(&meta("a", &[(L, "_idle")]), L, &mut w), None);
        assert_eq!(w.0.len(), 1);
        let (uid, p) = pod_entry(pod("p", &[(L, "team-c")]), L, &mut w).unwrap();
        assert_eq!(uid, "uid-p");
        let p = p.unwrap();
        assert_eq!((p.pod.namespace.as_str(), p.pod.pod.as_str()), ("ns", "p"));
        assert_eq!(p.tenant.as_deref(), Some("team-c"));
        let ns = Namespace {
            metadata: meta("research", &[]),
            ..Default::default()
        };
        assert_eq!(
            namespace_entry(ns, L, &mut w),
            Some(("research".to_owned(), None))
        );
    }

    fn apply(m: &mut Mirror<'_, LabelledPod>, e: watcher::Event<Pod>) -> Option<usize> {
        m.apply(e, |p| pod_entry(p, L, &mut Warned::default()))
    }

    #[test]
    fn watch_events_keep_the_map_and_a_relist_replaces_it_whole() {
        let labels = ApiLabels::default();
        let mut m = Mirror::new(&labels.pods);
        apply(&mut m, watcher::Event::Init);
        apply(&mut m, watcher::Event::InitApply(pod("a", &[])));
        apply(&mut m, watcher::Event::InitApply(pod("b", &[(L, "t")])));
        assert!(
            labels.pod("uid-a").is_none(),
            "not before the list is complete"
        );
        assert_eq!(apply(&mut m, watcher::Event::InitDone), Some(2));
        assert_eq!(labels.pod("uid-b").unwrap().tenant.as_deref(), Some("t"));

        // One MODIFIED event moves the pod.
        apply(&mut m, watcher::Event::Apply(pod("a", &[(L, "u")])));
        assert_eq!(labels.pod("uid-a").unwrap().tenant.as_deref(), Some("u"));
        apply(&mut m, watcher::Event::Delete(pod("b", &[])));
        assert!(labels.pod("uid-b").is_none());

        // A relist (after an outage too long for the watch to resume):
        // the old map serves until the new one is complete, and a pod
        // deleted meanwhile is gone with it.
        apply(&mut m, watcher::Event::Init);
        apply(&mut m, watcher::Event::InitApply(pod("c", &[])));
        assert_eq!(labels.pod("uid-a").unwrap().tenant.as_deref(), Some("u"));
        assert_eq!(apply(&mut m, watcher::Event::InitDone), Some(1));
        assert!(labels.pod("uid-a").is_none());
        assert!(labels.pod("uid-c").is_some());
    }

    #[test]
    fn namespaces_without_the_label_are_not_kept() {
        let labels = ApiLabels::default();
        let mut m = Mirror::new(&labels.namespaces);
        let ns = |name: &str, l: &[(&str, &str)]| Namespace {
            metadata: meta(name, l),
            ..Default::default()
        };
        let entry = |n| namespace_entry(n, L, &mut Warned::default());
        m.apply(watcher::Event::Init, entry);
        m.apply(watcher::Event::InitApply(ns("a", &[(L, "t")])), entry);
        m.apply(watcher::Event::InitApply(ns("b", &[])), entry);
        assert_eq!(m.apply(watcher::Event::InitDone, entry), Some(1));
        assert_eq!(labels.namespace_tenant("a").as_deref(), Some("t"));
        // The label removed: the namespace's name is the tenant again.
        m.apply(watcher::Event::Apply(ns("a", &[])), entry);
        assert_eq!(labels.namespace_tenant("a"), None);
    }
}
