//! The churn: short-lived GPU processes, each in a job cgroup of its own
//! under a tenant cgroup that exists only while it has jobs, registered on
//! the simulated GPUs; and the faults sprinkled in (XIDs, lost GPUs).

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
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

/// Counts of what the churn did, shared by its workers and the sampler.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub created: AtomicU64,
    pub destroyed: AtomicU64,
    pub cgroups_created: AtomicU64,
    pub cgroups_removed: AtomicU64,
    /// Starts skipped because a worker fell more than a second behind.
    pub missed: AtomicU64,
    /// The most jobs alive at once in any one worker.
    pub peak_live: AtomicU64,
}

impl Counts {
    pub(super) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

struct Job {
    // Dropped in this order: the process, then its cgroup.
    child: ChildGuard,
    cgroup: Cgroup,
    tenant: usize,
    until: Instant,
}

/// One worker's live jobs and tenant cgroups beneath `<base>/<tenant>/`:
/// worker `w` of `n` owns the tenants `t` with `t % n == w`, so workers
/// never share a cgroup.
pub(super) struct Churn<'a> {
    // Dropped in this order: jobs, ended jobs' cgroups, tenant cgroups.
    jobs: Vec<Job>,
    /// Cgroups of ended jobs, removed a moment later: right after the
    /// reap the kernel may still call them busy, and the kit's removal
    /// would then sleep-retry in the middle of the churn.
    ended: Vec<(Instant, Cgroup, usize)>,
    tenants: Vec<Option<(Cgroup, usize)>>,
    base: &'a Cgroup,
    sim: &'a SimNode,
    rng: fastrand::Rng,
    worker: usize,
    workers: usize,
    next_id: u64,
    counts: &'a Counts,
}

/// How long an ended job's cgroup waits before its removal.
const SETTLE: Duration = Duration::from_millis(300);

impl<'a> Churn<'a> {
    /// Jobs go under `base/<tenant>/w<worker>-job<n>`.
    pub(super) fn new(
        base: &'a Cgroup,
        sim: &'a SimNode,
        counts: &'a Counts,
        (worker, workers): (usize, usize),
        seed: u64,
    ) -> Churn<'a> {
        Churn {
            jobs: Vec::new(),
            ended: Vec::new(),
            tenants: (0..TENANTS).map(|_| None).collect(),
            base,
            sim,
            rng: fastrand::Rng::with_seed(seed),
            worker,
            workers,
            next_id: 0,
            counts,
        }
    }

    /// Starts one job living 0.5–4.5 s (≈ 2.5 s: ~125 live at 50/s).
    pub(super) fn start(&mut self, now: Instant) {
        let mine = TENANTS.div_ceil(self.workers);
        let t = (self.worker + self.workers * self.rng.usize(..mine)).min(TENANTS - 1);
        if self.tenants[t].is_none() {
            self.tenants[t] = Some((self.base.child(&format!("t{t:02}")), 0));
            Counts::add(&self.counts.cgroups_created, 1);
        }
        let (tenant, jobs) = self.tenants[t].as_mut().expect("created above");
        *jobs += 1;
        let cgroup = tenant.child(&format!("w{}-job{}", self.worker, self.next_id));
        self.next_id += 1;
        Counts::add(&self.counts.cgroups_created, 1);
        let child = cgroup.start("/bin/bash", &["-c", WORKLOAD]);
        let device = self.rng.u32(..DEVICES);
        let (gpu, mig, memory) = if device < 7 {
            (device, None, 1024 + 512 * self.rng.u64(..8))
        } else {
            (7, Some(device - 7), 256)
        };
        let sm = f64::from(self.rng.u32(1..=20)) / 20.0;
        self.sim.register(child.pid(), gpu, mig, memory, sm);
        Counts::add(&self.counts.created, 1);
        let life = Duration::from_millis(500 + self.rng.u64(..4000));
        self.jobs.push(Job {
            child,
            cgroup,
            tenant: t,
            until: now + life,
        });
        self.counts
            .peak_live
            .fetch_max(self.jobs.len() as u64, Ordering::Relaxed);
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
        self.remove_settled(false);
    }

    fn end(&mut self, mut job: Job) {
        let pid = job.child.pid();
        job.child.kill();
        self.sim.unregister(pid);
        Counts::add(&self.counts.destroyed, 1);
        self.ended
            .push((Instant::now() + SETTLE, job.cgroup, job.tenant));
    }

    /// Removes the cgroups of ended jobs that have settled (all with
    /// `all`), and each tenant cgroup left without jobs.
    fn remove_settled(&mut self, all: bool) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.ended.len() {
            if !all && self.ended[i].0 > now {
                i += 1;
                continue;
            }
            let (_, cgroup, tenant) = self.ended.swap_remove(i);
            drop(cgroup);
            Counts::add(&self.counts.cgroups_removed, 1);
            let slot = &mut self.tenants[tenant];
            if let Some((_, jobs)) = slot {
                *jobs -= 1;
                if *jobs == 0 {
                    *slot = None;
                    Counts::add(&self.counts.cgroups_removed, 1);
                }
            }
        }
    }
}

impl Drop for Churn<'_> {
    fn drop(&mut self) {
        self.reap(Instant::now(), true);
        std::thread::sleep(SETTLE);
        self.remove_settled(true);
    }
}

/// What the churn workers share.
#[derive(Clone, Copy)]
pub(super) struct Shared<'a> {
    /// `<soak cgroup>/tally`: the tenant cgroups go beneath it.
    pub base: &'a Cgroup,
    pub sim: &'a SimNode,
    pub counts: &'a Counts,
    /// Set when the soak ends early (the agent died).
    pub stop: &'a AtomicBool,
}

/// Runs worker `w` of `n` until `end` (or `stop`): a job started every `n / rate`
/// seconds, paced by absolute time so that a slow start catches up, and
/// jobs ended when their time is up; then ends the rest.
pub(super) fn work(
    with: &Shared<'_>,
    (w, n): (usize, usize),
    rate: u32,
    seed: u64,
    (start, end): (Instant, Instant),
) {
    let Shared {
        base,
        sim,
        counts,
        stop,
    } = *with;
    let mut churn = Churn::new(base, sim, counts, (w, n), seed);
    let period = Duration::from_secs(n as u64) / rate;
    let mut next = start + period * w as u32 / n as u32;
    loop {
        let now = Instant::now();
        if now >= end || stop.load(Ordering::Relaxed) {
            break;
        }
        churn.reap(now, false);
        if now.duration_since(next) > Duration::from_secs(1) {
            // More than a second behind (the machine is busy): skip
            // rather than burst; the achieved rate says so.
            let behind = now.duration_since(next).as_secs_f64();
            Counts::add(&counts.missed, (behind / period.as_secs_f64()) as u64);
            next = now;
        }
        while next <= now {
            churn.start(now);
            next += period;
        }
        let wait = next.saturating_duration_since(Instant::now());
        std::thread::sleep(wait.min(Duration::from_millis(50)));
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
