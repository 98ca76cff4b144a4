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
//! Liveness is not a file-system event: whether `/proc/<pid>` still exists
//! is asked with `kill(pid, 0)` per registration of the queried GPU
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
    fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags},
    io::Errno,
    process::{Pid, test_kill_process},
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
    /// Per GPU, its live registrations and the task counts they were
    /// checked at; cleared with `by_gpu`.
    live: HashMap<u32, (TaskCounts, Arc<[Proc]>)>,
    tasks: Tasks,
    lost: Vec<bool>,
    hang: Vec<bool>,
    reset: Vec<bool>,
    /// Per GPU, its health file and that file's throttle bits.
    health: Vec<(Arc<Health>, u64)>,
    /// Bad files already reported: (path, mtime).
    reported: HashSet<(PathBuf, Option<SystemTime>)>,
}

impl Watched {
    /// Starts watching `dir`; nothing is read until the first refresh.
    pub(crate) fn new(dir: PathBuf, gpus: usize) -> Watched {
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
        self.procs.remove(&name);
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
        // Counted before the checks: a reap during them shows next time.
        let counts = self.tasks.counts();
        if let (Some(now), Some((then, live))) = (counts, self.live.get(&gpu))
            && now == *then
        {
            return Arc::clone(live);
        }
        let by_gpu = self
            .by_gpu
            .get_or_insert_with(|| index(&self.procs, scenario));
        let Some(procs) = by_gpu.get(gpu as usize) else {
            return Arc::from([]);
        };
        // Usually all live: then the list is shared, not copied.
        let live: Arc<[Proc]> = match procs.iter().position(|p| !alive(p.pid)) {
            None => Arc::clone(procs),
            Some(first_dead) => procs[..first_dead]
                .iter()
                .cloned()
                .chain(
                    procs[first_dead + 1..]
                        .iter()
                        .filter(|p| alive(p.pid))
                        .cloned(),
                )
                .collect(),
        };
        if let Some(counts) = counts {
            self.live.insert(gpu, (counts, Arc::clone(&live)));
        }
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
struct Tasks(Option<File>);

impl Tasks {
    fn open() -> Tasks {
        let initial_ns = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|pids| pids.split_whitespace().count() == 1)
        });
        Tasks(
            initial_ns
                .then(|| File::open("/proc/loadavg").ok())
                .flatten(),
        )
    }

    fn counts(&self) -> Option<TaskCounts> {
        let f = self.0.as_ref()?;
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
}
