//! Where a report's statements run: one trait, [`Tx`], over the two
//! drivers, so [`super::ingest::write`] is written once.
//!
//! - **sqlx** (`AnyConnection`): PostgreSQL, each request its own
//!   transaction. A multi-row insert of up to 64 rows is one statement,
//!   its rows padded to a power of two (see [`PG_ROWS`]).
//! - **rusqlite** (`rusqlite::Connection`): the SQLite writer's thread
//!   ([`super::writer`]). Through sqlx every statement was a round trip
//!   to its worker thread and back, with each value copied on the way:
//!   the writer's core idled between statements while the runtime built
//!   the next. Here the statements run where they are made, prepared once
//!   and kept (a multi-row insert runs as statements of 16, 8, 4, 2 and 1
//!   rows, whatever its row count: a few texts SQLite does not parse
//!   again).

use std::{borrow::Cow, convert::Infallible, future::Future};

use sqlx::{AnyConnection, Arguments as _, Row as _, any::AnyArguments};

use super::LedgerError;

/// One value bound to a statement. Nulls keep their type: PostgreSQL
/// holds a prepared statement to the types it was first given.
#[derive(Debug, Clone)]
pub(super) enum Arg<'a> {
    Int(Option<i64>),
    Float(f64),
    Bool(bool),
    Text(Option<Cow<'a, str>>),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl From<f64> for Arg<'_> {
    fn from(v: f64) -> Self {
        Arg::Float(v)
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::Text(Some(Cow::Owned(v)))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(v: Option<String>) -> Self {
        Arg::Text(v.map(Cow::Owned))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v.map(Cow::Borrowed))
    }
}

/// A statement's values, in parameter order (`$1`, `$2`, … or, for a
/// multi-row insert, row after row).
#[derive(Debug, Default)]
pub(super) struct Args<'a>(Vec<Arg<'a>>);

impl<'a> Args<'a> {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Adds the next value. Never fails: a `Result` so that a row's
    /// values read `a.add(x)?; …; a.add(z)`.
    pub(super) fn add(&mut self, v: impl Into<Arg<'a>>) -> Result<(), Infallible> {
        self.0.push(v.into());
        Ok(())
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// `args`, each added.
pub(super) fn args<'a, const N: usize>(values: [Arg<'a>; N]) -> Args<'a> {
    Args(values.into())
}

/// A row's column read from either driver.
pub(super) trait Out: Sized + Send {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error>;
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

impl Out for i64 {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        row.try_get(0)
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Out for String {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        row.try_get(0)
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Out for (String, i64) {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

/// The statements a report's write needs, inside a transaction the
/// caller owns.
pub(super) trait Tx: Send {
    /// Runs `sql`, whose parameters are `$1`, `$2`, ….
    fn execute(
        &mut self,
        sql: &str,
        args: Args<'_>,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;

    /// The first row `sql` returns, if any.
    fn fetch_optional<T: Out>(
        &mut self,
        sql: &str,
        args: Args<'_>,
    ) -> impl Future<Output = Result<Option<T>, LedgerError>> + Send;

    /// `INSERT INTO {into} VALUES {rows tuples of template} {upsert}`:
    /// `template` is one row's placeholders, each `?` a value of `args`,
    /// row after row.
    fn insert(
        &mut self,
        into: &str,
        template: &[&str],
        upsert: &str,
        rows: usize,
        args: Args<'_>,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
}

/// `args` as sqlx's.
fn any_args(args: Args<'_>) -> Result<AnyArguments<'_>, sqlx::Error> {
    let mut out = AnyArguments::default();
    for a in args.0 {
        match a {
            Arg::Int(v) => out.add(v),
            Arg::Float(v) => out.add(v),
            Arg::Bool(v) => out.add(v),
            Arg::Text(Some(Cow::Borrowed(v))) => out.add(v),
            Arg::Text(Some(Cow::Owned(v))) => out.add(v),
            Arg::Text(None) => out.add(None::<String>),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

impl Tx for AnyConnection {
    async fn execute(&mut self, sql: &str, args: Args<'_>) -> Result<(), LedgerError> {
        sqlx::query_with(sql, any_args(args)?).execute(self).await?;
        Ok(())
    }

    async fn fetch_optional<T: Out>(
        &mut self,
        sql: &str,
        args: Args<'_>,
    ) -> Result<Option<T>, LedgerError> {
        let row = sqlx::query_with(sql, any_args(args)?)
            .fetch_optional(self)
            .await?;
        Ok(row.as_ref().map(T::from_any).transpose()?)
    }

    async fn insert(
        &mut self,
        into: &str,
        template: &[&str],
        upsert: &str,
        rows: usize,
        args: Args<'_>,
    ) -> Result<(), LedgerError> {
        if rows == 0 {
            return Ok(());
        }
        // PostgreSQL only: the ledger writes SQLite through its writer.
        let per_row = args.len() / rows;
        for chunk in args.0.chunks(PG_ROWS * per_row) {
            let real = chunk.len() / per_row;
            let size = real.next_power_of_two();
            let mut values = Vec::with_capacity(size * per_row + 1);
            values.extend_from_slice(chunk);
            let last = &chunk[chunk.len() - per_row..];
            for _ in real..size {
                values.extend_from_slice(last);
            }
            values.push(Arg::Int(Some(real as i64)));
            let sql = padded_insert(into, template, upsert, size);
            sqlx::query_with(&sql, any_args(Args(values))?)
                .execute(&mut *self)
                .await?;
        }
        Ok(())
    }
}

/// The text of a PostgreSQL insert of up to `size` rows: `INSERT INTO
/// {into} SELECT column2, … FROM (VALUES (1, $1, …), (2, …), …) v WHERE
/// column1 <= $last {upsert}`, each row numbered by a constant of the
/// text and each of its values a parameter, `$last` the number of rows
/// that are real. The rows past `$last` repeat the last real one, never
/// written: the filter is on the row's own number, whatever order the
/// database reads the list in.
fn padded_insert(into: &str, template: &[&str], upsert: &str, size: usize) -> String {
    let values = super::rows::values(size, template, true);
    let last = size
        * template
            .iter()
            .map(|c| c.matches('?').count())
            .sum::<usize>()
        + 1;
    let columns: Vec<String> = (2..template.len() + 2)
        .map(|c| format!("column{c}"))
        .collect();
    format!(
        "INSERT INTO {into} SELECT {} FROM (VALUES {values}) v WHERE column1 <= ${last} {upsert}",
        columns.join(", ")
    )
}

/// Most rows in one PostgreSQL insert. Each insert of up to this many
/// rows is one statement of the next power of two rows, the rest padding
/// that is never written ([`padded_insert`]): one round trip, and at
/// most seven texts per table whatever a report's row count, each kept
/// prepared (sqlx's cache, 100 a connection) so PostgreSQL parses and
/// plans it once. A text per row count once filled the cache with texts
/// used once (`rows::insert`); runs of powers of two without padding
/// (50 rows as 32, 16 and 2) cost two round trips more per table, each
/// 0.03–0.07 ms of CPU for the aggregator and the database together
/// (BENCHMARKS.md § 6).
const PG_ROWS: usize = 64;

/// How `rows` rows are written as statements of a power of two rows
/// each, at most `largest` (a power of two): `(rows per statement, times
/// it runs)`, as many of `largest` as fit, then each smaller power at
/// most once. 50 rows with `largest` 16 are `(16, 3), (2, 1)`.
fn runs(rows: usize, largest: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut rest = rows;
    std::iter::successors(Some(largest), |r| (*r > 1).then_some(r / 2))
        .map(move |r| {
            let times = rest / r;
            rest %= r;
            (r, times)
        })
        .filter(|&(_, times)| times > 0)
}

/// Binds `a` as parameter `i` (1-based).
fn bind_sqlite(stmt: &mut rusqlite::Statement<'_>, i: usize, a: &Arg<'_>) -> rusqlite::Result<()> {
    use rusqlite::types::Null;
    match a {
        Arg::Int(Some(v)) => stmt.raw_bind_parameter(i, v),
        Arg::Float(v) => stmt.raw_bind_parameter(i, v),
        Arg::Bool(v) => stmt.raw_bind_parameter(i, v),
        Arg::Text(Some(v)) => stmt.raw_bind_parameter(i, v.as_ref()),
        Arg::Int(None) | Arg::Text(None) => stmt.raw_bind_parameter(i, Null),
    }
}

/// Binds `args` to `$1`, `$2`, … by name (SQLite numbers named
/// parameters in the order they first appear in the text); a number the
/// statement does not name is left out, as a period read names `$5` only
/// when it keeps one cluster.
pub(super) fn bind_numbered(
    stmt: &mut rusqlite::Statement<'_>,
    args: &Args<'_>,
) -> rusqlite::Result<()> {
    for (n, a) in args.0.iter().enumerate() {
        if let Some(i) = stmt.parameter_index(&format!("${}", n + 1))? {
            bind_sqlite(stmt, i, a)?;
        }
    }
    Ok(())
}

impl Tx for rusqlite::Connection {
    async fn execute(&mut self, sql: &str, args: Args<'_>) -> Result<(), LedgerError> {
        let mut stmt = self.prepare_cached(sql)?;
        bind_numbered(&mut stmt, &args)?;
        stmt.raw_execute()?;
        Ok(())
    }

    async fn fetch_optional<T: Out>(
        &mut self,
        sql: &str,
        args: Args<'_>,
    ) -> Result<Option<T>, LedgerError> {
        let mut stmt = self.prepare_cached(sql)?;
        bind_numbered(&mut stmt, &args)?;
        let mut rows = stmt.raw_query();
        Ok(match rows.next()? {
            Some(row) => Some(T::from_sqlite(row)?),
            None => None,
        })
    }

    async fn insert(
        &mut self,
        into: &str,
        template: &[&str],
        upsert: &str,
        rows: usize,
        args: Args<'_>,
    ) -> Result<(), LedgerError> {
        if rows == 0 {
            return Ok(());
        }
        let per_row = args.len() / rows;
        let sql = |rows| {
            format!(
                "INSERT INTO {into} VALUES {} {upsert}",
                super::rows::values(rows, template, false)
            )
        };
        let mut rest = &args.0[..];
        for (run, times) in runs(rows, SQLITE_ROWS) {
            let (these, left) = rest.split_at(run * times * per_row);
            execute_each(self, &sql(run), these, run * per_row)?;
            rest = left;
        }
        Ok(())
    }
}

/// Most rows per statement of the SQLite writer's inserts. Every
/// execution of a statement sets up its program and opens and closes a
/// cursor on each of the table's B-trees: in runs of rows that is paid
/// once per run (callgrind: 7.5 % of the writer's instructions at 50
/// rows per table, BENCHMARKS.md § 6). Runs of powers of two keep at
/// most five statements per table prepared whatever a report's row count
/// (the writer's cache holds 64).
const SQLITE_ROWS: usize = 16;

/// Runs the prepared `sql` once per `per_execution` values of `args`.
fn execute_each(
    conn: &rusqlite::Connection,
    sql: &str,
    args: &[Arg<'_>],
    per_execution: usize,
) -> Result<(), LedgerError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut previous: Option<&[Arg<'_>]> = None;
    for values in args.chunks(per_execution) {
        for (i, a) in values.iter().enumerate() {
            // A value stays bound from one execution to the next: a text
            // the execution before had at this parameter (the report's
            // node, cluster, model on every row) is not copied again.
            if let (Arg::Text(text), Some(Arg::Text(before))) = (a, previous.map(|p| &p[i]))
                && text == before
            {
                continue;
            }
            bind_sqlite(&mut stmt, i + 1, a)?;
        }
        stmt.raw_execute()?;
        previous = Some(values);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_insert_numbers_its_rows_and_keeps_the_real_ones() {
        assert_eq!(
            padded_insert(
                "t (a, b)",
                &["?", "NULLIF(?, -1.0)"],
                "ON CONFLICT DO NOTHING",
                2
            ),
            "INSERT INTO t (a, b) SELECT column2, column3 FROM (VALUES (1, $1, NULLIF($2, -1.0)), \
             (2, $3, NULLIF($4, -1.0))) v WHERE column1 <= $5 ON CONFLICT DO NOTHING"
        );
    }

    #[test]
    fn rows_go_in_runs_of_powers_of_two() {
        let runs = |rows, largest| runs(rows, largest).collect::<Vec<_>>();
        assert_eq!(runs(50, 16), [(16, 3), (2, 1)]);
        assert_eq!(runs(8, 64), [(8, 1)]);
        assert_eq!(runs(200, 64), [(64, 3), (8, 1)]);
        assert_eq!(
            runs(127, 64),
            [(64, 1), (32, 1), (16, 1), (8, 1), (4, 1), (2, 1), (1, 1)]
        );
        assert_eq!(runs(0, 16), []);
        for rows in 0..300 {
            let written: usize = runs(rows, 16).iter().map(|(r, t)| r * t).sum();
            assert_eq!(written, rows);
        }
    }

    /// The SQLite writer writes rows in runs of 16, 8, 4, 2 and 1 per
    /// statement, and keeps a text bound where the statement's execution
    /// before had the same one: every row still stores its own values,
    /// nulls included, in order, and a statement taken again from the
    /// cache by the next insert binds its first execution whole.
    #[tokio::test]
    async fn every_row_is_stored_whatever_runs_it_is_written_in() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER, a TEXT, b TEXT)")
            .unwrap();
        let text = |t: Option<&'static str>| Arg::Text(t.map(Cow::Borrowed));
        // 39 rows: two runs of 16, then 4, 2, 1. Column a repeats within
        // and across runs, with nulls between; b changes every 5 rows.
        let rows: Vec<(i64, Option<&'static str>, Option<&'static str>)> = (0..39)
            .map(|n| {
                let a = (n % 3 != 0).then_some("x");
                let b = ["p", "q", "r", "s", "t", "u", "v", "w"][n as usize / 5];
                (n, a, Some(b).filter(|_| n % 7 != 0))
            })
            .collect();
        // The second insert reuses the statements the first left bound
        // with other values.
        for batch in [&rows[..], &rows[3..20]] {
            let mut a = Args::with_capacity(batch.len() * 3);
            for &(n, x, y) in batch {
                let Ok(()) = a.add(n);
                let Ok(()) = a.add(text(x));
                let Ok(()) = a.add(text(y));
            }
            conn.insert("t (n, a, b)", &["?", "?", "?"], "", batch.len(), a)
                .await
                .unwrap();
        }
        let stored: Vec<(i64, Option<String>, Option<String>)> = conn
            .prepare("SELECT n, a, b FROM t ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<_> = rows
            .iter()
            .chain(&rows[3..20])
            .map(|&(n, x, y)| (n, x.map(String::from), y.map(String::from)))
            .collect();
        assert_eq!(stored, expected);
    }
}
