//! Where a report's statements run: one trait, [`Tx`], over the two
//! drivers, so [`super::ingest::write`] is written once.
//!
//! - **sqlx** (`PgConnection`): PostgreSQL, each request its own
//!   transaction on the ledger's ingest pool. A multi-row insert is one
//!   statement, each column's values one array ([`unnest_insert`]), and
//!   the writes of a report nobody reads back are one statement together
//!   ([`Tx::write_all`]).
//! - **rusqlite** (`rusqlite::Connection`): the SQLite writer's thread
//!   ([`super::writer`]). Through sqlx every statement was a round trip
//!   to its worker thread and back, with each value copied on the way:
//!   the writer's core idled between statements while the runtime built
//!   the next. Here the statements run where they are made, prepared once
//!   and kept (a multi-row insert runs as statements of 16, 8, 4, 2 and 1
//!   rows, whatever its row count: a few texts SQLite does not parse
//!   again).

use std::{borrow::Cow, convert::Infallible, future::Future};

use sqlx::{Arguments as _, PgConnection, Row as _, postgres::PgArguments};

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
    fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error>;
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

impl Out for i64 {
    fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        row.try_get(0)
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Out for String {
    fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        row.try_get(0)
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Out for (String, i64) {
    fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

impl Out for (i64, Option<i64>) {
    fn from_pg(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

/// A statement of a report's write whose result nobody reads: one of
/// [`Tx::write_all`]'s.
#[derive(Debug)]
pub(super) enum Write<'a> {
    /// `sql`, its parameters `$1`, `$2`, … of its own.
    Execute {
        sql: &'static str,
        args: Args<'a>,
    },
    Insert(Insert<'a>),
}

/// `INSERT INTO {into} … {upsert}` of `rows` rows: `template` is one row's
/// placeholders, each `?` a value of `args`, row after row.
#[derive(Debug)]
pub(super) struct Insert<'a> {
    pub into: &'static str,
    pub template: &'static [&'static str],
    pub upsert: &'static str,
    pub rows: usize,
    pub args: Args<'a>,
}

impl Write<'_> {
    /// How many rows it writes at most: none for an insert of none.
    fn rows(&self) -> usize {
        match self {
            Write::Execute { .. } => 1,
            Write::Insert(i) => i.rows,
        }
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

    /// Runs `writes` in their order, none of which reads what another
    /// writes (on PostgreSQL they share one snapshot). PostgreSQL runs them
    /// as one statement, each but the last a data-modifying `WITH` of it:
    /// a round trip for all of them, where each cost the aggregator and
    /// the database 0.03–0.07 ms of CPU. SQLite runs them one after
    /// another in the writer's thread.
    fn write_all(
        &mut self,
        writes: Vec<Write<'_>>,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
}

/// `args` as sqlx's.
fn pg_args(args: &Args<'_>) -> Result<PgArguments, sqlx::Error> {
    let mut out = PgArguments::default();
    add_values(&mut out, args)?;
    Ok(out)
}

/// `args` onto `out`, each a value.
fn add_values(out: &mut PgArguments, args: &Args<'_>) -> Result<(), sqlx::Error> {
    for a in &args.0 {
        match a {
            Arg::Int(v) => out.add(*v),
            Arg::Float(v) => out.add(*v),
            Arg::Bool(v) => out.add(*v),
            Arg::Text(v) => out.add(v.as_deref()),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(())
}

/// The `rows` rows of `args` (row after row) onto `out` as one array per
/// column, for `unnest` ([`unnest_insert`]).
fn add_columns(out: &mut PgArguments, args: &Args<'_>, rows: usize) -> Result<(), sqlx::Error> {
    let per_row = args.len() / rows;
    for c in 0..per_row {
        let all = &args.0[c..];
        match &all[0] {
            Arg::Int(_) => out.add(column(all, per_row, |a| match a {
                Arg::Int(v) => Some(*v),
                _ => None,
            })?),
            Arg::Float(_) => out.add(column(all, per_row, |a| match a {
                Arg::Float(v) => Some(*v),
                _ => None,
            })?),
            Arg::Bool(_) => out.add(column(all, per_row, |a| match a {
                Arg::Bool(v) => Some(*v),
                _ => None,
            })?),
            Arg::Text(_) => out.add(column(all, per_row, |a| match a {
                Arg::Text(v) => Some(v.as_deref()),
                _ => None,
            })?),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(())
}

/// Every `per_row`-th value of `values` from the first (one column of
/// rows), each picked out by `get`: an error where one is of another
/// type than the column's.
fn column<'v, 'a: 'v, T>(
    values: &'v [Arg<'a>],
    per_row: usize,
    get: impl Fn(&'v Arg<'a>) -> Option<T>,
) -> Result<Vec<T>, sqlx::Error> {
    values
        .iter()
        .step_by(per_row)
        .map(|a| get(a).ok_or_else(|| sqlx::Error::Encode("an insert's column mixes types".into())))
        .collect()
}

impl Tx for PgConnection {
    async fn execute(&mut self, sql: &str, args: Args<'_>) -> Result<(), LedgerError> {
        sqlx::query_with(sql, pg_args(&args)?).execute(self).await?;
        Ok(())
    }

    async fn fetch_optional<T: Out>(
        &mut self,
        sql: &str,
        args: Args<'_>,
    ) -> Result<Option<T>, LedgerError> {
        let row = sqlx::query_with(sql, pg_args(&args)?)
            .fetch_optional(self)
            .await?;
        Ok(row.as_ref().map(T::from_pg).transpose()?)
    }

    async fn write_all(&mut self, writes: Vec<Write<'_>>) -> Result<(), LedgerError> {
        let writes: Vec<Write<'_>> = writes.into_iter().filter(|w| w.rows() > 0).collect();
        if writes.is_empty() {
            return Ok(());
        }
        let (sql, values) = with_statement(&writes)?;
        sqlx::query_with(&sql, values).execute(self).await?;
        Ok(())
    }
}

/// The text of a PostgreSQL insert of any number of rows, each column's
/// values one array parameter: `INSERT INTO {into} SELECT c1, NULLIF(c2,
/// -1.0), … FROM (SELECT unnest($1) AS c1, unnest($2) AS c2, …) v
/// {upsert}`, the template's `?` named in order. One text per table,
/// whatever the row count, kept prepared. PostgreSQL reads the arrays in
/// step, a row at a time: a padded `VALUES` list had it set up and
/// evaluate an expression per value, and `FROM UNNEST($1, $2, …)` first
/// copied each array into a tuple store of its own (PostgreSQL's CPU per
/// report −25 % against that, BENCHMARKS.md § 6). The arrays of one
/// insert are as long as each other, so none is cut short or padded.
fn unnest_insert(into: &str, template: &[&str], upsert: &str) -> String {
    use std::fmt::Write as _;
    let mut select = String::new();
    let mut n = 0;
    for (c, column) in template.iter().enumerate() {
        if c > 0 {
            select.push_str(", ");
        }
        for (i, part) in column.split('?').enumerate() {
            if i > 0 {
                n += 1;
                let _ = write!(select, "c{n}");
            }
            select.push_str(part);
        }
    }
    let columns: Vec<String> = (1..=n).map(|k| format!("unnest(${k}) AS c{k}")).collect();
    format!(
        "INSERT INTO {into} SELECT {select} FROM (SELECT {}) v {upsert}",
        columns.join(", ")
    )
}

/// `writes` (none empty) as one PostgreSQL statement and its values:
/// `WITH w0 AS (…), w1 AS (…) …`, the last write the statement itself,
/// each write's parameters numbered on from the one before's.
/// PostgreSQL runs every data-modifying `WITH` to completion whether or
/// not anything reads it.
fn with_statement(writes: &[Write<'_>]) -> Result<(String, PgArguments), sqlx::Error> {
    use std::fmt::Write as _;
    let last = writes.len().saturating_sub(1);
    let mut sql = String::new();
    let mut values = PgArguments::default();
    let mut bound = 0;
    for (n, w) in writes.iter().enumerate() {
        let (text, count) = match w {
            Write::Execute { sql, args } => {
                add_values(&mut values, args)?;
                (Cow::Borrowed(*sql), args.len())
            }
            Write::Insert(i) => {
                add_columns(&mut values, &i.args, i.rows)?;
                (
                    Cow::Owned(unnest_insert(i.into, i.template, i.upsert)),
                    i.args.len() / i.rows,
                )
            }
        };
        match (n, n == last) {
            (0, false) => sql.push_str("WITH w0 AS ("),
            (_, false) => {
                let _ = write!(sql, "), w{n} AS (");
            }
            (0, true) => {}
            (_, true) => sql.push_str(") "),
        }
        shift_parameters(&mut sql, &text, bound);
        bound += count;
    }
    Ok((sql, values))
}

/// `text` onto `out`, each parameter `$n` as `$(n + by)`.
fn shift_parameters(out: &mut String, text: &str, by: usize) {
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
}

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

    async fn write_all(&mut self, writes: Vec<Write<'_>>) -> Result<(), LedgerError> {
        for w in writes {
            match w {
                Write::Execute { sql, args } => self.execute(sql, args).await?,
                Write::Insert(i) => sqlite_insert(self, &i)?,
            }
        }
        Ok(())
    }
}

/// `INSERT INTO {into} VALUES {rows tuples of template} {upsert}` on the
/// SQLite writer's connection, in runs of [`SQLITE_ROWS`], 8, 4, 2 and 1
/// rows.
fn sqlite_insert(conn: &rusqlite::Connection, insert: &Insert<'_>) -> Result<(), LedgerError> {
    let Insert {
        into,
        template,
        upsert,
        rows,
        ref args,
    } = *insert;
    if rows == 0 {
        return Ok(());
    }
    let per_row = args.len() / rows;
    let sql = |rows| {
        format!(
            "INSERT INTO {into} VALUES {} {upsert}",
            super::rows::values(rows, template)
        )
    };
    let mut rest = &args.0[..];
    for (run, times) in runs(rows, SQLITE_ROWS) {
        let (these, left) = rest.split_at(run * times * per_row);
        execute_each(conn, &sql(run), these, run * per_row)?;
        rest = left;
    }
    Ok(())
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
    fn a_postgres_insert_unnests_one_array_per_column() {
        assert_eq!(
            unnest_insert(
                "t (a, b)",
                &["?", "NULLIF(?, -1.0)"],
                "ON CONFLICT DO NOTHING"
            ),
            "INSERT INTO t (a, b) SELECT c1, NULLIF(c2, -1.0) FROM (SELECT unnest($1) AS c1, \
             unnest($2) AS c2) v ON CONFLICT DO NOTHING"
        );
    }

    #[test]
    fn parameters_are_numbered_on() {
        let mut out = String::from("x ");
        shift_parameters(&mut out, "$1, $12, NULLIF($3, -1.0) $ $", 10);
        assert_eq!(out, "x $11, $22, NULLIF($13, -1.0) $ $");
    }

    /// A report's writes as one PostgreSQL statement: each but the last a
    /// `WITH`, the parameters numbered on from write to write, an insert
    /// one array per column whatever its rows.
    #[test]
    fn writes_are_one_postgres_statement() {
        let int = |v: i64| Arg::Int(Some(v));
        let writes = vec![
            Write::Execute {
                sql: "DELETE FROM q WHERE node = $1",
                args: args(["n".into()]),
            },
            Write::Insert(Insert {
                into: "t (a, b)",
                template: &["?", "NULLIF(?, -1.0)"],
                upsert: "",
                rows: 3,
                args: Args(vec![int(1), int(2), int(3), int(4), int(5), int(6)]),
            }),
            Write::Execute {
                sql: "INSERT INTO b AS o (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE \
                      SET v = o.v + excluded.v",
                args: args(["k".into(), 7.into()]),
            },
        ];
        let (sql, values) = with_statement(&writes).unwrap();
        assert_eq!(
            sql,
            "WITH w0 AS (DELETE FROM q WHERE node = $1), w1 AS (INSERT INTO t (a, b) SELECT \
             c1, NULLIF(c2, -1.0) FROM (SELECT unnest($2) AS c1, unnest($3) AS c2) v ) INSERT \
             INTO b AS o (k, v) VALUES ($4, $5) ON CONFLICT (k) DO UPDATE SET v = o.v + \
             excluded.v"
        );
        assert_eq!(values.len(), 5);
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
        let conn = rusqlite::Connection::open_in_memory().unwrap();
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
            let insert = Insert {
                into: "t (n, a, b)",
                template: &["?", "?", "?"],
                upsert: "",
                rows: batch.len(),
                args: a,
            };
            sqlite_insert(&conn, &insert).unwrap();
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
