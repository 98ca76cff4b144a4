//! Multi-row statements: the `VALUES (…), (…)` list of an INSERT that
//! writes many rows with one round trip, in either dialect.

use std::convert::Infallible;

use super::{
    LedgerError,
    tx::{Args, Tx},
};

/// Most rows in one statement: keeps the bound parameters far below
/// SQLite's 32,766 and PostgreSQL's 65,535.
const MAX_ROWS: usize = 1000;

/// `rows` tuples of `template`, whose every `?` becomes the next numbered
/// parameter (`$1`, `$2`, …) where `numbered`: `values(2, &["?",
/// "NULLIF(?, -1.0)"], true)` is `($1, NULLIF($2, -1.0)), ($3, NULLIF($4,
/// -1.0))`. SQLite gets plain `?`: sqlx looks up every parameter's name,
/// and SQLite finds a name in a list of all of them, which made binding a
/// 650-parameter statement cost more than running it (40 % of the
/// aggregator's CPU in `sqlite3_bind_parameter_name`, BENCHMARKS.md § 6).
pub(super) fn values(rows: usize, template: &[&str], numbered: bool) -> String {
    let mut out = String::with_capacity(rows * template.len() * 6);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (c, col) in template.iter().enumerate() {
            if c > 0 {
                out.push_str(", ");
            }
            for ch in col.chars() {
                if ch == '?' && numbered {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(ch);
                }
            }
        }
        out.push(')');
    }
    out
}

/// `count` plain placeholders: a tuple template for [`values`].
pub(super) fn plain(count: usize) -> Vec<&'static str> {
    vec!["?"; count]
}

/// Writes `rows` with one `INSERT INTO {into} VALUES (…), (…) {upsert}`
/// per [`MAX_ROWS`] of them: `template` is one row's placeholders (see
/// [`values`]), `upsert` what follows the list (an `ON CONFLICT` clause,
/// or nothing), and `bind` adds one row's values in the template's order.
///
/// Each driver runs the rows as statements of a power of two rows, kept
/// prepared ([`Tx`]): at most five texts per table on SQLite (16 rows at
/// most), seven on PostgreSQL (64). A text per row count, kept, once
/// filled sqlx's per-connection cache (100 statements, each pool
/// connection its own) with texts used once: on SQLite, reports of 1 to
/// 150 tenants grew the aggregator by 44 MiB (the 22-minute soak's
/// +40 MiB/h, docs/faults.md).
pub(super) async fn insert<'a, T>(
    conn: &mut impl Tx,
    into: &str,
    template: &[&str],
    upsert: &str,
    rows: &'a [T],
    bind: impl Fn(&mut Args<'a>, &'a T) -> Result<(), Infallible>,
) -> Result<(), LedgerError> {
    for chunk in rows.chunks(MAX_ROWS) {
        let mut args = Args::with_capacity(chunk.len() * template.len());
        for row in chunk {
            let Ok(()) = bind(&mut args, row);
        }
        conn.insert(into, template, upsert, chunk.len(), args)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::{AnyConnection, Connection, Executor};

    use super::*;

    /// Runs on the test PostgreSQL that `cargo xtask test` starts
    /// (`TALLY_TEST_POSTGRES_URL`), whose `pg_prepared_statements` lists
    /// what the connection keeps prepared; says skipped without one.
    /// Inserts of 1 to 40 rows keep six statements, of 1, 2, 4, 8, 16
    /// and 32 rows, not one per row count.
    #[tokio::test]
    async fn statements_are_kept_prepared_per_run_not_per_row_count() {
        let Some(url) = std::env::var("TALLY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            eprintln!("skipped: no TALLY_TEST_POSTGRES_URL (cargo xtask test sets it)");
            return;
        };
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect(&url).await.unwrap();
        Executor::execute(&mut conn, "CREATE TEMP TABLE t (a BIGINT, b BIGINT)")
            .await
            .unwrap();
        let prepared = async |conn: &mut AnyConnection| -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_statements")
                .persistent(false)
                .fetch_one(conn)
                .await
                .unwrap()
        };
        let before = prepared(&mut conn).await;
        for n in 1..=40i64 {
            let rows: Vec<i64> = (0..n).collect();
            insert(&mut conn, "t (a, b)", &plain(2), "", &rows, |a, v| {
                a.add(*v)?;
                a.add(n)
            })
            .await
            .unwrap();
        }
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .persistent(false)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored, 40 * 41 / 2);
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT a, b FROM t ORDER BY b, a")
            .persistent(false)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let expected: Vec<(i64, i64)> = (1..=40i64)
            .flat_map(|n| (0..n).map(move |a| (a, n)))
            .collect();
        assert_eq!(rows, expected, "every row once, with its own values");
        assert_eq!(prepared(&mut conn).await - before, 6);
    }

    #[test]
    fn parameters_are_numbered_across_rows() {
        assert_eq!(
            values(2, &["?", "NULLIF(?, -1.0)"], true),
            "($1, NULLIF($2, -1.0)), ($3, NULLIF($4, -1.0))"
        );
        assert_eq!(values(1, &plain(3), true), "($1, $2, $3)");
        assert_eq!(values(2, &plain(2), false), "(?, ?), (?, ?)");
    }
}
