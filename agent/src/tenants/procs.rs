//! The process cache: what each GPU process's tenant was derived from,
//! kept across sampling cycles, so that a steady node costs one small
//! `/proc/<pid>/stat` read per process per cycle and no allocation.
//!
//! - **Reused pids.** An entry is keyed by pid and checked against the
//!   start time in that cycle's `stat` (field 22): a different start time
//!   is another process, read afresh.
//! - **Moved processes.** A process moved to another cgroup (or that
//!   changed its uid) keeps its pid and start time, and nothing cheap
//!   tells that it moved: inotify does not watch `/proc/<pid>/cgroup`, and
//!   its old cgroup directory may well still exist. So every entry re-reads
//!   `/proc/<pid>/cgroup` once every [`REVALIDATE_EVERY`] cycles, spread over
//!   pids so each cycle re-reads about 1/16 of them: a move is seen within
//!   that many intervals (16 s at the default 1 s), and meanwhile the
//!   process is charged to the tenant it had.
//! - **Gone pids.** Entries of pids not reported in a cycle are evicted at
//!   its end ([`ProcCache::end_cycle`]).
//!
//! The same `stat` read gives the state machine the process state and its
//! CPU ticks ([`ProcCache::obs`]), so each holder's `stat` is read once per
//! cycle however many devices (MIG instances and their parent) it holds.

use std::{collections::HashMap, io, io::Read as _};

use super::Attribution;
use crate::{
    paths,
    states::{ProcObs, ProcState},
};

/// Every how many cycles a cached process's cgroup is read again.
pub const REVALIDATE_EVERY: u64 = 16;

/// What one read of `/proc/<pid>/stat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `D`, `Z`, `T`, …).
    pub state: u8,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks: with the pid, a process's
    /// identity.
    pub start_time: u64,
}

/// Where the cache learns about processes: `/proc` ([`ProcFs`]), or a fake
/// in tests.
pub trait ProcSource: Send + std::fmt::Debug {
    /// `/proc/<pid>/stat`; an error when the process is gone.
    fn stat(&mut self, pid: u32) -> io::Result<Stat>;
    /// The cgroup v2 path of `pid`, when readable.
    fn cgroup(&mut self, pid: u32) -> Option<String>;
}

/// The real `/proc`, with buffers reused between reads.
#[derive(Debug, Default)]
pub struct ProcFs {
    path: String,
    buf: Vec<u8>,
}

impl ProcSource for ProcFs {
    fn stat(&mut self, pid: u32) -> io::Result<Stat> {
        // By hand rather than through `procfs`: its `Stat` owns the command
        // name and a path per read, an allocation per process per cycle.
        paths::proc_stat_into(&mut self.path, pid);
        self.buf.clear();
        std::fs::File::open(&self.path)?.read_to_end(&mut self.buf)?;
        parse_stat(&self.buf).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot parse {}", self.path),
            )
        })
    }

    fn cgroup(&mut self, pid: u32) -> Option<String> {
        crate::cgroupfs::cgroup_of(pid).ok()
    }
}

/// Fields 3 (state), 14 + 15 (utime, stime) and 22 (start time) of a
/// `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may hold spaces and `)`, so fields are counted after the last `)`.
pub fn parse_stat(line: &[u8]) -> Option<Stat> {
    let close = line.iter().rposition(|&b| b == b')')?;
    let mut fields = line[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    let state = *fields.next()?.first()?;
    // After the state (field 3): fields 4..=13 are skipped to reach 14.
    let utime = number(fields.nth(10)?)?;
    let stime = number(fields.next()?)?;
    let start_time = number(fields.nth(6)?)?;
    Some(Stat {
        state,
        cpu_ticks: utime + stime,
        start_time,
    })
}

#[derive(Debug)]
struct Entry {
    /// The cycle this pid was last reported in.
    seen: u64,
    /// That cycle's `stat` (`None`: the process is gone).
    stat: Option<Stat>,
    /// Start time and cycle of the last cgroup read, and the attribution
    /// it gave (without a workload, which is derived afresh each cycle).
    facts: Option<(u64, u64, Attribution)>,
}

/// pid → what its tenant was derived from; see the module docs.
#[derive(Debug)]
pub struct ProcCache {
    /// Where `stat` and `cgroup` are read (the resolver reads a process's
    /// cgroup through it when the cache has none).
    pub(super) source: Box<dyn ProcSource>,
    entries: HashMap<u32, Entry>,
    cycle: u64,
}

impl Default for ProcCache {
    fn default() -> Self {
        Self::new(Box::<ProcFs>::default())
    }
}

impl ProcCache {
    pub fn new(source: Box<dyn ProcSource>) -> Self {
        Self {
            source,
            entries: HashMap::new(),
            // Entries start at `seen: 0`: cycle 0 would never read them.
            cycle: 1,
        }
    }

    /// Starts a sampling cycle: each pid's `stat` is read afresh once.
    pub fn begin_cycle(&mut self) {
        self.cycle += 1;
    }

    /// Ends a cycle: forgets the pids it did not report.
    pub fn end_cycle(&mut self) {
        let cycle = self.cycle;
        self.entries.retain(|_, e| e.seen == cycle);
    }

    /// How many processes are cached.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn visit(&mut self, pid: u32) -> &mut Entry {
        let cycle = self.cycle;
        let source = &mut self.source;
        let entry = self.entries.entry(pid).or_insert_with(|| Entry {
            seen: 0,
            stat: None,
            facts: None,
        });
        if entry.seen != cycle {
            entry.seen = cycle;
            entry.stat = source.stat(pid).ok();
        }
        entry
    }

    /// The cached facts of `pid` when they still hold this cycle: same
    /// start time, and not due for its periodic re-read. A process that
    /// ended since keeps what it was.
    pub fn cached(&mut self, pid: u32) -> Option<Attribution> {
        let cycle = self.cycle;
        let entry = self.visit(pid);
        let (start, checked, facts) = entry.facts.as_ref()?;
        let fresh = match entry.stat {
            None => true,
            Some(st) => {
                st.start_time == *start
                    && (*checked == cycle
                        || !(cycle + u64::from(pid)).is_multiple_of(REVALIDATE_EVERY))
            }
        };
        fresh.then(|| facts.clone())
    }

    /// Remembers what `pid` was attributed from this cycle; not kept for a
    /// process already gone (its start time is unknown).
    pub fn store(&mut self, pid: u32, attribution: &Attribution) {
        let cycle = self.cycle;
        let entry = self.visit(pid);
        entry.facts = entry.stat.map(|st| {
            let facts = Attribution {
                tenant: attribution.tenant.clone(),
                cgroup: attribution.cgroup.clone(),
                workload: None,
            };
            (st.start_time, cycle, facts)
        });
    }

    /// The state machine's view of `pid` this cycle, from the same `stat`
    /// read.
    pub fn obs(&mut self, pid: u32) -> ProcObs {
        match self.visit(pid).stat {
            None => ProcObs {
                pid,
                state: ProcState::Gone,
                cpu_ticks: None,
            },
            Some(st) => ProcObs {
                pid,
                state: match st.state {
                    b'Z' | b'X' => ProcState::Zombie,
                    b'D' => ProcState::DiskSleep,
                    b'T' | b't' => ProcState::Stopped,
                    _ => ProcState::Alive,
                },
                cpu_ticks: Some(st.cpu_ticks),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A `/proc` held in memory, shared with the test that changes it.

    use std::sync::{Arc, Mutex};

    use super::*;

    /// A process: start time, cgroup, and how often each file was read.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct Proc {
        pub(crate) start_time: u64,
        pub(crate) state: u8,
        pub(crate) cgroup: String,
    }

    #[derive(Debug, Default)]
    pub(crate) struct Table {
        pub(crate) procs: HashMap<u32, Proc>,
        pub(crate) stat_reads: u64,
        pub(crate) cgroup_reads: u64,
    }

    #[derive(Debug, Clone, Default)]
    pub(crate) struct FakeProc(pub(crate) Arc<Mutex<Table>>);

    impl FakeProc {
        pub(crate) fn set(&self, pid: u32, start_time: u64, cgroup: &str) {
            self.0.lock().unwrap().procs.insert(
                pid,
                Proc {
                    start_time,
                    state: b'S',
                    cgroup: cgroup.to_owned(),
                },
            );
        }

        pub(crate) fn reads(&self) -> (u64, u64) {
            let t = self.0.lock().unwrap();
            (t.stat_reads, t.cgroup_reads)
        }
    }

    impl ProcSource for FakeProc {
        fn stat(&mut self, pid: u32) -> io::Result<Stat> {
            let mut t = self.0.lock().unwrap();
            t.stat_reads += 1;
            let p = t.procs.get(&pid).ok_or(io::ErrorKind::NotFound)?;
            Ok(Stat {
                state: p.state,
                cpu_ticks: 0,
                start_time: p.start_time,
            })
        }

        fn cgroup(&mut self, pid: u32) -> Option<String> {
            let mut t = self.0.lock().unwrap();
            t.cgroup_reads += 1;
            t.procs.get(&pid).map(|p| p.cgroup.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a `)` (field 2).
        let line = b"4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
            70 30 0 0 20 0 1 0 987654 10000 200 18446744073709551615\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: b'S',
                cpu_ticks: 100,
                start_time: 987654
            })
        );
        assert_eq!(parse_stat(b"1 (x) S 1 2"), None);
        assert_eq!(parse_stat(b""), None);
    }

    #[test]
    fn own_stat_is_read_from_proc() {
        let mut fs = ProcFs::default();
        let me = fs.stat(std::process::id()).unwrap();
        assert!(me.state.is_ascii_uppercase());
        assert!(me.start_time > 0);
        // Same process, same identity.
        assert_eq!(
            fs.stat(std::process::id()).unwrap().start_time,
            me.start_time
        );
        assert!(fs.stat(u32::MAX).is_err());
    }
}
