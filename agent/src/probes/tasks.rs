//! The process-stat probe: a task iterator (`task.bpf.c`) that tells the
//! state, CPU time and start time of every GPU process in one `read` per
//! cycle, where `/proc` takes one `stat` read per process, each a pid
//! lookup, a ptrace access check and 52 printed fields in the kernel (the
//! largest part of the sampler's CPU in benchmark 1's profile).
//!
//! It is a [`ProcSource`] for the process cache: the pids the cache asks
//! about are put in the kernel's `tally_watched` map, and each cycle starts
//! with one pass of the iterator over them. A pid asked about for the
//! first time is read from `/proc` that once; a watched pid the pass did
//! not meet has been reaped, as a failed `/proc` read would say. The
//! `cgroup` of a process is still read from `/proc`, but only for a new
//! pid or when the pass says its cgroup id or effective uid changed
//! ([`Placement`]): no periodic re-reads.
//!
//! The iterator visits every task on the node, so it pays only where the
//! GPU processes are a good part of them ([`pass_pays`]); elsewhere each
//! cycle reads `/proc` as without it.
//!
//! The numbers are `/proc/<pid>/stat`'s: the state letter is the kernel's
//! `task_state_index` of the group leader, the CPU time is the threads'
//! run time summed as `thread_group_cputime` does (the kernel scales utime
//! and stime to add up to it), and the start time is field 22's clock
//! ticks after boot.

use std::{fs::File, io, os::unix::fs::FileExt as _};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
    programs::Iter,
};
use tally_ebpf::TaskRecord;
use tracing::{debug, warn};

use super::{
    PinDir,
    error::{ProbeError, chain, load_error},
    load::{load_object, program, take_map},
};
use crate::{
    pids::PidMap,
    tenants::procs::{Placement, ProcFs, ProcSource, Stat},
};

const OBJECT: &str = "task";

/// Nanoseconds per clock tick of `/proc` (`USER_HZ`).
fn ns_per_tick() -> u64 {
    1_000_000_000 / rustix::param::clock_ticks_per_second().max(1)
}

/// `/proc`'s state letter for a task's `__state` and `exit_state`, as the
/// kernel's `__task_state_index` picks it.
fn state_letter(state: u64, exit_state: u64) -> u8 {
    // include/linux/sched.h: the reported states, then the special cases.
    const TASK_REPORT: u64 = 0x7f;
    const TASK_UNINTERRUPTIBLE: u64 = 0x2;
    const TASK_IDLE: u64 = 0x402;
    const TASK_RTLOCK_WAIT: u64 = 0x1000;
    const TASK_FROZEN: u64 = 0x8000;
    const TASK_REPORT_IDLE: u64 = TASK_REPORT + 1;
    let mut reported = (state | exit_state) & TASK_REPORT;
    if state & TASK_IDLE == TASK_IDLE {
        reported = TASK_REPORT_IDLE;
    }
    if state & (TASK_RTLOCK_WAIT | TASK_FROZEN) != 0 {
        reported = TASK_UNINTERRUPTIBLE;
    }
    // fls(): 0 for none, else the highest set bit's place from 1.
    let index = (u64::BITS - reported.leading_zeros()) as usize;
    b"RSDTtXZPI".get(index).copied().unwrap_or(b'?')
}

/// When a pass pays for itself. The iterator visits every task on the node
/// (~0.8 µs each in benchmark 1's profile), where `/proc` costs one `stat`
/// read per followed process (~5 µs each): a pass is the cheaper while the
/// node's tasks (threads included) are within a few times the followed
/// processes, as on a node full of GPU jobs, and `/proc` is on a node of
/// thousands of threads and a few GPU processes. Passes start at or below
/// `PASS_UP_TO` tasks per followed process and stop above `PROC_ABOVE`; in
/// between the last choice holds, so a node near the line does not switch
/// every cycle.
const PASS_UP_TO: u64 = 4;
const PROC_ABOVE: u64 = 6;

/// Whether this cycle runs a pass, given the last choice, the node's task
/// count and the number of processes followed.
fn pass_pays(was: bool, tasks: u64, followed: u64, (up_to, above): (u64, u64)) -> bool {
    if tasks <= followed.saturating_mul(up_to) {
        true
    } else if tasks > followed.saturating_mul(above) {
        false
    } else {
        was
    }
}

/// The node's task count, threads included: the denominator of
/// `/proc/loadavg`'s fourth field (`0.00 0.01 0.05 <running>/<tasks> …`).
#[derive(Debug)]
struct NodeTasks(Option<File>);

impl NodeTasks {
    fn open() -> Self {
        Self(File::open("/proc/loadavg").ok())
    }

    fn count(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = self.0.as_ref()?.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_whitespace()
            .nth(3)?
            .split_once('/')?
            .1
            .parse()
            .ok()
    }
}

/// One process as a pass of the iterator met it: its threads' run time,
/// and from the group leader's record its state letter, start time and
/// placement. Flat rather than an `Option` of a tuple: 32 bytes, not 48,
/// in a table of twice as many slots as processes (16,384 at 8,192).
#[derive(Debug, Default, Clone, Copy)]
struct Met {
    runtime_ns: u64,
    start_time: u64,
    cgroup_id: u64,
    /// A kernel uid is 32 bits; the record carries it in 64.
    euid: u32,
    /// The leader's state letter; 0 while its record was not met.
    state: u8,
}

impl Met {
    /// The process's `stat`, CPU time in ticks of `ns_per_tick`; `None`
    /// when the pass met its threads but not its leader.
    fn stat(&self, ns_per_tick: u64) -> Option<Stat> {
        (self.state != 0).then(|| Stat {
            state: self.state,
            cpu_ticks: self.runtime_ns / ns_per_tick,
            start_time: self.start_time,
            placement: Some(Placement {
                cgroup_id: self.cgroup_id,
                euid: u64::from(self.euid),
            }),
        })
    }
}

/// Writes the word of `tally_watched` (one bit per pid) that holds
/// `pid`'s bit, as `watching` has it now: one map update, no read.
fn write_word(
    map: &mut Array<MapData, u64>,
    watching: &PidMap<u64>,
    pid: u32,
) -> Result<(), MapError> {
    let first = pid / 64 * 64;
    let bits = (0..64)
        .filter(|b| watching.contains_key(&(first + b)))
        .fold(0u64, |w, b| w | 1 << b);
    // Fails for a pid beyond the map (none: it covers PID_MAX_LIMIT).
    map.set(pid / 64, bits, 0)
}

/// The iterator and the pids it watches; a [`ProcSource`].
pub struct ProcessStats {
    ebpf: Ebpf,
    /// `tally_watched`: the bits of `watching`'s pids.
    watched: Array<MapData, u64>,
    /// The pids whose bits are set in `watched`, each with the number of
    /// passes that had run when it was set: later passes cover it.
    watching: PidMap<u64>,
    /// Passes run so far.
    passes: u64,
    /// This cycle's pass, when it ran.
    met: Option<PidMap<Met>>,
    /// The last pass failed (and said so).
    failing: bool,
    /// Whether cycles run a pass or read `/proc` ([`pass_pays`]).
    passing: bool,
    /// [`PASS_UP_TO`] and [`PROC_ABOVE`] (tests follow a few processes on a
    /// busy machine and lift them).
    thresholds: (u64, u64),
    tasks: NodeTasks,
    buf: Vec<u8>,
    ns_per_tick: u64,
    proc_fs: ProcFs,
}

impl std::fmt::Debug for ProcessStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStats")
            .field("watching", &self.watching.len())
            .finish_non_exhaustive()
    }
}

/// Loads `task.bpf.o` and its iterator program. The pids its records name
/// are the initial pid namespace's, so an agent in another one (a
/// container without the host's pids) gets an error and stays on `/proc`.
pub(super) fn start(pin: &PinDir) -> Result<ProcessStats, ProbeError> {
    if !in_initial_pid_namespace() {
        return Err(ProbeError::Load {
            object: OBJECT,
            message: "the agent is not in the host's pid namespace (/proc/self/status \
                      NSpid has more than one pid), so the kernel's pids are not its own"
                .into(),
        });
    }
    let (mut ebpf, _) = load_object(pin, OBJECT, tally_ebpf::TASK, tally_ebpf::MAP_WATCHED)?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::Load {
        object: OBJECT,
        message: format!("kernel BTF (/sys/kernel/btf/vmlinux): {}", chain(&e)),
    })?;
    let prog: &mut Iter = program(&mut ebpf, OBJECT, tally_ebpf::PROG_TASK_DUMP)?;
    prog.load("task", &btf)
        .map_err(|e| load_error(tally_ebpf::PROG_TASK_DUMP, e))?;
    let watched = take_map(&mut ebpf, OBJECT, tally_ebpf::MAP_WATCHED)?;
    let mut stats = ProcessStats {
        ebpf,
        watched,
        watching: PidMap::default(),
        passes: 0,
        met: None,
        failing: false,
        passing: true,
        thresholds: (PASS_UP_TO, PROC_ABOVE),
        tasks: NodeTasks::open(),
        buf: Vec::new(),
        ns_per_tick: ns_per_tick(),
        proc_fs: ProcFs::default(),
    };
    // One pass now, so that a kernel that loads the program but cannot run
    // it is found at start, not in the first cycle.
    stats.pass().map_err(|e| ProbeError::Attach {
        program: tally_ebpf::PROG_TASK_DUMP,
        target: "the task iterator".into(),
        message: e.to_string(),
    })?;
    Ok(stats)
}

fn in_initial_pid_namespace() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|pids| pids.split_whitespace().count() == 1)
    })
}

impl ProcessStats {
    /// What this cycle's pass says of `pid`: `None` when no pass covers it
    /// (none ran, or it was not watched yet), `Some(None)` when the pass
    /// did not meet it (reaped).
    fn this_pass(&self, pid: u32) -> Option<Option<&Met>> {
        let since = *self.watching.get(&pid)?;
        let met = self.met.as_ref()?;
        (since < self.passes).then(|| met.get(&pid))
    }

    /// Runs the iterator once: every watched process it meets.
    fn pass(&mut self) -> io::Result<PidMap<Met>> {
        let prog: &mut Iter = self
            .ebpf
            .program_mut(tally_ebpf::PROG_TASK_DUMP)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| io::Error::other("the task iterator program is missing"))?;
        let link = prog
            .attach()
            .and_then(|id| prog.take_link(id))
            .map_err(|e| io::Error::other(chain(&e)))?;
        let mut file = link.into_file().map_err(|e| io::Error::other(chain(&e)))?;
        let mut met = self.met.take().unwrap_or_default();
        met.clear();
        let ns_per_tick = self.ns_per_tick;
        read_records(&mut file, &mut self.buf, |chunk| {
            let Some(r) = TaskRecord::read(chunk) else {
                return;
            };
            let Ok(tgid) = u32::try_from(r.tgid) else {
                return;
            };
            let m = met.entry(tgid).or_default();
            m.runtime_ns = m.runtime_ns.saturating_add(r.runtime_ns);
            if r.tid == r.tgid {
                m.state = state_letter(r.state, r.exit_state);
                m.start_time = r.start_boottime / ns_per_tick;
                m.cgroup_id = r.cgroup_id;
                m.euid = u32::try_from(r.euid).unwrap_or(u32::MAX);
            }
        })?;
        Ok(met)
    }
}

/// Bytes of iterator output read at a time: records are handled as they
/// arrive, so the buffer stays this size however many tasks the node runs
/// (reading it whole kept 1.2 MiB at 8,192 processes).
const READ_CHUNK: usize = 64 * 1024;

/// Reads `file` to its end in chunks of [`READ_CHUNK`] through `buf`,
/// handing each whole [`TaskRecord::SIZE`] record to `record`; a record
/// split across two reads is joined first.
fn read_records(
    file: &mut impl io::Read,
    buf: &mut Vec<u8>,
    mut record: impl FnMut(&[u8]),
) -> io::Result<()> {
    buf.resize(READ_CHUNK.max(2 * TaskRecord::SIZE), 0);
    let mut filled = 0;
    loop {
        let n = match file.read(&mut buf[filled..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        filled += n;
        let whole = filled - filled % TaskRecord::SIZE;
        buf[..whole]
            .chunks_exact(TaskRecord::SIZE)
            .for_each(&mut record);
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

impl ProcSource for ProcessStats {
    fn begin_cycle(&mut self) {
        let followed = self.watching.len() as u64;
        if followed == 0 {
            // Nothing to ask about: no pass, and no count of the node's
            // tasks to flip the choice back and forth on.
            self.met = None;
            return;
        }
        if let Some(tasks) = self.tasks.count() {
            let passing = pass_pays(self.passing, tasks, followed, self.thresholds);
            if passing != self.passing {
                debug!(
                    tasks,
                    followed,
                    "process stats from {}",
                    if passing {
                        "the task iterator"
                    } else {
                        "/proc"
                    }
                );
            }
            self.passing = passing;
        }
        if !self.passing {
            self.met = None;
            return;
        }
        match self.pass() {
            Ok(met) => {
                self.passes += 1;
                self.met = Some(met);
                self.failing = false;
            }
            Err(e) => {
                // This cycle reads `/proc` instead; said once per run of
                // failures, not every cycle.
                if !self.failing {
                    warn!("task iterator failed, reading /proc until it works again: {e}");
                }
                self.failing = true;
                self.met = None;
            }
        }
    }

    fn stat(&mut self, pid: u32) -> io::Result<Stat> {
        let watched_since = self.watching.get(&pid).copied();
        if let Some(met) = self.this_pass(pid) {
            match met {
                Some(m) => {
                    if let Some(stat) = m.stat(self.ns_per_tick) {
                        return Ok(stat);
                    }
                    // Threads without their leader's record: ask `/proc`.
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("process {pid} is gone"),
                    ));
                }
            }
        } else if watched_since.is_none() {
            self.watching.insert(pid, self.passes);
            match write_word(&mut self.watched, &self.watching, pid) {
                Ok(()) => {
                    // Read once: its `stat` file need not stay open.
                    let stat = self.proc_fs.stat(pid);
                    self.proc_fs.forget(pid);
                    return stat;
                }
                Err(e) => {
                    self.watching.remove(&pid);
                    debug!(pid, "not watched by the task iterator: {}", chain(&e));
                }
            }
        }
        self.proc_fs.stat(pid)
    }

    fn cgroup(&mut self, pid: u32) -> Option<String> {
        self.proc_fs.cgroup(pid)
    }

    fn forget(&mut self, pid: u32) {
        if self.watching.remove(&pid).is_some() {
            let _ = write_word(&mut self.watched, &self.watching, pid);
        }
        self.proc_fs.forget(pid);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::MetadataExt as _,
        path::Path,
        process::{Child, Command},
        time::Duration,
    };

    use rustix::process::{Pid, Signal, kill_process};

    use super::*;

    /// Hands out its bytes a few at a time, and fails once with EINTR.
    struct Dribble {
        data: Vec<u8>,
        at: usize,
        step: usize,
        interrupted: bool,
    }

    impl io::Read for Dribble {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(out.len()).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// The pass's table holds a `Met` per slot, twice as many slots as
    /// processes: its size is the agent's RSS at scale.
    #[test]
    fn a_met_process_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<Met>(), 32);
        let mut m = Met {
            runtime_ns: 30,
            ..Met::default()
        };
        assert_eq!(m.stat(10), None);
        (m.state, m.start_time, m.cgroup_id, m.euid) = (b'S', 7, 9, 1000);
        let placement = Placement {
            cgroup_id: 9,
            euid: 1000,
        };
        let stat = m.stat(10).unwrap();
        assert_eq!(
            (stat.state, stat.start_time, stat.placement),
            (b'S', 7, Some(placement))
        );
        assert_eq!(stat.cpu_ticks, 3);
    }

    #[test]
    fn records_split_across_reads_arrive_whole_and_in_order() {
        let count = READ_CHUNK / TaskRecord::SIZE * 3 + 5;
        let mut data: Vec<u8> = (0..count)
            .flat_map(|i| [(i % 251) as u8; TaskRecord::SIZE])
            .collect();
        // A torn last record (the iterator stopped mid-write) is not one.
        data.extend_from_slice(&[7; 10]);
        for step in [1, 7, TaskRecord::SIZE + 3, READ_CHUNK - 1, usize::MAX] {
            let mut file = Dribble {
                data: data.clone(),
                at: 0,
                step,
                interrupted: false,
            };
            let mut buf = Vec::new();
            let mut seen = Vec::new();
            read_records(&mut file, &mut buf, |r| {
                assert_eq!(r.len(), TaskRecord::SIZE);
                assert!(r.iter().all(|&b| b == r[0]), "record torn at step {step}");
                seen.push(r[0]);
            })
            .unwrap();
            let want: Vec<u8> = (0..count).map(|i| (i % 251) as u8).collect();
            assert_eq!(seen, want, "step {step}");
            assert_eq!(buf.capacity(), READ_CHUNK, "step {step}");
        }
    }

    fn spawn(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    /// Kills and reaps its children and removes the pin directory and the
    /// test's cgroup, even when an assertion fails first.
    struct CleanUp(Vec<u32>, std::path::PathBuf, Option<std::path::PathBuf>);

    impl Drop for CleanUp {
        fn drop(&mut self) {
            for &pid in &self.0 {
                if let Some(pid) = Pid::from_raw(pid as i32) {
                    let _ = kill_process(pid, Signal::KILL);
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
            }
            let _ = std::fs::remove_dir(&self.1);
            if let Some(cgroup) = &self.2 {
                let _ = std::fs::remove_dir(cgroup);
            }
        }
    }

    fn pid_of(c: &Child) -> Pid {
        Pid::from_raw(c.id() as i32).unwrap()
    }

    /// Whether the kernel's `tally_watched` has `pid`'s bit.
    fn watched_in_kernel(stats: &ProcessStats, pid: u32) -> bool {
        stats
            .watched
            .get(&(pid / 64), 0)
            .is_ok_and(|w| w & (1 << (pid % 64)) != 0)
    }

    /// `/proc`'s own answer, through the cache's reader.
    fn proc_stat(pid: u32) -> Stat {
        ProcFs::default().stat(pid).unwrap()
    }

    /// One cycle's answer from the iterator for each of `pids`.
    fn cycle(stats: &mut ProcessStats, pids: &[u32]) -> Vec<io::Result<Stat>> {
        stats.begin_cycle();
        pids.iter().map(|&p| stats.stat(p)).collect()
    }

    #[test]
    fn the_iterator_says_what_proc_stat_says() {
        // Needs root (CAP_BPF and CAP_PERFMON for a tracing program).
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: loading the task iterator needs root");
            return;
        }
        let dir = Path::new("/sys/fs/bpf").join(format!("tally-task-test-{}", std::process::id()));
        let mut clean_up = CleanUp(Vec::new(), dir.clone(), None);
        let pin = PinDir::open(&dir).unwrap();
        let mut stats = start(&pin).unwrap();
        // Five processes on a machine of hundreds of tasks: passes anyway.
        stats.thresholds = (u64::MAX, u64::MAX);

        let sleeping = spawn("exec sleep 60");
        let stopped = spawn("exec sleep 60");
        kill_process(pid_of(&stopped), Signal::STOP).unwrap();
        let mut zombie = spawn("exit 0");
        let spinning = spawn("while :; do :; done");
        let mut reaped = spawn("exec sleep 60");
        let children = [sleeping, stopped, spinning];
        let pids: Vec<u32> = children
            .iter()
            .chain([&zombie, &reaped])
            .map(Child::id)
            .collect();
        clean_up.0.clone_from(&pids);
        // Until the zombie is one and the stopped one stopped.
        for _ in 0..100 {
            let states = [proc_stat(pids[1]).state, proc_stat(pids[3]).state];
            if states == [b'T', b'Z'] {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        // First asked: read from `/proc`, and watched from then on.
        let first = cycle(&mut stats, &pids);
        assert!(first.iter().all(Result::is_ok), "{first:?}");
        assert_eq!(stats.watching.len(), pids.len());
        assert_eq!(stats.passes, 0, "nothing watched yet, no pass");

        let (from_iter, from_proc): (Vec<Stat>, Vec<Stat>) = {
            let it = cycle(&mut stats, &pids);
            let proc: Vec<Stat> = pids.iter().map(|&p| proc_stat(p)).collect();
            (it.into_iter().map(Result::unwrap).collect(), proc)
        };
        assert_eq!(stats.passes, 1);
        for (i, (it, proc)) in from_iter.iter().zip(&from_proc).enumerate() {
            let pid = pids[i];
            // The spinner can block for a moment (a page fault on a loaded
            // machine) between the two reads: running or sleeping, either.
            if i == 2 && it.state != proc.state {
                assert!(
                    [it.state, proc.state]
                        .iter()
                        .all(|s| matches!(s, b'R' | b'S')),
                    "state of the spinner {pid}: {} against {}",
                    it.state as char,
                    proc.state as char
                );
            } else {
                assert_eq!(it.state as char, proc.state as char, "state of {pid}");
            }
            assert_eq!(it.start_time, proc.start_time, "start time of {pid}");
            // /proc rounds utime and stime down each; the spinner also ran
            // between the two reads.
            let slack = if i == 2 { 20 } else { 1 };
            assert!(
                it.cpu_ticks <= proc.cpu_ticks + 1 && proc.cpu_ticks <= it.cpu_ticks + slack,
                "CPU ticks of {pid}: iterator {} /proc {}",
                it.cpu_ticks,
                proc.cpu_ticks
            );
        }
        assert_eq!((from_iter[1].state, from_iter[3].state), (b'T', b'Z'));

        // Placement: the inode of the cgroup v2 directory /proc/<pid>/cgroup
        // names, and the owner of /proc/<pid>.
        let root = crate::cgroupfs::unified_root().expect("a cgroup v2 hierarchy");
        let cgroup_dir = |pid: u32| {
            let cgroup = crate::cgroupfs::cgroup_of(pid).unwrap();
            root.join(cgroup.trim_start_matches('/'))
        };
        for (&pid, it) in pids[..3].iter().zip(&from_iter) {
            let placement = it.placement.expect("placed by the pass");
            let owner = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
            assert_eq!(
                placement,
                Placement {
                    cgroup_id: std::fs::metadata(cgroup_dir(pid)).unwrap().ino(),
                    euid: u64::from(owner),
                },
                "placement of {pid}"
            );
        }
        // Moved to a cgroup of its own (beneath this test's): the next
        // pass says so.
        let moved = cgroup_dir(std::process::id()).join(format!("tally-task-test-{}", pids[0]));
        std::fs::create_dir(&moved).unwrap();
        clean_up.2 = Some(moved.clone());
        std::fs::write(moved.join("cgroup.procs"), pids[0].to_string()).unwrap();
        let after_move = cycle(&mut stats, &pids[..1]).remove(0).unwrap();
        assert_eq!(
            after_move.placement.map(|p| p.cgroup_id),
            Some(std::fs::metadata(&moved).unwrap().ino()),
            "the move is seen"
        );

        // The spinner's CPU time moves, the sleeper's does not.
        std::thread::sleep(Duration::from_millis(300));
        let later = cycle(&mut stats, &pids);
        let later: Vec<Stat> = later.into_iter().map(Result::unwrap).collect();
        assert!(
            later[2].cpu_ticks >= from_iter[2].cpu_ticks + 10,
            "{later:?}"
        );
        assert_eq!(later[0].cpu_ticks, from_iter[0].cpu_ticks);

        // Reaped: gone, as a failed `/proc` read says; forgotten, unwatched.
        reaped.kill().unwrap();
        reaped.wait().unwrap();
        zombie.wait().unwrap();
        let after = cycle(&mut stats, &pids);
        for i in [3, 4] {
            let e = after[i].as_ref().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{}: {e}", pids[i]);
        }
        stats.forget(pids[4]);
        assert!(!stats.watching.contains_key(&pids[4]));
        assert!(
            !watched_in_kernel(&stats, pids[4]) && watched_in_kernel(&stats, pids[0]),
            "removed from the kernel map"
        );

        drop(stats);
        drop(pin);
        drop(children);
    }

    #[test]
    fn state_letters_follow_the_kernel() {
        // (__state, exit_state, letter); TASK_KILLABLE (0x102), frozen
        // (0x8000) and RT-lock waits (0x1000) show as D.
        let cases = [
            (0, 0, b'R'),
            (0x1, 0, b'S'),
            (0x2, 0, b'D'),
            (0x102, 0, b'D'),
            (0x4, 0, b'T'),
            (0x8, 0, b't'),
            (0x80, 0x20, b'Z'),
            (0x80, 0x10, b'X'),
            (0x40, 0, b'P'),
            (0x402, 0, b'I'),
            (0x8001, 0, b'D'),
            (0x1000, 0, b'D'),
        ];
        for (state, exit_state, letter) in cases {
            assert_eq!(
                state_letter(state, exit_state) as char,
                letter as char,
                "{state:#x} {exit_state:#x}"
            );
        }
    }

    #[test]
    fn a_pass_runs_where_gpu_processes_are_a_good_part_of_the_node() {
        let t = (PASS_UP_TO, PROC_ABOVE);
        // Benchmark 1's node: 512 GPU processes among ~650 tasks.
        assert!(pass_pays(false, 650, 512, t));
        // Eight GPU processes on a node of 5,000 threads.
        assert!(!pass_pays(true, 5_000, 8, t));
        // Between the two lines the last choice holds.
        assert!(pass_pays(true, 500, 100, t));
        assert!(!pass_pays(false, 500, 100, t));
        assert!(!pass_pays(true, 601, 100, t));
        assert!(pass_pays(false, 400, 100, t));
        // Nothing followed: nothing to pass over.
        assert!(!pass_pays(true, 100, 0, t));
    }

    #[test]
    fn the_node_task_count_is_the_loadavg_denominator() {
        let n = NodeTasks::open().count().unwrap();
        assert!(n >= 1, "{n}");
    }
}
