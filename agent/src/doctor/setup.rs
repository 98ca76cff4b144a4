//! What the config asks of the node: the kubelet's pod-resources socket,
//! cgroup delegation for the limits the agent writes, the state and log
//! directories, and the aggregator the reports go to.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use nix::unistd::{AccessFlags, access};

use super::{Check, Verdict};
use crate::{
    config::Config,
    enforce::cgroup::{Backend, Layout, TenantTree},
};

/// The config checks, in the order they are printed (the aggregator's
/// comes from [`aggregator_verdict`]: it needs the network).
pub fn config_checks(config: &Config) -> Vec<Check> {
    vec![
        Check {
            name: "kubelet",
            verdict: kubelet(config),
        },
        Check {
            name: "delegation",
            verdict: delegation(config),
        },
        Check {
            name: "state-dir",
            verdict: state_dir(&config.agent.state_dir),
        },
        Check {
            name: "log-dirs",
            verdict: log_dirs(config),
        },
    ]
}

fn uses_kubernetes(config: &Config) -> bool {
    crate::tenants::kubernetes_wanted(&config.tenant.kubernetes, &config.tenant.rules)
}

fn kubelet(config: &Config) -> Verdict {
    let socket = &config.tenant.kubernetes.pod_resources_socket;
    let used = uses_kubernetes(config);
    match UnixStream::connect(socket) {
        Ok(_) if used => Verdict::Ok(format!(
            "{} answers: pods are named from the kubelet",
            socket.display()
        )),
        Ok(_) => Verdict::Ok(format!(
            "{} answers (unused: no kubernetes tenant rule, workload_series off)",
            socket.display()
        )),
        Err(_) if !used => Verdict::Ok(
            "not used (no kubernetes tenant rule, [tenant.kubernetes] workload_series off)".into(),
        ),
        Err(e) => Verdict::Fail(format!(
            "cannot connect to {}: {e}; kubernetes tenant rules fall back to the next rule. \
             Mount the kubelet's pod-resources directory into the agent \
             (deploy/base/agent-daemonset.yaml) or set [tenant.kubernetes] pod_resources_socket",
            socket.display()
        )),
    }
}

/// Can the agent make `tally/<tenant>` beneath its parent and write the
/// cpu, memory and pids limits there (a delegated subtree on pure v2)?
fn delegation(config: &Config) -> Verdict {
    let quotas = !config.tenant.quotas.is_empty();
    let layout = match Layout::detect() {
        Ok(l) => l,
        Err(e) => return Verdict::Fail(format!("cannot read the cgroup layout: {e}")),
    };
    let tree = TenantTree::new(layout, config.tenant.cgroup_parent.clone());
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    for controller in ["cpu", "memory", "pids"] {
        let Some(backend) = tree.layout.backend(controller) else {
            missing.push(format!("{controller}: no hierarchy has it"));
            continue;
        };
        let (h, v2) = match backend {
            Backend::V2(h) => (h, true),
            Backend::V1(h) => (h, false),
        };
        let parent = h.dir(&tree.parent_path(h));
        // A relative parent is made beneath the own cgroup: check that one.
        let existing = nearest_existing(&parent);
        if access(&existing, AccessFlags::W_OK).is_err() {
            missing.push(format!("{controller}: {} not writable", existing.display()));
        } else if v2 && !controller_available(&existing, controller) {
            missing.push(format!(
                "{controller}: not in {}/cgroup.controllers",
                existing.display()
            ));
        } else {
            ok.push(format!("{controller} ({})", if v2 { "v2" } else { "v1" }));
        }
    }
    let shown = config
        .tenant
        .cgroup_parent
        .as_deref()
        .unwrap_or("own cgroup");
    if missing.is_empty() {
        Verdict::Ok(format!(
            "can write {} limits beneath {shown}",
            ok.join(", ")
        ))
    } else {
        let text = format!(
            "cannot write every limit beneath {shown}: {}; run as root, or delegate a subtree \
             (systemd Delegate=yes) and set [tenant] cgroup_parent to it",
            missing.join("; ")
        );
        if quotas {
            Verdict::Fail(text)
        } else {
            Verdict::Warn(format!("{text} (no quota configured yet)"))
        }
    }
}

fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn controller_available(dir: &Path, controller: &str) -> bool {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .is_ok_and(|t| t.split_whitespace().any(|c| c == controller))
}

fn state_dir(dir: &Path) -> Verdict {
    if dir.is_dir() {
        if access(dir, AccessFlags::W_OK).is_ok() {
            Verdict::Ok(format!(
                "{} writable (spool, audit log, report state)",
                dir.display()
            ))
        } else {
            Verdict::Fail(format!(
                "{} not writable: reports cannot be spooled nor enforcement audited; \
                 chown it to the agent's user or set [agent] state_dir",
                dir.display()
            ))
        }
    } else {
        let parent = nearest_existing(dir);
        if access(&parent, AccessFlags::W_OK).is_ok() {
            Verdict::Ok(format!(
                "{} does not exist yet; the agent makes it",
                dir.display()
            ))
        } else {
            Verdict::Fail(format!(
                "{} missing and {} not writable: create it for the agent's user \
                 (systemd StateDirectory=tally) or set [agent] state_dir",
                dir.display(),
                parent.display()
            ))
        }
    }
}

fn log_dirs(config: &Config) -> Verdict {
    let k = &config.tenant.kubernetes;
    if !uses_kubernetes(config) {
        return Verdict::Ok("not used (pods are named only with kubernetes tenant rules)".into());
    }
    let unreadable: Vec<String> = [&k.pod_logs_dir, &k.container_logs_dir]
        .into_iter()
        .filter(|d| std::fs::read_dir(d).is_err())
        .map(|d| d.display().to_string())
        .collect();
    if unreadable.is_empty() {
        Verdict::Ok(format!(
            "{} and {} readable (pod names when the kubelet does not answer)",
            k.pod_logs_dir.display(),
            k.container_logs_dir.display()
        ))
    } else {
        Verdict::Warn(format!(
            "cannot read {}: without the kubelet socket, pods stay unnamed; mount them read-only",
            unreadable.join(", ")
        ))
    }
}

/// What asking the aggregator gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggregatorAnswer {
    /// `[report] aggregator` is not set.
    NotConfigured,
    /// The token file could not be read.
    BadToken(String),
    /// No HTTP answer.
    Unreachable(String),
    /// `GET /readyz` and `GET /api/v1/reports` (with the token) statuses.
    Answered { ready: u16, reports: u16 },
}

/// The verdict on the aggregator the reports go to: reachable, ready, and
/// taking the token (an agent token gets 403 on the admin-only read;
/// 401 means the token is unknown).
pub fn aggregator_verdict(url: &str, answer: &AggregatorAnswer) -> Check {
    let verdict = match answer {
        AggregatorAnswer::NotConfigured => {
            Verdict::Ok("not configured ([report] aggregator): this node keeps no ledger".into())
        }
        AggregatorAnswer::BadToken(e) => Verdict::Fail(format!("[report] token_file: {e}")),
        AggregatorAnswer::Unreachable(e) => Verdict::Fail(format!(
            "{url} unreachable: {e}; reports are spooled until it answers"
        )),
        AggregatorAnswer::Answered { ready, reports } => match (ready, reports) {
            (_, 401) => Verdict::Fail(format!(
                "{url} rejects the token (401): put an agent token of the aggregator's \
                 [[auth.token]] in [report] token_file"
            )),
            (200, 403) => Verdict::Ok(format!("{url} ready; the token is an agent token")),
            (200, 200) => Verdict::Warn(format!(
                "{url} ready, but the token reads everything (admin) or none is required: \
                 give agents role = \"agent\" tokens"
            )),
            (r, s) => Verdict::Warn(format!(
                "{url} answered /readyz {r}, /api/v1/reports {s}: the ledger may be down"
            )),
        },
    };
    Check {
        name: "aggregator",
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregator_verdict_reads_the_statuses() {
        let v = |a| aggregator_verdict("http://agg", &a).verdict;
        assert!(matches!(v(AggregatorAnswer::NotConfigured), Verdict::Ok(_)));
        assert!(matches!(
            v(AggregatorAnswer::Answered {
                ready: 200,
                reports: 403
            }),
            Verdict::Ok(_)
        ));
        assert!(matches!(
            v(AggregatorAnswer::Answered {
                ready: 200,
                reports: 401
            }),
            Verdict::Fail(_)
        ));
        assert!(matches!(
            v(AggregatorAnswer::Answered {
                ready: 503,
                reports: 403
            }),
            Verdict::Warn(_)
        ));
        assert!(matches!(
            v(AggregatorAnswer::Unreachable("refused".into())),
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn a_missing_state_dir_under_a_writable_parent_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(state_dir(&tmp.path().join("a/b")), Verdict::Ok(_)));
        assert!(matches!(state_dir(tmp.path()), Verdict::Ok(_)));
    }

    #[test]
    fn config_checks_run_on_the_defaults() {
        let names: Vec<_> = config_checks(&Config::default())
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["kubelet", "delegation", "state-dir", "log-dirs"]);
    }
}
