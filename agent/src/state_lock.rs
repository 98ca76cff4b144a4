//! One agent per state directory: an exclusive `flock` on
//! `<state_dir>/agent.lock`, held for the agent's life.
//!
//! Two agents on one directory would share the report state, the spool
//! and the audit log and lose usage without noticing (a DaemonSet rolling
//! update with `maxSurge`, a second agent started by hand). The second one
//! waits for the lock instead and takes over when the first exits; the
//! kernel releases the lock when its holder dies, however it dies. The
//! file holds the holder's pid, for the waiter's log and `/readyz`.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

/// How often a waiting agent tries the lock again.
const RETRY: Duration = Duration::from_millis(200);

/// The held lock; released when dropped (or by the kernel at exit).
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

/// Another agent holds the lock.
#[derive(Debug)]
pub struct Busy {
    file: File,
    /// The lock file.
    pub path: PathBuf,
    /// The holder's pid, as it wrote it.
    pub holder: Option<u32>,
}

impl Busy {
    /// Why this agent is not ready, for `/readyz` and the log.
    pub fn reason(&self) -> String {
        let holder = self
            .holder
            .map_or_else(|| "another tally agent".to_owned(), |p| format!("pid {p}"));
        format!(
            "waiting for the state directory lock {} held by {holder}",
            self.path.display()
        )
    }

    /// Waits until the holder lets go, trying every [`RETRY`]; `None` when
    /// `shutdown` comes first.
    pub async fn wait(self, shutdown: &CancellationToken) -> Option<io::Result<StateLock>> {
        let mut file = self.file;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(RETRY) => {}
            }
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Some(mark(lock)),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, e)) => return Some(Err(e.into())),
            }
        }
    }
}

/// Takes the lock of `state_dir` (creating both) if no other agent holds it.
pub fn try_lock(state_dir: &Path) -> io::Result<Result<StateLock, Busy>> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(crate::paths::STATE_LOCK_FILE);
    // Not truncated here: the holder's pid must survive a waiter's open.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => mark(lock).map(Ok),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            Ok(Err(Busy { file, path, holder }))
        }
        Err((_, e)) => Err(e.into()),
    }
}

/// Writes this process's pid into the held lock file.
fn mark(lock: Flock<File>) -> io::Result<StateLock> {
    let mut f: &File = &lock;
    f.set_len(0)?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    Ok(StateLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_holder_waits_names_the_first_and_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock(dir.path()).unwrap().expect("free lock");
        let busy = try_lock(dir.path()).unwrap().expect_err("held lock");
        assert_eq!(busy.holder, Some(std::process::id()));
        assert!(
            busy.reason()
                .contains(&format!("pid {}", std::process::id()))
        );

        let shutdown = CancellationToken::new();
        let waiter = tokio::spawn(async move { busy.wait(&shutdown).await });
        tokio::time::sleep(RETRY * 5).await;
        assert!(!waiter.is_finished(), "took a held lock");
        drop(first);
        let second = waiter.await.unwrap().expect("no shutdown").unwrap();
        assert!(try_lock(dir.path()).unwrap().is_err());
        drop(second);
        assert!(try_lock(dir.path()).unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let _first = try_lock(dir.path()).unwrap().unwrap();
        let busy = try_lock(dir.path()).unwrap().unwrap_err();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(busy.wait(&shutdown).await.is_none());
    }
}
