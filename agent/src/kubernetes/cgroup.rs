//! Pod UID, QoS class and container id from a cgroup path, as the kubelet
//! and the container runtimes name their cgroups.
//!
//! The kubelet makes one cgroup per pod beneath one per QoS class, and the
//! runtime one per container beneath the pod's:
//!
//! | driver   | pod cgroup                                                        | container cgroup |
//! | -------- | ----------------------------------------------------------------- | ---------------- |
//! | cgroupfs | `/kubepods/pod<uid>` (guaranteed), `/kubepods/burstable/pod<uid>`  | `<id>` (containerd, docker), `crio-<id>` |
//! | systemd  | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//!
//! The root is not always `/kubepods`: `--cgroup-root` renames it
//! (`machine.slice` → `machine-burstable-pod<uid>.slice`), kind nodes nest it
//! (`/kubelet.slice/kubelet-kubepods.slice/…`), a cgroup namespace cuts a
//! prefix off or shows `/../..`, and test fixtures make the tree beneath
//! their own cgroup. So the parser looks for the pod component anywhere in
//! the path instead of anchoring at the root; a component only counts as a
//! pod when what follows `pod` is a pod UID (a UUID, or the 32 hex digits
//! the kubelet gives static pods). Anything below the container cgroup
//! (crun's `…/container`, a systemd inside the container) is ignored.

use std::fmt;

use serde::Serialize;

/// A pod's QoS class, from the cgroup level the kubelet put it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QosClass {
    /// Requests equal limits: the pod cgroup sits right under the root.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The container runtime that named the container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` / `crio-<id>`.
    CriO,
    /// `crio-conmon-<id>.scope`: CRI-O's monitor process of container `<id>`.
    CriOConmon,
    /// `docker-<id>.scope`.
    Docker,
    /// A bare `<id>` (cgroupfs driver with containerd or docker).
    Unnamed,
}

/// What a cgroup path says about the pod a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, lower case, with dashes (`2ca4a155-3599-498d-…`), or
    /// 32 hex digits for a static pod.
    pub pod_uid: String,
    pub qos: QosClass,
    /// The container's 64-hex-digit runtime id; `None` for a process in the
    /// pod cgroup itself (or a container cgroup named in a way not known).
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

/// Parses a cgroup path (v2 `0::` line, or a v1 controller path). `None`
/// when the path is not a Kubernetes pod's.
pub fn parse(path: &str) -> Option<PodCgroup> {
    parse_at(path).map(|(_, pc)| pc)
}

/// The pod's own cgroup: `path` cut after its (innermost) pod component.
/// `None` when the path is not a pod's, or when the pod and its container
/// share one directory name (`<pod>.slice:cri-containerd:<id>`), which
/// has no pod directory of its own.
pub fn pod_dir(path: &str) -> Option<String> {
    let (i, _) = parse_at(path)?;
    let dirs: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if dirs.iter().any(|d| d.contains(".slice:")) {
        return None;
    }
    Some(format!("/{}", dirs[..=i].join("/")))
}

/// [`parse`], with the index of the pod component among the path's parts.
fn parse_at(path: &str) -> Option<(usize, PodCgroup)> {
    // A systemd cgroup *name* given to a runtime that manages cgroupfs
    // itself (containerd with `SystemdCgroup = false` under a systemd-driver
    // kubelet) becomes one directory `<pod>.slice:cri-containerd:<id>`.
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once(".slice:") {
            Some((slice, container)) => vec![&p[..slice.len() + ".slice".len()], container],
            None => vec![p],
        })
        .collect();
    // The innermost pod component wins: a pod inside a kind node inside a
    // pod (nested clusters) belongs to the inner kubelet, which is the one
    // whose cgroups the processes are in.
    let (i, pod_uid, qos) = parts.iter().enumerate().rev().find_map(|(i, part)| {
        let (uid, qos) = pod_component(part, i.checked_sub(1).map(|p| parts[p]))?;
        Some((i, uid, qos))
    })?;
    let (container_id, runtime) = match parts.get(i + 1).and_then(|c| container_component(c)) {
        Some((id, runtime)) => (Some(id), Some(runtime)),
        None => (None, None),
    };
    Some((
        i,
        PodCgroup {
            pod_uid,
            qos,
            container_id,
            runtime,
        },
    ))
}

/// `pod<uid>` (cgroupfs) or `<prefix>-pod<uid_with_underscores>.slice`
/// (systemd): the UID and the QoS class.
fn pod_component(part: &str, parent: Option<&str>) -> Option<(String, QosClass)> {
    if let Some(stem) = part.strip_suffix(".slice") {
        // systemd: the unit name repeats its parents, so the QoS class is in
        // the pod slice's own name.
        let (prefix, uid) = match stem.rsplit_once("-pod") {
            Some((prefix, uid)) => (prefix, uid),
            None => ("", stem.strip_prefix("pod")?),
        };
        let uid = pod_uid(&uid.replace('_', "-"))?;
        let qos = if prefix.ends_with("-besteffort") || prefix == "besteffort" {
            QosClass::BestEffort
        } else if prefix.ends_with("-burstable") || prefix == "burstable" {
            QosClass::Burstable
        } else {
            QosClass::Guaranteed
        };
        return Some((uid, qos));
    }
    // cgroupfs: the QoS class is the parent directory.
    let uid = pod_uid(part.strip_prefix("pod")?)?;
    let qos = match parent {
        Some("besteffort") => QosClass::BestEffort,
        Some("burstable") => QosClass::Burstable,
        _ => QosClass::Guaranteed,
    };
    Some((uid, qos))
}

/// A pod UID: a UUID (any case, normalised to lower case), or 32 hex digits
/// (static pods: a hash of the manifest).
fn pod_uid(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let ok = match bytes.len() {
        36 => bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        }),
        32 => bytes.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    ok.then(|| text.to_ascii_lowercase())
}

/// The container id and runtime of a container cgroup component.
fn container_component(part: &str) -> Option<(String, Runtime)> {
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    // `cri-containerd:<id>` appears in kubelet's systemd cgroup *names*; the
    // directories use `-`, but accept both.
    let (prefix, id) = match stem.rsplit_once(['-', ':']) {
        Some((prefix, id)) => (prefix, id),
        None => ("", stem),
    };
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let runtime = match prefix {
        "" => Runtime::Unnamed,
        "cri-containerd" | "containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "crio-conmon" => Runtime::CriOConmon,
        "docker" => Runtime::Docker,
        _ => return None,
    };
    Some((id.to_ascii_lowercase(), runtime))
}

/// A pod's `namespace` and `name`, as the kubelet's log directory
/// (`/var/log/pods/<namespace>_<name>_<uid>`) spells them; `None` for any
/// other entry. Namespaces and pod names are DNS names, which have no `_`.
pub fn parse_pod_log_dir(name: &str) -> Option<(String, String, String)> {
    let mut it = name.split('_');
    let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || ns.is_empty() || pod.is_empty() {
        return None;
    }
    Some((ns.to_owned(), pod.to_owned(), pod_uid(uid)?))
}

/// `(pod, namespace, container, container id)` from a
/// `/var/log/containers/<pod>_<namespace>_<container>-<id>.log` link name.
pub fn parse_container_log_link(name: &str) -> Option<(String, String, String, String)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut it = rest.split('_');
    let (pod, ns, container) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || pod.is_empty() || ns.is_empty() || container.is_empty() {
        return None;
    }
    Some((
        pod.to_owned(),
        ns.to_owned(),
        container.to_owned(),
        id.to_ascii_lowercase(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real names, from `systemd-cgls` and `/proc/PID/cgroup` output people
    // posted in kubelet, minikube, kind, CRI-O and netdata issues.
    const CRIO_ID: &str = "358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c";
    const CTRD_ID: &str = "66be9b2efdf4d85288c319b8c1a2f50d2439b5617e36f45d9d0d0be1381113be";
    const DOCKER_ID: &str = "abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152";

    fn pod(path: &str) -> PodCgroup {
        parse(path).unwrap_or_else(|| panic!("{path} should parse as a pod"))
    }

    #[test]
    fn the_pod_directory_is_the_path_cut_after_the_pod() {
        let uid = "e1465238_4518_4c21_832f_fd9f87033dad";
        let pod_slice =
            format!("/t/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice");
        assert_eq!(
            pod_dir(&format!("{pod_slice}/cri-containerd-{CTRD_ID}.scope")),
            Some(pod_slice.clone())
        );
        assert_eq!(pod_dir(&pod_slice), Some(pod_slice));
        let cgroupfs = "/kubepods/besteffort/pode1465238-4518-4c21-832f-fd9f87033dad";
        assert_eq!(
            pod_dir(&format!("{cgroupfs}/{CTRD_ID}")).as_deref(),
            Some(cgroupfs)
        );
        assert_eq!(
            pod_dir(&format!(
                "/kubepods.slice/kubepods-pod{uid}.slice:cri-containerd:{CTRD_ID}"
            )),
            None
        );
        assert_eq!(pod_dir("/user.slice/user-0.slice"), None);
    }

    #[test]
    fn systemd_driver_with_crio() {
        // minikube (docker driver) with CRI-O: the node is itself a docker
        // container, so the tree sits under /docker/<id>/.
        let p = pod(&format!(
            "/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/\
             kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-{CRIO_ID}.scope"
        ));
        assert_eq!(p.pod_uid, "2ca4a155-3599-498d-bb9d-4446693fa3ea");
        assert_eq!(p.qos, QosClass::BestEffort);
        assert_eq!(p.container_id.as_deref(), Some(CRIO_ID));
        assert_eq!(p.runtime, Some(Runtime::CriO));
    }

    #[test]
    fn systemd_driver_with_containerd_every_qos_class() {
        let uid = "e1465238_4518_4c21_832f_fd9f87033dad";
        let cases = [
            (
                format!("kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"),
                QosClass::BestEffort,
            ),
            (
                format!("kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"),
                QosClass::Burstable,
            ),
            (format!("kubepods-pod{uid}.slice"), QosClass::Guaranteed),
        ];
        for (middle, qos) in cases {
            let path = format!("/kubepods.slice/{middle}/cri-containerd-{CTRD_ID}.scope");
            let p = pod(&path);
            assert_eq!(p.pod_uid, "e1465238-4518-4c21-832f-fd9f87033dad", "{path}");
            assert_eq!(p.qos, qos, "{path}");
            assert_eq!(p.container_id.as_deref(), Some(CTRD_ID), "{path}");
            assert_eq!(p.runtime, Some(Runtime::Containerd), "{path}");
        }
    }

    #[test]
    fn systemd_driver_with_docker() {
        let p = pod(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/docker-{DOCKER_ID}.scope"
        ));
        assert_eq!(p.pod_uid, "9692aa0e-748e-11e8-8dfa-76d458035df6");
        assert_eq!(p.runtime, Some(Runtime::Docker));
        assert_eq!(p.container_id.as_deref(), Some(DOCKER_ID));
    }

    #[test]
    fn cgroupfs_driver_every_qos_class() {
        let uid = "0b8e8d2c-5c4f-4f4a-9d8e-6e4b3a2f1c0d";
        let cases = [
            (format!("/kubepods/burstable/pod{uid}"), QosClass::Burstable),
            (
                format!("/kubepods/besteffort/pod{uid}"),
                QosClass::BestEffort,
            ),
            (format!("/kubepods/pod{uid}"), QosClass::Guaranteed),
        ];
        for (pod_dir, qos) in cases {
            let p = pod(&format!("{pod_dir}/{CTRD_ID}"));
            assert_eq!(p.pod_uid, uid);
            assert_eq!(p.qos, qos, "{pod_dir}");
            assert_eq!(p.container_id.as_deref(), Some(CTRD_ID));
            assert_eq!(p.runtime, Some(Runtime::Unnamed));
            // CRI-O with cgroupfs names the directory `crio-<id>`.
            let p = pod(&format!("{pod_dir}/crio-{CRIO_ID}"));
            assert_eq!(p.runtime, Some(Runtime::CriO));
            assert_eq!(p.container_id.as_deref(), Some(CRIO_ID));
        }
    }

    #[test]
    fn kind_node_nests_the_tree_under_kubelet_slice() {
        // kind runs the kubelet with --cgroup-root=/kubelet: every slice
        // name starts with `kubelet-`.
        let p = pod(&format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
             kubelet-kubepods-burstable-pod7e9b4c9a_1d2e_4f60_8a7b_0c1d2e3f4a5b.slice/\
             cri-containerd-{CTRD_ID}.scope"
        ));
        assert_eq!(p.pod_uid, "7e9b4c9a-1d2e-4f60-8a7b-0c1d2e3f4a5b");
        assert_eq!(p.qos, QosClass::Burstable);
        let p = pod("/kubelet.slice/kubelet-kubepods.slice/\
             kubelet-kubepods-pod7e9b4c9a_1d2e_4f60_8a7b_0c1d2e3f4a5b.slice");
        assert_eq!(p.qos, QosClass::Guaranteed);
        assert_eq!(p.container_id, None);
    }

    #[test]
    fn custom_cgroup_root_and_prefixes() {
        // --cgroup-root=machine.slice with the systemd driver.
        let p = pod(&format!(
            "/machine.slice/machine-burstable.slice/\
             machine-burstable-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/crio-{CRIO_ID}.scope"
        ));
        assert_eq!(p.qos, QosClass::Burstable);
        // The kubepods tree under a runtime's service cgroup.
        let p = pod(&format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice:cri-containerd:{CTRD_ID}"
        ));
        assert_eq!(p.pod_uid, "9692aa0e-748e-11e8-8dfa-76d458035df6");
        assert_eq!(p.qos, QosClass::BestEffort);
        // Seen from inside a cgroup namespace.
        let p = pod(&format!(
            "/../../kubepods-burstable-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/cri-containerd-{CTRD_ID}.scope"
        ));
        assert_eq!(p.container_id.as_deref(), Some(CTRD_ID));
        // A test fixture beneath its own cgroup.
        let p = pod(&format!(
            "/user.slice/user-0.slice/session-3.scope/tally-e2e-7-0/kubepods.slice/\
             kubepods-burstable.slice/kubepods-burstable-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/\
             cri-containerd-{CTRD_ID}.scope"
        ));
        assert_eq!(p.qos, QosClass::Burstable);
    }

    #[test]
    fn below_the_container_and_conmon() {
        // crun on cgroup v2 puts the payload one level further down.
        let p = pod(&format!(
            "/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-{CRIO_ID}.scope/container"
        ));
        assert_eq!(p.container_id.as_deref(), Some(CRIO_ID));
        let p = pod(&format!(
            "/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-conmon-{CRIO_ID}.scope"
        ));
        assert_eq!(p.runtime, Some(Runtime::CriOConmon));
        assert_eq!(p.container_id.as_deref(), Some(CRIO_ID));
    }

    #[test]
    fn static_pods_have_hash_uids() {
        let p = pod("/kubepods/burstable/pod5b0b5e8e1f0c4b1e9f2a3c4d5e6f7a8b");
        assert_eq!(p.pod_uid, "5b0b5e8e1f0c4b1e9f2a3c4d5e6f7a8b");
        let p = pod(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5B0B5E8E1F0C4B1E9F2A3C4D5E6F7A8B.slice",
        );
        assert_eq!(p.pod_uid, "5b0b5e8e1f0c4b1e9f2a3c4d5e6f7a8b");
    }

    #[test]
    fn nested_clusters_take_the_innermost_pod() {
        let p = pod(&format!(
            "/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/{CTRD_ID}/\
             kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod66666666_7777_8888_9999_000000000000.slice/\
             cri-containerd-{CRIO_ID}.scope"
        ));
        assert_eq!(p.pod_uid, "66666666-7777-8888-9999-000000000000");
        assert_eq!(p.container_id.as_deref(), Some(CRIO_ID));
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/kubelet.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/tally/acme/job1",
            // `pod` followed by something that is not a UID.
            "/kubepods/burstable/podman",
            "/kubepods/burstable/pod1234",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podzzzzzzzz_3599_498d_bb9d_4446693fa3ea.slice",
            "/machine.slice/libpod-2ca4a155359949.scope",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }

    #[test]
    fn unknown_container_names_leave_the_pod() {
        let p = pod("/kubepods/burstable/pod0b8e8d2c-5c4f-4f4a-9d8e-6e4b3a2f1c0d/not-a-container");
        assert_eq!(p.container_id, None);
        let p = pod(&format!(
            "/kubepods/burstable/pod0b8e8d2c-5c4f-4f4a-9d8e-6e4b3a2f1c0d/libpod-{CTRD_ID}.scope"
        ));
        assert_eq!(p.container_id, None, "an unknown runtime prefix");
    }

    #[test]
    fn pod_log_directories() {
        assert_eq!(
            parse_pod_log_dir("team-a-prod_trainer-7f9c_2ca4a155-3599-498d-bb9d-4446693fa3ea"),
            Some((
                "team-a-prod".into(),
                "trainer-7f9c".into(),
                "2ca4a155-3599-498d-bb9d-4446693fa3ea".into()
            ))
        );
        assert!(
            parse_pod_log_dir("kube-system_kube-apiserver-node1_5b0b5e8e1f0c4b1e9f2a3c4d5e6f7a8b")
                .is_some()
        );
        assert_eq!(parse_pod_log_dir("lost+found"), None);
        assert_eq!(parse_pod_log_dir("a_b_c"), None);
        assert_eq!(
            parse_pod_log_dir("a_b_c_2ca4a155-3599-498d-bb9d-4446693fa3ea"),
            None
        );
    }

    #[test]
    fn container_log_links() {
        assert_eq!(
            parse_container_log_link(&format!("trainer-7f9c_team-a-prod_cuda-{CTRD_ID}.log")),
            Some((
                "trainer-7f9c".into(),
                "team-a-prod".into(),
                "cuda".into(),
                CTRD_ID.into()
            ))
        );
        // Container names have dashes too: the id is after the last one.
        assert_eq!(
            parse_container_log_link(&format!("p_ns_sidecar-proxy-{CTRD_ID}.log")).map(|t| t.2),
            Some("sidecar-proxy".into())
        );
        assert_eq!(parse_container_log_link("p_ns_c-1234.log"), None);
        assert_eq!(parse_container_log_link("README"), None);
    }
}
