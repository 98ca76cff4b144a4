//! Group commit on SQLite: one thread writes every report, committing all
//! the reports queued meanwhile in one transaction (one fsync for many),
//! instead of a pool of connections queueing for SQLite's single write
//! lock. Each caller is answered only once its report's transaction has
//! committed. The thread has its own rusqlite connection: the statements
//! run where they are made ([`super::tx`]).
//!
//! Two more threads take work off the writer's path:
//! - the syncer flushes the write-ahead log to disk after each commit and
//!   only then answers the batch's callers, while the writer already
//!   writes the next batch (SQLite would flush inside the commit: a
//!   fifth of the writer's time went waiting on it, BENCHMARKS.md § 6);
//! - the checkpointer copies the committed log into the database file,
//!   which SQLite would otherwise do inside a commit every 1,000 pages.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::pin,
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender},
    },
    task::{Context, Poll, Waker},
};

use rusqlite::Connection;
use tally_contract::wire::Report;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{LedgerError, ingest::Ingested};
use crate::audit_keys::NodeKeys;

/// Most reports in one transaction: bounds how long the first of them
/// waits for the rest to be written.
const MAX_BATCH: usize = 256;

/// Reports waiting for the writer; a full queue makes callers wait.
const QUEUE: usize = 1024;

/// One report to write and where its outcome goes.
struct Job {
    report: Report,
    digest: String,
    received_ms: i64,
    keys: Arc<NodeKeys>,
    done: oneshot::Sender<Result<Ingested, LedgerError>>,
}

/// The handle to the writer task; the task ends when every handle is
/// dropped.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Opens `file` for writing and starts the writer thread on it.
    pub(super) fn start(file: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open(file)?;
        // As the pool's connections (`Ledger::open`): a reader or the
        // maintenance pass holding the lock is waited for; rows refer to
        // their report. A committed report survives power loss as there
        // (`synchronous = FULL`), but through the syncer: with `NORMAL`
        // SQLite writes the log without flushing it, and the syncer
        // flushes it before anyone is answered. (A reader may see a
        // report some milliseconds before it is durable.)
        //
        // And the sub-journal in memory: each report's savepoint copies
        // every page it changes first, and past 64 KiB SQLite spilled
        // those copies to a temporary file, a `pwrite` per page and its
        // header (20 % of the writer's time, BENCHMARKS.md § 6). A
        // report changes a few hundred KiB; nothing there needs to
        // survive a crash, as the WAL holds what commits.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;",
        )?;
        conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        // Checkpoints are the checkpointer's; the writer's own, past
        // `WAL_LIMIT` pages, only bounds the log should the checkpointer
        // fall behind. The log is written from its start again once a
        // checkpoint has copied all of it.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_LIMIT)?;
        // Every statement of a report's write, kept prepared.
        conn.set_prepared_statement_cache_capacity(64);
        let checkpointer = Connection::open(file)?;
        checkpointer.execute_batch("PRAGMA synchronous = FULL;")?;
        let (kick, kicked) = std::sync::mpsc::sync_channel(1);
        spawn("tally-checkpoint", move || {
            checkpoints(&checkpointer, &kicked)
        })?;
        let wal = wal_file(file);
        let (committed, to_sync) = std::sync::mpsc::sync_channel(SYNC_QUEUE);
        spawn("tally-sync", move || syncs(&wal, &to_sync))?;
        let (jobs, rx) = mpsc::channel(QUEUE);
        spawn("tally-ledger", move || run(conn, rx, &committed, &kick))?;
        Ok(Self { jobs })
    }

    /// Queues `r` and waits until it is durable (or refused).
    pub(super) async fn ingest(
        &self,
        r: &Report,
        digest: &str,
        received_ms: i64,
        keys: &Arc<NodeKeys>,
    ) -> Result<Ingested, LedgerError> {
        let (done, outcome) = oneshot::channel();
        let job = Job {
            report: r.clone(),
            digest: digest.to_owned(),
            received_ms,
            keys: keys.clone(),
            done,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| LedgerError::WriterStopped)?;
        outcome.await.map_err(|_| LedgerError::WriterStopped)?
    }
}

/// The write-ahead log's pages past which the writer checkpoints itself
/// (SQLite's default is 1,000): 16 MiB of 4 KiB pages.
const WAL_LIMIT: i64 = 4096;

/// How often at most the checkpointer copies the log: SQLite's default
/// checkpoint came every 1,000 pages, ~10 times a second at § 6's rates.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Committed batches waiting for the syncer; a full queue makes the
/// writer wait.
const SYNC_QUEUE: usize = 4;

/// A committed batch's callers, each with its report's outcome.
type Answers = Vec<(
    oneshot::Sender<Result<Ingested, LedgerError>>,
    Result<Ingested, LedgerError>,
)>;

/// Starts the thread `name` running `f`.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), LedgerError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| LedgerError::Thread(format!("cannot start the ledger's {name} thread: {e}")))
}

/// The write-ahead log of the SQLite database `file`.
fn wal_file(file: &Path) -> PathBuf {
    let mut wal = file.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// The writer: commits what is queued, batch after batch, hands each
/// committed batch to the syncer (`committed`) and tells the
/// checkpointer (`kick`) that the log grew. Both end with it, when their
/// channels close. Not inlined: BENCHMARKS.md § 6 counts the
/// instructions inside it.
#[inline(never)]
fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    committed: &SyncSender<Answers>,
    kick: &SyncSender<()>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = rx.blocking_recv() {
        batch.push(job);
        while batch.len() < MAX_BATCH
            && let Ok(job) = rx.try_recv()
        {
            batch.push(job);
        }
        if let Some(answers) = commit(&mut conn, &mut batch) {
            // Fails only if the syncer is gone (it panicked): its
            // callers then see the writer stopped.
            let _ = committed.send(answers);
            // Full: a checkpoint is due already, and will see this commit.
            let _ = kick.try_send(());
        }
    }
}

/// The syncer: flushes the write-ahead log `wal` to disk (its data, as
/// SQLite's own commit does) and only then answers a committed batch;
/// one flush covers every batch committed before it. After a failed
/// flush every later batch is answered with that error: Linux may have
/// dropped the pages it could not write, and a later flush would not
/// say so.
fn syncs(wal: &Path, committed: &Receiver<Answers>) {
    let mut failed: Option<Arc<std::io::Error>> = None;
    while let Ok(answers) = committed.recv() {
        if failed.is_none()
            && let Err(e) = std::fs::File::open(wal).and_then(|f| f.sync_data())
        {
            error!(
                error = %e,
                wal = %wal.display(),
                "the ledger's log could not be made durable; no report is acknowledged until \
                 the aggregator restarts"
            );
            failed = Some(Arc::new(e));
        }
        for (done, out) in answers {
            let _ = done.send(match &failed {
                Some(e) => Err(LedgerError::NotDurable(e.clone())),
                None => out,
            });
        }
    }
}

/// The checkpointer: after each commit it is told of, and at most every
/// [`CHECKPOINT_EVERY`], copies the committed log into the database file
/// (`PASSIVE`: the writer's commits go on meanwhile; what a reader still
/// reads from the log stays for the next one).
fn checkpoints(conn: &Connection, kicked: &Receiver<()>) {
    while kicked.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            warn!(error = %e, "ledger checkpoint failed; the writer's own bounds the log");
        }
        std::thread::sleep(CHECKPOINT_EVERY);
    }
}

/// Runs `f`, whose every await is a rusqlite statement (synchronous): it
/// is done on its first poll.
fn at_once<T>(f: impl Future<Output = T>) -> T {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("a rusqlite statement never waits"),
    }
}

/// Runs one of the transaction's own statements.
fn run_sql(conn: &Connection, sql: &str) -> Result<(), LedgerError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Writes every job of `batch` in one transaction and answers each one.
/// A report whose statements fail, or that is refused as expired, is
/// rolled back to its savepoint and answered with the error or outcome;
/// the others still commit.
///
/// Savepoints are not free: each copies every page its report changes
/// before changing it (7 % of the writer's time, BENCHMARKS.md § 6). So
/// a batch is first written without them, and only one in which a
/// report left something to undo (an error, or an expired claim) is
/// rolled back whole and written again, each report under its own.
///
/// Returns the committed batch's answers, for the syncer to send; a batch
/// that failed to commit is answered here, with the error.
fn commit(conn: &mut Connection, batch: &mut Vec<Job>) -> Option<Answers> {
    let result = match transaction(conn, batch, false) {
        Ok(Some(outcomes)) => Ok(outcomes),
        Ok(None) => transaction(conn, batch, true)
            .map(|o| o.expect("with savepoints every report is settled")),
        Err(e) => Err(e),
    };
    match result {
        Ok(outcomes) => Some(batch.drain(..).map(|job| job.done).zip(outcomes).collect()),
        Err(e) => {
            warn!(error = %e, reports = batch.len(), "group commit failed");
            let e = Arc::new(e);
            for job in batch.drain(..) {
                let _ = job.done.send(Err(LedgerError::GroupCommit(e.clone())));
            }
            None
        }
    }
}

/// Writes `batch` in one transaction, each report under a savepoint of
/// its own where `savepoints`, and commits: every report's outcome. Or,
/// without savepoints, `None` where a report left something to undo: the
/// transaction is then rolled back. On an error it is rolled back too.
fn transaction(
    conn: &mut Connection,
    batch: &[Job],
    savepoints: bool,
) -> Result<Option<Vec<Result<Ingested, LedgerError>>>, LedgerError> {
    let rollback = |conn: &Connection| {
        // SQLite ends some transactions itself on an error (a full disk).
        if !conn.is_autocommit()
            && let Err(r) = run_sql(conn, "ROLLBACK")
        {
            warn!(error = %r, "group commit: rollback failed");
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    let written = (|| {
        // The write lock now, not at the first write: a reader's lock is
        // waited for here rather than turned into a busy error mid-way.
        run_sql(conn, "BEGIN IMMEDIATE")?;
        for job in batch {
            if savepoints {
                run_sql(conn, "SAVEPOINT report")?;
            }
            let written = at_once(super::ingest::write(
                conn,
                &job.report,
                &job.digest,
                job.received_ms,
                &job.keys,
            ));
            // Only a stored report keeps what it wrote. A duplicate or a
            // conflict wrote nothing; an expired one has claimed its
            // (node, boot, seq) before it was refused.
            let undo = matches!(written, Err(_) | Ok(Ingested::Expired));
            if savepoints {
                if undo {
                    run_sql(conn, "ROLLBACK TO report")?;
                }
                run_sql(conn, "RELEASE report")?;
            } else if undo {
                return Ok(false);
            }
            outcomes.push(written);
        }
        run_sql(conn, "COMMIT")?;
        Ok(true)
    })();
    match written {
        Ok(true) => Ok(Some(outcomes)),
        Ok(false) => {
            rollback(conn);
            Ok(None)
        }
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ledger::{chargeback::tests::sqlite_ledger, ingest::tests::report};

    /// Reports queued together commit together; one whose statements fail
    /// is rolled back to its savepoint, answered with the error, and the
    /// others of its transaction are stored all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_report_leaves_the_rest_of_its_batch_stored() {
        let (dir, ledger) = sqlite_ledger(2).await;
        sqlx::query(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON gpu_usage WHEN NEW.tenant = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'boom is refused'); END",
        )
        .execute(&ledger.pool)
        .await
        .unwrap();
        let keys = Arc::new(NodeKeys::default());
        // Hold the write lock so that the writer waits on its first
        // batch while the next three reports queue behind it.
        let file = dir.path().join("ledger.db");
        let holder = Connection::open(&file).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let send = |r: Report| {
            let (ledger, keys) = (ledger.clone(), keys.clone());
            tokio::spawn(async move { ledger.ingest(&r, &r.digest(), 1, &keys).await })
        };
        let first = send(report("n0", 1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut boom = report("n2", 1);
        boom.gpu_usage[0].tenant = "boom".into();
        let queued = [send(report("n1", 1)), send(boom), send(report("n3", 1))];
        tokio::time::sleep(Duration::from_millis(200)).await;
        holder.execute_batch("COMMIT").unwrap();
        assert!(matches!(first.await.unwrap(), Ok(Ingested::Stored { .. })));
        let [a, b, c] = queued;
        assert!(matches!(a.await.unwrap(), Ok(Ingested::Stored { .. })));
        let e = b.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("boom is refused"), "{e}");
        assert!(matches!(c.await.unwrap(), Ok(Ingested::Stored { .. })));
        let nodes: Vec<String> = sqlx::query_scalar("SELECT node FROM reports ORDER BY node")
            .fetch_all(&ledger.pool)
            .await
            .unwrap();
        // The refused report's claim of its (node, boot, seq) went with it.
        assert_eq!(nodes, ["n0", "n1", "n3"]);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM io_usage")
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
        assert_eq!(rows, 3);
    }

    /// The checkpointer copies what the writer commits into the database
    /// file itself, far below the writer's own bound: read as an
    /// immutable file (the log ignored), the file holds every report.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_reports_reach_the_database_file() {
        let (dir, ledger) = sqlite_ledger(2).await;
        let keys = Arc::new(NodeKeys::default());
        for seq in 1..=20 {
            let r = report("n1", seq);
            ledger.ingest(&r, &r.digest(), 1, &keys).await.unwrap();
        }
        let file = format!(
            "file:{}?immutable=1",
            dir.path().join("ledger.db").display()
        );
        let in_file = || -> i64 {
            let conn = Connection::open_with_flags(
                &file,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            // No table yet where the migrations are still in the log.
            conn.query_row("SELECT COUNT(*) FROM reports", [], |r| r.get(0))
                .unwrap_or(-1)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while in_file() < 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(in_file(), 20);
    }

    /// The syncer answers a batch once the log is flushed. Once a flush
    /// has failed (here: no log to flush), that batch and every later
    /// one are answered with the failure, even where the log is back.
    #[test]
    fn nothing_is_answered_as_stored_after_a_failed_flush() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("ledger.db-wal");
        let (committed, to_sync) = std::sync::mpsc::sync_channel(4);
        let syncer = {
            let wal = wal.clone();
            std::thread::spawn(move || syncs(&wal, &to_sync))
        };
        let batch = || {
            let (done, answer) = oneshot::channel();
            let stored = Ingested::Stored {
                audit_breaks: vec![],
            };
            (vec![(done, Ok(stored))], answer)
        };
        std::fs::write(&wal, b"frames").unwrap();
        let (answers, flushed) = batch();
        committed.send(answers).unwrap();
        assert!(matches!(
            flushed.blocking_recv().unwrap(),
            Ok(Ingested::Stored { .. })
        ));
        std::fs::remove_file(&wal).unwrap();
        let (answers, lost) = batch();
        committed.send(answers).unwrap();
        let e = lost.blocking_recv().unwrap().unwrap_err();
        assert!(matches!(e, LedgerError::NotDurable(_)), "{e}");
        assert!(e.to_string().contains("restart the aggregator"), "{e}");
        std::fs::write(&wal, b"frames").unwrap();
        let (answers, later) = batch();
        committed.send(answers).unwrap();
        assert!(matches!(
            later.blocking_recv().unwrap(),
            Err(LedgerError::NotDurable(_))
        ));
        drop(committed);
        syncer.join().unwrap();
    }

    /// One batch of every outcome: stored, duplicate, conflict and
    /// expired. Only the expired one has written something to undo (its
    /// claim), and the batch is written again under savepoints: each
    /// report is answered as alone, and only the stored ones remain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_every_outcome_keeps_only_what_was_stored() {
        let (dir, ledger) = sqlite_ledger(2).await;
        let keys = Arc::new(NodeKeys::default());
        let before = report("n0", 1);
        ledger
            .ingest(&before, &before.digest(), 1, &keys)
            .await
            .unwrap();
        // Retention removed n9's claims through seq 5.
        sqlx::query(
            "INSERT INTO claims_removed (node, boot_id, reports, first_seq, last_seq, \
             last_interval_end_ms) VALUES ('n9', 'boot', 5, 1, 5, 0)",
        )
        .execute(&ledger.pool)
        .await
        .unwrap();
        let holder = Connection::open(dir.path().join("ledger.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let send = |r: Report, digest: String| {
            let (ledger, keys) = (ledger.clone(), keys.clone());
            tokio::spawn(async move { ledger.ingest(&r, &digest, 1, &keys).await })
        };
        let blocked = send(report("n1", 1), report("n1", 1).digest());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let queued = [
            send(report("n2", 1), report("n2", 1).digest()),
            send(before.clone(), before.digest()),
            send(before.clone(), "other".into()),
            send(report("n9", 4), report("n9", 4).digest()),
            send(report("n3", 1), report("n3", 1).digest()),
        ];
        tokio::time::sleep(Duration::from_millis(200)).await;
        holder.execute_batch("COMMIT").unwrap();
        assert!(matches!(
            blocked.await.unwrap(),
            Ok(Ingested::Stored { .. })
        ));
        let mut outcomes = Vec::new();
        for q in queued {
            outcomes.push(q.await.unwrap().unwrap());
        }
        let stored = Ingested::Stored {
            audit_breaks: vec![],
        };
        assert_eq!(
            outcomes,
            [
                stored.clone(),
                Ingested::Duplicate,
                Ingested::Conflict,
                Ingested::Expired,
                stored
            ]
        );
        let nodes: Vec<String> = sqlx::query_scalar("SELECT node FROM reports ORDER BY node")
            .fetch_all(&ledger.pool)
            .await
            .unwrap();
        assert_eq!(nodes, ["n0", "n1", "n2", "n3"]);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gpu_usage")
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
        assert_eq!(rows, 4);
    }
}
