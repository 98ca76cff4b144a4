//! Carrying out the policy's decisions on real processes: freezer duty
//! cycles, SIGTERM then SIGKILL, each audited through the recorder.
//!
//! Nothing here waits on the sampling thread: the throttle duty cycle and
//! the SIGTERM→SIGKILL wait run on their own threads.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::json;

use super::{
    cgroup::{Freezer, Layout},
    policy::{Decision, GpuResource, ProcessKey},
    quota::Quota,
    record::Recorder,
};
use crate::{
    cgroupfs::Cgroups,
    snapshot::GpuProcess,
    tenants::procs::{ProcFs, ProcSource as _},
};

/// Period of the throttle duty cycle.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(1000);
/// Part of each period a throttled cgroup spends frozen.
pub const THROTTLE_FROZEN: Duration = Duration::from_millis(750);

/// A running freezer duty cycle.
#[derive(Debug)]
struct Throttle {
    stop: Arc<AtomicBool>,
    targets: Arc<Mutex<BTreeSet<Freezer>>>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(targets: BTreeSet<Freezer>) -> Throttle {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let thread = {
            let (stop, targets) = (stop.clone(), targets.clone());
            std::thread::Builder::new()
                .name("tally-throttle".into())
                .spawn(move || duty_cycle(&stop, &targets))
                .ok()
        };
        Throttle {
            stop,
            targets,
            thread,
        }
    }

    fn set_targets(&self, new: BTreeSet<Freezer>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        // Thaw cgroups that are no longer targets before forgetting them.
        for gone in t.difference(&new) {
            let _ = gone.set(false);
        }
        *t = new;
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Freezes the targets for [`THROTTLE_FROZEN`] of every [`THROTTLE_PERIOD`]
/// until `stop`, then thaws them. A target whose cgroup vanished only fails
/// its writes.
fn duty_cycle(stop: &AtomicBool, targets: &Mutex<BTreeSet<Freezer>>) {
    let set_all = |frozen: bool| {
        for f in targets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = f.set(frozen);
        }
    };
    let sleep = |d: Duration| {
        let end = Instant::now() + d;
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        set_all(true);
        sleep(THROTTLE_FROZEN);
        set_all(false);
        sleep(THROTTLE_PERIOD.saturating_sub(THROTTLE_FROZEN));
    }
    set_all(false);
}

/// A process as the enforcer knows it: pid, start time (clock ticks since
/// boot, from `/proc/<pid>/stat`) and the cgroup the snapshot saw it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    pub start: u64,
    pub cgroup: Option<String>,
}

/// Start time of a live, non-zombie process (the process cache's own
/// `stat` reader: one parser of that line).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = ProcFs::default().stat(pid).ok()?;
    (stat.state != b'Z' && stat.state != b'X').then_some(stat.start_time)
}

impl Target {
    /// Checks, right before acting, that `pid` is still this process: same
    /// start time and same cgroup v2 path. `Err` says why not.
    pub fn verify(&self) -> Result<(), String> {
        match start_time(self.pid) {
            None => return Err("process exited".into()),
            Some(s) if s != self.start => {
                return Err(format!(
                    "pid {} was reused (start time {s}, expected {})",
                    self.pid, self.start
                ));
            }
            Some(_) => {}
        }
        if let Some(expected) = &self.cgroup {
            match crate::cgroupfs::cgroup_of(self.pid) {
                Ok(now) if &now == expected => {}
                Ok(now) => return Err(format!("process moved from {expected} to {now}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Sends `signal` after [`Target::verify`].
    pub fn signal(&self, signal: Signal) -> Result<(), String> {
        self.verify()?;
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal).map_err(|e| e.to_string())
    }

    fn key(&self) -> ProcessKey {
        (self.pid, self.start)
    }
}

/// One GPU quota of one tenant, as a decision about it is carried out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Case<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) resource: GpuResource,
    pub(crate) usage: f64,
    pub(crate) limit: f64,
    pub(crate) quota: &'a Quota,
    /// The tenant's processes that can be acted on.
    pub(crate) targets: &'a [Target],
}

/// The running throttles and the processes they may act on.
#[derive(Debug)]
pub(crate) struct Actions {
    /// The agent's own cgroups, never frozen.
    own_cgroup: Cgroups,
    throttles: HashMap<(String, GpuResource), Throttle>,
    /// Start times of processes, as first seen after a snapshot.
    starts: HashMap<u32, u64>,
}

impl Actions {
    pub(crate) fn new() -> Actions {
        Actions {
            own_cgroup: Cgroups::own().unwrap_or_default(),
            throttles: HashMap::new(),
            starts: HashMap::new(),
        }
    }

    /// Remembers the start time of every live pid (read right after the
    /// sample, so that a pid reused later is told apart) and forgets the
    /// rest.
    pub(crate) fn see(&mut self, live: &BTreeSet<u32>) {
        self.starts.retain(|pid, _| live.contains(pid));
        for pid in live {
            if !self.starts.contains_key(pid)
                && let Some(s) = start_time(*pid)
            {
                self.starts.insert(*pid, s);
            }
        }
    }

    /// The processes that can be acted on: those with a known start time.
    pub(crate) fn targets(&self, procs: &[GpuProcess]) -> Vec<Target> {
        procs
            .iter()
            .filter_map(|p| {
                Some(Target {
                    pid: p.pid,
                    start: *self.starts.get(&p.pid)?,
                    cgroup: p.cgroup.as_deref().map(str::to_owned),
                })
            })
            .collect()
    }

    /// Whether a throttle runs for this quota.
    pub(crate) fn throttling(&self, tenant: &str, resource: GpuResource) -> bool {
        self.throttles.contains_key(&(tenant.to_owned(), resource))
    }

    /// Does what `decision` says, and audits it.
    pub(crate) fn carry_out(
        &mut self,
        rec: &Recorder,
        layout: Option<&Layout>,
        c: &Case<'_>,
        decision: Decision,
    ) {
        let key = (c.tenant.to_owned(), c.resource);
        let res = c.resource.as_str();
        let (usage, limit) = (c.usage, c.limit);
        let detail = |breach: Duration| {
            let pids: Vec<u32> = c.targets.iter().map(|t| t.pid).collect();
            json!({
                "usage": usage,
                "limit": limit,
                "grace_s": c.quota.grace.as_secs_f64(),
                "breach_s": breach.as_secs_f64(),
                "pids": pids,
            })
        };
        match decision {
            Decision::Nothing => {}
            Decision::EndThrottle => {
                if let Some(t) = self.throttles.remove(&key) {
                    t.stop();
                }
                rec.record(
                    c.tenant,
                    res,
                    "throttle_end",
                    json!({ "usage": usage, "limit": limit }),
                );
            }
            Decision::Resolved => rec.record(
                c.tenant,
                res,
                "resolved",
                json!({ "usage": usage, "limit": limit }),
            ),
            Decision::Alert { breach } => rec.act(c.tenant, res, "alert", detail(breach)),
            Decision::Retarget => {
                let freezers = self.freezers(layout, c.targets);
                if let Some(t) = self.throttles.get(&key) {
                    t.set_targets(freezers);
                }
            }
            Decision::StartThrottle { breach } => {
                let freezers = self.freezers(layout, c.targets);
                let cgroups: Vec<String> = freezers
                    .iter()
                    .map(|f| f.dir().display().to_string())
                    .collect();
                let mut detail = detail(breach);
                detail["cgroups"] = json!(cgroups);
                if freezers.is_empty() {
                    detail["error"] = json!("no freezable cgroup: alert only");
                    rec.act(c.tenant, res, "alert", detail);
                } else {
                    rec.act(c.tenant, res, "throttle", detail);
                    self.throttles.insert(key, Throttle::start(freezers));
                }
            }
            Decision::Terminate { processes } => {
                for t in c.targets.iter().filter(|t| processes.contains(&t.key())) {
                    match t.signal(Signal::SIGTERM) {
                        Ok(()) => {
                            rec.act(
                                c.tenant,
                                res,
                                "terminate",
                                json!({
                                    "usage": usage, "limit": limit, "pid": t.pid,
                                    "signal": "SIGTERM", "cgroup": t.cgroup,
                                }),
                            );
                            spawn_killer(
                                rec.clone(),
                                c.tenant,
                                res,
                                t.clone(),
                                c.quota.kill_timeout,
                            );
                        }
                        Err(reason) => rec.record(
                            c.tenant,
                            res,
                            "skip",
                            json!({ "pid": t.pid, "reason": reason }),
                        ),
                    }
                }
            }
        }
    }

    /// The freezers of the targets' cgroups, those still the same process
    /// and not holding the agent.
    fn freezers(&self, layout: Option<&Layout>, targets: &[Target]) -> BTreeSet<Freezer> {
        let mut freezers = BTreeSet::new();
        for t in targets {
            if t.verify().is_err() {
                continue;
            }
            let Ok(groups) = Cgroups::of(t.pid) else {
                continue;
            };
            if let Some(f) = layout.and_then(|l| l.freezer_for(&groups, &self.own_cgroup)) {
                freezers.insert(f);
            }
        }
        freezers
    }
}

/// After `timeout`, SIGKILLs the target if it is still the same process.
fn spawn_killer(
    rec: Recorder,
    tenant: &str,
    resource: &str,
    t: Target,
    timeout: Duration,
) -> Option<JoinHandle<()>> {
    let (tenant, resource) = (tenant.to_owned(), resource.to_owned());
    std::thread::Builder::new()
        .name("tally-terminate".into())
        .spawn(move || {
            let end = Instant::now() + timeout;
            while Instant::now() < end {
                if t.verify().is_err() {
                    return; // exited (or its pid is someone else's now)
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match t.signal(Signal::SIGKILL) {
                Ok(()) => rec.act(
                    &tenant,
                    &resource,
                    "kill",
                    json!({ "pid": t.pid, "signal": "SIGKILL", "after_s": timeout.as_secs_f64() }),
                ),
                Err(reason) => rec.record(
                    &tenant,
                    &resource,
                    "skip",
                    json!({ "pid": t.pid, "signal": "SIGKILL", "reason": reason }),
                ),
            }
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use std::{os::unix::process::ExitStatusExt, process::Command};

    use super::*;

    #[test]
    fn a_target_whose_start_time_differs_is_refused() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        let ok = Target {
            pid: me,
            start,
            cgroup: crate::cgroupfs::cgroup_of(me).ok(),
        };
        assert_eq!(ok.verify(), Ok(()));
        let reused = Target {
            start: start + 1,
            ..ok.clone()
        };
        assert!(reused.verify().unwrap_err().contains("reused"));
        let moved = Target {
            cgroup: Some("/elsewhere".into()),
            ..ok
        };
        assert!(moved.verify().unwrap_err().contains("moved"));
        let gone = Target {
            pid: u32::MAX - 1,
            start: 1,
            cgroup: None,
        };
        assert_eq!(gone.verify(), Err("process exited".into()));
        // A refused target is never signalled.
        assert!(reused.signal(Signal::SIGTERM).is_err());
    }

    /// A child that ignores SIGTERM (ignored signals survive `exec`).
    fn stubborn_child() -> (std::process::Child, Target) {
        let child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 60"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait for the exec: before it, `sh` may not have set the trap.
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() != "sleep")
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = start_time(pid).unwrap();
        (
            child,
            Target {
                pid,
                start,
                cgroup: None,
            },
        )
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::open(d.path(), "n1", false, false);
        let (mut child, t) = stubborn_child();
        t.signal(Signal::SIGTERM).unwrap();
        let killer = spawn_killer(
            rec.clone(),
            "a",
            "gpu_memory",
            t,
            Duration::from_millis(100),
        );
        killer.unwrap().join().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(Signal::SIGKILL as i32));
        let counts = rec.counts();
        assert_eq!(
            counts
                .iter()
                .map(|c| (c.action.as_str(), c.total))
                .collect::<Vec<_>>(),
            [("kill", 1)]
        );
    }

    #[test]
    fn a_process_that_exits_in_time_is_not_killed() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::open(d.path(), "n1", false, false);
        let (mut child, t) = stubborn_child();
        let killer = spawn_killer(rec.clone(), "a", "gpu_memory", t, Duration::from_secs(60));
        child.kill().unwrap();
        child.wait().unwrap();
        killer.unwrap().join().unwrap();
        assert!(rec.counts().is_empty());
    }
}
