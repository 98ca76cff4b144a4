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

/// `rows` tuples of `template`. SQLite's are positional, each `?` a
/// parameter bound by its place: `values(2, &["?", "NULLIF(?, -1.0)"],
/// false)` is `(?, NULLIF(?, -1.0)), (?, NULLIF(?, -1.0))` (bound by name,
/// SQLite finds a name in a list of all of them, which made binding a
/// 650-parameter statement cost more than running it: 40 % of the
/// aggregator's CPU in `sqlite3_bind_parameter_name`, BENCHMARKS.md § 6).
/// PostgreSQL's are `numbered`: each tuple led by its row's number (see
/// `tx::padded_insert`) and each `?` the next `$n`, so the same call is
/// `(1, $1, NULLIF($2, -1.0)), (2, $3, NULLIF($4, -1.0))`.
pub(super) fn values(rows: usize, template: &[&str], numbered: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows * template.len() * 6);
    let mut n = 0;
    for r in 1..=rows {
        out.push_str(if r > 1 { ", (" } else { "(" });
        if numbered {
            let _ = write!(out, "{r}, ");
        }
        for (c, col) in template.iter().enumerate() {
            if c > 0 {
                out.push_str(", ");
            }
            for (i, part) in col.split('?').enumerate() {
                if i > 0 {
                    if numbered {
                        n += 1;
                        let _ = write!(out, "${n}");
                    } else {
                        out.push('?');
                    }
                }
                out.push_str(part);
            }
        }
        out.push(')');
    }
    out
}

/// `count` plain placeholders: a one-row template.
pub(super) fn plain(count: usize) -> Vec<&'static str> {
    vec!["?"; count]
}

/// Writes `rows` into `into` (`table (columns)`), [`MAX_ROWS`] of them
/// at a time: `template` is one row's values, each `?` a parameter
/// (`NULLIF(?, -1.0)` for an optional double), `upsert` what follows the
/// rows (an `ON CONFLICT` clause, or nothing), and `bind` adds one row's
/// values in the template's order.
///
/// Each driver keeps a few statement texts per table, prepared, whatever
/// the row count ([`Tx`]): PostgreSQL at most seven (one statement per
/// 64 rows, padded to a power of two), SQLite at most five (runs of 16,
/// 8, 4, 2 and 1 rows). A text per row count, kept, once filled sqlx's
/// per-connection cache (100 statements, each pool connection its own)
/// with texts used once: reports of 1 to 150 tenants grew the aggregator
/// by 44 MiB (the 22-minute soak's +40 MiB/h, docs/faults.md).
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
    /// Inserts of 1 to 40 rows and of 100 store every value as it was
    /// bound (the extremes of each type, NULLs, texts with quotes) and no
    /// padding row, and keep seven statements prepared (1, 2, 4, …, 64
    /// rows), not one per row count.
    #[tokio::test]
    async fn postgres_rows_arrive_exactly_through_a_few_kept_statements() {
        let Some(url) = std::env::var("TALLY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            eprintln!("skipped: no TALLY_TEST_POSTGRES_URL (cargo xtask test sets it)");
            return;
        };
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect(&url).await.unwrap();
        Executor::execute(
            &mut conn,
            "CREATE TEMP TABLE t (n BIGINT, i BIGINT, v BIGINT, f DOUBLE PRECISION, s TEXT, \
             o TEXT, b BOOLEAN, PRIMARY KEY (n, i))",
        )
        .await
        .unwrap();
        let prepared = async |conn: &mut AnyConnection| -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_statements")
                .persistent(false)
                .fetch_one(conn)
                .await
                .unwrap()
        };
        let ints = [i64::MIN, -1, 0, 1, 9_007_199_254_740_993, i64::MAX];
        let floats = [
            0.1,
            -0.0,
            1e-300,
            f64::MIN_POSITIVE,
            f64::MAX,
            2.0f64.powi(60) + 1.0,
            1.0 / 3.0,
        ];
        let texts = [
            "plain",
            "",
            "quote \" and \\ backslash",
            "tab\tnewline\ncontrol\u{1}",
            "ünïcödé ✓ 𝄞",
            "{\"c0\": 1}",
        ];
        type Row = (i64, i64, i64, f64, String, Option<String>, bool);
        let row = |n: i64, i: i64| -> Row {
            let k = (n + i) as usize;
            (
                n,
                i,
                ints[k % ints.len()],
                floats[k % floats.len()],
                texts[k % texts.len()].to_owned(),
                (!k.is_multiple_of(3)).then(|| texts[(k + 1) % texts.len()].to_owned()),
                k.is_multiple_of(2),
            )
        };
        let before = prepared(&mut conn).await;
        let mut expected: Vec<Row> = Vec::new();
        for n in (1..=40i64).chain([100]) {
            let rows: Vec<Row> = (0..n).map(|i| row(n, i)).collect();
            insert(
                &mut conn,
                "t (n, i, v, f, s, o, b)",
                &plain(7),
                "",
                &rows,
                |a, (n, i, v, f, s, o, b)| {
                    a.add(*n)?;
                    a.add(*i)?;
                    a.add(*v)?;
                    a.add(*f)?;
                    a.add(s)?;
                    a.add(o.as_deref())?;
                    a.add(*b)
                },
            )
            .await
            .unwrap();
            expected.extend(rows);
        }
        let stored: Vec<Row> = sqlx::query_as("SELECT n, i, v, f, s, o, b FROM t ORDER BY n, i")
            .persistent(false)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored.len(), expected.len(), "every row once");
        for (s, e) in stored.iter().zip(&expected) {
            assert_eq!(
                (s.0, s.1, s.2, &s.4, &s.5, s.6),
                (e.0, e.1, e.2, &e.4, &e.5, e.6)
            );
            assert_eq!(s.3.to_bits(), e.3.to_bits(), "every bit of {} kept", e.3);
        }
        assert_eq!(prepared(&mut conn).await - before, 7);

        // An upsert's rows arrive the same way.
        insert(
            &mut conn,
            "t (n, i, v, f, s, o, b)",
            &plain(7),
            "ON CONFLICT (n, i) DO UPDATE SET f = t.f + excluded.f",
            &[(1i64, 0i64, 0.5)],
            |a, (n, i, f)| {
                a.add(*n)?;
                a.add(*i)?;
                a.add(0)?;
                a.add(*f)?;
                a.add("x")?;
                a.add(None::<&str>)?;
                a.add(false)
            },
        )
        .await
        .unwrap();
        let f: f64 = sqlx::query_scalar("SELECT f FROM t WHERE n = 1")
            .persistent(false)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(f, row(1, 0).3 + 0.5);
    }

    #[test]
    fn sqlite_rows_are_positional() {
        assert_eq!(
            values(2, &["?", "NULLIF(?, -1.0)"], false),
            "(?, NULLIF(?, -1.0)), (?, NULLIF(?, -1.0))"
        );
        assert_eq!(values(1, &plain(3), false), "(?, ?, ?)");
    }

    #[test]
    fn postgres_rows_are_numbered_across_rows() {
        assert_eq!(
            values(2, &["?", "NULLIF(?, -1.0)"], true),
            "(1, $1, NULLIF($2, -1.0)), (2, $3, NULLIF($4, -1.0))"
        );
        assert_eq!(values(1, &plain(3), true), "(1, $1, $2, $3)");
    }
}
