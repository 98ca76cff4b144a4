//! Kubernetes as the agent sees it from a node: pod cgroups named as the
//! kubelet names them (both cgroup drivers, beneath our own cgroup), and a
//! fake API server answering list and watch for pods and namespaces.
//!
//! The fake speaks the real API's shapes as kube-rs asks for them: `GET
//! /api/v1/pods?fieldSelector=spec.nodeName=<node>` and `/api/v1/namespaces`
//! answer a `PodList` / `NamespaceList` with `metadata.resourceVersion`;
//! with `watch=true&resourceVersion=R` they stream, as JSON lines, every
//! `ADDED` / `MODIFIED` / `DELETED` event after `R`, then each new one as it
//! happens. Plain HTTP on loopback; no bookmarks (they are optional).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full, channel::Channel, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::{Cgroup, ChildGuard, unique};

/// A pod UID and a container id, unique per call.
pub fn pod_ids() -> (String, String) {
    let n = unique("k8s");
    let digits: String = n.chars().filter(char::is_ascii_digit).collect();
    let tail = format!("{digits:0>12}");
    let tail = &tail[tail.len() - 12..];
    let uid = format!("7e9b4c9a-1d2e-4f60-8a7b-{tail}");
    let cid = format!("{:0>64}", format!("c0{digits}"));
    (uid, cid)
}

/// A process (`sleep`) in a pod's container cgroup.
pub struct PodProcess {
    pub cgroup: Cgroup,
    pub proc: ChildGuard,
    pub uid: String,
    pub cid: String,
}

/// A container cgroup named the systemd driver's way (with containerd),
/// beneath a unique base cgroup of ours.
pub fn systemd_burstable_pod() -> PodProcess {
    let (uid, cid) = pod_ids();
    let cgroup = Cgroup::create(&format!(
        "{}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
        unique("e2e-k8s"),
        uid.replace('-', "_")
    ));
    let proc = cgroup.spawn("sleep", &["600"]);
    PodProcess {
        cgroup,
        proc,
        uid,
        cid,
    }
}

/// The cgroupfs driver's naming: `kubepods/besteffort/pod<uid>/<id>`.
pub fn cgroupfs_besteffort_pod() -> PodProcess {
    let (uid, cid) = pod_ids();
    let cgroup = Cgroup::create(&format!(
        "{}/kubepods/besteffort/pod{uid}/{cid}",
        unique("e2e-k8s")
    ));
    let proc = cgroup.spawn("sleep", &["600"]);
    PodProcess {
        cgroup,
        proc,
        uid,
        cid,
    }
}

/// The two kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Namespaces,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/pods" => Some(Kind::Pods),
            "/api/v1/namespaces" => Some(Kind::Namespaces),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pods => "PodList",
            Kind::Namespaces => "NamespaceList",
        }
    }
}

/// One change, as a watch sends it.
struct Change {
    version: u64,
    kind: Kind,
    action: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    version: u64,
    /// Current objects by kind and key (pod UID, namespace name).
    objects: BTreeMap<(Kind, String), Value>,
    changes: Vec<Change>,
    /// Requests served: (kind, watch?).
    requests: Vec<(Kind, bool)>,
}

impl State {
    /// Stores `object` (its `metadata.resourceVersion` set) and records
    /// the change for watchers.
    fn put(&mut self, kind: Kind, key: &str, mut object: Value, action: &'static str) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.objects.insert((kind, key.to_owned()), object.clone());
        self.changes.push(Change {
            version: self.version,
            kind,
            action,
            object,
        });
    }
}

type Shared = (Mutex<State>, tokio::sync::watch::Sender<u64>);

/// The fake API server; stops (every connection closed) on
/// [`FakeApiServer::stop`] or drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let shared: Arc<Shared> = Arc::new((
            Mutex::new(State::default()),
            tokio::sync::watch::channel(0).0,
        ));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        let served = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(answer(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            shared,
            runtime: Some(runtime),
            addr,
        }
    }

    /// The URL for `[tenant.kubernetes] api_server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        let version = {
            let mut state = self.shared.0.lock().unwrap();
            f(&mut state);
            state.version
        };
        self.shared.1.send_replace(version);
    }

    /// Adds namespace `name` with `labels` (and the label the API server
    /// puts on every namespace).
    pub fn add_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
        all.insert("kubernetes.io/metadata.name", name);
        let object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": format!("0000{:0>32}", name.len()),
                "labels": all,
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        self.change(|s| s.put(Kind::Namespaces, name, object, "ADDED"));
    }

    /// Adds a running pod on `node`.
    pub fn add_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        labels: &[(&str, &str)],
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid,
                "labels": labels,
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "main", "image": "registry.invalid/app:1"}],
            },
            "status": {"phase": "Running"},
        });
        self.change(|s| s.put(Kind::Pods, uid, object, "ADDED"));
    }

    /// Replaces pod `uid`'s labels: one `MODIFIED` event.
    pub fn set_pod_labels(&self, uid: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.change(|s| {
            let mut object = s
                .objects
                .get(&(Kind::Pods, uid.to_owned()))
                .unwrap_or_else(|| panic!("no pod {uid}"))
                .clone();
            object["metadata"]["labels"] = json!(labels);
            s.put(Kind::Pods, uid, object, "MODIFIED");
        });
    }

    /// Makes `kind`/`name` pod `uid`'s controller: one `MODIFIED` event.
    pub fn set_pod_controller(&self, uid: &str, kind: &str, name: &str) {
        self.change(|s| {
            let mut object = s
                .objects
                .get(&(Kind::Pods, uid.to_owned()))
                .unwrap_or_else(|| panic!("no pod {uid}"))
                .clone();
            object["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "batch/v1",
                "kind": kind,
                "name": name,
                "uid": format!("owner-of-{uid}"),
                "controller": true,
                "blockOwnerDeletion": true,
            }]);
            s.put(Kind::Pods, uid, object, "MODIFIED");
        });
    }

    /// How many list (`watch` false) or watch requests of `kind` came.
    pub fn requests(&self, kind: Kind, watch: bool) -> usize {
        let state = self.shared.0.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|r| **r == (kind, watch))
            .count()
    }

    /// An outage: the listener and every open watch are closed.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("response")
}

/// A `Status` object, as the API server sends with an error.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

/// Whether `object` passes the request's field selector (only
/// `spec.nodeName=<node>` is understood; anything else is refused).
fn selected(object: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|n| object["spec"]["nodeName"] == n)
}

fn answer(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find {}", req.uri().path()),
        );
    };
    if req.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "read only",
        );
    }
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let node = match query.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(sel) => match (kind, sel.strip_prefix("spec.nodeName=")) {
            (Kind::Pods, Some(node)) => Some(node.to_owned()),
            _ => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("field label not supported: {sel}"),
                );
            }
        },
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut state = shared.0.lock().unwrap();
    state.requests.push((kind, watch));
    if !watch {
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, _), o)| *k == kind && selected(o, node.as_deref()))
            .map(|(_, o)| {
                // List items carry no kind/apiVersion, as the real API's.
                let mut o = o.clone();
                let map = o.as_object_mut().expect("object");
                map.remove("kind");
                map.remove("apiVersion");
                o
            })
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "kind": kind.list_kind(),
                "apiVersion": "v1",
                "metadata": {"resourceVersion": state.version.to_string()},
                "items": items,
            }),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(state.version);
    let limit = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    drop(state);
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut changed = shared.1.subscribe();
        let mut sent = from;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let lines: Vec<(u64, String)> = {
                let state = shared.0.lock().unwrap();
                state
                    .changes
                    .iter()
                    .filter(|c| c.version > sent && c.kind == kind)
                    .map(|c| {
                        let line = if selected(&c.object, node.as_deref()) {
                            json!({"type": c.action, "object": c.object}).to_string() + "\n"
                        } else {
                            String::new()
                        };
                        (c.version, line)
                    })
                    .collect()
            };
            for (version, line) in lines {
                sent = version;
                if !line.is_empty() && tx.send_data(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(body.boxed())
        .expect("response")
}
