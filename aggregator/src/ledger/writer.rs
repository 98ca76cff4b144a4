//! Group commit on SQLite: one thread writes every report, committing all
//! the reports queued meanwhile in one transaction (one fsync for many),
//! instead of a pool of connections queueing for SQLite's single write
//! lock. Each caller is answered only once its report's transaction has
//! committed. The thread has its own rusqlite connection: the statements
//! run where they are made ([`super::tx`]).

use std::{
    future::Future,
    path::Path,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use rusqlite::Connection;
use tally_contract::wire::Report;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

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
        // As the pool's connections (`Ledger::open`): a committed report
        // survives power loss; a reader or the maintenance pass holding
        // the lock is waited for; rows refer to their report.
        //
        // And the sub-journal in memory: each report's savepoint copies
        // every page it changes first, and past 64 KiB SQLite spilled
        // those copies to a temporary file, a `pwrite` per page and its
        // header (20 % of the writer's time, BENCHMARKS.md § 6). A
        // report changes a few hundred KiB; nothing there needs to
        // survive a crash, as the WAL holds what commits.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;",
        )?;
        conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        // Every statement of a report's write, kept prepared.
        conn.set_prepared_statement_cache_capacity(64);
        let (jobs, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("tally-ledger".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| LedgerError::Thread(format!("cannot start the ledger writer: {e}")))?;
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

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = rx.blocking_recv() {
        batch.push(job);
        while batch.len() < MAX_BATCH
            && let Ok(job) = rx.try_recv()
        {
            batch.push(job);
        }
        commit(&mut conn, &mut batch);
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
/// A report whose statements fail, or that is not stored, is rolled back
/// to its savepoint and answered with the error or outcome; the others
/// still commit.
///
/// Savepoints are not free: each copies every page its report changes
/// before changing it (7 % of the writer's time, BENCHMARKS.md § 6). So
/// a batch is first written without them, and only one in which a
/// report left something to undo (an error, or an expired claim) is
/// rolled back whole and written again, each report under its own.
fn commit(conn: &mut Connection, batch: &mut Vec<Job>) {
    let result = match transaction(conn, batch, false) {
        Ok(Some(outcomes)) => Ok(outcomes),
        Ok(None) => transaction(conn, batch, true)
            .map(|o| o.expect("with savepoints every report is settled")),
        Err(e) => Err(e),
    };
    match result {
        Ok(outcomes) => {
            for (job, out) in batch.drain(..).zip(outcomes) {
                let _ = job.done.send(out);
            }
        }
        Err(e) => {
            warn!(error = %e, reports = batch.len(), "group commit failed");
            let e = Arc::new(e);
            for job in batch.drain(..) {
                let _ = job.done.send(Err(LedgerError::GroupCommit(e.clone())));
            }
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
