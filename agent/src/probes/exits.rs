//! The process probe: raw tracepoints on `sched_process_exec` and
//! `sched_process_exit` recording each pid's cgroup, so that processes
//! that already exited can still be attributed ([`ExitedProcs`]).

use std::sync::{Arc, Mutex};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::RawTracePoint,
};
use tally_ebpf::ProcRecord;
use tracing::warn;

use super::{
    PinDir,
    cgroups::CgroupPaths,
    error::{ProbeError, chain, load_error},
    load::{load_object, program, take_map},
};
use crate::tenants;

/// The tracepoint programs (the map is shared with [`ExitedProcs`]).
pub(super) struct ProcProbe {
    _ebpf: Ebpf,
}

/// pid → cgroup path of processes that already exited, from the kernel's
/// `tally_procs` map. Handed to [`Resolver`](tenants::Resolver) so a GPU
/// process that ended before the sampler read its `/proc` entry still
/// lands on its tenant.
pub struct ExitedProcs {
    map: BpfHashMap<MapData, u32, ProcRecord>,
    cgroups: Arc<Mutex<CgroupPaths>>,
}

impl std::fmt::Debug for ExitedProcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitedProcs").finish_non_exhaustive()
    }
}

impl ExitedProcs {
    /// The kernel's record of `pid`, if it has one.
    pub fn record(&self, pid: u32) -> Option<ProcRecord> {
        self.map.get(&pid, 0).ok()
    }

    /// The cgroup v2 path `pid` was in at exit (or exec), if recorded and the
    /// cgroup is (or was, while this agent ran) known.
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let rec = self.record(pid)?;
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resolve(rec.cgroup_id)
    }
}

impl tenants::ExitedCgroups for ExitedProcs {
    fn cgroup_of_exited(&mut self, pid: u32) -> Option<String> {
        self.cgroup_of(pid)
    }
}

/// What [`start`] brings up: the programs, the lookup over their map when
/// it could be opened, and the exec and exit results.
pub(super) type Started = (ProcProbe, Option<ExitedProcs>, [Result<(), ProbeError>; 2]);

/// Loads `proc.bpf.o` and attaches both tracepoints; ids in its records
/// resolve through `cgroups`. `Err` when the object could not be loaded
/// (both programs report that).
pub(super) fn start(pin: &PinDir, cgroups: Arc<Mutex<CgroupPaths>>) -> Result<Started, ProbeError> {
    let (mut ebpf, _) = load_object(pin, "proc", tally_ebpf::PROC, tally_ebpf::MAP_PROCS)?;
    let mut attach = |name: &'static str, tp: &str| -> Result<(), ProbeError> {
        let prog: &mut RawTracePoint = program(&mut ebpf, "proc", name)?;
        prog.load().map_err(|e| load_error(name, e))?;
        prog.attach(tp).map_err(|e| ProbeError::Attach {
            program: name,
            target: format!("raw tracepoint {tp}"),
            message: chain(&e),
        })?;
        Ok(())
    };
    let exec = attach("tally_proc_exec", "sched_process_exec");
    let exit = attach("tally_proc_exit", "sched_process_exit");
    let exited = match take_map(&mut ebpf, "proc", tally_ebpf::MAP_PROCS) {
        Ok(map) => Some(ExitedProcs { map, cgroups }),
        Err(e) => {
            warn!("{}", e.explain());
            None
        }
    };
    Ok((ProcProbe { _ebpf: ebpf }, exited, [exec, exit]))
}
