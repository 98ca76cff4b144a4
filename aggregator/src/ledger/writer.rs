//! Group commit on SQLite: one task writes every report, committing all
//! the reports queued meanwhile in one transaction (one fsync for many),
//! instead of a pool of connections queueing for SQLite's single write
//! lock. Each caller is answered only once its report's transaction has
//! committed.

use std::sync::Arc;

use sqlx::{Acquire, AnyPool};
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
    /// Starts the writer task on `pool`.
    pub(super) fn start(pool: AnyPool) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, rx));
        Self { jobs }
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

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&pool, &mut batch).await;
    }
}

/// Writes every job of `batch` in one transaction and answers each one.
/// A report whose statements fail is rolled back to its savepoint and
/// answered with the error; the others still commit.
async fn commit(pool: &AnyPool, batch: &mut Vec<Job>) {
    let mut outcomes: Vec<Result<Ingested, LedgerError>> = Vec::with_capacity(batch.len());
    let result: Result<(), sqlx::Error> = async {
        let mut tx = pool.begin().await?;
        for job in batch.iter() {
            let mut savepoint = tx.begin().await?;
            let written = super::ingest::write(
                &mut savepoint,
                &job.report,
                &job.digest,
                job.received_ms,
                &job.keys,
            )
            .await;
            match written {
                Ok(out) => {
                    savepoint.commit().await?;
                    outcomes.push(Ok(out));
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    outcomes.push(Err(e.into()));
                }
            }
        }
        tx.commit().await
    }
    .await;
    match result {
        Ok(()) => {
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
