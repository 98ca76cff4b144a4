//! The durable usage ledger on SQLite or PostgreSQL (sqlx's `Any` driver,
//! one schema per dialect, migrations embedded and run at start). Every
//! SQL statement of the aggregator lives under this module; the views
//! ([`crate::chargeback`], [`crate::cluster`]) are built from what it
//! returns and never see a connection.
//!
//! A report and everything in it is written in one transaction that first
//! claims `(node, boot_id, seq)`: a retry finds the claim and is
//! acknowledged without writing, so each report is stored exactly once,
//! also with several aggregator replicas on one PostgreSQL. Each table
//! gets one multi-row statement per report. On SQLite, one writer thread
//! commits every report queued meanwhile in one transaction (group
//! commit, [`writer`], on rusqlite: [`tx`]); on PostgreSQL each request
//! writes its own, in parallel, on a pool of sqlx's PostgreSQL driver:
//! the claim, the node's row, then every other table in one statement,
//! each column of rows one array ([`tx`]).
//!
//! The same transaction adds the report to hourly rollups, keyed by node,
//! so no row is written by every node's reports. Chargeback reads the
//! rollups for the whole hours of a period and the raw rows only for the
//! partial hours at its edges. A background tick ([`Ledger::maintain`])
//! folds the per-node hourly rollups into node-less ones for chargeback
//! by tenant, and into the cluster totals `/metrics` reads ([`fold`],
//! [`totals`]), and removes rows past their retention ([`retention`]; on
//! PostgreSQL by dropping day partitions, [`partitions`]).

use std::{
    path::{Path, PathBuf},
    sync::Once,
};

use sqlx::{
    AnyPool, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

/// The hours with reports received since the fold's watermark (the row
/// [`fold::WATERMARK`] names): those the next fold re-folds, and that
/// readers read per node until then. A `SELECT` of `hour_ms`, to which a
/// caller may add conditions with `AND`. One definition for the fold,
/// chargeback and the totals, whose sums are exact only if they agree on
/// it. Before the modules, as the macro below.
macro_rules! unfolded_hours {
    () => {
        "SELECT DISTINCT (interval_end_ms / 3600000) * 3600000 AS hour_ms FROM reports \
         WHERE received_ms >= (SELECT received_ms FROM rollup_watermark \
         WHERE name = 'tenant_hourly')"
    };
}

/// The statement adding `$3` reports, seqs `$4` to `$5`, last interval
/// end `$6`, to the row of node `$1`, boot `$2` of `$table`: one of the
/// per-boot tallies, `boot_reports` (what ingest stored) and
/// `claims_removed` (what retention removed). Before the modules: a
/// `macro_rules!` is seen only below it.
macro_rules! add_to_boot_row {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS t (node, boot_id, reports, first_seq, last_seq, last_interval_end_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (node, boot_id) DO UPDATE SET \
             reports = t.reports + excluded.reports, \
             first_seq = CASE WHEN excluded.first_seq < t.first_seq \
             THEN excluded.first_seq ELSE t.first_seq END, \
             last_seq = CASE WHEN excluded.last_seq > t.last_seq \
             THEN excluded.last_seq ELSE t.last_seq END, \
             last_interval_end_ms = CASE WHEN excluded.last_interval_end_ms > \
             t.last_interval_end_ms THEN excluded.last_interval_end_ms \
             ELSE t.last_interval_end_ms END"
        )
    };
}

pub(crate) mod audit;
pub(crate) mod chargeback;
pub(crate) mod cluster;
pub(crate) mod energy;
mod fold;
pub(crate) mod ingest;
mod partitions;
mod retention;
mod rows;
mod sqlite;
pub(crate) mod totals;
mod tx;
mod writer;

pub(crate) use retention::{Cutoffs, Maintained};

/// Longest wait for a PostgreSQL connection. sqlx's default, 30 s, is
/// spent retrying a refused connection while the server is down: every
/// report and `/readyz` would hang that long instead of answering 503
/// soon. (A SQLite file does not go away; there the wait is only for a
/// busy pool, and the default stays.)
const POSTGRES_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LedgerError {
    /// The database could not be reached or refused a statement.
    #[error("ledger database: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite refused a statement of the writer or of a period read
    /// (rusqlite: [`writer`], [`sqlite`]).
    #[error("ledger database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The thread of a SQLite read or of the writer could not run.
    #[error("ledger thread: {0}")]
    Thread(String),
    /// The schema migrations failed.
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The group commit that carried the report failed; nothing of it
    /// was stored.
    #[error("group commit: {0}")]
    GroupCommit(std::sync::Arc<LedgerError>),
    /// A sum over the period does not fit in 64 bits (the database
    /// refuses the same when it sums).
    #[error("a sum over the period is out of range of 64-bit integers")]
    SumOverflow,
    /// The SQLite write-ahead log could not be flushed to disk: what
    /// was committed since the last flush may not survive a power loss,
    /// and nothing is acknowledged until the aggregator restarts (after
    /// a failed flush, the next can succeed without the lost pages).
    #[error("the ledger's log could not be made durable ({0}); restart the aggregator")]
    NotDurable(std::sync::Arc<std::io::Error>),
    /// The SQLite writer thread has stopped (the aggregator is shutting
    /// down).
    #[error("the ledger's writer has stopped")]
    WriterStopped,
    /// A SQLite ledger must be a file: the period reads open it again
    /// ([`sqlite`]), and an in-memory database would not be durable.
    #[error(
        "ledger url {0:?}: a SQLite ledger needs a file, e.g. sqlite:///var/lib/tally/ledger.db"
    )]
    NotAFile(String),
    /// The SQLite file's directory could not be created.
    #[error("cannot create {path}: {source}")]
    Directory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Which database is behind the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// The ledger: a connection pool, and on each backend what goes past it.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    pool: AnyPool,
    side: Side,
}

/// What each backend does past the pool.
#[derive(Debug, Clone)]
enum Side {
    Sqlite(SqliteSide),
    /// The pool ingest writes reports with, on sqlx's PostgreSQL driver,
    /// which binds a column of rows as one array (`Any` binds no arrays;
    /// see [`tx`]). As large as the other pool.
    Postgres(sqlx::PgPool),
}

/// What a SQLite ledger does on rusqlite rather than on the pool: write
/// reports (the group-commit writer) and read periods.
#[derive(Debug, Clone)]
struct SqliteSide {
    writer: writer::Writer,
    reads: sqlite::Reads,
}

/// A count from the wire as SQL's BIGINT (saturating).
pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A URL sqlx accepts, its backend and, on SQLite, its file: SQLite
/// files are created (with their directory).
fn prepare_url(url: &str) -> Result<(String, Backend, Option<PathBuf>), LedgerError> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let file = path.split('?').next().unwrap_or(path);
        if file.is_empty() || file == ":memory:" || url.contains("mode=memory") {
            return Err(LedgerError::NotAFile(url.to_owned()));
        }
        if let Some(dir) = Path::new(file).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        let url = if url.contains("mode=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        Ok((url, Backend::Sqlite, Some(PathBuf::from(file))))
    } else {
        Ok((url.to_owned(), Backend::Postgres, None))
    }
}

/// The pool's limits on `backend`.
fn pool_options(backend: Backend, max_connections: u32) -> AnyPoolOptions {
    let pool = AnyPoolOptions::new().max_connections(max_connections);
    match backend {
        Backend::Postgres => pool.acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT),
        Backend::Sqlite => pool,
    }
}

impl Ledger {
    /// Connects and brings the schema up to date.
    pub(crate) async fn open(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (url, backend, file) = prepare_url(url)?;
        let options: AnyConnectOptions = url.parse()?;
        let pool = pool_options(backend, max_connections)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers do not block the writer; FULL: a
                        // committed report survives power loss too.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    } else {
                        // No JIT: PostgreSQL cannot estimate the reads'
                        // CTEs, their guessed costs crossed the JIT
                        // thresholds, and compiling took 0.15-1.8 s of
                        // chargeback reads that run in milliseconds.
                        conn.execute("SET jit = off").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE.run(&pool).await?,
            Backend::Postgres => POSTGRES.run(&pool).await?,
        }
        let side = match file {
            Some(file) => Side::Sqlite(SqliteSide {
                writer: writer::Writer::start(&file)?,
                reads: sqlite::Reads::new(file),
            }),
            None => Side::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
                    .connect_lazy(&url)?,
            ),
        };
        let ledger = Self { pool, side };
        // Today's partitions before the first report; until they exist
        // rows wait in the default partition, so a failure only warns.
        if backend == Backend::Postgres
            && let Err(e) = ledger.create_partitions(crate::time::now_ms()).await
        {
            tracing::warn!(error = %e, "day partitions not created yet; retrying each maintenance pass");
        }
        Ok(ledger)
    }

    /// Which database is behind the ledger.
    pub(crate) fn backend(&self) -> Backend {
        match self.side {
            Side::Sqlite(_) => Backend::Sqlite,
            Side::Postgres(_) => Backend::Postgres,
        }
    }

    /// Whether the database answers.
    pub(crate) async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite ledger is a file, which the period reads open again; an
    /// in-memory one is refused by name, not opened empty.
    #[test]
    fn a_sqlite_ledger_must_be_a_file() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite:",
            "sqlite://x.db?mode=memory",
        ] {
            let e = prepare_url(url).unwrap_err();
            assert!(matches!(e, LedgerError::NotAFile(_)), "{url}: {e}");
            assert!(e.to_string().contains("needs a file"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/ledger.db");
        let (url, backend, at) = prepare_url(&format!("sqlite://{}", file.display())).unwrap();
        assert_eq!(backend, Backend::Sqlite);
        assert_eq!(at.as_deref(), Some(file.as_path()));
        assert!(url.ends_with("?mode=rwc"), "{url}");
        assert!(file.parent().unwrap().is_dir());
        let (_, backend, at) = prepare_url("postgres://h/db").unwrap();
        assert_eq!((backend, at), (Backend::Postgres, None));
    }

    /// A PostgreSQL that is down must get a 503 to agents well within
    /// their `[report] timeout` (10 s by default), not hang every request
    /// for sqlx's 30 s (seen in `tests/e2e/tests/partition.rs`).
    #[test]
    fn a_postgres_connection_is_waited_for_less_than_an_agent_waits() {
        let pg = pool_options(Backend::Postgres, 4).get_acquire_timeout();
        assert_eq!(pg, POSTGRES_ACQUIRE_TIMEOUT);
        assert!(pg < std::time::Duration::from_secs(10));
        // SQLite keeps sqlx's patience for a busy pool.
        assert!(
            pool_options(Backend::Sqlite, 4).get_acquire_timeout()
                >= std::time::Duration::from_secs(30)
        );
    }
}
