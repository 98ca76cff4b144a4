//! How a waiter for XID events sleeps: woken by the kernel when `xid/`
//! changes (inotify), as a real driver's `nvmlEventSetWait` blocks in the
//! kernel, instead of waking every 20 ms to list the directory. Those
//! wake-ups were a third of the agent's CPU on an idle node (BENCHMARKS.md,
//! benchmark 1), all of it the simulator's. Without inotify (the instance
//! limit reached) the waiter polls every 20 ms, as before.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread::sleep,
    time::Duration,
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    fd::OwnedFd,
    fs::inotify::{self, CreateFlags, WatchFlags},
    io::Errno,
};

use crate::state;

/// Polling interval without inotify.
const POLL: Duration = Duration::from_millis(20);

/// Changes that may bring an XID: a file created, renamed in or written.
const CHANGES: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::CLOSE_WRITE);

/// Wakes a waiter when `xid/` (or, until it exists, the state directory,
/// where `xid/` will be made) changes. One per event set, made with it:
/// the agent waits 500 ms at a time, and each wait would otherwise open
/// and close an inotify instance.
#[derive(Debug)]
pub(crate) struct XidChanges {
    fd: Option<OwnedFd>,
    xid: PathBuf,
    /// Whether `xid/` itself is watched yet.
    watching_xid: AtomicBool,
}

impl XidChanges {
    /// Watches from now: a change after this call wakes [`Self::wait`],
    /// whatever the waiter looked at in between (changes between waits
    /// are kept for the next one).
    pub(crate) fn new(state_dir: &Path) -> XidChanges {
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).ok();
        let mut w = XidChanges {
            fd,
            xid: state::xid_dir(state_dir),
            watching_xid: AtomicBool::new(false),
        };
        if let Some(fd) = &w.fd
            && inotify::add_watch(fd, state_dir, WatchFlags::CREATE | WatchFlags::MOVED_TO).is_err()
        {
            w.fd = None;
        }
        w.watch_xid();
        w
    }

    fn watch_xid(&self) {
        if let Some(fd) = &self.fd
            && !self.watching_xid.load(Ordering::Relaxed)
            // Watching a path twice is one watch: waiters may race here.
            && inotify::add_watch(fd, &self.xid, CHANGES).is_ok()
        {
            self.watching_xid.store(true, Ordering::Relaxed);
        }
    }

    /// Sleeps until something changed or `left` passed.
    pub(crate) fn wait(&self, left: Duration) {
        let Some(fd) = &self.fd else {
            sleep(left.min(POLL));
            return;
        };
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => sleep(left.min(POLL)),
        }
        // Drain what woke us; the caller looks at the directory itself.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(fd, &mut buf);
        while reader.next().is_ok() {}
        // `xid/` may have just been made.
        self.watch_xid();
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Instant};

    use super::*;

    /// The wait ends on the change, not at its 60 s timeout: first when
    /// `xid/` is made, then when an XID file appears in it, then for a
    /// file written between waits.
    #[test]
    fn a_waiter_wakes_when_xid_changes() {
        let state = tempfile::tempdir().unwrap();
        let changes = XidChanges::new(state.path());
        assert!(changes.fd.is_some(), "inotify is available here");
        let xid = state::xid_dir(state.path());
        let woke = |changes: &XidChanges, change: &(dyn Fn() + Sync)| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    change();
                });
                let t = Instant::now();
                changes.wait(Duration::from_secs(60));
                t.elapsed()
            })
        };
        let first = woke(&changes, &|| fs::create_dir(&xid).unwrap());
        assert!(first < Duration::from_secs(30), "slept {first:?}");
        assert!(changes.watching_xid.load(Ordering::Relaxed));
        let second = woke(&changes, &|| {
            fs::write(xid.join("x.toml"), "gpu = 0\nxid = 79\n").unwrap()
        });
        assert!(second < Duration::from_secs(30), "slept {second:?}");
        // One watcher serves every wait of its set: a change while nobody
        // waited ends the next wait at once.
        fs::write(xid.join("y.toml"), "gpu = 0\nxid = 31\n").unwrap();
        let t = Instant::now();
        changes.wait(Duration::from_secs(60));
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "slept {:?}",
            t.elapsed()
        );
    }
}
