//! The churn: short-lived GPU processes, each in a job cgroup of its own
//! under a tenant cgroup that exists only while it has jobs, registered on
//! the simulated GPUs; and the faults sprinkled in (XIDs, lost GPUs).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tally_e2e::{Cgroup, ChildGuard, SimNode};

/// Tenants the jobs are drawn from: few enough that tenant cgroups empty
/// and come back all the time, as many as a busy node has.
pub(super) const TENANTS: usize = 32;

/// Devices a job can be registered on: GPUs 0–6, then the MIG instances
/// 0–3 of GPU 7.
const DEVICES: u32 = 11;

/// Sends one UDP packet (so the network map gets an entry for the job's
/// cgroup), then sleeps until killed.
const WORKLOAD: &str = "echo soak > /dev/udp/127.0.0.1/9; exec sleep infinity";

/// Counts of what the churn did; `created` is shared with the sampler.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub created: Arc<AtomicU64>,
    pub destroyed: u64,
    pub cgroups_created: u64,
    pub cgroups_removed: u64,
    /// Starts skipped because the loop fell more than a second behind.
    pub missed: u64,
}

struct Job {
    // Dropped in this order: the process, then its cgroup.
    child: ChildGuard,
    cgroup: Cgroup,
    tenant: usize,
    until: Instant,
}

/// The live jobs and tenant cgroups beneath `<soak cgroup>/tally/`.
pub(super) struct Churn<'a> {
    // Dropped in this order: jobs, tenant cgroups, the base.
    jobs: Vec<Job>,
    tenants: Vec<Option<(Cgroup, usize)>>,
    base: Cgroup,
    sim: &'a SimNode,
    rng: fastrand::Rng,
    next_id: u64,
    pub counts: Counts,
}

impl<'a> Churn<'a> {
    /// Jobs go under `tree/tally/<tenant>/job<n>`.
    pub(super) fn new(tree: &Cgroup, sim: &'a SimNode, seed: u64) -> Churn<'a> {
        Churn {
            jobs: Vec::new(),
            tenants: (0..TENANTS).map(|_| None).collect(),
            base: tree.child("tally"),
            sim,
            rng: fastrand::Rng::with_seed(seed),
            next_id: 0,
            counts: Counts::default(),
        }
    }

    pub(super) fn live(&self) -> usize {
        self.jobs.len()
    }

    /// Starts one job living 0.5–4.5 s (≈ 2.5 s: ~125 live at 50/s).
    pub(super) fn start(&mut self, now: Instant) {
        let t = self.rng.usize(..TENANTS);
        if self.tenants[t].is_none() {
            self.tenants[t] = Some((self.base.child(&format!("t{t:02}")), 0));
            self.counts.cgroups_created += 1;
        }
        let (tenant, jobs) = self.tenants[t].as_mut().expect("created above");
        *jobs += 1;
        let cgroup = tenant.child(&format!("job{}", self.next_id));
        self.next_id += 1;
        self.counts.cgroups_created += 1;
        let child = cgroup.start("/bin/bash", &["-c", WORKLOAD]);
        let device = self.rng.u32(..DEVICES);
        let (gpu, mig, memory) = if device < 7 {
            (device, None, 1024 + 512 * self.rng.u64(..8))
        } else {
            (7, Some(device - 7), 256)
        };
        let sm = f64::from(self.rng.u32(1..=20)) / 20.0;
        self.sim.register(child.pid(), gpu, mig, memory, sm);
        self.counts.created.fetch_add(1, Ordering::Relaxed);
        let life = Duration::from_millis(500 + self.rng.u64(..4000));
        self.jobs.push(Job {
            child,
            cgroup,
            tenant: t,
            until: now + life,
        });
    }

    /// Ends every job whose time is up (all of them with `all`).
    pub(super) fn reap(&mut self, now: Instant, all: bool) {
        let mut i = 0;
        while i < self.jobs.len() {
            if all || self.jobs[i].until <= now {
                let job = self.jobs.swap_remove(i);
                self.end(job);
            } else {
                i += 1;
            }
        }
    }

    fn end(&mut self, mut job: Job) {
        let pid = job.child.pid();
        job.child.kill();
        self.sim.unregister(pid);
        drop(job.cgroup);
        self.counts.destroyed += 1;
        self.counts.cgroups_removed += 1;
        let slot = &mut self.tenants[job.tenant];
        if let Some((_, jobs)) = slot {
            *jobs -= 1;
            if *jobs == 0 {
                *slot = None;
                self.counts.cgroups_removed += 1;
            }
        }
    }
}

impl Drop for Churn<'_> {
    fn drop(&mut self) {
        self.reap(Instant::now(), true);
    }
}

/// XIDs and lost GPUs, until `quiet_from`; a lost GPU comes back after
/// `LOST_FOR` whatever the time.
pub(super) struct Faults<'a> {
    sim: &'a SimNode,
    rng: fastrand::Rng,
    quiet_from: Instant,
    next_xid: Instant,
    next_loss: Instant,
    lost: Option<(u32, Instant)>,
    pub xids: u64,
    pub losses: u64,
}

/// 13 and 31 (application errors), 43 (a stopped kernel), 79 (fell off
/// the bus: fatal, the GPU is `lost` until `fatal_xid_clear_after`).
const XIDS: [u64; 4] = [13, 31, 43, 79];
const XID_EVERY: Duration = Duration::from_secs(5);
const LOSS_EVERY: Duration = Duration::from_secs(60);
const LOST_FOR: Duration = Duration::from_secs(10);

impl<'a> Faults<'a> {
    pub(super) fn new(sim: &'a SimNode, seed: u64, start: Instant, quiet_from: Instant) -> Self {
        Faults {
            sim,
            rng: fastrand::Rng::with_seed(seed),
            quiet_from,
            next_xid: start + XID_EVERY,
            next_loss: start + Duration::from_secs(20),
            lost: None,
            xids: 0,
            losses: 0,
        }
    }

    pub(super) fn tick(&mut self, now: Instant) {
        if let Some((gpu, until)) = self.lost
            && now >= until
        {
            self.sim.set_lost(gpu, false);
            self.lost = None;
        }
        if now >= self.quiet_from {
            return;
        }
        if now >= self.next_xid {
            let gpu = self.rng.u32(..8);
            self.sim.inject_xid(gpu, XIDS[self.rng.usize(..XIDS.len())]);
            self.xids += 1;
            self.next_xid = now + XID_EVERY;
        }
        if self.lost.is_none() && now >= self.next_loss {
            let gpu = self.rng.u32(..8);
            self.sim.set_lost(gpu, true);
            self.lost = Some((gpu, now + LOST_FOR));
            self.losses += 1;
            self.next_loss = now + LOSS_EVERY;
        }
    }
}

impl Drop for Faults<'_> {
    fn drop(&mut self) {
        if let Some((gpu, _)) = self.lost.take() {
            self.sim.set_lost(gpu, false);
        }
    }
}
