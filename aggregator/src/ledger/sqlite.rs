//! Period reads on SQLite, decoded in place (rusqlite) on a blocking
//! thread of their own.
//!
//! Why not sqlx here: its SQLite driver copies every value a statement
//! returns (`sqlite3_value_dup`, one `malloc` each) on its worker thread
//! and hands each row over a channel, and the `Any` driver converts it
//! again on the runtime thread; a month's chargeback by node (400,000
//! rows) spent about half of its time there. rusqlite reads each column
//! straight from the statement into the group's fields, through the same
//! SQLite library sqlx links (one `libsqlite3-sys`). Reports are written
//! on rusqlite too, for the same reason ([`super::writer`]); migrations,
//! maintenance and the small reads stay on sqlx.

use std::{path::PathBuf, sync::Arc};

use rusqlite::{Connection, OpenFlags, Row, Statement};

use super::{
    LedgerError,
    tx::{Args, bind_numbered},
};

/// How long a statement waits for another connection's lock, as the
/// pool's connections do (`busy_timeout`).
pub(super) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A type read from a row by column name: its fields' names and how to
/// build it from the columns at those names' positions.
pub(crate) trait Decode: Sized {
    /// The columns it is built from, in the order `decode` takes them.
    const COLUMNS: &'static [&'static str];
    /// Builds it from `row`, `at[i]` being the position of `COLUMNS[i]`.
    fn decode(row: &Row<'_>, at: &[usize]) -> rusqlite::Result<Self>;
}

/// Implements [`Decode`] for a struct whose every field is a column of
/// the same name (the struct literal names each field, so a field left
/// out does not compile).
macro_rules! decoded_by_name {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::ledger::sqlite::Decode for $ty {
            const COLUMNS: &'static [&'static str] = &[$(stringify!($field)),+];
            fn decode(row: &rusqlite::Row<'_>, at: &[usize]) -> rusqlite::Result<Self> {
                let mut at = at.iter().copied();
                Ok($ty {
                    $($field: row.get(at.next().unwrap_or(usize::MAX))?),+
                })
            }
        }
    };
}
pub(crate) use decoded_by_name;

/// The ledger's SQLite file, opened afresh by each period read.
#[derive(Debug, Clone)]
pub(super) struct Reads {
    file: Arc<PathBuf>,
}

impl Reads {
    pub(super) fn new(file: PathBuf) -> Self {
        Self {
            file: Arc::new(file),
        }
    }

    /// Runs `query` with `params` (`$1`, `$2`, …) and decodes every row
    /// as `T`.
    pub(super) async fn period<T>(
        &self,
        query: String,
        params: Args<'static>,
    ) -> Result<Vec<T>, LedgerError>
    where
        T: Decode + Send + 'static,
    {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || read(&file, &query, &params))
            .await
            .map_err(|e| LedgerError::Thread(e.to_string()))?
    }
}

fn read<T: Decode>(
    file: &std::path::Path,
    query: &str,
    params: &Args<'_>,
) -> Result<Vec<T>, LedgerError> {
    // Read-only, and without SQLite's per-connection mutex: the
    // connection lives on this one thread.
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mut stmt = conn.prepare(query)?;
    bind_numbered(&mut stmt, params)?;
    let at = positions::<T>(&stmt)?;
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(T::decode(row, &at)?);
    }
    Ok(out)
}

/// Where each of `T`'s columns is in the statement's result.
fn positions<T: Decode>(stmt: &Statement<'_>) -> rusqlite::Result<Vec<usize>> {
    T::COLUMNS
        .iter()
        .map(|name| stmt.column_index(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tx::args;

    #[derive(Debug, PartialEq)]
    struct Pair {
        name: String,
        count: i64,
        share: f64,
    }
    decoded_by_name!(Pair { name, count, share });

    fn file_with_rows() -> (tempfile::TempDir, Reads) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.db");
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (name TEXT, count INTEGER, at INTEGER, cluster TEXT);
             INSERT INTO t VALUES ('a', 1, 10, 'x'), ('b', 2, 20, 'y'), ('c', 3, 30, 'x');",
        )
        .unwrap();
        (dir, Reads::new(file))
    }

    /// Columns are found by name whatever their order, parameters by
    /// name whatever the order they first appear in, integers read as a
    /// double where the field is one.
    #[tokio::test]
    async fn rows_are_decoded_by_column_name_and_bound_by_parameter_name() {
        let (_dir, reads) = file_with_rows();
        let params = |cluster: Option<&str>| {
            let mut p = args([10.into(), 31.into(), 20.into(), 30.into()]);
            if let Some(c) = cluster {
                let Ok(()) = p.add(c.to_owned());
            }
            p
        };
        let query = "SELECT count * 1.5 AS share, count, name FROM t \
                     WHERE at >= $3 AND at < $2 AND at >= $1 AND at <> $4 ORDER BY name";
        let rows: Vec<Pair> = reads.period(query.into(), params(None)).await.unwrap();
        assert_eq!(
            rows,
            [Pair {
                name: "b".into(),
                count: 2,
                share: 3.0
            }]
        );
        let query = "SELECT name, count, count AS share FROM t \
                     WHERE at >= $1 AND at < $2 AND cluster = $5 ORDER BY name";
        let rows: Vec<Pair> = reads.period(query.into(), params(Some("x"))).await.unwrap();
        let names: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.share)).collect();
        assert_eq!(names, [("a", 1.0), ("c", 3.0)]);
    }

    /// A column the type needs but the query does not return, a NULL
    /// where the field is an integer, or a missing file are errors that
    /// name the problem, never a default.
    #[tokio::test]
    async fn a_missing_column_or_null_is_an_error() {
        let (dir, reads) = file_with_rows();
        let params = || args([0.into(), 100.into(), 0.into(), 100.into()]);
        let e = reads
            .period::<Pair>("SELECT name, count FROM t".into(), params())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("share"), "{e}");
        let e = reads
            .period::<Pair>(
                "SELECT name, NULL AS count, 1.0 AS share FROM t".into(),
                params(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Null"), "{e}");
        let gone = Reads::new(dir.path().join("absent.db"));
        assert!(
            gone.period::<Pair>("SELECT 1".into(), params())
                .await
                .is_err()
        );
    }
}
