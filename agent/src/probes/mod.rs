//! eBPF probes: loading, attaching, pinning, and reading kernel maps.
//!
//! Three objects from `tally-ebpf`, each loaded on its own so that one that
//! cannot load leaves the others working:
//! - `net`: `cgroup_skb` ingress/egress at the cgroup v2 root, bytes and
//!   packets per cgroup id;
//! - `pcie`: uprobes on libcuda's `cuMemcpy*` family, bytes per cgroup id;
//! - `proc`: raw tracepoints `sched_process_exec`/`sched_process_exit`,
//!   pid → cgroup of recently exited processes (see [`ExitedProcs`]).
//!
//! Maps are pinned under `[probes] pin_dir`; per-tenant totals are the
//! folded counters of vanished cgroups (state file, see [`state`]) plus the
//! live map entries, so they continue across agent restarts. Nothing here
//! is fatal: a probe that cannot start is reported in [`ProbeStatus`] with
//! the reason and the fix, logged once, and the agent serves the rest.
//!
//! This file is the [`Probes`] facade; each job has its own module: the
//! `[probes]` section (`config`), errors and fixes (`error`), bpffs and
//! the pin lock (`pin`), object loading (`load`), one loader per object
//! (`net`, `pcie`, `exits`), per-CPU reads (`maps`), per-tenant totals
//! (`totals`, persisted by [`state`]) and the doctor's `trial`.

pub mod cgroups;
mod config;
pub mod cuda;
mod error;
mod exits;
mod load;
mod maps;
mod net;
mod pcie;
mod pin;
pub mod state;
mod tasks;
mod totals;
mod trial;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tracing::{info, warn};

use self::{
    cgroups::CgroupPaths, exits::ProcProbe, net::NetProbe, pcie::PcieProbe, pin::PinDir,
    totals::Totals,
};
pub use self::{
    config::ProbesConfig, error::ProbeError, exits::ExitedProcs, tasks::ProcessStats, trial::trial,
};
use crate::{
    paths,
    snapshot::{GpuSnapshot, ProbeStatus, TenantIoUsage},
    tenants::Resolver,
};

/// Label values of `tally_probe_up{probe}`.
pub const PROBE_NET_INGRESS: &str = "network_ingress";
pub const PROBE_NET_EGRESS: &str = "network_egress";
pub const PROBE_PCIE: &str = "pcie_uprobes";
pub const PROBE_EXEC: &str = "process_exec";
pub const PROBE_EXIT: &str = "process_exit";
pub const PROBE_STAT: &str = "process_stat";

/// Every probe name, in the order [`Probes::statuses`] lists them.
pub const PROBE_NAMES: [&str; 6] = [
    PROBE_NET_INGRESS,
    PROBE_NET_EGRESS,
    PROBE_PCIE,
    PROBE_EXEC,
    PROBE_EXIT,
    PROBE_STAT,
];

/// The running probes and the per-tenant totals derived from them.
pub struct Probes {
    net: Option<NetProbe>,
    pcie: Option<PcieProbe>,
    _procs: Option<ProcProbe>,
    exited: Option<ExitedProcs>,
    stats: Option<ProcessStats>,
    statuses: Vec<ProbeStatus>,
    cgroups: Arc<Mutex<CgroupPaths>>,
    totals: Totals,
    /// Last, so the lock is released after the programs are detached.
    _pin: Option<PinDir>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("statuses", &self.statuses)
            .finish_non_exhaustive()
    }
}

fn status(probe: &str, result: &Result<(), ProbeError>) -> ProbeStatus {
    ProbeStatus {
        probe: probe.to_owned(),
        up: result.is_ok(),
        error: result.as_ref().err().map(ProbeError::explain),
    }
}

/// Statuses of the programs of one object: each program's own result, or,
/// when the object itself could not be used, that one error for every
/// program, explained once.
fn family_statuses<const N: usize>(
    probes: [&str; N],
    outcome: Result<[Result<(), ProbeError>; N], ProbeError>,
) -> [ProbeStatus; N] {
    match outcome {
        Ok(results) => std::array::from_fn(|i| status(probes[i], &results[i])),
        Err(e) => {
            let text = e.explain();
            probes.map(|probe| ProbeStatus {
                probe: probe.to_owned(),
                up: false,
                error: Some(text.clone()),
            })
        }
    }
}

impl Probes {
    /// Loads and attaches every enabled probe. Never fails: what cannot
    /// start is in [`Probes::statuses`], logged once with its fix.
    pub fn start(config: &ProbesConfig, state_dir: &Path) -> Probes {
        let cgroup_root = crate::cgroupfs::unified_root().map(Path::to_path_buf);
        let cgroups = Arc::new(Mutex::new(CgroupPaths::new(
            cgroup_root
                .clone()
                .unwrap_or_else(|| PathBuf::from(paths::CGROUP_UNIFIED_HYBRID)),
        )));
        let mut probes = Probes {
            net: None,
            pcie: None,
            _procs: None,
            exited: None,
            stats: None,
            statuses: Vec::new(),
            cgroups,
            totals: Totals::load(state_dir),
            _pin: None,
        };

        let any = config.network || config.pcie || config.process;
        let pin = any.then(|| PinDir::open(&config.pin_dir));
        if let Some(Err(e)) = &pin {
            // Nothing can load without the pin directory: every enabled
            // probe reports the same reason.
            let text = e.explain();
            for (probe, enabled, key) in [
                (PROBE_NET_INGRESS, config.network, "network"),
                (PROBE_NET_EGRESS, config.network, "network"),
                (PROBE_PCIE, config.pcie, "pcie"),
                (PROBE_EXEC, config.process, "process"),
                (PROBE_EXIT, config.process, "process"),
                (PROBE_STAT, config.process, "process"),
            ] {
                probes.statuses.push(ProbeStatus {
                    probe: probe.to_owned(),
                    up: false,
                    error: Some(if enabled {
                        text.clone()
                    } else {
                        ProbeError::Disabled { key }.explain()
                    }),
                });
            }
        } else {
            let pin = pin.as_ref().and_then(|p| p.as_ref().ok());
            let net = match pin {
                Some(pin) if config.network => {
                    net::start(pin, cgroup_root.as_deref(), &mut probes.totals).map(
                        |(probe, results)| {
                            probes.net = Some(probe);
                            results
                        },
                    )
                }
                _ => Err(ProbeError::Disabled { key: "network" }),
            };
            probes
                .statuses
                .extend(family_statuses([PROBE_NET_INGRESS, PROBE_NET_EGRESS], net));
            let pcie = match pin {
                Some(pin) if config.pcie => {
                    pcie::start(pin, config.cuda_libs.as_deref(), &mut probes.totals).and_then(
                        |(probe, attached)| {
                            probes.pcie = Some(probe);
                            attached
                        },
                    )
                }
                _ => Err(ProbeError::Disabled { key: "pcie" }),
            };
            probes.statuses.push(status(PROBE_PCIE, &pcie));
            let procs = match pin {
                Some(pin) if config.process => {
                    exits::start(pin, probes.cgroups.clone()).map(|(probe, exited, results)| {
                        probes._procs = Some(probe);
                        probes.exited = exited;
                        results
                    })
                }
                _ => Err(ProbeError::Disabled { key: "process" }),
            };
            probes
                .statuses
                .extend(family_statuses([PROBE_EXEC, PROBE_EXIT], procs));
            let stats = match pin {
                Some(pin) if config.process => tasks::start(pin).map(|stats| {
                    probes.stats = Some(stats);
                }),
                _ => Err(ProbeError::Disabled { key: "process" }),
            };
            probes.statuses.push(status(PROBE_STAT, &stats));
        }

        for s in &probes.statuses {
            match &s.error {
                None => info!(probe = %s.probe, "probe attached"),
                Some(e) => warn!(probe = %s.probe, "probe not running: {e}"),
            }
        }
        probes._pin = pin.and_then(Result::ok);
        probes.totals.persist();
        probes
    }

    /// State of every probe, for the snapshot.
    pub fn statuses(&self) -> Vec<ProbeStatus> {
        self.statuses.clone()
    }

    /// The exited-process lookup for [`Resolver`], once (it moves out).
    pub fn take_exited(&mut self) -> Option<ExitedProcs> {
        self.exited.take()
    }

    /// The task iterator as the process cache's source of `stat`, once (it
    /// moves out); `None` when it did not start (the cache reads `/proc`).
    pub fn take_process_stats(&mut self) -> Option<ProcessStats> {
        self.stats.take()
    }

    /// Reads the maps and returns cumulative per-tenant counters; folds and
    /// deletes entries of cgroups that vanished; adds the PCIe bytes the
    /// devices moved but no probe saw to `_unattributed`.
    pub fn sample(&mut self, resolver: &Resolver, gpus: &[GpuSnapshot]) -> Vec<TenantIoUsage> {
        let net = self
            .net
            .as_ref()
            .map(|p| maps::sum_per_cpu(&p.map))
            .unwrap_or_default();
        let pcie = self
            .pcie
            .as_ref()
            .map(|p| maps::sum_per_cpu(&p.map))
            .unwrap_or_default();
        let ids = net.iter().map(|e| e.0).chain(pcie.iter().map(|e| e.0));
        let paths = self
            .cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resolve_all(ids);
        let (net_probe, pcie_probe) = (&mut self.net, &mut self.pcie);
        self.totals
            .update(&net, &pcie, &paths, resolver, gpus, |net_ids, pcie_ids| {
                if let Some(p) = net_probe {
                    maps::remove(&mut p.map, net_ids);
                }
                if let Some(p) = pcie_probe {
                    maps::remove(&mut p.map, pcie_ids);
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_sharing_a_broken_object_reports_its_error_once_each() {
        let e = ProbeError::Load {
            object: "net",
            message: "map tally_net: Operation not permitted (os error 1)".into(),
        };
        let want = e.explain();
        let [ingress, egress] = family_statuses([PROBE_NET_INGRESS, PROBE_NET_EGRESS], Err(e));
        for s in [&ingress, &egress] {
            let text = s.error.as_deref().unwrap();
            assert!(!s.up);
            assert_eq!(text, want, "{}", s.probe);
            assert_eq!(text.matches("cannot load").count(), 1, "{text}");
            assert_eq!(text.matches("fix:").count(), 1, "{text}");
        }
        assert_eq!(
            (ingress.probe.as_str(), egress.probe.as_str()),
            (PROBE_NET_INGRESS, PROBE_NET_EGRESS)
        );

        // Once the object loaded, each program reports its own result.
        let [exec, exit] = family_statuses(
            [PROBE_EXEC, PROBE_EXIT],
            Ok([Ok(()), Err(ProbeError::NoCgroup2)]),
        );
        assert!(exec.up && exec.error.is_none());
        assert!(!exit.up && exit.error.unwrap().contains("no cgroup v2"));
    }

    #[test]
    fn disabled_probes_load_nothing_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let config = ProbesConfig {
            network: false,
            pcie: false,
            process: false,
            cuda_libs: None,
            pin_dir: dir.path().join("pins"),
        };
        let probes = Probes::start(&config, dir.path());
        let statuses = probes.statuses();
        assert_eq!(
            statuses
                .iter()
                .map(|s| s.probe.as_str())
                .collect::<Vec<_>>(),
            PROBE_NAMES
        );
        for s in statuses {
            assert!(!s.up);
            assert!(s.error.unwrap().contains("disabled in the config"));
        }
        assert!(
            !dir.path().join("pins").exists(),
            "no pin dir when all are off"
        );
    }
}
