//! The process cache: what each GPU process's tenant was derived from,
//! kept across sampling cycles, so that a steady node costs one small
//! `/proc/<pid>/stat` read per process per cycle and no allocation.
//!
//! - **Reused pids.** An entry is keyed by pid and checked against the
//!   start time in that cycle's `stat` (field 22): a different start time
//!   is another process, read afresh.
//! - **Moved processes.** A process moved to another cgroup (or that
//!   changed its uid) keeps its pid and start time. Where the eBPF task
//!   iterator runs, it says each process's cgroup id and effective uid
//!   every cycle ([`Placement`]): a change is a move, read afresh that
//!   cycle, and nothing else is re-read. From `/proc` nothing cheap tells
//!   that a process moved: inotify does not watch `/proc/<pid>/cgroup`,
//!   and its old cgroup directory may well still exist. So there every
//!   entry re-reads `/proc/<pid>/cgroup` once every [`REVALIDATE_EVERY`]
//!   cycles, spread over pids so each cycle re-reads about 1/16 of them: a
//!   move is seen within that many intervals (16 s at the default 1 s),
//!   and meanwhile the process is charged to the tenant it had.
//! - **Gone pids.** Entries of pids not reported in a cycle are evicted at
//!   its end ([`ProcCache::end_cycle`]).
//!
//! The same `stat` read gives the state machine the process state and its
//! CPU ticks ([`ProcCache::obs`]), so each holder's `stat` is read once per
//! cycle however many devices (MIG instances and their parent) it holds.
//! Where the eBPF task iterator runs (`probes::ProcessStats`), it is the
//! cache's [`ProcSource`] and answers every followed pid's `stat` from one
//! read per cycle.

use std::{fs::File, io, io::Read as _, os::unix::fs::FileExt as _};

use super::Attribution;
use crate::{
    paths,
    pids::PidMap,
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
    /// Where the process is, where the source knows it without another
    /// read (the task iterator); `None` from `/proc`, which leaves the
    /// cache to its periodic cgroup re-reads.
    pub placement: Option<Placement>,
}

/// Where a process is, as far as its tenant goes: its cgroup v2 id and
/// effective uid, as the kernel holds them. Only compared from one cycle
/// to the next, never turned into a path or a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub cgroup_id: u64,
    pub euid: u64,
}

/// Where the cache learns about processes: `/proc` ([`ProcFs`]), the task
/// iterator, or a fake in tests.
pub trait ProcSource: Send + std::fmt::Debug {
    /// A sampling cycle starts: each pid's `stat` is asked for once.
    fn begin_cycle(&mut self) {}
    /// `/proc/<pid>/stat`; an error when the process is gone.
    fn stat(&mut self, pid: u32) -> io::Result<Stat>;
    /// The cgroup v2 path of `pid`, when readable.
    fn cgroup(&mut self, pid: u32) -> Option<String>;
    /// `pid` is no longer reported: anything kept for it can go.
    fn forget(&mut self, _pid: u32) {}
}

/// The real `/proc`, with buffers reused between reads.
///
/// Each process's `stat` file is kept open from one cycle to the next (up
/// to a quarter of the descriptor limit), so a steady read is one
/// `pread`: opening it anew walked `/proc/<pid>` in the kernel every
/// cycle, the largest part of the sampler's kernel time in profiles. The
/// open file follows the process, not the pid: once that process is
/// reaped a read fails, and the pid's file is opened afresh (a reused pid
/// then shows its new start time).
#[derive(Debug)]
pub struct ProcFs {
    path: String,
    buf: Vec<u8>,
    open: PidMap<File>,
    keep: usize,
}

impl Default for ProcFs {
    fn default() -> Self {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        Self {
            path: String::new(),
            buf: Vec::new(),
            open: PidMap::default(),
            keep: usize::try_from(limit / 4).unwrap_or(usize::MAX),
        }
    }
}

/// The whole of a `/proc` file from its start into `buf`.
fn read_whole(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.reserve(1024);
    loop {
        let len = buf.len();
        if len == buf.capacity() {
            buf.reserve(len);
        }
        let room = buf.capacity() - len;
        buf.resize(len + room, 0);
        let n = file.read_at(&mut buf[len..], len as u64)?;
        buf.truncate(len + n);
        // A `/proc` file is generated whole: a short read is its end, and
        // the extra read for an empty one is saved.
        if n < room {
            return Ok(());
        }
    }
}

impl ProcSource for ProcFs {
    fn stat(&mut self, pid: u32) -> io::Result<Stat> {
        // By hand rather than through `procfs`: its `Stat` owns the command
        // name and a path per read, an allocation per process per cycle.
        let kept = self.open.get(&pid).map(|f| read_whole(f, &mut self.buf));
        if !matches!(kept, Some(Ok(()))) {
            // Not kept, or its process is gone: the pid's file now.
            self.open.remove(&pid);
            paths::proc_stat_into(&mut self.path, pid);
            let file = File::open(&self.path)?;
            read_whole(&file, &mut self.buf)?;
            if self.open.len() < self.keep {
                self.open.insert(pid, file);
            }
        }
        parse_stat(&self.buf).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot parse /proc/{pid}/stat"),
            )
        })
    }

    fn forget(&mut self, pid: u32) {
        self.open.remove(&pid);
    }

    fn cgroup(&mut self, pid: u32) -> Option<String> {
        // By hand too: `procfs` opens `/proc/<pid>` first and owns a string
        // per line of every hierarchy, ~30k instructions a read.
        paths::proc_cgroup_into(&mut self.path, pid);
        self.buf.clear();
        File::open(&self.path)
            .ok()?
            .read_to_end(&mut self.buf)
            .ok()?;
        unified_cgroup(&self.buf).map(str::to_owned)
    }
}

/// The cgroup v2 path in a `/proc/<pid>/cgroup` text: the line with
/// hierarchy id `0` and no controllers, `0::<path>` (the path may itself
/// hold `:`), as [`crate::cgroupfs::Cgroups::unified`] reads it.
pub fn unified_cgroup(text: &[u8]) -> Option<&str> {
    text.split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"0::"))
        .and_then(|path| std::str::from_utf8(path).ok())
        .map(str::trim_end)
}

/// Where a `stat` line's command name ends at the latest: a pid (at most
/// 10 digits), ` (`, the name (at most 64 bytes), `)`.
const COMM_END_WITHIN: usize = 80;

/// Fields 3 (state), 14 + 15 (utime, stime) and 22 (start time) of a
/// `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may hold spaces and `)`, so fields are counted after the last `)`.
/// It runs for every GPU process every cycle, so the line the kernel
/// writes (fields parted by single spaces) is read eight bytes at a time
/// ([`fields_by_words`]); anything else goes through the byte-by-byte
/// reading ([`fields_by_bytes`]), which decides on every input.
pub fn parse_stat(line: &[u8]) -> Option<Stat> {
    // The name is at most 64 bytes (the kernel's buffer for it), so its
    // last `)` is near the start: searching back from the line's end
    // cost most of the parse.
    let head = &line[..line.len().min(COMM_END_WITHIN)];
    let close = last_close(head)?;
    let rest = &line[close + 1..];
    fields_by_words(rest).unwrap_or_else(|| fields_by_bytes(rest))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` that equals `b`. Exact: no byte's
/// sum carries into the next.
fn bytes_equal(w: u64, b: u8) -> u64 {
    let y = w ^ (ONES * u64::from(b));
    !(((y & !HIGH) + !HIGH) | y) & HIGH
}

/// The high bit of each byte of `w` at most `b' '`: the space and the
/// control bytes (every ASCII whitespace among them). Exact too.
fn bytes_low(w: u64) -> u64 {
    !(((w & !HIGH) + ONES * 0x5F) | w) & HIGH
}

/// The position of the last `)` in `head`, eight bytes at a time from the
/// end.
fn last_close(head: &[u8]) -> Option<usize> {
    let mut end = head.len();
    while end >= 8 {
        let w = u64::from_le_bytes(head[end - 8..end].try_into().expect("8 bytes"));
        let m = bytes_equal(w, b')');
        if m != 0 {
            return Some(end - 8 + (63 - m.leading_zeros() as usize) / 8);
        }
        end -= 8;
    }
    head[..end].iter().rposition(|&b| b == b')')
}

/// The fields after the command name when they are parted by single
/// spaces up to field 22, found by counting spaces a word at a time;
/// `None` for any other shape (another whitespace or control byte, two
/// spaces in a row, a line that ends first), left to [`fields_by_bytes`].
/// Where it answers, it answers as that reading would.
fn fields_by_words(rest: &[u8]) -> Option<Option<Stat>> {
    // at[n]: where the n-th space is; field n + 2 starts after it.
    let mut at = [0usize; 21];
    let (mut count, mut base, mut after_space) = (0usize, 0usize, false);
    while count < 20 {
        let chunk = rest.get(base..).filter(|c| !c.is_empty())?;
        let mut word = [b'x'; 8];
        let n = chunk.len().min(8);
        word[..n].copy_from_slice(&chunk[..n]);
        let w = u64::from_le_bytes(word);
        let mut spaces = bytes_equal(w, b' ');
        if bytes_low(w) != spaces
            || spaces & (spaces >> 8) != 0
            || (after_space && spaces & 0x80 != 0)
        {
            return None;
        }
        after_space = spaces >> 63 != 0;
        while spaces != 0 && count < 20 {
            count += 1;
            at[count] = base + spaces.trailing_zeros() as usize / 8;
            spaces &= spaces - 1;
        }
        base += 8;
    }
    if at[1] != 0 {
        return None;
    }
    let state = *rest.get(1)?;
    let start = at[20] + 1;
    let end = rest[start..]
        .iter()
        .position(u8::is_ascii_whitespace)
        .map_or(rest.len(), |n| start + n);
    if end == start {
        return None;
    }
    let read = || {
        let utime = number(&rest[at[12] + 1..at[13]])?;
        let stime = number(&rest[at[13] + 1..at[14]])?;
        Some(Stat {
            state,
            cpu_ticks: utime + stime,
            start_time: number(&rest[start..end])?,
            placement: None,
        })
    };
    Some(read())
}

/// A field of decimal digits; `None` for anything else or an overflow.
fn number(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |value, &b| {
        let digit = b.wrapping_sub(b'0');
        (digit <= 9).then_some(())?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The fields after the command name byte by byte, any whitespace parting
/// them: one pass up to field 22, digits summed as they come.
fn fields_by_bytes(rest: &[u8]) -> Option<Stat> {
    // Field number of the token being read (3 is the state); its value.
    let (mut field, mut value, mut in_token) = (2u32, 0u64, false);
    let (mut state, mut utime, mut stime) = (None, 0u64, 0u64);
    for &b in rest {
        if b.is_ascii_whitespace() {
            if in_token {
                match field {
                    14 => utime = value,
                    15 => stime = value,
                    22 => {
                        return Some(Stat {
                            state: state?,
                            cpu_ticks: utime + stime,
                            start_time: value,
                            placement: None,
                        });
                    }
                    _ => {}
                }
                in_token = false;
            }
            continue;
        }
        if !in_token {
            in_token = true;
            field += 1;
            value = 0;
            if field == 3 {
                state = Some(b);
                continue;
            }
        }
        if matches!(field, 14 | 15 | 22) {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
        }
    }
    // The line ended inside field 22.
    (in_token && field == 22).then_some(())?;
    Some(Stat {
        state: state?,
        cpu_ticks: utime + stime,
        start_time: value,
        placement: None,
    })
}

#[derive(Debug)]
struct Entry {
    /// The cycle this pid was last reported in.
    seen: u64,
    /// That cycle's `stat` (`None`: the process is gone).
    stat: Option<Stat>,
    /// What the last cgroup read was made of and gave; boxed, as the
    /// table keeps up to twice as many slots as pids.
    facts: Option<Box<Facts>>,
}

/// A cgroup read and the attribution it gave (without a workload, which
/// is derived afresh each cycle).
#[derive(Debug)]
struct Facts {
    start_time: u64,
    /// The cycle it was read in.
    cycle: u64,
    /// The process's placement in that cycle, where known.
    placement: Option<Placement>,
    attribution: Attribution,
}

/// pid → what its tenant was derived from; see the module docs.
#[derive(Debug)]
pub struct ProcCache {
    /// Where `stat` and `cgroup` are read (the resolver reads a process's
    /// cgroup through it when the cache has none).
    pub(super) source: Box<dyn ProcSource>,
    entries: PidMap<Entry>,
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
            entries: PidMap::default(),
            // Entries start at `seen: 0`: cycle 0 would never read them.
            cycle: 1,
        }
    }

    /// Starts a sampling cycle: each pid's `stat` is read afresh once.
    pub fn begin_cycle(&mut self) {
        self.cycle += 1;
        self.source.begin_cycle();
    }

    /// Ends a cycle: forgets the pids it did not report.
    pub fn end_cycle(&mut self) {
        let cycle = self.cycle;
        let source = &mut self.source;
        self.entries.retain(|&pid, e| {
            let seen = e.seen == cycle;
            if !seen {
                source.forget(pid);
            }
            seen
        });
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
    /// start time, and the same placement or, where the placement is not
    /// known, not due for its periodic re-read. A process that ended since
    /// keeps what it was.
    pub fn cached(&mut self, pid: u32) -> Option<Attribution> {
        let cycle = self.cycle;
        let entry = self.visit(pid);
        let facts = entry.facts.as_ref()?;
        let fresh = match entry.stat {
            None => true,
            Some(st) => {
                st.start_time == facts.start_time
                    && match (st.placement, facts.placement) {
                        (Some(now), Some(then)) => now == then,
                        _ => {
                            facts.cycle == cycle
                                || !(cycle + u64::from(pid)).is_multiple_of(REVALIDATE_EVERY)
                        }
                    }
            }
        };
        fresh.then(|| facts.attribution.clone())
    }

    /// Remembers what `pid` was attributed from this cycle; not kept for a
    /// process already gone (its start time is unknown).
    pub fn store(&mut self, pid: u32, attribution: &Attribution) {
        let cycle = self.cycle;
        let entry = self.visit(pid);
        let Some(st) = entry.stat else {
            entry.facts = None;
            return;
        };
        let facts = Facts {
            start_time: st.start_time,
            cycle,
            placement: st.placement,
            attribution: attribution.without_workload(),
        };
        // A re-read reuses the box: no allocation for a pid already known.
        match &mut entry.facts {
            Some(old) => **old = facts,
            none => *none = Some(Box::new(facts)),
        }
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

    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// A process: start time, cgroup, and how often each file was read.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct Proc {
        pub(crate) start_time: u64,
        pub(crate) state: u8,
        pub(crate) cgroup: String,
        /// Said with the `stat`, as the task iterator does.
        pub(crate) placement: Option<Placement>,
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
            self.insert(pid, start_time, cgroup, None);
        }

        /// Moves `pid` to `cgroup` and says where it is, as the task
        /// iterator does; `cgroup_id` stands for the directory.
        pub(crate) fn place(&self, pid: u32, start_time: u64, cgroup: &str, cgroup_id: u64) {
            let placement = Placement { cgroup_id, euid: 0 };
            self.insert(pid, start_time, cgroup, Some(placement));
        }

        fn insert(&self, pid: u32, start_time: u64, cgroup: &str, placement: Option<Placement>) {
            let proc = Proc {
                start_time,
                state: b'S',
                cgroup: cgroup.to_owned(),
                placement,
            };
            self.0.lock().unwrap().procs.insert(pid, proc);
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
                placement: p.placement,
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
                start_time: 987654,
                placement: None,
            })
        );
        assert_eq!(parse_stat(b"1 (x) S 1 2"), None);
        assert_eq!(parse_stat(b""), None);
    }

    #[test]
    fn stat_agrees_with_procfs_and_ends_at_field_22() {
        // A sleeping child, not this process: the test harness's main
        // thread flips between running and sleeping between two reads.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let read = || {
            let text = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
            let mine = parse_stat(&text).unwrap();
            let theirs = procfs::process::Process::new(pid as i32)
                .unwrap()
                .stat()
                .unwrap();
            (mine, theirs)
        };
        // Until the exec'd `sleep` sleeps, it may still be running.
        let mut tries = 0;
        let (mine, theirs) = loop {
            let (mine, theirs) = read();
            tries += 1;
            if (mine.state == b'S' && theirs.state == 'S') || tries == 200 {
                break (mine, theirs);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(mine.state, theirs.state as u8);
        assert_eq!(mine.start_time, theirs.starttime);
        // CPU ticks move while the test runs: procfs read the file later.
        assert!(mine.cpu_ticks <= theirs.utime + theirs.stime);
        // A line cut right after field 22 still parses; a number that is
        // not one does not.
        let cut = b"7 (a b) R 1 1 1 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 99";
        assert_eq!(
            parse_stat(cut),
            Some(Stat {
                state: b'R',
                cpu_ticks: 11,
                start_time: 99,
                placement: None,
            })
        );
        assert_eq!(
            parse_stat(b"7 (a) R 1 1 1 0 -1 0 0 0 0 0 5 x 0 0 20 0 1 0 99 1"),
            None
        );
        // The longest name the kernel writes (63 bytes, here all `)`)
        // after the longest pid.
        let longest = format!(
            "4294967295 ({}) S 1 1 1 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 99 1",
            ")".repeat(63)
        );
        assert_eq!(
            parse_stat(longest.as_bytes()).map(|s| s.start_time),
            Some(99)
        );
    }

    /// Lines of the kernel's shape and mutations of them (a byte put in,
    /// taken out, the line cut): the word-at-a-time reading agrees with
    /// the byte-by-byte one on every one.
    #[test]
    fn stat_by_words_agrees_with_stat_by_bytes() {
        let reference = |line: &[u8]| {
            let head = &line[..line.len().min(COMM_END_WITHIN)];
            let close = head.iter().rposition(|&b| b == b')')?;
            fields_by_bytes(&line[close + 1..])
        };
        // xorshift: the same lines every run.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let names = ["a", "a b", "x)y", ")))", "", "0123456789abcdef0123456789"];
        let bytes = b"0123456789 ) (\t\nx-S\x0b\x0c\r\xff";
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut line = format!(
                "{} ({}) {} 1 2 3 0 -1 4194560 {} 0 0 0 {} {} 0 0 20 0 1 0 {} 10000 200 5\n",
                next() % 100_000,
                names[next() as usize % names.len()],
                ["S", "R", "Z", "D"][next() as usize % 4],
                next() % 1000,
                next() % 1_000_000,
                next() % 1_000_000,
                next(),
            )
            .into_bytes();
            for _ in 0..next() % 4 {
                let at = next() as usize % (line.len() + 1);
                match next() % 3 {
                    0 => line.insert(at, bytes[next() as usize % bytes.len()]),
                    1 if at < line.len() => {
                        line.remove(at);
                    }
                    _ => line.truncate(at),
                }
            }
            let words = parse_stat(&line);
            assert_eq!(
                words,
                reference(&line),
                "{:?}",
                String::from_utf8_lossy(&line)
            );
            parsed += usize::from(words.is_some());
        }
        assert!(parsed > 5_000, "most lines parse: {parsed}");
    }

    #[test]
    fn unified_cgroup_is_the_0_line_with_colons_kept() {
        let text = b"12:memory:/user.slice\n1:name=systemd:/init.scope\n0::/tally/a:b/job1\n";
        assert_eq!(unified_cgroup(text), Some("/tally/a:b/job1"));
        assert_eq!(unified_cgroup(b"0::/\n"), Some("/"));
        assert_eq!(unified_cgroup(b"3:cpu:/x\n"), None);
        // The same answer as the `procfs` reading for this process.
        let me = std::process::id();
        assert_eq!(
            ProcFs::default().cgroup(me),
            crate::cgroupfs::cgroup_of(me).ok()
        );
        assert_eq!(ProcFs::default().cgroup(u32::MAX), None);
    }

    #[test]
    fn a_kept_stat_file_follows_its_process_until_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut fs = ProcFs::default();
        let first = fs.stat(pid).unwrap();
        assert!(fs.open.contains_key(&pid), "the file is kept");
        // The second read goes through the kept file and sees the same
        // process.
        assert_eq!(fs.stat(pid).unwrap().start_time, first.start_time);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(fs.stat(pid).is_err(), "a reaped process has no stat");
        assert!(!fs.open.contains_key(&pid), "its file is closed");
        // Forgetting closes a kept file.
        fs.stat(std::process::id()).unwrap();
        fs.forget(std::process::id());
        assert!(fs.open.is_empty());
    }

    #[test]
    fn no_more_files_are_kept_than_allowed() {
        let mut fs = ProcFs {
            keep: 0,
            ..ProcFs::default()
        };
        fs.stat(std::process::id()).unwrap();
        assert!(fs.open.is_empty());
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
