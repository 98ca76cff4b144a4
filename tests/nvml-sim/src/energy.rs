//! Each GPU's energy counter: ∫ power dt as a left Riemann sum, shared
//! through `.energy/<index>` by every process that loads the simulator with
//! one state directory (README, "energy").
//!
//! The contract steps the sum on every device query, at the power computed
//! then. Steps at an unchanged power add up to one step over their whole
//! span (integer picojoules: exactly), so the file only changes when a
//! query finds a power other than the stored one, or a reset marker: the
//! integral is kept in memory as its last segment (start, sum, power) and
//! read as `sum + power × (now − start)`. An energy query still reads the
//! file under a shared lock, so a segment another process started is seen.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::unix::fs::FileExt,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{sim::Code, sim::code, state};

/// The integral since the start of its last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// When the segment started, ns since the epoch.
    start_ns: u128,
    /// The integral up to `start_ns`, picojoules (mW × ns).
    picojoules: u128,
    /// Power over the segment, mW.
    power_mw: u64,
}

impl Segment {
    fn picojoules_at(&self, now_ns: u128) -> u128 {
        self.picojoules + u128::from(self.power_mw) * now_ns.saturating_sub(self.start_ns)
    }

    /// Closes this segment at `now_ns` and starts one at `power_mw`.
    fn then(self, now_ns: u128, power_mw: u64) -> Segment {
        Segment {
            start_ns: self.start_ns.max(now_ns),
            picojoules: self.picojoules_at(now_ns),
            power_mw,
        }
    }

    fn parse(text: &[u8]) -> Option<Segment> {
        let text = std::str::from_utf8(text).ok()?;
        let mut words = text.split_whitespace().map(str::parse::<u128>);
        let (Some(Ok(start_ns)), Some(Ok(picojoules)), Some(Ok(power)), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        Some(Segment {
            start_ns,
            picojoules,
            power_mw: u64::try_from(power).unwrap_or(0),
        })
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn to_mj(picojoules: u128) -> u64 {
    (picojoules / 1_000_000_000) as u64
}

/// One GPU's counter in this process.
#[derive(Debug, Default)]
struct Counter {
    /// `.energy/<index>`, kept open (state directory only).
    file: Option<File>,
    /// The segment as this process last read or wrote it.
    seen: Option<Segment>,
}

/// The energy counters of one initialized simulator.
#[derive(Debug)]
pub(crate) struct Energy {
    /// The state directory; `None`: counters live in this process only.
    dir: Option<PathBuf>,
    counters: HashMap<u32, Counter>,
}

impl Energy {
    pub(crate) fn new(dir: Option<PathBuf>) -> Energy {
        Energy {
            dir,
            counters: HashMap::new(),
        }
    }

    /// A device query of `gpu` at `power_mw`: starts a new segment when the
    /// power differs from the stored one, or restarts the counter from 0
    /// when `reset/<gpu>` was seen (and this query is the one to remove it).
    pub(crate) fn advance(&mut self, gpu: u32, power_mw: u64, reset: bool) -> Result<(), Code> {
        let counter = self.counters.entry(gpu).or_default();
        match (&self.dir, counter.seen) {
            (_, Some(seen)) if seen.power_mw == power_mw && !reset => Ok(()),
            (None, seen) => {
                let now = now_ns();
                counter.seen = Some(start_or_step(seen, now, power_mw));
                Ok(())
            }
            (Some(_), _) => self.rewrite(gpu, power_mw).map(|_| ()),
        }
    }

    /// The counter of `gpu` now, mJ, after [`Energy::advance`] at `power_mw`.
    pub(crate) fn read_mj(&mut self, gpu: u32, power_mw: u64) -> Result<u64, Code> {
        if self.dir.is_none() {
            let counter = self.counters.entry(gpu).or_default();
            let seen = *counter.seen.get_or_insert(Segment {
                start_ns: now_ns(),
                picojoules: 0,
                power_mw,
            });
            return Ok(to_mj(seen.picojoules_at(now_ns())));
        }
        match self.read_shared(gpu) {
            Ok(Some((seg, now))) if seg.power_mw == power_mw => {
                self.counters.entry(gpu).or_default().seen = Some(seg);
                Ok(to_mj(seg.picojoules_at(now)))
            }
            // Another process stored another power (or nothing yet): close
            // its interval and store ours, as every query does.
            Ok(_) => self.rewrite(gpu, power_mw),
            Err(err) => Err(self.failed(gpu, &err)),
        }
    }

    fn path(&self, gpu: u32) -> Option<PathBuf> {
        self.dir.as_deref().map(|d| state::energy_file(d, gpu))
    }

    fn failed(&self, gpu: u32, err: &io::Error) -> Code {
        let path = self.path(gpu).unwrap_or_default();
        eprintln!("nvml-sim: {}: {err}", path.display());
        code::UNKNOWN
    }

    /// The open energy file of `gpu`, created on first use.
    fn file(&mut self, gpu: u32) -> io::Result<&File> {
        let path = self.path(gpu).expect("only called with a state directory");
        let counter = self.counters.entry(gpu).or_default();
        if counter.file.is_none() {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            counter.file = Some(f);
        }
        Ok(counter.file.as_ref().expect("just opened"))
    }

    /// The stored segment and the time it was read at, under a shared lock.
    fn read_shared(&mut self, gpu: u32) -> io::Result<Option<(Segment, u128)>> {
        let f = self.file(gpu)?;
        f.lock_shared()?;
        let read = read_segment(f);
        // Read the clock under the lock so it is ordered with the writers'.
        let now = now_ns();
        f.unlock()?;
        Ok(read?.map(|s| (s, now)))
    }

    /// Closes the stored interval at its power, stores `power_mw` (and
    /// consumes a reset marker), under an exclusive lock; returns the
    /// counter in mJ.
    fn rewrite(&mut self, gpu: u32, power_mw: u64) -> Result<u64, Code> {
        let dir = self
            .dir
            .clone()
            .expect("only called with a state directory");
        let result = (|| -> io::Result<Segment> {
            let f = self.file(gpu)?;
            f.lock()?;
            let done = (|| {
                let prev = read_segment(f)?;
                let now = now_ns();
                let mut seg = start_or_step(prev, now, power_mw);
                // A driver reload: the counter restarts from 0, once per marker.
                let reset = state::reset_file(&dir, gpu);
                if reset.exists() && fs::remove_file(&reset).is_ok() {
                    seg.picojoules = 0;
                }
                let line = format!("{} {} {}\n", seg.start_ns, seg.picojoules, seg.power_mw);
                f.set_len(0)?;
                f.write_all_at(line.as_bytes(), 0)?;
                Ok(seg)
            })();
            f.unlock()?;
            done
        })();
        match result {
            Ok(seg) => {
                self.counters.entry(gpu).or_default().seen = Some(seg);
                Ok(to_mj(seg.picojoules))
            }
            Err(err) => Err(self.failed(gpu, &err)),
        }
    }
}

/// The first segment (the counter starts at 0 now), or the next one.
fn start_or_step(prev: Option<Segment>, now_ns: u128, power_mw: u64) -> Segment {
    match prev {
        None => Segment {
            start_ns: now_ns,
            picojoules: 0,
            power_mw,
        },
        Some(prev) => prev.then(now_ns, power_mw),
    }
}

fn read_segment(f: &File) -> io::Result<Option<Segment>> {
    let mut buf = [0u8; 128];
    let mut len = 0;
    loop {
        let n = f.read_at(&mut buf[len..], len as u64)?;
        if n == 0 || len + n == buf.len() {
            len += n;
            break;
        }
        len += n;
    }
    Ok(Segment::parse(&buf[..len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_at_one_power_add_up_to_one_step() {
        let s0 = start_or_step(None, 1_000, 700_000);
        let stepped = s0.then(1_500, 700_000).then(4_000, 700_000);
        assert_eq!(stepped.picojoules_at(9_000), s0.picojoules_at(9_000));
        let changed = s0.then(4_000, 70_000);
        assert_eq!(
            changed.picojoules_at(9_000),
            700_000 * 3_000 + 70_000 * 5_000
        );
    }

    #[test]
    fn segments_parse_as_written() {
        let s = Segment {
            start_ns: 1_764_000_000_000_000_000,
            picojoules: 42,
            power_mw: 385_000,
        };
        let line = format!("{} {} {}\n", s.start_ns, s.picojoules, s.power_mw);
        assert_eq!(Segment::parse(line.as_bytes()), Some(s));
        assert_eq!(Segment::parse(b""), None);
        assert_eq!(Segment::parse(b"1 2"), None);
        assert_eq!(Segment::parse(b"1 2 3 4"), None);
    }
}
