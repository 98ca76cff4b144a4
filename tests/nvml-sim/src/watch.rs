//! The state directory as last read — registrations, `lost/`, `hang/`,
//! `reset/` markers and `health/` files — re-read only where inotify says
//! something changed, so a device query costs one `read` of the inotify
//! descriptor instead of a walk of `procs/` and a parse of every file.
//!
//! inotify reports a change before the writing syscall returns, so whatever
//! a test or workload wrote before a query is seen by that query, however
//! fine or coarse the file system's timestamps are, and a file rewritten in
//! place is seen as well as one replaced by a rename. Without inotify (the
//! state directory did not exist at init, or the per-user instance limit
//! is reached) every refresh re-reads everything, as the simulator first did.
//!
//! Liveness is not a file-system event. Each registered pid gets a pidfd
//! in one epoll set ([`Pids`]); a pidfd becomes readable when its process
//! exits, so a query does one `epoll_wait` and a pid that has not signalled
//! is alive without asking. A pid that exited (maybe a zombie still) or got
//! no pidfd (over the cap, or an error) is asked with `kill(pid, 0)`
//! (zombies answer, reaped processes do not) — unless no task was created
//! or reaped since the last time it was asked (see [`Tasks`]).

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    fs::{self, File},
    mem::MaybeUninit,
    os::fd::OwnedFd,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rustix::{
    event::{Timespec, epoll},
    fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags},
    io::Errno,
    process::{Pid, PidfdFlags, Resource, getrlimit, pidfd_open, test_kill_process},
};

use crate::{
    scenario::Scenario,
    sim::{NO_INSTANCE, Proc},
    state::{self, Health, Registration},
};

/// A part of the state directory, re-read as a whole when it changes
/// (except `procs/`, re-read file by file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Area {
    Procs,
    Lost,
    Hang,
    Health,
    Reset,
}

const AREAS: [Area; 5] = [
    Area::Procs,
    Area::Lost,
    Area::Hang,
    Area::Health,
    Area::Reset,
];

impl Area {
    fn dir_name(self) -> &'static str {
        match self {
            Area::Procs => "procs",
            Area::Lost => "lost",
            Area::Hang => "hang",
            Area::Health => "health",
            Area::Reset => "reset",
        }
    }

    fn of_dir_name(name: &[u8]) -> Option<Area> {
        AREAS.into_iter().find(|a| a.dir_name().as_bytes() == name)
    }
}

/// What a watch descriptor covers: the state directory itself (whose
/// events say an area's directory came or went) or one area.
#[derive(Debug, Clone, Copy)]
enum Watch {
    Root,
    Area(Area),
}

/// Everything that changes a directory's listing or a file's content.
const AREA_EVENTS: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::ONLYDIR);

/// A registration file that was read and rejected: reported (once per path
/// and mtime) on queries while `pid` lives; `pid` `None`: the name is not
/// `<pid>.toml`, reported whatever runs.
#[derive(Debug, Clone)]
struct Bad {
    pid: Option<u32>,
    mtime: Option<SystemTime>,
    problem: String,
    /// Reported already: not looked at again until the file is re-read.
    reported: bool,
}

/// The in-memory copy of one state directory.
#[derive(Debug)]
pub(crate) struct Watched {
    dir: PathBuf,
    inotify: Option<OwnedFd>,
    watches: HashMap<i32, Watch>,
    /// Areas to re-read in full at the next refresh.
    stale: HashSet<Area>,
    /// `procs/` file names to re-read at the next refresh.
    stale_procs: HashSet<OsString>,
    /// Valid registrations by file name: (pid, registration).
    procs: HashMap<OsString, (u32, Registration)>,
    bad: HashMap<OsString, Bad>,
    /// Valid registrations per GPU, sorted by pid, dead or alive; `None`
    /// after `procs` changed.
    by_gpu: Option<Vec<Arc<[Proc]>>>,
    /// Per GPU, its live registrations as last checked; cleared with
    /// `by_gpu` and whenever a watched process exits.
    live: HashMap<u32, Live>,
    /// Pids of registrations (re)read since the last refresh: watched then.
    fresh: Vec<u32>,
    /// `procs` lost a registration since the last refresh.
    procs_dropped: bool,
    pids: Pids,
    tasks: Tasks,
    lost: Vec<bool>,
    hang: Vec<bool>,
    reset: Vec<bool>,
    /// Per GPU, its health file and that file's throttle bits.
    health: Vec<(Arc<Health>, u64)>,
    /// Bad files already reported: (path, mtime).
    reported: HashSet<(PathBuf, Option<SystemTime>)>,
}

/// One GPU's live registrations and what their check depended on.
#[derive(Debug)]
struct Live {
    procs: Arc<[Proc]>,
    /// Some registration on the GPU was left unwatched: the list holds only
    /// while `counts` does (and never without counts).
    unwatched: bool,
    /// Task counts read before the first `kill` of the check.
    counts: Option<TaskCounts>,
}

impl Watched {
    /// Starts watching `dir`; nothing is read until the first refresh.
    pub(crate) fn new(dir: PathBuf, gpus: usize) -> Watched {
        Watched::with_pidfd_cap(dir, gpus, default_pidfd_cap())
    }

    /// [`Watched::new`] holding at most `cap` pidfds.
    pub(crate) fn with_pidfd_cap(dir: PathBuf, gpus: usize, cap: usize) -> Watched {
        let inotify = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).ok();
        let mut w = Watched {
            inotify,
            watches: HashMap::new(),
            stale: AREAS.into_iter().collect(),
            stale_procs: HashSet::new(),
            procs: HashMap::new(),
            bad: HashMap::new(),
            by_gpu: None,
            live: HashMap::new(),
            fresh: Vec::new(),
            procs_dropped: false,
            pids: Pids::new(cap),
            tasks: Tasks::open(),
            lost: vec![false; gpus],
            hang: vec![false; gpus],
            reset: vec![false; gpus],
            health: vec![Default::default(); gpus],
            reported: HashSet::new(),
            dir,
        };
        let root = WatchFlags::CREATE
            .union(WatchFlags::DELETE)
            .union(WatchFlags::MOVED_FROM)
            .union(WatchFlags::MOVED_TO)
            .union(WatchFlags::DELETE_SELF)
            .union(WatchFlags::MOVE_SELF)
            .union(WatchFlags::ONLYDIR);
        match w.add_watch(&w.dir.clone(), root) {
            Some(wd) => {
                w.watches.insert(wd, Watch::Root);
            }
            // No directory to watch yet: poll, as before.
            None => w.inotify = None,
        }
        w
    }

    fn add_watch(&self, path: &Path, flags: WatchFlags) -> Option<i32> {
        let fd = self.inotify.as_ref()?;
        inotify::add_watch(fd, path, flags).ok()
    }

    /// Brings the copy up to date with everything written before this call.
    pub(crate) fn refresh(&mut self, scenario: &Scenario) {
        self.drain();
        for area in AREAS {
            if self.stale.remove(&area) {
                self.reread(area, scenario);
            }
        }
        if !self.stale_procs.is_empty() {
            let names: Vec<OsString> = self.stale_procs.drain().collect();
            for name in names {
                self.read_proc(name, scenario);
            }
        }
        self.settle_pids();
    }

    /// Closes the pidfds of pids no longer registered, then watches the
    /// pids whose registrations were (re)read.
    fn settle_pids(&mut self) {
        if self.procs_dropped {
            self.procs_dropped = false;
            let registered: HashSet<u32> = self.procs.values().map(|(pid, _)| *pid).collect();
            self.pids.keep_only(&registered);
        }
        for pid in std::mem::take(&mut self.fresh) {
            self.pids.watch(pid);
        }
    }

    /// Turns pending inotify events into stale areas and files.
    fn drain(&mut self) {
        let Some(fd) = &self.inotify else {
            self.stale.extend(AREAS);
            return;
        };
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(fd, &mut buf);
        let mut events: Vec<(i32, ReadFlags, Option<OsString>)> = Vec::new();
        let mut lost_track = false;
        loop {
            match reader.next() {
                Ok(ev) => {
                    let name = ev
                        .file_name()
                        .map(|n| std::os::unix::ffi::OsStrExt::from_bytes(n.to_bytes()))
                        .map(std::ffi::OsStr::to_owned);
                    events.push((ev.wd(), ev.events(), name));
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(_) => {
                    lost_track = true;
                    break;
                }
            }
        }
        for (wd, flags, name) in events {
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                lost_track = true;
                continue;
            }
            let Some(&watch) = self.watches.get(&wd) else {
                continue;
            };
            let gone = flags
                .intersects(ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF);
            if flags.contains(ReadFlags::IGNORED) {
                self.watches.remove(&wd);
            }
            match (watch, name) {
                (Watch::Root, _) if gone => lost_track = true,
                (Watch::Root, Some(name)) => {
                    if let Some(area) = Area::of_dir_name(name.as_encoded_bytes()) {
                        self.stale.insert(area);
                    }
                }
                (Watch::Root, None) => {}
                (Watch::Area(Area::Procs), Some(name)) if !gone => {
                    self.stale_procs.insert(name);
                }
                (Watch::Area(area), _) => {
                    self.stale.insert(area);
                }
            }
        }
        if lost_track {
            self.stale.extend(AREAS);
        }
    }

    /// Re-reads one area in full; watching it first, so that nothing written
    /// while it is read goes unseen.
    fn reread(&mut self, area: Area, scenario: &Scenario) {
        let path = self.dir.join(area.dir_name());
        if let Some(wd) = self.add_watch(&path, AREA_EVENTS) {
            self.watches.insert(wd, Watch::Area(area));
        }
        let gpus = self.lost.len() as u32;
        match area {
            Area::Procs => {
                self.procs_dropped |= !self.procs.is_empty();
                self.procs.clear();
                self.bad.clear();
                self.by_gpu = None;
                self.live.clear();
                self.stale_procs.clear();
                if let Ok(entries) = fs::read_dir(&path) {
                    for entry in entries.flatten() {
                        self.read_proc(entry.file_name(), scenario);
                    }
                }
            }
            Area::Lost => {
                self.lost = (0..gpus)
                    .map(|g| state::lost_file(&self.dir, g).exists())
                    .collect();
            }
            Area::Hang => {
                self.hang = (0..gpus)
                    .map(|g| state::hang_file(&self.dir, g).exists())
                    .collect();
            }
            Area::Reset => {
                self.reset = (0..gpus)
                    .map(|g| state::reset_file(&self.dir, g).exists())
                    .collect();
            }
            Area::Health => {
                self.health = (0..gpus).map(|g| self.read_health(g)).collect();
            }
        }
    }

    /// (Re-)reads `procs/<name>`; a file that is gone is forgotten.
    fn read_proc(&mut self, name: OsString, scenario: &Scenario) {
        self.by_gpu = None;
        self.live.clear();
        self.procs_dropped |= self.procs.remove(&name).is_some();
        self.bad.remove(&name);
        let Some(text_name) = name.to_str() else {
            return;
        };
        // Temporary files of atomic writes start with '.'.
        if text_name.starts_with('.') {
            return;
        }
        let Some(pid) = text_name.strip_suffix(".toml") else {
            return;
        };
        let path = state::procs_dir(&self.dir).join(&name);
        let mtime = || fs::metadata(&path).and_then(|m| m.modified()).ok();
        let bad = match pid.parse::<u32>() {
            Err(_) if !path.exists() => return,
            Err(_) => Bad {
                pid: None,
                mtime: mtime(),
                problem: "file name is not <pid>.toml".to_owned(),
                reported: false,
            },
            Ok(pid) => {
                let Ok(text) = fs::read_to_string(&path) else {
                    return;
                };
                match state::parse_registration(scenario, &text) {
                    Ok(reg) => {
                        self.procs.insert(name, (pid, reg));
                        self.fresh.push(pid);
                        return;
                    }
                    Err(problem) => Bad {
                        pid: Some(pid),
                        mtime: mtime(),
                        problem,
                        reported: false,
                    },
                }
            }
        };
        self.bad.insert(name, bad);
    }

    /// `health/<gpu>.toml` and its throttle bits (healthy, 0, when the
    /// file is missing or bad).
    fn read_health(&mut self, gpu: u32) -> (Arc<Health>, u64) {
        let path = state::health_file(&self.dir, gpu);
        let Ok(text) = fs::read_to_string(&path) else {
            return Default::default();
        };
        match state::parse_health(&text) {
            // parse_health checked the names.
            Ok(health) => {
                let bits = health.throttle_bits().unwrap_or(0);
                (Arc::new(health), bits)
            }
            Err(problem) => {
                let mtime = fs::metadata(&path).and_then(|m| m.modified()).ok();
                self.report_once(&path, mtime, &problem);
                Default::default()
            }
        }
    }

    pub(crate) fn report_once(&mut self, path: &Path, mtime: Option<SystemTime>, problem: &str) {
        if self.reported.insert((path.to_owned(), mtime)) {
            eprintln!("nvml-sim: {}: {problem}; ignored", path.display());
        }
    }

    /// Live, valid registrations on `gpu`, sorted by pid; reports the bad
    /// files of live processes (once per path and mtime).
    pub(crate) fn procs_on(&mut self, gpu: u32, scenario: &Scenario) -> Arc<[Proc]> {
        let mut bad: Vec<(PathBuf, Option<SystemTime>, String)> = Vec::new();
        for (name, b) in &mut self.bad {
            if !b.reported && b.pid.is_none_or(alive) {
                b.reported = true;
                let path = state::procs_dir(&self.dir).join(name);
                bad.push((path, b.mtime, b.problem.clone()));
            }
        }
        for (path, mtime, problem) in bad {
            self.report_once(&path, mtime, &problem);
        }
        if self.pids.poll_exits() {
            self.live.clear();
        }
        // Task counts, read at most once per call and before any `kill`:
        // a reap during the checks shows next time.
        let mut counts: Option<Option<TaskCounts>> = None;
        if let Some(cached) = self.live.get(&gpu) {
            if !cached.unwatched {
                return Arc::clone(&cached.procs);
            }
            let now = *counts.insert(self.tasks.counts());
            if now.is_some() && now == cached.counts {
                return Arc::clone(&cached.procs);
            }
        }
        let by_gpu = self
            .by_gpu
            .get_or_insert_with(|| index(&self.procs, scenario));
        let Some(procs) = by_gpu.get(gpu as usize).map(Arc::clone) else {
            return Arc::from([]);
        };
        let mut unwatched = false;
        let mut alive = |pids: &mut Pids, pid: u32| {
            if pids.watching(pid) {
                return true;
            }
            counts.get_or_insert_with(|| self.tasks.counts());
            let alive = pids.alive(pid);
            // A pid seen dead and alive again may have been watched afresh.
            unwatched |= !pids.watching(pid);
            alive
        };
        // Usually all live: then the list is shared, not copied.
        let live: Arc<[Proc]> = match procs.iter().position(|p| !alive(&mut self.pids, p.pid)) {
            None => Arc::clone(&procs),
            Some(first_dead) => procs[..first_dead]
                .iter()
                .cloned()
                .chain(
                    procs[first_dead + 1..]
                        .iter()
                        .filter(|p| alive(&mut self.pids, p.pid))
                        .cloned(),
                )
                .collect(),
        };
        self.live.insert(
            gpu,
            Live {
                procs: Arc::clone(&live),
                unwatched,
                counts: counts.flatten(),
            },
        );
        live
    }

    pub(crate) fn lost(&self, gpu: u32) -> bool {
        self.lost.get(gpu as usize).copied().unwrap_or(false)
    }

    pub(crate) fn hung(&self, gpu: u32) -> bool {
        self.hang.get(gpu as usize).copied().unwrap_or(false)
    }

    /// Whether `reset/<gpu>` existed at the last refresh.
    pub(crate) fn reset_pending(&self, gpu: u32) -> bool {
        self.reset.get(gpu as usize).copied().unwrap_or(false)
    }

    /// GPU `gpu`'s health and its throttle bits.
    pub(crate) fn health(&self, gpu: u32) -> (Arc<Health>, u64) {
        self.health.get(gpu as usize).cloned().unwrap_or_default()
    }
}

/// Valid registrations grouped by GPU, each group sorted by pid.
fn index(procs: &HashMap<OsString, (u32, Registration)>, scenario: &Scenario) -> Vec<Arc<[Proc]>> {
    let mut by_gpu = vec![Vec::new(); scenario.gpus.len()];
    for (pid, reg) in procs.values() {
        let Some(gpu) = scenario.gpus.get(reg.gpu as usize) else {
            continue;
        };
        let (gi, ci) = match (reg.mig, &gpu.mig) {
            (Some(m), Some(mig)) => {
                let inst = &mig[m as usize];
                (inst.gpu_instance_id, inst.compute_instance_id)
            }
            _ => (NO_INSTANCE, NO_INSTANCE),
        };
        by_gpu[reg.gpu as usize].push(Proc {
            pid: *pid,
            reg: reg.clone(),
            gpu_instance_id: gi,
            compute_instance_id: ci,
        });
    }
    by_gpu
        .into_iter()
        .map(|mut procs| {
            procs.sort_by_key(|p| p.pid);
            Arc::from(procs)
        })
        .collect()
}

/// Pidfds held at most: a quarter of the soft descriptor limit, and at
/// most 4096. The simulator lives inside the host's process (the agent)
/// and must not starve it of descriptors.
fn default_pidfd_cap() -> usize {
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    usize::try_from(soft / 4).unwrap_or(usize::MAX).min(4096)
}

/// Which registered pids are alive without asking: a pidfd per pid in one
/// epoll set, which reports the pidfds whose process exited. A pid without
/// one ("unwatched": its process exited, or no pidfd could be had) is
/// asked with `kill(pid, 0)`.
#[derive(Debug)]
struct Pids {
    /// `None` without epoll or with a cap of 0: every pid is unwatched.
    epoll: Option<OwnedFd>,
    /// Watched pids: their process had not exited at the last poll.
    fds: HashMap<u32, OwnedFd>,
    /// Unwatched pids that `kill` last found gone: alive again means a new
    /// process got the pid (reuse), which is watched afresh.
    dead: HashSet<u32>,
    cap: usize,
    /// `kill(pid, 0)` calls made.
    #[cfg(test)]
    kills: u64,
}

impl Pids {
    fn new(cap: usize) -> Pids {
        Pids {
            epoll: (cap > 0)
                .then(|| epoll::create(epoll::CreateFlags::CLOEXEC).ok())
                .flatten(),
            fds: HashMap::new(),
            dead: HashSet::new(),
            cap,
            #[cfg(test)]
            kills: 0,
        }
    }

    fn watching(&self, pid: u32) -> bool {
        self.fds.contains_key(&pid)
    }

    /// Watches `pid` if it is not watched and the cap allows; otherwise it
    /// stays unwatched.
    fn watch(&mut self, pid: u32) {
        let Some(epoll) = &self.epoll else {
            return;
        };
        if self.fds.len() >= self.cap || self.fds.contains_key(&pid) {
            return;
        }
        let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
            return;
        };
        // A zombie's pidfd opens, and is readable at once.
        let Ok(fd) = pidfd_open(raw, PidfdFlags::empty()) else {
            return;
        };
        let data = epoll::EventData::new_u64(pid.into());
        if epoll::add(epoll, &fd, data, epoll::EventFlags::IN).is_ok() {
            self.fds.insert(pid, fd);
            self.dead.remove(&pid);
        }
    }

    /// Stops watching `pid`: out of the epoll set, pidfd closed.
    fn unwatch(&mut self, pid: u32) {
        if let (Some(fd), Some(epoll)) = (self.fds.remove(&pid), &self.epoll) {
            let _ = epoll::delete(epoll, &fd);
        }
    }

    /// Forgets every pid not in `registered`.
    fn keep_only(&mut self, registered: &HashSet<u32>) {
        let gone: Vec<u32> = self
            .fds
            .keys()
            .filter(|pid| !registered.contains(pid))
            .copied()
            .collect();
        for pid in gone {
            self.unwatch(pid);
        }
        self.dead.retain(|pid| registered.contains(pid));
    }

    /// One non-blocking `epoll_wait`: the pids whose process exited since
    /// become unwatched. Whether any did.
    fn poll_exits(&mut self) -> bool {
        if self.fds.is_empty() {
            return false;
        }
        let Some(epoll) = &self.epoll else {
            return false;
        };
        let mut any = false;
        loop {
            let mut buf = [MaybeUninit::<epoll::Event>::uninit(); 64];
            let full = buf.len();
            match epoll::wait(epoll, &mut buf, Some(&Timespec::default())) {
                Ok((events, _)) => {
                    for ev in events.iter() {
                        let data = ev.data;
                        // Out of the set, so not reported again.
                        if let Some(fd) = self.fds.remove(&(data.u64() as u32)) {
                            let _ = epoll::delete(epoll, &fd);
                            any = true;
                        }
                    }
                    if events.len() < full {
                        return any;
                    }
                }
                Err(Errno::INTR) => {}
                Err(_) => {
                    // No telling who exited: ask about every pid, from now on.
                    self.fds.clear();
                    self.epoll = None;
                    return true;
                }
            }
        }
    }

    /// Whether the unwatched `pid`'s `/proc` entry exists.
    fn alive(&mut self, pid: u32) -> bool {
        #[cfg(test)]
        {
            self.kills += 1;
        }
        let alive = alive(pid);
        if !alive {
            self.dead.insert(pid);
        } else if self.dead.remove(&pid) {
            self.watch(pid);
        }
        alive
    }
}

/// (last pid allocated, tasks in the system) from `/proc/loadavg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TaskCounts {
    last_pid: u64,
    tasks: u64,
}

/// Whether any task was created or reaped between two moments, for one
/// `pread` of `/proc/loadavg` instead of a `kill` per registration. The
/// kernel counts every task (threads too) up when it is created and down
/// when it is reaped, and every creation allocates a pid, moving the last
/// pid: so equal (last pid, tasks) means nothing was reaped in between.
/// That holds in the initial pid namespace, where `last_pid` sees every
/// allocation; in a nested one (`NSpid` with more than one pid) an
/// allocation outside could hide a reap, so there it is never used.
#[derive(Debug)]
struct Tasks {
    loadavg: Option<File>,
    /// `/proc/loadavg` reads made.
    #[cfg(test)]
    reads: std::cell::Cell<u64>,
}

impl Tasks {
    fn open() -> Tasks {
        let initial_ns = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|pids| pids.split_whitespace().count() == 1)
        });
        Tasks {
            loadavg: initial_ns
                .then(|| File::open("/proc/loadavg").ok())
                .flatten(),
            #[cfg(test)]
            reads: Default::default(),
        }
    }

    fn counts(&self) -> Option<TaskCounts> {
        let f = self.loadavg.as_ref()?;
        #[cfg(test)]
        self.reads.set(self.reads.get() + 1);
        let mut buf = [0u8; 128];
        let n = f.read_at(&mut buf, 0).ok()?;
        parse_loadavg(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

/// `0.00 0.01 0.05 <running>/<tasks> <last pid>`.
fn parse_loadavg(text: &str) -> Option<TaskCounts> {
    let mut fields = text.split_whitespace().skip(3);
    let (_, tasks) = fields.next()?.split_once('/')?;
    Some(TaskCounts {
        tasks: tasks.parse().ok()?,
        last_pid: fields.next()?.parse().ok()?,
    })
}

/// Whether `/proc/<pid>` exists: `kill(pid, 0)` succeeds (or is refused)
/// for a running process and a zombie, and fails once the parent reaped it.
fn alive(pid: u32) -> bool {
    // Pids above i32::MAX do not exist; negative ones would name a group.
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    !matches!(test_kill_process(pid), Err(Errno::SRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_gives_tasks_and_last_pid() {
        assert_eq!(
            parse_loadavg("22.92 28.69 20.78 23/234 18146\n"),
            Some(TaskCounts {
                last_pid: 18146,
                tasks: 234
            })
        );
        assert_eq!(parse_loadavg("0.1 0.2 0.3\n"), None);
    }

    #[test]
    fn a_new_process_moves_the_counts() {
        let tasks = Tasks::open();
        let Some(before) = tasks.counts() else {
            eprintln!("skipped: not in the initial pid namespace");
            return;
        };
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        assert_ne!(tasks.counts(), Some(before));
    }

    const SCENARIO: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
"#;

    /// A state directory watched with at most `cap` pidfds.
    struct Fixture {
        dir: tempfile::TempDir,
        scenario: Scenario,
        w: Watched,
    }

    impl Fixture {
        fn new(cap: usize) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let scenario = crate::scenario::parse(Path::new("scenario.toml"), SCENARIO).unwrap();
            let w = Watched::with_pidfd_cap(dir.path().to_owned(), 2, cap);
            Fixture { dir, scenario, w }
        }

        fn register(&self, pid: u32, gpu: u32) {
            let reg = Registration {
                gpu,
                mig: None,
                memory_mib: 1024,
                sm: 0.5,
                kind: crate::ProcKind::Compute,
            };
            crate::register(self.dir.path(), pid, &reg).unwrap();
        }

        /// One query's view of `gpu`: refresh, then its live pids.
        fn pids(&mut self, gpu: u32) -> Vec<u32> {
            self.w.refresh(&self.scenario);
            self.w
                .procs_on(gpu, &self.scenario)
                .iter()
                .map(|p| p.pid)
                .collect()
        }

        fn kills(&self) -> u64 {
            self.w.pids.kills
        }
    }

    /// `sleep 60`, killed and reaped on drop.
    struct Sleep(Option<std::process::Child>);

    impl Sleep {
        fn new() -> Sleep {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap();
            Sleep(Some(child))
        }

        fn pid(&self) -> u32 {
            self.0.as_ref().unwrap().id()
        }

        /// Killed, not reaped: a zombie once this returns.
        fn kill_leave_zombie(&mut self) {
            let child = self.0.as_mut().unwrap();
            child.kill().unwrap();
            let stat = format!("/proc/{}/stat", child.id());
            while !fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            }) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }

        fn reap(&mut self) {
            if let Some(mut child) = self.0.take() {
                let _ = child.kill();
                child.wait().unwrap();
            }
        }
    }

    impl Drop for Sleep {
        fn drop(&mut self) {
            self.reap();
        }
    }

    /// Another process created and reaped: the task counts move.
    fn churn() {
        std::process::Command::new("true").status().unwrap();
    }

    /// How many pidfds of this process refer to `pid` (`/proc/self/fdinfo`
    /// names the pid of a pidfd). Robust against other tests' descriptors.
    fn pidfds_of(pid: u32) -> usize {
        let want = format!("Pid:\t{pid}\n");
        fs::read_dir("/proc/self/fdinfo")
            .unwrap()
            .flatten()
            .filter(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&want)))
            .count()
    }

    /// Kill without reap: listed (a zombie); reap: gone from the next call,
    /// with no registration changed; kill and reap between two calls: gone.
    fn zombies_stay_reaped_go(cap: usize) {
        let mut f = Fixture::new(cap);
        let (mut a, mut b) = (Sleep::new(), Sleep::new());
        f.register(a.pid(), 0);
        f.register(b.pid(), 0);
        let mut both = vec![a.pid(), b.pid()];
        both.sort_unstable();
        assert_eq!(f.pids(0), both);
        assert_eq!(f.w.pids.watching(a.pid()), cap > 0);

        a.kill_leave_zombie();
        assert_eq!(f.pids(0), both, "a zombie is still listed");
        assert_eq!(f.pids(0), both);
        assert!(
            !f.w.pids.watching(a.pid()),
            "an exited process is unwatched"
        );
        a.reap();
        assert_eq!(f.pids(0), vec![b.pid()], "gone from the next call");

        b.reap();
        assert_eq!(f.pids(0), Vec::<u32>::new());
        assert!(f.w.pids.fds.is_empty());
    }

    #[test]
    fn zombies_are_listed_and_reaped_processes_gone_next_call() {
        zombies_stay_reaped_go(64);
    }

    #[test]
    fn without_pidfds_the_answers_are_the_same() {
        zombies_stay_reaped_go(0);
    }

    #[test]
    fn registrations_over_the_cap_are_asked_with_kill() {
        let mut f = Fixture::new(1);
        let (a, b) = (Sleep::new(), Sleep::new());
        f.register(a.pid(), 1);
        f.register(b.pid(), 1);
        let mut both = vec![a.pid(), b.pid()];
        both.sort_unstable();
        assert_eq!(f.pids(1), both);
        assert_eq!(f.w.pids.fds.len(), 1);
        churn();
        let kills = f.kills();
        assert_eq!(f.pids(1), both);
        assert_eq!(f.kills() - kills, 1, "only the unwatched one is asked");
    }

    #[test]
    fn steady_state_makes_no_per_registration_syscall() {
        let mut f = Fixture::new(64);
        let procs: Vec<Sleep> = (0..4).map(|_| Sleep::new()).collect();
        for (i, p) in procs.iter().enumerate() {
            f.register(p.pid(), (i % 2) as u32);
        }
        assert_eq!(f.pids(0).len(), 2);
        assert_eq!(f.pids(1).len(), 2);
        assert_eq!(f.kills(), 0, "every registration is watched");
        churn();
        let reads = f.w.tasks.reads.get();
        assert_eq!(f.pids(0).len(), 2);
        assert_eq!(f.pids(1).len(), 2);
        assert_eq!(f.kills(), 0);
        assert_eq!(f.w.tasks.reads.get(), reads, "no /proc/loadavg read either");
    }

    #[test]
    fn a_pid_alive_again_is_watched_again() {
        let mut f = Fixture::new(64);
        let a = Sleep::new();
        f.register(a.pid(), 0);
        assert_eq!(f.pids(0), vec![a.pid()]);
        // As if `kill` had found it gone and a new process took the pid.
        f.w.pids.unwatch(a.pid());
        f.w.pids.dead.insert(a.pid());
        f.w.live.clear();
        assert_eq!(f.pids(0), vec![a.pid()]);
        assert_eq!(f.kills(), 1);
        assert!(f.w.pids.watching(a.pid()));
        churn();
        assert_eq!(f.pids(0), vec![a.pid()]);
        assert_eq!(f.kills(), 1);
    }

    #[test]
    fn pidfds_are_closed_with_their_registration() {
        let mut f = Fixture::new(64);
        let (a, b, c) = (Sleep::new(), Sleep::new(), Sleep::new());
        f.register(a.pid(), 0);
        f.register(b.pid(), 1);
        assert_eq!(f.pids(0), vec![a.pid()]);
        assert_eq!((pidfds_of(a.pid()), pidfds_of(b.pid())), (1, 1));

        // Rewritten in place (another GPU): the same pidfd is kept.
        f.register(a.pid(), 1);
        assert_eq!(f.pids(0), Vec::<u32>::new());
        assert_eq!(pidfds_of(a.pid()), 1);

        // Removed: closed.
        crate::unregister(f.dir.path(), a.pid()).unwrap();
        assert_eq!(f.pids(1), vec![b.pid()]);
        assert_eq!(pidfds_of(a.pid()), 0);

        // Renamed to another pid: the old pid's closed, the new one watched.
        let procs = state::procs_dir(f.dir.path());
        fs::rename(
            procs.join(format!("{}.toml", b.pid())),
            procs.join(format!("{}.toml", c.pid())),
        )
        .unwrap();
        assert_eq!(f.pids(1), vec![c.pid()]);
        assert_eq!((pidfds_of(b.pid()), pidfds_of(c.pid())), (0, 1));

        // procs/ removed as a whole, then the simulator dropped.
        fs::remove_dir_all(&procs).unwrap();
        assert_eq!(f.pids(1), Vec::<u32>::new());
        assert_eq!(pidfds_of(c.pid()), 0);
        f.register(c.pid(), 1);
        assert_eq!(f.pids(1), vec![c.pid()]);
        assert_eq!(pidfds_of(c.pid()), 1);
        drop(f);
        assert_eq!(pidfds_of(c.pid()), 0);
    }
}
